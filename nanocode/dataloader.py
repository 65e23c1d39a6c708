"""Pretraining batches: documents -> (FIM) -> tokens -> rows packed BOS-aligned best-fit.

Every row of T+1 tokens starts with <|bos|> at the start of a document, so no token is trained on a
context that begins in the middle of some other document. Rows are filled best-fit from a buffer of
tokenized documents: take the largest document that fits in the space left; only when none fits,
crop the shortest one to fill the row exactly (its cut-off tail is dropped: that is the only place
tokens are lost; `state_dict()["tokens_cropped"]` counts them). Rows have no padding. Ties go to the
document that arrived last among the largest that fit, and to the one that arrived first among the
shortest when cropping.

Source files are often longer than a row, and cropping them would throw most of their tokens away
(59% of all tokens on the local corpus at T=2048), so a document longer than `max_doc_chars`
(default 2*T characters, about half a row of code tokens with a 32k vocab) is first cut at line
ends into chunks; each chunk is then a document of its own (BOS, FIM). That brings cropping down to
about 13% (bench/dataloader.py).

Documents are split across DDP ranks by dataset.iter_rows (rank r takes rows r, r+w, ...). The
loader is infinite: after the last shard it starts the next epoch (same order, new FIM cuts).

Exact resume: a background thread tokenizes and packs ahead, and hands every batch over together
with the loader state right after it: (epoch, shard, row) of the next document to read, and the
documents waiting in the packing buffer. FIM randomness is seeded per (seed, epoch, shard, row,
chunk), so replaying from that state yields exactly the batches an uninterrupted loader yields next.
"""

import bisect
import queue
import random
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch

