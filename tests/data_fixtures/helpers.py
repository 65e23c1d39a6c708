"""Shared by the data tests: a small tokenizer and a way to write a corpus of shards to a temp dir."""
import random

import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>", "<|tool_start|>",
            "<|tool_end|>", "<|output_start|>", "<|output_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


class ByteTokenizer:
    """Stand-in with the Tokenizer interface the data code uses: specials 0..11, then the 256 bytes."""

    def __init__(self):
        self.encoding = tiktoken.Encoding("bytes", pat_str=PATTERN, mergeable_ranks={bytes([i]): i + 12 for i in range(256)},
                                          special_tokens={s: i for i, s in enumerate(SPECIALS)})
        self.bos_id, self.vocab_size = 0, 268

    def special_id(self, s):
        return SPECIALS.index(s)

    def encode(self, text):
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts):
        return self.encoding.encode_ordinary_batch(texts)

    def decode(self, ids):
        return self.encoding.decode(ids)


def make_tokenizer(texts=()):
    """The real tokenizer trained tiny when it exists (nanocode.tokenizer.Tokenizer.train), else the stand-in."""
    try:
        from nanocode.tokenizer import Tokenizer
    except ImportError:
        return ByteTokenizer()
    if not hasattr(Tokenizer, "train"):
        return ByteTokenizer()
    return Tokenizer.train(list(texts), vocab_size=300)


WORDS = ["def", "return", "self", "import", "for", "in", "if", "else", "x", "y", "value", "print", "(", ")", ":", "=",
         "+", "[", "]", "λ", "é", "数据", "🙂"]


def make_docs(n, seed=0, min_lines=2, max_lines=60):
    """n distinct pseudo-code documents of varied length, with some non-ASCII characters."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [f"# doc {i}"]
        for _ in range(rng.randint(min_lines, max_lines)):
            lines.append("    " * rng.randint(0, 2) + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))))
        docs.append("\n".join(lines) + "\n")
    return docs


def write_corpus(directory, docs, per_shard):
    """Write docs into shard_00000.parquet ... with per_shard documents each; the last shard is val."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(0, len(docs), per_shard):
        chunk = docs[k:k + per_shard]
        path = directory / f"shard_{k // per_shard:05d}.parquet"
        pq.write_table(pa.table({"text": chunk, "lang": ["python"] * len(chunk)}), path)
        paths.append(path)
    return paths
