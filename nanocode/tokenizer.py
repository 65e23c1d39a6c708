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
import json
from pathlib import Path

import tiktoken

from nanocode.common import NanocodeError, get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|tool_start|>",
    "<|tool_end|>",
    "<|output_start|>",
    "<|output_end|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
]
N_SPECIAL = len(SPECIAL_TOKENS)

# GPT-4's split pattern with numbers cut into groups of at most 2 digits (rustbpe's default).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

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
            name="nanocode",
            pat_str=pattern,
            mergeable_ranks=ranks,
            special_tokens={s: i for i, s in enumerate(SPECIAL_TOKENS)},
        )
        self._token_bytes = None

    # ---- training, saving, loading

    @classmethod
    def train(cls, texts, vocab_size: int = 32768, pattern: str | None = None) -> "Tokenizer":
        """Train on an iterable of str. vocab_size counts the 12 special tokens; a corpus too small to
        find that many merges gives a smaller vocabulary."""
        import rustbpe  # only training needs the Rust extension

        if not isinstance(vocab_size, int) or vocab_size < 256 + N_SPECIAL:
            raise ValueError(
                f"vocab_size must be an integer >= {256 + N_SPECIAL} (256 bytes + {N_SPECIAL} special tokens), got {vocab_size!r}"
            )
        bpe = rustbpe.Tokenizer()
        # Smaller buffers than rustbpe's default (8192 documents) so that pulling documents from a
        # slow Python source overlaps with the counting from the start, even on small corpora.
        bpe.train_from_iterator(
            iter(texts), vocab_size - N_SPECIAL, buffer_size=1024, pattern=pattern
        )
        return cls([bytes(b) for b, _ in bpe.get_mergeable_ranks()], bpe.get_pattern())

    def save(self, directory) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lines = [
            f"{base64.b64encode(b).decode()} {i}"
            for i, b in enumerate(self.id_bytes)
            if i >= N_SPECIAL
        ]
        (directory / RANKS_FILE).write_text("\n".join(lines) + "\n")
        config = {
            "pattern": self.pattern,
            "special_tokens": {s: i for i, s in enumerate(SPECIAL_TOKENS)},
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory) -> "Tokenizer":
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
        if specials != {s: i for i, s in enumerate(SPECIAL_TOKENS)}:
            raise NanocodeError(
                f"tokenizer in {directory} has other special tokens than this code: {specials}"
            )
        return cls(ordinary, config["pattern"])

    # ---- encoding and decoding

    @property
    def bos_id(self) -> int:
        return 0

    def special_id(self, name: str) -> int:
        if name not in SPECIAL_TOKENS:
            raise ValueError(
                f"unknown special token {name!r}; the special tokens are {SPECIAL_TOKENS}"
            )
        return SPECIAL_TOKENS.index(name)

    def encode(self, text: str) -> list[int]:
        """Ordinary tokens only: special-token text in `text` is encoded as plain text (so a file or a
        user message containing "<|tool_start|>" can never make the model see a real tool call)."""
        if not isinstance(text, str):
            raise TypeError(f"encode needs a str, got {type(text).__name__}")
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
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

    @property
    def token_bytes(self):
        """torch.int64 tensor (vocab_size,): UTF-8 bytes per token, 0 for the special tokens (so they
        count for nothing in bits per byte)."""
        if self._token_bytes is None:
            import torch

            self._token_bytes = torch.tensor(
                [0] * N_SPECIAL + [len(b) for b in self.id_bytes[N_SPECIAL:]], dtype=torch.int64
            )
        return self._token_bytes

    # ---- conversations

    def render_conversation(
        self, conversation: dict, max_tokens: int | None = None
    ) -> tuple[list[int], list[int]]:
        """(ids, mask) of a whole conversation; mask 1 where the model is trained to write the token:
        assistant text, tool calls from <|tool_start|> to <|tool_end|>, and <|assistant_end|>."""
        sid = self.special_id
        ids, mask = [self.bos_id], [0]

        def add(tokens, m):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        for role, parts in _messages(conversation):
            if role == "user":
                add([sid("<|user_start|>")], 0)
                for part in parts:
                    add(self.encode(part["text"]), 0)
                add([sid("<|user_end|>")], 0)
                continue
            add([sid("<|assistant_start|>")], 0)
            for part in parts:
                if part["type"] == "text":
                    add(self.encode(part["text"]), 1)
                elif part["type"] == "tool_call":
                    call = json.dumps({"name": part["name"], "arguments": part["arguments"]})
                    add([sid("<|tool_start|>")] + self.encode(call) + [sid("<|tool_end|>")], 1)
                else:  # tool_output: written by the tool, never learned
                    add(
                        [sid("<|output_start|>")]
                        + self.encode(part["text"])
                        + [sid("<|output_end|>")],
                        0,
                    )
            add([sid("<|assistant_end|>")], 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation: dict) -> list[int]:
        """The ids to prime the model for the assistant's next reply: the conversation (without a
        final assistant message, if there is one, as in an eval sample that holds its answer)
        followed by <|assistant_start|>. A final assistant message that ends in a tool_output part is a
        turn in progress instead (the model always writes after a tool's output): it is kept, without
        its <|assistant_end|>, and the model goes on from there (the server's OpenAI tool messages)."""
        messages = list(_checked(conversation))
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            if in_progress(messages[-1]):
                return self.render_conversation({"messages": messages})[0][:-1]
            messages = messages[:-1]
        ids, _ = self.render_conversation({"messages": messages})
        return ids + [self.special_id("<|assistant_start|>")]