from nanocode.common import NanocodeError
from nanocode.dataset import iter_rows
from nanocode.fim import apply_fim


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Cut text into pieces of at most max_chars characters, at line ends where possible."""
    chunks, start = [], 0
    while max_chars > 0 and len(text) - start > max_chars:
        cut = text.rfind("\n", start, start + max_chars) + 1  # after the last newline that fits
        if cut <= start:  # one line longer than max_chars: cut inside it
            cut = start + max_chars
        chunks.append(text[start:cut])
        start = cut
    return chunks + [text[start:]]


class DataLoader:
    """next(loader) -> (inputs, targets), both (B, T) int64 on `device`; targets are inputs shifted
    by one.

    buffer_size: best-fit packs tighter the more documents it can choose from (fewer crops), at the
    cost of memory and of documents waiting longer; prefetch: batches packed ahead so a slow shard
    read or a long document never stalls a training step."""

    def __init__(
        self,
        tokenizer,
        B: int,
        T: int,
        split: str = "train",
        device="cpu",
        rank: int = 0,
        world_size: int = 1,
        fim_rate: float | None = None,
        seed: int = 0,
        name: str = "code",
        buffer_size: int = 512,
        max_doc_chars: int | None = None,
        tokenizer_threads: int = 4,
        tokenizer_batch: int = 128,
        prefetch: int = 4,
    ):
        """Checks the arguments and records the start state; the packing thread starts on the
        first next(). fim_rate defaults to 0.5 for train and 0 for val (val never gets FIM)."""
        if B < 1 or T < 1:
            raise ValueError(f"B and T must be positive, got B={B} T={T}")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        fim_rate = (0.5 if split == "train" else 0.0) if fim_rate is None else fim_rate
        if split == "val" and fim_rate > 0:
            raise ValueError("FIM is for training data only: use fim_rate=0 (or None) for val")
        self.tokenizer, self.device, self.prefetch = tokenizer, torch.device(device), prefetch
        max_doc_chars = 2 * T if max_doc_chars is None else max_doc_chars
        # What decides the batches: a resumed loader must have the same (load_state_dict checks).
        self.config = dict(B=B, T=T, split=split, name=name, rank=rank, world_size=world_size)
        self.config.update(seed=seed, fim_rate=fim_rate, max_doc_chars=max_doc_chars)
        self.config["vocab_size"] = getattr(tokenizer, "vocab_size", None)
        # The packing thread's copy of all it needs (it must hold no reference to the loader, see
        # _start); the rest only decides how fast batches come.
        self.settings = SimpleNamespace(
            **self.config,
            tokenizer=tokenizer,
            buffer_size=buffer_size,
            tokenizer_threads=tokenizer_threads,
            tokenizer_batch=tokenizer_batch,
            pin_memory=self.device.type == "cuda",
        )
        self._state = dict(epoch=0, shard=0, row=rank, buffer=(), tokens_packed=0, tokens_cropped=0)
        self._thread = None

    def __iter__(self):
        return self

    def __next__(self):
        """Take the next packed batch from the thread (starting it if needed), copy it to the
        device and adopt the state saved with it. An error from the thread is re-raised here."""
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        host, self._state = item
        batch = host.to(self.device, non_blocking=True)  # the one host-to-device copy of this batch
        return batch[0], batch[1]

    def state_dict(self) -> dict:
        """The state after the last batch returned: plain ints and tensors (torch.save /
        weights_only friendly)."""
        state = dict(self._state)
        buffer = list(state.pop("buffer"))
        tokens = np.concatenate(buffer) if buffer else np.zeros(0, np.int32)
        state["buffer_tokens"] = torch.from_numpy(tokens)
        state["buffer_lengths"] = torch.tensor([len(d) for d in buffer], dtype=torch.int64)
        return {**state, "config": dict(self.config)}

    def load_state_dict(self, sd: dict):
        """Continue exactly where the loader that saved `sd` was (same data, tokenizer and
        config)."""
        mine = self.config
        different = {k: (v, mine.get(k)) for k, v in sd["config"].items() if mine.get(k) != v}
        if different:
            raise NanocodeError(f"dataloader state was saved with a different config: {different}")
        self.close()  # the batches the thread packed ahead came from the old state
        tokens, bounds = sd["buffer_tokens"].numpy(), np.cumsum([0] + sd["buffer_lengths"].tolist())
        keys = ("epoch", "shard", "row", "tokens_packed", "tokens_cropped")
        self._state = {k: int(sd[k]) for k in keys}
        self._state["buffer"] = tuple(tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:]))

    def close(self):
        """Stop the background thread (it restarts from the current state on the next batch)."""
        if self._thread is not None:
            self._finalizer()
            self._thread = None

    def _start(self):
        """Start the packing thread from the current state, with a queue of `prefetch` batches."""
        self._queue, stop = queue.Queue(maxsize=self.prefetch), threading.Event()
        args = (self.settings, dict(self._state), self._queue, stop)
        self._thread = threading.Thread(target=_run, args=args, daemon=True)
        self._thread.start()
        # Stop the thread when this loader is collected, and at interpreter exit (killing the thread
        # inside the tokenizer or the parquet reader would abort the process). The thread holds no
        # reference to the loader.
        self._finalizer = weakref.finalize(self, _shutdown, self._queue, stop, self._thread)


def _shutdown(out: queue.Queue, stop: threading.Event, thread: threading.Thread):
    """A loader's finalizer: set `stop` and wait for the thread to exit, draining the queue
    meanwhile."""
    stop.set()
    while thread.is_alive():  # unblock a put() on a full queue
        try:
            out.get(timeout=0.05)
        except queue.Empty:
            pass


def _run(cfg, state, out: queue.Queue, stop: threading.Event):
    """The background thread: batches (or the error that stopped it, e.g. a corrupt shard) into
    `out` until `stop` is set."""

    def put(item) -> bool:
        """Put item into `out`; False if `stop` was set first. The timeout makes a put on a full
        queue notice `stop`."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    try:
        with ThreadPoolExecutor(cfg.tokenizer_threads) as pool:
            for batch in _pack(cfg, state, pool):
                if not put(batch):
                    return
    except BaseException as e:  # hand errors to the consumer
        put(e)


def _documents(cfg, epoch, shard, row, pool):
    """Endless stream of ((epoch, shard, next_row), [token arrays of the document's chunks])."""
    while True:
        pending, any_rows = [], False
        for s, r, text, _ in iter_rows(cfg.split, cfg.name, cfg.rank, cfg.world_size, shard, row):
            any_rows = True
            pending.append((s, r, text))
            if len(pending) == cfg.tokenizer_batch:
                yield from _tokenize(cfg, epoch, pending, pool)
                pending = []
        yield from _tokenize(cfg, epoch, pending, pool)
        # only a pass from the epoch's start proves it: a resumed one may begin past its last row
        if not any_rows and shard == 0 and row == cfg.rank:
            raise NanocodeError(
                f"rank {cfg.rank} of {cfg.world_size} gets no documents from the {cfg.split} "
                f"split of corpus {cfg.name!r}: it has fewer documents than ranks"
            )
        epoch, shard, row = epoch + 1, 0, cfg.rank


