"""The packing loader: BOS-aligned rows, nothing lost but the counted crops, disjoint ranks, exact
resume, FIM only on train, errors from the background thread."""

import gc
import io
import re

import pytest
import torch

from nanocode.common import NanocodeError
from nanocode.dataloader import DataLoader, chunk_text
from nanocode.fim import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from tests.helpers import make_docs, trained_tokenizer, undo_fim, write_corpus

N_PER_SHARD, N_TRAIN_SHARDS = 40, 3


@pytest.fixture(scope="module")
def docs():
    return make_docs(N_PER_SHARD * N_TRAIN_SHARDS + 10, seed=0, max_lines=16)


@pytest.fixture(scope="module")
def tok(docs):
    return trained_tokenizer(docs[:30])


@pytest.fixture(autouse=True)
def corpus(docs, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCODE_BASE_DIR", str(tmp_path))
    write_corpus(
        tmp_path / "data" / "code", docs, per_shard=N_PER_SHARD
    )  # 3 train shards + 1 val shard of 10


def rows_of(inputs, targets):
    return torch.cat([inputs, targets[:, -1:]], dim=1)


def segments(row):
    """Split a row at its BOS tokens: one list of ids per document (BOS included)."""
    starts = (row == 0).nonzero().flatten().tolist() + [len(row)]
    return [row[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]


def doc_index(tok, seg):
    m = re.match(r"# doc (\d+)\n", tok.decode(seg[1:]))
    return int(m.group(1)) if m else None


def test_chunk_text():
    text = "".join(f"line {i}\n" for i in range(100))
    for max_chars in (1, 7, 30, 100, 10_000):
        chunks = chunk_text(text, max_chars)
        assert "".join(chunks) == text and all(0 < len(c) <= max_chars for c in chunks)
        if max_chars >= 8:
            assert all(c.endswith("\n") for c in chunks)  # cut at line ends when a line fits
    assert chunk_text(text, 0) == [text]


def test_rows_start_with_bos_and_targets_are_shifted(tok):
    loader = DataLoader(tok, B=3, T=64, buffer_size=8)
    for _ in range(10):
        x, y = next(loader)
        assert x.shape == y.shape == (3, 64) and x.dtype == y.dtype == torch.int64
        assert (x[:, 0] == tok.bos_id).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert x.is_contiguous() and y.is_contiguous()
    loader.close()


def test_no_token_lost_except_counted_crops(tok, docs):
    """Every row segment is a whole document or, at a row's end only, a cropped one; the tokens of
    all documents read equal tokens in rows + tokens cropped + tokens still waiting in the buffer
    (nothing lost or duplicated)."""
    full = {i: [tok.bos_id] + tok.encode(d) for i, d in enumerate(docs)}
    loader = DataLoader(tok, B=4, T=128, fim_rate=0.0, max_doc_chars=0, buffer_size=6)
    seen, rows_tokens = [], 0
    for _ in range(1000):  # until the loader is into its second epoch
        if loader.state_dict()["epoch"] >= 1:
            break
        for row in rows_of(*next(loader)):
            rows_tokens += len(row)
            segs = segments(row)
            for k, seg in enumerate(segs):
                i = doc_index(tok, seg)
                if (
                    i is None
                ):  # a crop shorter than its "# doc N" header: check it is some document's prefix
                    assert k == len(segs) - 1 and any(f[: len(seg)] == seg for f in full.values())
                    continue
                assert seg == full[i][: len(seg)]
                assert (
                    len(seg) == len(full[i]) or k == len(segs) - 1
                )  # cropped only at the end of a row
                seen.append(i)
    sd = loader.state_dict()
    loader.close()
    assert sd["tokens_packed"] == rows_tokens and sd["epoch"] == 1
    # documents read so far: every full epoch, plus the current one up to the cursor
    read = sd["epoch"] * sum(len(full[i]) for i in range(N_PER_SHARD * N_TRAIN_SHARDS))
    read += sum(
        len(full[s * N_PER_SHARD + r])
        for s in range(N_TRAIN_SHARDS)
        for r in range(N_PER_SHARD)
        if (s, r) < (sd["shard"], sd["row"])
    )
    assert read == sd["tokens_packed"] + sd["tokens_cropped"] + len(sd["buffer_tokens"])
    assert (
        len(seen) > 100 and max(seen) < N_PER_SHARD * N_TRAIN_SHARDS
    )  # never the validation documents


def reference_pack(tok, docs, B, T, buffer_size, num_batches):
    """Best-fit packing written the slow, obvious way. Ties: the latest arrival among the largest
    that fit; the earliest among the shortest when cropping."""
    stream = iter([[tok.bos_id] + tok.encode(d) for d in docs[: N_PER_SHARD * N_TRAIN_SHARDS]] * 10)
    buffer, arrival, batches = [], 0, []
    for _ in range(num_batches):
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buffer) < buffer_size:
                    buffer.append((arrival, next(stream)))
                    arrival += 1
                space = T + 1 - len(row)
                fits = [d for d in buffer if len(d[1]) <= space]
                pick = (
                    max(fits, key=lambda d: (len(d[1]), d[0]))
                    if fits
                    else min(buffer, key=lambda d: (len(d[1]), d[0]))
                )
                buffer.remove(pick)
                row += pick[1][:space]
            rows.append(row)
        batches.append(torch.tensor(rows))
    return batches


@pytest.mark.parametrize("buffer_size", [1, 4, 32])
def test_best_fit_packing_matches_reference(tok, docs, buffer_size):
    loader = DataLoader(tok, B=3, T=100, fim_rate=0.0, max_doc_chars=0, buffer_size=buffer_size)
    for want in reference_pack(tok, docs, 3, 100, buffer_size, num_batches=12):
        assert torch.equal(rows_of(*next(loader)), want)
    loader.close()


def test_bigger_buffer_crops_less(tok, docs):
    T = 2 * max(
        len(tok.encode(d)) + 1 for d in docs
    )  # every document fits in a row: crops only fill row ends
    cropped = []
    for buffer_size in (1, 64):  # buffer 1: first come, first packed
        loader = DataLoader(tok, B=4, T=T, fim_rate=0.0, max_doc_chars=0, buffer_size=buffer_size)
        for _ in range(8):
            next(loader)
        cropped.append(loader.state_dict()["tokens_cropped"])
        loader.close()
    assert cropped[0] > 0 and cropped[1] < 0.8 * cropped[0]


def test_two_ranks_see_disjoint_documents(tok):
    seen = []
    for rank in range(2):
        loader = DataLoader(
            tok, B=2, T=128, rank=rank, world_size=2, fim_rate=0.0, max_doc_chars=0, buffer_size=4
        )
        ids = set()
        for _ in range(10):
            for row in rows_of(*next(loader)):
                ids.update(
                    i for i in map(lambda s: doc_index(tok, s), segments(row)) if i is not None
                )
        loader.close()
        assert all(
            i % 2 == rank for i in ids
        )  # rank r gets rows r, r+2, ... of each 40-document shard
        seen.append(ids)
    assert seen[0].isdisjoint(seen[1]) and len(seen[0]) > 10 and len(seen[1]) > 10


@pytest.mark.parametrize("where", ["first batch", "middle", "epoch boundary"])
def test_resume_yields_exactly_the_uninterrupted_batches(tok, where):
    """With FIM and chunking of long documents on; the last case resumes 2 batches before the next
    epoch starts."""
    kwargs = dict(
        tokenizer=tok, B=4, T=128, seed=3, buffer_size=5, max_doc_chars=200, tokenizer_batch=7
    )
    ref, expected, epochs = DataLoader(**kwargs), [], []
    for _ in range(300):
        expected.append(next(ref))
        epochs.append(ref.state_dict()["epoch"])
        if epochs[-1] == 1 and len(expected) >= 12:
            break
    ref.close()
    n_first = {"first batch": 1, "middle": 7, "epoch boundary": epochs.index(1) - 2}[where]
    expected = expected[n_first : n_first + 6]
    first = DataLoader(**kwargs)
    for _ in range(n_first):
        next(first)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # through a checkpoint file, as training does
    first.close()
    resumed = DataLoader(**kwargs)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for want in expected:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    resumed.close()


def test_load_state_dict_rejects_another_config(tok):
    sd = DataLoader(tok, B=2, T=64).state_dict()
    with pytest.raises(NanocodeError, match="different config"):
        DataLoader(tok, B=2, T=64, world_size=2).load_state_dict(sd)


def test_fim_on_train_only_and_undoable(tok, docs):
    train = DataLoader(tok, B=4, T=128, seed=1, max_doc_chars=0, buffer_size=8)
    fim_docs = whole = 0
    for _ in range(20):
        for row in rows_of(*next(train)):
            segs = segments(row)
            for seg in segs[:-1]:  # the last one may be cropped
                if FIM_PREFIX in seg:
                    fim_docs += 1
                    assert seg[1] == FIM_PREFIX
                    text = undo_fim(seg[1:], tok.decode)
                    assert text in docs
                whole += 1
    train.close()
    assert 0.2 < fim_docs / whole < 0.8  # about half (loose: a few dozen documents)
    val = DataLoader(tok, B=4, T=128, split="val")
    for _ in range(5):
        x, y = next(val)
        assert not torch.isin(x, torch.tensor([FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX])).any()
    val.close()
    with pytest.raises(ValueError, match="training data only"):
        DataLoader(tok, B=4, T=128, split="val", fim_rate=0.5)


def test_errors_reach_the_caller(tok, tmp_path):
    (tmp_path / "data" / "code" / "shard_00001.parquet").write_bytes(b"garbage" * 100)
    loader = DataLoader(tok, B=2, T=64, buffer_size=4, tokenizer_batch=8)
    with pytest.raises(NanocodeError, match="shard_00001.parquet"):
        for _ in range(1000):  # the error surfaces when the loader reaches shard 1
            next(loader)
    few = DataLoader(
        tok, B=2, T=64, split="val", rank=15, world_size=16
    )  # the val shard has 10 documents
    with pytest.raises(NanocodeError, match="no documents"):
        next(few)


def test_a_dropped_loader_stops_its_thread(tok):
    loader = DataLoader(tok, B=2, T=64, prefetch=1)
    next(loader)
    thread = loader._thread
    assert thread.is_alive()
    del loader  # e.g. the validation loader made for one evaluation
    gc.collect()
    thread.join(timeout=60)
    assert not thread.is_alive()
