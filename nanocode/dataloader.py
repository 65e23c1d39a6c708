"""Pretraining batches: documents -> (FIM) -> tokens -> rows packed BOS-aligned best-fit.

Every row of T+1 tokens starts with <|bos|> at the start of a document, so no token is trained on a
context that begins in the middle of some other document. Rows are filled best-fit from a buffer of
tokenized documents: take the largest document that fits in the space left; only when none fits, crop
the shortest one to fill the row exactly (its cut-off tail is dropped: that is the only place tokens
are lost; `state_dict()["tokens_cropped"]` counts them). Rows have no padding. Ties go to the document that
arrived last among the largest that fit, and to the one that arrived first among the shortest when cropping.

Source files are often longer than a row, and cropping them would throw most of their tokens away (59% of
all tokens on the local corpus at T=2048), so a document longer than `max_doc_chars` (default 2*T characters,
about half a row of code tokens with a 32k vocab) is first cut at line ends into chunks; each chunk is then a
document of its own (BOS, FIM). That brings cropping down to about 13% (bench/dataloader.py).

Documents are split across DDP ranks by dataset.iter_rows (rank r takes rows r, r+w, ...). The loader is
infinite: after the last shard it starts the next epoch (same order, new FIM cuts).

Exact resume: a background thread tokenizes and packs ahead, and hands every batch over together with
the loader state right after it: (epoch, shard, row) of the next document to read, and the documents
waiting in the packing buffer. FIM randomness is seeded per (seed, epoch, shard, row, chunk), so
replaying from that state yields exactly the batches an uninterrupted loader yields next.
"""