def _encode(cfg, texts, pool):
    """Ordinary-token ids of each text. tiktoken releases the GIL while it encodes, so a few threads
    each encoding a share of the texts run in parallel (one task per thread, not per text: less
    overhead)."""
    encoding, n = getattr(cfg.tokenizer, "encoding", None), cfg.tokenizer_threads
    if encoding is None:  # a stand-in tokenizer without tiktoken
        return cfg.tokenizer.encode_batch(texts)

    def encode_share(i):
        return [encoding.encode_ordinary(t) for t in texts[i::n]]

    encoded = [None] * len(texts)
    for i, ids in enumerate(pool.map(encode_share, range(n))):
        encoded[i::n] = ids
    return encoded


def _tokenize(cfg, epoch, docs, pool):
    """Chunk, FIM and tokenize a batch of documents, encoding all their text pieces in one go."""
    pieces = []  # per document, per chunk: its pieces (texts and special ids, see apply_fim)
    for s, r, text in docs:
        chunks = []
        for c, chunk in enumerate(chunk_text(text, cfg.max_doc_chars)):
            # FIM seeded per chunk: the same cut wherever a run resumes (a str seed goes through
            # SHA-512, not hash(), so it is the same in every process whatever PYTHONHASHSEED is)
            rng = random.Random(f"{cfg.seed}/{epoch}/{s}/{r}/{c}") if cfg.fim_rate > 0 else None
            chunks.append(apply_fim(chunk, rng, cfg.fim_rate) if rng else [chunk])
        pieces.append(chunks)
    texts = [p for chunks in pieces for chunk in chunks for p in chunk if isinstance(p, str)]
    encoded = iter(_encode(cfg, texts, pool))  # in the order of the texts above
    for (s, r, _), chunks in zip(docs, pieces):
        arrays = []
        for chunk in chunks:
            ids = [cfg.tokenizer.bos_id]
            for p in chunk:
                ids += next(encoded) if isinstance(p, str) else [p]
            arrays.append(np.array(ids, dtype=np.int32))  # int32: half of int64's memory
        yield (epoch, s, r + cfg.world_size), arrays


def _pack(cfg, state, pool):
    """Endless (batch in pinned host memory, loader state after it) pairs."""
    B, T = cfg.B, cfg.T
    docs = _documents(cfg, state["epoch"], state["shard"], state["row"], pool)
    cursor = (state["epoch"], state["shard"], state["row"])
    buffer = list(state["buffer"])  # token arrays, kept sorted by length
    lengths = [len(d) for d in buffer]
    packed, cropped = state["tokens_packed"], state["tokens_cropped"]
    while True:
        rows = np.empty((B, T + 1), dtype=np.int32)  # inputs are [:-1], targets the same shifted
        for b in range(B):
            pos = 0
            while pos < T + 1:
                while len(buffer) < cfg.buffer_size:
                    cursor, arrays = next(docs)
                    for doc in arrays:
                        i = bisect.bisect_right(lengths, len(doc))
                        lengths.insert(i, len(doc))
                        buffer.insert(i, doc)
                space = T + 1 - pos
                i = bisect.bisect_right(lengths, space) - 1  # the largest document that fits,
                i = max(i, 0)  # or, when none does, the shortest (it loses the fewest tokens)
                doc, _ = buffer.pop(i), lengths.pop(i)
                cropped += max(len(doc) - space, 0)
                doc = doc[:space]  # cropped to fill the row
                rows[b, pos : pos + len(doc)] = doc
                pos += len(doc)
        packed += B * (T + 1)
        rows = torch.from_numpy(rows)
        # int64 (what embedding and cross-entropy index with) in pinned memory, so the copy to the
        # GPU in __next__ can be asynchronous; inputs and targets in one tensor: one copy, not two.
        # A fresh buffer per batch, never refilled: the queue holds several, and a non_blocking
        # copy may still be reading one after __next__ has returned.
        host = torch.empty((2, B, T), dtype=torch.int64, pin_memory=cfg.pin_memory)
        host[0], host[1] = rows[:, :-1], rows[:, 1:]
        epoch, shard, row = cursor
        new_state = dict(epoch=epoch, shard=shard, row=row, buffer=tuple(buffer))
        yield host, {**new_state, "tokens_packed": packed, "tokens_cropped": cropped}
