"""The tokenizer: byte-level BPE trained by rustbpe, run by tiktoken.

Ids 0-11 are the special tokens (SPECIAL_TOKENS, fixed by the design); the ordinary tokens follow:
the 256 single bytes, then the merges in the order training found them. Encoding never produces a
special token from text: "<|bos|>" typed by a user is seven ordinary characters. Special tokens only
enter a sequence through render_conversation / render_for_completion (or by id).

On disk a tokenizer is a directory with two files:
  tokenizer.tiktoken  one line per ordinary token, "<base64 bytes> <id>" (tiktoken's own format)
  tokenizer.json      the split pattern and the special tokens
"""

import base64
import functools
import json
from pathlib import Path

import tiktoken

from nanocode.common import NanocodeError, get_base_dir
from nanocode.conversations import validate_conversation

# Ids 0-11, in this order (docs/DESIGN.md has the table).
SPECIAL_TOKENS = (
    "<|bos|> <|user_start|> <|user_end|> <|assistant_start|> <|assistant_end|> <|tool_start|> "
    "<|tool_end|> <|output_start|> <|output_end|> <|fim_prefix|> <|fim_middle|> <|fim_suffix|>"
).split()
SPECIAL_IDS = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
N_SPECIAL = len(SPECIAL_TOKENS)

# GPT-4's split pattern with numbers cut into groups of at most 2 digits (rustbpe's default).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

RANKS_FILE, CONFIG_FILE = "tokenizer.tiktoken", "tokenizer.json"


