"""nanocode.tokenizer: special tokens, encode/decode, save/load, token_bytes, conversation
rendering."""

import json

import pytest
import torch

pytest.importorskip("rustbpe")
from nanocode.common import NanocodeError  # noqa: E402
from nanocode.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, get_tokenizer  # noqa: E402

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "import os\nprint(os.getcwd())  # where am I?\n",
    "The quick brown fox jumps over the lazy dog. Naïve café, 数据, 🙂!\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)\n",
] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TEXTS, vocab_size=350)


def test_specials_come_first(tok):
    assert len(SPECIAL_TOKENS) == 12
    assert tok.bos_id == 0 and tok.special_id("<|bos|>") == 0
    assert tok.special_id("<|fim_suffix|>") == 11
    assert [tok.decode([i]) for i in range(12)] == SPECIAL_TOKENS
    assert tok.vocab_size == 350
    assert tok.encoding.n_vocab == 350
    # Ordinary tokens start at 12 with the 256 bytes.
    assert tok.decode([12 + ord("a")]) == "a"
    with pytest.raises(ValueError, match="unknown special token"):
        tok.special_id("<|nope|>")


def test_split_pattern_is_rustbpes_default(tok):
    import rustbpe

    assert tok.pattern == SPLIT_PATTERN == rustbpe.DEFAULT_PATTERN


def test_encode_decode_round_trip(tok):
    for text in TEXTS[:4] + ["", "😀👨‍👩‍👧", "\r\n  \t", "mixed русский 日本語"]:
        ids = tok.encode(text)
        assert all(12 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode_batch(TEXTS[:4]) == [tok.encode(t) for t in TEXTS[:4]]
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0])  # training found merges that apply


def test_special_token_text_is_ordinary_text(tok):
    text = "<|bos|><|assistant_end|> hi"
    ids = tok.encode(text)
    assert min(ids) >= 12
    assert tok.decode(ids) == text
    assert tok.encode_batch([text]) == [ids]


def test_long_run_and_invalid_utf8(tok):
    long = "a" * 1_000_000
    ids = tok.encode(long)
    assert tok.decode(ids) == long
    assert tok.decode([12 + 0xFF]) == "\ufffd"
    assert tok.decode([12 + b for b in "é".encode()][:1]) == "\ufffd"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_token_bytes(tok):
    tb = tok.token_bytes
    assert tb.dtype == torch.int64 and tb.shape == (tok.vocab_size,)
    assert tb[:12].tolist() == [0] * 12
    assert tb[12:].tolist() == [
        len(tok.encoding.decode_single_token_bytes(i)) for i in range(12, tok.vocab_size)
    ]
    assert tb[12:].min() >= 1


def test_save_load(tok, tmp_path):
    tok.save(tmp_path / "t")
    loaded = Tokenizer.load(tmp_path / "t")
    assert loaded.vocab_size == tok.vocab_size and loaded.pattern == tok.pattern
    for text in TEXTS[:4]:
        assert loaded.encode(text) == tok.encode(text)
    assert torch.equal(loaded.token_bytes, tok.token_bytes)
    # The ranks file is tiktoken's own format.
    import tiktoken.load

    ranks = tiktoken.load.load_tiktoken_bpe(str(tmp_path / "t" / "tokenizer.tiktoken"))
    assert ranks[b"a"] == 12 + ord("a") and len(ranks) == tok.vocab_size - 12


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(NanocodeError, match="no tokenizer"):
        Tokenizer.load(tmp_path)
    monkeypatch.setenv("NANOCODE_BASE_DIR", str(tmp_path / "empty_base"))
    with pytest.raises(NanocodeError, match="tok_train"):
        get_tokenizer()
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer.tiktoken").write_text("YQ== 12\n")
    with pytest.raises(NanocodeError, match="corrupt"):
        Tokenizer.load(tmp_path)


