"""The Rust BPE trainer against slow but obvious references: a pure-Python BPE, the `regex` module's
split, and tiktoken's encoder."""

import random
from collections import Counter

import pytest
import regex
import tiktoken

rustbpe = pytest.importorskip("rustbpe")

DEFAULT = rustbpe.DEFAULT_PATTERN
GPT4 = rustbpe.GPT4_PATTERN

UNICODE_TEXTS = [
    "",
    "Hello world! I'm here, we'll see; they've gone. DON'T SHOUT'S",
    "café naïve résumé Ångström Zürich ßtraße",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵",
    "mixed العربية русский ελληνικά हिन्दी ไทย",
    "line one\r\nline two\r\n\r\n\tindented\n\n\n    spaces",
    "x" + " " * 300 + "y" + "\t" * 50 + "\n" + " " * 40,
    "numbers 1 12 123 1234 12345 ٣٤٥ ½ Ⅻ 3.14159 1e10 0xFF",
    "def f(x):\n    return x**2  # comment\n\nclass A(B):\n\tpass\n",
    "'s 'S 'ſ 'll 'LL 'Ve 're '' 'x",
    "trailing spaces   ",
    "   ",
    "\u00a0nbsp\u3000ideographic\u2028sep\u0085nel\u200bzwsp\u001cfs",
    "combining e\u0301 a\u0308 and ZWJ\u200d",
]


def random_texts(n, seed=0):
    alphabet = list("aZéßж中あ😀1٣½Ⅻ \t\n\r\u3000\u00a0\u0085'sSſlLvVeErRdDmMtT.(-_#\u0301")
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(n)]


@pytest.mark.parametrize("pattern", [DEFAULT, GPT4, r"\w+|[^\w\s]+|\s+"])
def test_split_equals_regex_module(pattern):
    for text in UNICODE_TEXTS + random_texts(3000):
        assert rustbpe.split_text(text, pattern) == regex.findall(pattern, text), repr(text)


def reference_merges(texts, pattern, num_merges):
    """Textbook BPE: count chunks, then recount all pairs before every merge. Ties: smallest
    pair."""
    chunks = Counter(c for t in texts for c in regex.findall(pattern, t))
    words = [(list(c.encode()), n) for c, n in chunks.items()]
    merges = []
    for i in range(num_merges):
        pairs = Counter()
        for ids, n in words:
            for p in zip(ids, ids[1:]):
                pairs[p] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for ids, _ in words:
            j = 0
            while j < len(ids) - 1:
                if (ids[j], ids[j + 1]) == best:
                    ids[j : j + 2] = [256 + i]
                j += 1
    return merges


def corpus():
    rng = random.Random(1)
    words = [
        "def",
        "return",
        "self",
        "the",
        "value",
        "naïve",
        "数据",
        "😀",
        "x",
        "==",
        "(",
        ")",
        "  ",
        "\n",
        "42",
        "'s",
    ]
    return [
        "".join(rng.choice(words) + rng.choice([" ", "", "\n"]) for _ in range(rng.randint(5, 60)))
        for _ in range(200)
    ]


def test_merges_equal_pure_python_reference():
    texts = corpus()
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(texts, 256 + 150)
    ranks = tok.get_mergeable_ranks()
    assert [r for _, r in ranks] == list(range(len(ranks)))
    assert [b for b, _ in ranks[:256]] == [bytes([i]) for i in range(256)]
    # Rebuild the reference's token bytes and compare merge by merge.
    table = [bytes([i]) for i in range(256)]
    for a, b in reference_merges(texts, DEFAULT, 150):
        table.append(table[a] + table[b])
    assert [b for b, _ in ranks] == table
    assert tok.vocab_size == len(table)


def test_training_is_deterministic_across_buffer_sizes():
    texts = corpus()
    results = []
    for buffer_size in (1, 7, 8192):
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(texts), 400, buffer_size=buffer_size)
        results.append(tok.get_mergeable_ranks())
    assert results[0] == results[1] == results[2]


def trained(pattern=None, vocab_size=600):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(corpus() + UNICODE_TEXTS * 3, vocab_size, pattern=pattern)
    return tok


@pytest.mark.parametrize("pattern", [None, GPT4])
def test_tiktoken_from_ranks_encodes_identically(pattern):
    tok = trained(pattern)
    enc = tiktoken.Encoding(
        "t",
        pat_str=tok.get_pattern(),
        mergeable_ranks=dict(tok.get_mergeable_ranks()),
        special_tokens={},
    )
    for text in UNICODE_TEXTS + corpus()[:20] + random_texts(300, seed=2):
        ids = tok.encode(text)
        assert ids == enc.encode_ordinary(text), repr(text)
        assert tok.decode(ids) == text
    assert tok.batch_encode(UNICODE_TEXTS) == [tok.encode(t) for t in UNICODE_TEXTS]


def test_round_trips():
    tok = trained()
    assert tok.encode("") == []
    assert tok.decode([]) == ""
    for text in ["😀", "👨‍👩‍👧", "日本", "\r\n", " " * 1000]:
        assert tok.decode(tok.encode(text)) == text
    # One 1,000,000-character chunk: merging is O(n log n), not O(n^2).
    long = "a" * 1_000_000
    assert tok.decode(tok.encode(long)) == long
    # Token 0xFF alone is not valid UTF-8: replaced, not raised.
    assert tok.decode([0xFF]) == "\ufffd"
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"  # a character cut in half


def test_bad_input_gives_python_errors():
    tok = rustbpe.Tokenizer()
    with pytest.raises(ValueError, match="vocab_size"):
        tok.train_from_iterator(["abc"], 100)
    with pytest.raises(ValueError, match="vocab_size"):
        tok.train_from_iterator(["abc"], -1)
    with pytest.raises(TypeError, match="item 1"):
        tok.train_from_iterator(["abc", 5, "def"], 300)
    with pytest.raises(TypeError, match="iterable"):
        tok.train_from_iterator(42, 300)
    with pytest.raises(ValueError, match="pattern"):
        tok.train_from_iterator(["abc"], 300, pattern="(unclosed")
    with pytest.raises(ValueError, match="item 1 is not valid text"):
        tok.train_from_iterator(["ok", "lone surrogate \ud800"], 300)
    with pytest.raises(ValueError, match="buffer_size"):
        tok.train_from_iterator(["abc"], 300, buffer_size=0)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([256])

    def failing():
        yield "abc"
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        tok.train_from_iterator(failing(), 300)
    # The failed calls left a usable tokenizer.
    tok.train_from_iterator(["abcabc"], 258)
    assert tok.vocab_size == 258


def test_small_corpus_stops_early_and_default_pattern():
    tok = rustbpe.Tokenizer()
    assert tok.get_pattern() == DEFAULT
    tok.train_from_iterator(["ab"], 1000)
    assert tok.vocab_size == 257
    tok.train_from_iterator([], 1000)
    assert tok.vocab_size == 256