class Tokenizer:
    def __init__(self, ordinary: list[bytes], pattern: str = SPLIT_PATTERN):
        """`ordinary`: the bytes of every ordinary token in id order (ids 12, 13, ...)."""
        if len(ordinary) < 256 or sorted(ordinary[:256]) != [bytes([i]) for i in range(256)]:
            raise NanocodeError(
                "a tokenizer's first 256 ordinary tokens must be the 256 single bytes"
            )
        self.pattern = pattern
        # Every token's bytes by id (specials as their text), for decode and token_bytes.
        self.id_bytes = [s.encode() for s in SPECIAL_TOKENS] + list(ordinary)
        self.vocab_size = len(self.id_bytes)
        # Two merges can in rare cases build the same bytes; tiktoken keys ranks by bytes, so it
        # keeps the first (lowest) id. The other id is never produced by encode but still decodes.
        ranks = {}
        for i, b in enumerate(ordinary):
            ranks.setdefault(b, N_SPECIAL + i)
        self.encoding = tiktoken.Encoding(
            name="nanocode", pat_str=pattern, mergeable_ranks=ranks, special_tokens=SPECIAL_IDS
        )

    # ---- training, saving, loading

    @classmethod
    def train(cls, texts, vocab_size: int = 32768, pattern: str | None = None) -> "Tokenizer":
        """Train on an iterable of str. vocab_size counts the 12 special tokens; a corpus too small
        to find that many merges gives a smaller vocabulary."""
        import rustbpe  # only training needs the Rust extension

        if not isinstance(vocab_size, int) or vocab_size < 256 + N_SPECIAL:
            need = f"{256 + N_SPECIAL} (256 bytes + {N_SPECIAL} special tokens)"
            raise ValueError(f"vocab_size must be an integer >= {need}, got {vocab_size!r}")
        bpe = rustbpe.Tokenizer()
        # Smaller buffers than rustbpe's default (8192 documents) so that pulling documents from a
        # slow Python source overlaps with the counting from the start, even on small corpora.
        bpe.train_from_iterator(
            iter(texts), vocab_size - N_SPECIAL, buffer_size=1024, pattern=pattern
        )
        return cls([bytes(b) for b, _ in bpe.get_mergeable_ranks()], bpe.get_pattern())

    def save(self, directory) -> Path:
        """Write the two files of the module docstring into `directory` (made if missing); the
        special tokens are written too, so that load can refuse a mismatch. Returns the path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ordinary = enumerate(self.id_bytes[N_SPECIAL:], N_SPECIAL)
        lines = [f"{base64.b64encode(b).decode()} {i}\n" for i, b in ordinary]
        (directory / RANKS_FILE).write_text("".join(lines))
        config = {"pattern": self.pattern, "special_tokens": SPECIAL_IDS}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        """The tokenizer `save` wrote. Raises NanocodeError when a file is missing, corrupt (ids
        not consecutive from 12, bad base64 or JSON) or names other special tokens than this
        code's, so that ids are never silently remapped."""
        directory = Path(directory)
        if not (directory / RANKS_FILE).is_file() or not (directory / CONFIG_FILE).is_file():
            raise NanocodeError(
                f"no tokenizer in {directory} (expected {RANKS_FILE} and {CONFIG_FILE}): "
                "train one with `python -m scripts.tok_train`"
            )
        try:
            config = json.loads((directory / CONFIG_FILE).read_text())
            specials = config["special_tokens"]
            ordinary = []
            for n, line in enumerate((directory / RANKS_FILE).read_text().splitlines()):
                token, token_id = line.split()
                if int(token_id) != N_SPECIAL + n:
                    raise ValueError(f"line {n + 1} has id {token_id}, expected {N_SPECIAL + n}")
                ordinary.append(base64.b64decode(token))
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            raise NanocodeError(f"corrupt tokenizer in {directory}: {e}") from e
        if specials != SPECIAL_IDS:
            raise NanocodeError(
                f"tokenizer in {directory} has other special tokens than this code: {specials}"
            )
        return cls(ordinary, config["pattern"])

    # ---- encoding and decoding

    bos_id = 0  # <|bos|>

    def special_id(self, name: str) -> int:
        if name not in SPECIAL_IDS:
            raise ValueError(
                f"unknown special token {name!r}; the special tokens: {SPECIAL_TOKENS}"
            )
        return SPECIAL_IDS[name]

    def encode(self, text: str) -> list[int]:
        """Ordinary tokens only: special-token text in `text` is encoded as plain text (so a file or
        a user message containing "<|tool_start|>" can never make the model see a real tool
        call)."""
        if not isinstance(text, str):
            raise TypeError(f"encode needs a str, got {type(text).__name__}")
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode for many texts at once, on tiktoken's threads (8). Every item is checked first,
        so a TypeError names the first one that is not a str."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch needs str items, item {i} is {type(t).__name__}")
        return self.encoding.encode_ordinary_batch(texts)

    def decode(self, ids) -> str:
        """Text of any id sequence; specials appear as their text, and byte sequences that are not
        valid UTF-8 (a sequence cut inside a character) become U+FFFD instead of raising."""
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is out of range for vocab_size {self.vocab_size}")
        return b"".join(self.id_bytes[i] for i in ids).decode("utf-8", errors="replace")

    @functools.cached_property
    def token_bytes(self):
        """torch.int64 tensor (vocab_size,): UTF-8 bytes per token, 0 for the special tokens (so
        they count for nothing in bits per byte)."""
        import torch

        lengths = [0] * N_SPECIAL + [len(b) for b in self.id_bytes[N_SPECIAL:]]
        return torch.tensor(lengths, dtype=torch.int64)

    # ---- conversations

    def render_conversation(self, conversation: dict, max_tokens: int | None = None):
        """(ids, mask) of a whole conversation (checked by conversations.validate_conversation);
        mask 1 where the model is trained to write the token: assistant text, tool calls from
        <|tool_start|> to <|tool_end|>, and <|assistant_end|>. The token table has no system token
        (as in nanochat): a leading system message opens the first user turn, "system\n\nuser"."""
        messages = validate_conversation(conversation, last_role=None)["messages"]
        sid, ids, mask = self.special_id, [self.bos_id], [0]

        def add(tokens, m=0):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        system = ""
        for message in messages:
            parts = message["content"]
            parts = [{"type": "text", "text": parts}] if isinstance(parts, str) else parts
            if message["role"] != "assistant":
                text = system + "".join(p["text"] for p in parts)
                if message["role"] == "system":
                    system = text + "\n\n"
                    continue
                add([sid("<|user_start|>"), *self.encode(text), sid("<|user_end|>")])
                system = ""
                continue
            add([sid("<|assistant_start|>")])
            for part in parts:
                if part["type"] == "text":
                    add(self.encode(part["text"]), 1)
                elif part["type"] == "tool_call":
                    call = json.dumps({"name": part["name"], "arguments": part["arguments"]})
                    add([sid("<|tool_start|>"), *self.encode(call), sid("<|tool_end|>")], 1)
                else:  # tool_output: written by the tool, never learned
                    output = self.encode(part["text"])
                    add([sid("<|output_start|>"), *output, sid("<|output_end|>")])
            add([sid("<|assistant_end|>")], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """The ids to prime the model for the assistant's next reply: the conversation (without a
        final assistant message, if there is one, as in an eval sample that holds its answer)
        followed by <|assistant_start|>. A final assistant message that ends in a tool_output part
        is a turn in progress instead (the model always writes after a tool's output): it is kept,
        without its <|assistant_end|>, and the model goes on from there (the server's OpenAI tool
        messages)."""
        messages = validate_conversation(conversation, last_role=None)["messages"]
        if messages[-1]["role"] == "assistant":
            if in_progress(messages[-1]):
                return self.render_conversation(conversation)[0][:-1]
            messages = messages[:-1]
        ids, _ = self.render_conversation({"messages": messages})
        return ids + [self.special_id("<|assistant_start|>")]


def in_progress(message) -> bool:
    """Is this an assistant message whose last part is a tool's output (so the turn goes on)?"""
    content = message.get("content")
    if message.get("role") != "assistant" or not isinstance(content, list) or not content:
        return False
    return isinstance(content[-1], dict) and content[-1].get("type") == "tool_output"


def get_tokenizer() -> Tokenizer:
    """The tokenizer trained by scripts.tok_train, from $NANOCODE_BASE_DIR/tokenizer."""
    return Tokenizer.load(get_base_dir() / "tokenizer")