def test_get_tokenizer(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCODE_BASE_DIR", str(tmp_path))
    tok.save(tmp_path / "tokenizer")
    assert get_tokenizer().encode("hello") == tok.encode("hello")


def test_train_bad_input():
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(TEXTS, vocab_size=267)
    with pytest.raises(TypeError, match="str"):
        Tokenizer.train(["ok", None], vocab_size=300)
    with pytest.raises(ValueError, match="pattern"):
        Tokenizer.train(TEXTS, vocab_size=300, pattern="[")


CONV = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "List files."},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_call", "name": "bash", "arguments": {"command": "ls"}},
                {"type": "tool_output", "text": "main.py"},
                {"type": "text", "text": "It has main.py."},
            ],
        },
        {"role": "user", "content": "Thanks <|assistant_end|>"},
        {"role": "assistant", "content": "You're welcome."},
    ]
}


def test_render_conversation(tok):
    ids, mask = tok.render_conversation(CONV)
    assert len(ids) == len(mask)
    sid = tok.special_id
    call = json.dumps({"name": "bash", "arguments": {"command": "ls"}})
    expected = [
        (
            [0, sid("<|user_start|>")]
            + tok.encode("Be brief.\n\nList files.")
            + [sid("<|user_end|>"), sid("<|assistant_start|>")],
            0,
        ),
        (
            tok.encode("Let me look.")
            + [sid("<|tool_start|>")]
            + tok.encode(call)
            + [sid("<|tool_end|>")],
            1,
        ),
        ([sid("<|output_start|>")] + tok.encode("main.py") + [sid("<|output_end|>")], 0),
        (tok.encode("It has main.py.") + [sid("<|assistant_end|>")], 1),
        (
            [sid("<|user_start|>")]
            + tok.encode("Thanks <|assistant_end|>")
            + [sid("<|user_end|>"), sid("<|assistant_start|>")],
            0,
        ),
        (tok.encode("You're welcome.") + [sid("<|assistant_end|>")], 1),
    ]
    assert ids == [i for seg, _ in expected for i in seg]
    assert mask == [m for seg, m in expected for _ in seg]
    short_ids, short_mask = tok.render_conversation(CONV, max_tokens=10)
    assert short_ids == ids[:10] and short_mask == mask[:10]


def test_render_for_completion(tok):
    prompt = {"messages": CONV["messages"][:4]}
    ids = tok.render_for_completion(prompt)
    assert ids[-1] == tok.special_id("<|assistant_start|>")
    # A prefix of the whole conversation's rendering (what DPO and SFT rely on).
    full, _ = tok.render_conversation(CONV)
    assert full[: len(ids)] == ids
    # A final assistant message (an eval sample's answer) is left out.
    assert tok.render_for_completion(CONV) == ids


@pytest.mark.parametrize(
    "conv, match",
    [
        ([], "'messages' list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": 5}]}, "content"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_call", "name": "bash", "arguments": {}}],
                    }
                ]
            },
            "may only appear in an assistant message",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": [{"type": "tool_call", "name": "bash"}]},
                ]
            },
            "arguments",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": [{"type": "image"}]},
                ]
            },
            "type one of",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
            "system",
        ),
        ({"messages": [{"role": "system", "content": "b"}]}, "system"),
    ],
)
def test_render_bad_conversations(tok, conv, match):
    with pytest.raises(NanocodeError, match=match):
        tok.render_conversation(conv)


def test_tok_train_script(tmp_path, monkeypatch, capsys):
    import sys

    import scripts.tok_train as tok_train
    from tests.helpers import make_docs, write_corpus

    monkeypatch.setenv("NANOCODE_BASE_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["tok_train", "--vocab-size", "300", "--doc-cap", "500"])
    with pytest.raises(NanocodeError, match="nanocode.dataset --local"):
        tok_train.main()
    write_corpus(tmp_path / "data" / "code", make_docs(40), per_shard=10)
    tok_train.main()
    assert "MB/s" in capsys.readouterr().out
    tok = get_tokenizer()
    assert 268 < tok.vocab_size <= 300
    report = json.loads((tmp_path / "report" / "tokenizer.json").read_text())
    assert (
        report["vocab_size"] == tok.vocab_size
        and report["train_docs"] == 30
        and report["train_mb_per_s"] > 0
    )