def in_progress(message) -> bool:
    """Is this an assistant message whose last part is a tool's output (so the turn goes on)?"""
    content = message.get("content")
    return (
        message.get("role") == "assistant"
        and isinstance(content, list)
        and bool(content)
        and isinstance(content[-1], dict)
        and content[-1].get("type") == "tool_output"
    )


def _checked(conversation) -> list:
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError('a conversation is a dict {"messages": [...]}')
    return conversation["messages"]


def _messages(conversation: dict):
    """Validated (role, parts) pairs. A user message becomes one text part (its parts joined), with a
    leading system message's text prepended to the first one as "system\n\nuser"."""
    messages = _checked(conversation)
    out, system = [], None
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in (
            "system",
            "user",
            "assistant",
        ):
            raise ValueError(
                f"message {n} needs a role of system, user or assistant: {message!r:.200}"
            )
        role, content = message["role"], message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ValueError(
                f"message {n}: content must be a str or a list of parts, got {type(content).__name__}"
            )
        for part in parts:
            _check_part(n, role, part)
        if role == "assistant":
            if system is not None:
                raise ValueError("a system message must be followed by a user message")
            out.append((role, parts))
            continue
        text = "".join(p["text"] for p in parts)
        if role == "system":
            if n != 0:
                raise ValueError(f"message {n}: a system message may only come first")
            system = text
            continue
        if system is not None:  # the token table has no system token (as in nanochat): the system
            text, system = system + "\n\n" + text, None  # prompt opens the first user turn
        out.append((role, [{"type": "text", "text": text}]))
    if system is not None:
        raise ValueError("a system message must be followed by a user message")
    return out


def _check_part(n: int, role: str, part) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    allowed = ("text", "tool_call", "tool_output") if role == "assistant" else ("text",)
    if kind not in allowed:
        raise ValueError(
            f"message {n} ({role}): part types allowed here are {allowed}, got {part!r:.200}"
        )
    if kind in ("text", "tool_output") and not isinstance(part.get("text"), str):
        raise ValueError(f"message {n}: a {kind} part needs a str 'text', got {part!r:.200}")
    if kind == "tool_call" and not (
        isinstance(part.get("name"), str) and isinstance(part.get("arguments"), dict)
    ):
        raise ValueError(
            f"message {n}: a tool_call part needs a str 'name' and a dict 'arguments', got {part!r:.200}"
        )


def get_tokenizer() -> Tokenizer:
    """The tokenizer trained by scripts.tok_train, from $NANOCODE_BASE_DIR/tokenizer."""
    return Tokenizer.load(get_base_dir() / "tokenizer")