import bisect
import queue
import random
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from nanocode.common import NanocodeError
from nanocode.dataset import iter_rows
from nanocode.fim import apply_fim


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Cut text into pieces of at most max_chars characters, at line ends where possible."""
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    chunks, start = [], 0
    while len(text) - start > max_chars:
        cut = (
            text.rfind("\n", start, start + max_chars) + 1
        )  # just after the last newline that fits
        if cut <= start:  # one line longer than max_chars: cut inside it
            cut = start + max_chars
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return chunks


class DataLoader:
    """next(loader) -> (inputs, targets), both (B, T) int64 on `device`; targets are inputs shifted by one."""

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
        if B < 1 or T < 1:
            raise ValueError(f"B and T must be positive, got B={B} T={T}")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.tokenizer, self.B, self.T, self.split, self.name = tokenizer, B, T, split, name
        self.device = torch.device(device)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.fim_rate = (0.5 if split == "train" else 0.0) if fim_rate is None else fim_rate
        if split == "val" and self.fim_rate > 0:
            raise ValueError(
                "FIM is for training data only: use fim_rate=0 (or None) for the val split"
            )
        # buffer_size: best-fit packs tighter the more documents it can choose from (fewer crops), at the cost
        # of memory and of documents waiting longer; prefetch: batches packed ahead so a slow shard read or
        # a long document never stalls a training step.
        self.buffer_size, self.tokenizer_threads, self.tokenizer_batch, self.prefetch = (
            buffer_size,
            tokenizer_threads,
            tokenizer_batch,
            prefetch,
        )
        self.max_doc_chars = 2 * T if max_doc_chars is None else max_doc_chars
        self.bos = tokenizer.bos_id
        self._state = {
            "epoch": 0,
            "shard": 0,
            "row": rank,
            "buffer": (),
            "tokens_packed": 0,
            "tokens_cropped": 0,
        }
        self._thread = None

    # ---- consumer side (the training loop's thread)

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            self._start()
        item = self._packer.queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        host, self._state = item
        batch = host.to(self.device, non_blocking=True)  # the one host-to-device copy of this batch
        return batch[0], batch[1]

    def state_dict(self) -> dict:
        """The state after the last batch returned: plain ints and tensors (torch.save / weights_only friendly)."""
        s = self._state
        buffer = list(s["buffer"])
        return {
            "epoch": s["epoch"],
            "shard": s["shard"],
            "row": s["row"],
            "buffer_tokens": torch.from_numpy(
                np.concatenate(buffer) if buffer else np.zeros(0, np.int32)
            ),
            "buffer_lengths": torch.tensor([len(d) for d in buffer], dtype=torch.int64),
            "tokens_packed": s["tokens_packed"],
            "tokens_cropped": s["tokens_cropped"],
            "config": {
                "B": self.B,
                "T": self.T,
                "split": self.split,
                "name": self.name,
                "rank": self.rank,
                "world_size": self.world_size,
                "seed": self.seed,
                "fim_rate": self.fim_rate,
                "max_doc_chars": self.max_doc_chars,
                "vocab_size": getattr(self.tokenizer, "vocab_size", None),
            },
        }

    def load_state_dict(self, sd: dict):
        """Continue exactly where the loader that saved `sd` was (same data, tokenizer and config)."""
        mine = self.state_dict()["config"]
        different = {k: (v, mine.get(k)) for k, v in sd["config"].items() if mine.get(k) != v}
        if different:
            raise NanocodeError(
                f"dataloader state was saved with a different config (saved, now): {different}"
            )
        self.close()
        tokens = sd["buffer_tokens"].numpy()
        bounds = np.cumsum([0] + sd["buffer_lengths"].tolist())
        buffer = tuple(tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
        self._state = {
            "epoch": int(sd["epoch"]),
            "shard": int(sd["shard"]),
            "row": int(sd["row"]),
            "buffer": buffer,
            "tokens_packed": int(sd["tokens_packed"]),
            "tokens_cropped": int(sd["tokens_cropped"]),
        }

    def close(self):
        """Stop the background thread (it restarts from the current state on the next batch)."""
        if self._thread is not None:
            self._finalizer()
            self._thread = None

    def _start(self):
        self._packer = _Packer(self)
        self._thread = threading.Thread(
            target=self._packer.run, args=(dict(self._state),), daemon=True
        )
        self._thread.start()
        # Stop the thread when this loader is collected, and at interpreter exit (killing the thread inside the
        # tokenizer or the parquet reader would abort the process). The thread holds no reference to the loader.
        self._finalizer = weakref.finalize(self, _Packer.shutdown, self._packer, self._thread)


class _Packer:
    """The background thread's side: a copy of the loader's settings, the queue of finished batches, a stop flag."""

    def __init__(self, loader: DataLoader):
        for k in (
            "tokenizer",
            "B",
            "T",
            "split",
            "name",
            "rank",
            "world_size",
            "seed",
            "fim_rate",
            "buffer_size",
            "max_doc_chars",
            "tokenizer_threads",
            "tokenizer_batch",
            "bos",
        ):
            setattr(self, k, getattr(loader, k))
        self.pin_memory = loader.device.type == "cuda"
        self.queue, self.stop = queue.Queue(maxsize=loader.prefetch), threading.Event()

    @staticmethod
    def shutdown(packer, thread):
        packer.stop.set()
        while thread.is_alive():  # unblock a put() on a full queue
            try:
                packer.queue.get(timeout=0.05)
            except queue.Empty:
                pass

    def run(self, state):
        try:
            with ThreadPoolExecutor(self.tokenizer_threads) as pool:
                self.produce(state, pool)
        except BaseException as e:  # hand errors (a corrupt shard, ...) to the consumer
            self.put(e)

    def put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def documents(self, epoch, shard, row, pool):
        """Endless stream of ((epoch, shard, next_row), [token arrays of the document's chunks])."""
        while True:
            pending, any_rows = [], False
            for s, r, text, _ in iter_rows(
                self.split, self.name, self.rank, self.world_size, shard, row
            ):
                any_rows = True
                pending.append((s, r, text))
                if len(pending) == self.tokenizer_batch:
                    yield from self.tokenize(epoch, pending, pool)
                    pending = []
            yield from self.tokenize(epoch, pending, pool)
            if not any_rows and shard == 0 and row == self.rank:
                raise NanocodeError(
                    f"rank {self.rank} of {self.world_size} gets no documents from the {self.split} split "
                    f"of corpus {self.name!r}: it has fewer documents than ranks"
                )
            epoch, shard, row = epoch + 1, 0, self.rank

    def encode(self, texts, pool):
        """Ordinary-token ids of each text. tiktoken releases the GIL while it encodes, so a few threads each
        encoding a share of the texts run in parallel (one task per thread, not per text: less overhead)."""
        encoding = getattr(self.tokenizer, "encoding", None)
        if encoding is None:
            return self.tokenizer.encode_batch(texts)
        n = self.tokenizer_threads
        if n <= 1 or len(texts) < 2:
            return [encoding.encode_ordinary(t) for t in texts]
        shares = list(
            pool.map(
                lambda share: [encoding.encode_ordinary(t) for t in share],
                [texts[i::n] for i in range(n)],
            )
        )
        encoded = [None] * len(texts)
        for i in range(n):
            encoded[i::n] = shares[i]
        return encoded

    def tokenize(self, epoch, docs, pool):
        """Chunk, FIM and tokenize a batch of documents, encoding all their text pieces in one go."""
        specs, texts = (
            [],
            [],
        )  # specs: per document, per chunk, the pieces with text replaced by its index in texts
        for s, r, text in docs:
            chunks = []
            for c, chunk in enumerate(chunk_text(text, self.max_doc_chars)):
                pieces = [chunk]
                if self.fim_rate > 0:
                    pieces = apply_fim(
                        chunk, random.Random(f"{self.seed}/{epoch}/{s}/{r}/{c}"), self.fim_rate
                    )
                spec = []
                for p in pieces:
                    if isinstance(p, str):
                        spec.append(len(texts))
                        texts.append(p)
                    else:
                        spec.append(-1 - p)  # special ids are stored as negative numbers
                chunks.append(spec)
            specs.append(chunks)
        encoded = self.encode(texts, pool)
        for (s, r, _), chunks in zip(docs, specs):
            arrays = []
            for spec in chunks:
                ids = [self.bos]
                for k in spec:
                    if k >= 0:
                        ids += encoded[k]
                    else:
                        ids.append(-1 - k)
                arrays.append(
                    np.array(ids, dtype=np.int32)
                )  # int32: half of int64's memory in the buffer
            yield (epoch, s, r + self.world_size), arrays

    def produce(self, state, pool):
        B, T = self.B, self.T
        docs = self.documents(state["epoch"], state["shard"], state["row"], pool)
        cursor = (state["epoch"], state["shard"], state["row"])
        buffer = list(state["buffer"])  # token arrays, kept sorted by length
        lengths = [len(d) for d in buffer]
        packed, cropped = state["tokens_packed"], state["tokens_cropped"]
        while not self.stop.is_set():
            rows = np.empty(
                (B, T + 1), dtype=np.int32
            )  # T + 1: inputs are [:-1], targets the same shifted by one
            for b in range(B):
                pos = 0
                while pos < T + 1:
                    while len(buffer) < self.buffer_size:
                        cursor, arrays = next(docs)
                        for doc in arrays:
                            i = bisect.bisect_right(lengths, len(doc))
                            lengths.insert(i, len(doc))
                            buffer.insert(i, doc)
                    space = T + 1 - pos
                    i = bisect.bisect_right(lengths, space) - 1  # the largest document that fits
                    if i >= 0:
                        doc = buffer.pop(i)
                        lengths.pop(i)
                    else:  # nothing fits: crop the shortest document to fill the row (it loses the fewest tokens)
                        doc = buffer.pop(0)
                        lengths.pop(0)
                        cropped += len(doc) - space
                        doc = doc[:space]
                    rows[b, pos : pos + len(doc)] = doc
                    pos += len(doc)
            packed += B * (T + 1)
            rows = torch.from_numpy(rows)
            # int64 (what embedding and cross-entropy index with) in pinned memory, so the copy to the GPU
            # in __next__ can be asynchronous; inputs and targets in one tensor: one copy, not two.
            host = torch.empty((2, B, T), dtype=torch.int64, pin_memory=self.pin_memory)
            host[0] = rows[:, :-1]
            host[1] = rows[:, 1:]
            new_state = {
                "epoch": cursor[0],
                "shard": cursor[1],
                "row": cursor[2],
                "buffer": tuple(buffer),
                "tokens_packed": packed,
                "tokens_cropped": cropped,
            }
            if not self.put((host, new_state)):
                return
