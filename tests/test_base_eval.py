"""base_eval's bits per byte per language: every byte counted once, a uniform model at log2(V) bits
per byte, balanced document selection, and agreement with nanocode.loss_eval."""

import math

import pytest
import torch

from tests.helpers import ByteTokenizer


class UniformModel(torch.nn.Module):
    """Predicts every token with probability 1/V: its loss is ln V nats per token, whatever the
    input."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size, self.rows_seen = vocab_size, []

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        self.rows_seen.append(tuple(idx.shape))
        logits = torch.zeros(idx.numel(), self.vocab_size)
        return torch.nn.functional.cross_entropy(
            logits, targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )


DOCS = [
    {"text": "def f():\n    return 1\n", "lang": "python"},
    {"text": "int main() { return 0; }", "lang": "c"},
    {"text": "print('héllo wörld')\n", "lang": "python"},
    {"text": "fn main() {}", "lang": "rust"},
    {"text": "x = [i * i for i in range(10)]\n" * 3, "lang": "python"},
    {"text": "", "lang": ""},
]


@pytest.mark.parametrize("batch_size,seq_len", [(1, 7), (2, 16), (4, 5), (3, 1000)])
def test_bpb_per_language_counts_every_byte_once(batch_size, seq_len):
    """With a byte-level tokenizer each text byte is one target token: bytes per language must equal
    the documents' UTF-8 sizes (specials count for nothing), and a uniform model scores log2(V) bits
    per byte."""
    from scripts.base_eval import bpb, bpb_per_language

    tok = ByteTokenizer()
    tok.token_bytes = torch.tensor([0] * 12 + [1] * 256)
    model = UniformModel(tok.vocab_size)
    sums = bpb_per_language(
        model, tok, DOCS, batch_size, seq_len, max_tokens=10**9, device=torch.device("cpu")
    )
    expect = {}
    for d in DOCS:
        lang = d["lang"] or "unknown"
        expect[lang] = expect.get(lang, 0) + len(d["text"].encode("utf-8"))
    assert {lang: s[1] for lang, s in sums.items()} == expect
    assert {lang: s[2] for lang, s in sums.items()} == expect  # tokens counted = bytes here
    for nats, nbytes, _ in sums.values():
        if nbytes:
            assert bpb(nats, nbytes) == pytest.approx(math.log2(tok.vocab_size))
    assert all(t <= seq_len for _, t in model.rows_seen) and all(
        b <= batch_size for b, _ in model.rows_seen
    )


def test_bpb_max_tokens_and_balanced_selection():
    from scripts.base_eval import bpb_per_language, select_docs

    docs = [{"text": "a" * 10, "lang": "python"}] * 6 + [{"text": "b" * 10, "lang": "go"}] * 2
    chosen = select_docs(docs, 5)
    assert [d["lang"] for d in chosen] == ["go", "python", "go", "python", "python"]
    tok = ByteTokenizer()
    tok.token_bytes = torch.tensor([0] * 12 + [1] * 256)
    sums = bpb_per_language(
        UniformModel(tok.vocab_size), tok, docs, 2, 8, max_tokens=25, device=torch.device("cpu")
    )
    assert sums["python"][1] == 30  # documents are added until 25 tokens are reached: 3 x (1 + 10)


def test_bpb_per_language_agrees_with_loss_eval():
    """Summed over languages, the per-language numbers equal nanocode.loss_eval.evaluate_bpb on the
    same batches."""
    from nanocode.gpt import GPTConfig, build_model
    from nanocode.loss_eval import evaluate_bpb
    from scripts.base_eval import bpb, bpb_per_language, token_batches

    tok = ByteTokenizer()
    tok.token_bytes = torch.tensor([0] * 12 + [1] * 256)
    torch.manual_seed(0)
    model = build_model(
        GPTConfig(
            sequence_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=64
        ),
        "cpu",
    )
    model.eval()
    sums = bpb_per_language(model, tok, DOCS, 2, 16, 10**9, torch.device("cpu"))
    ours = bpb(sum(s[0] for s in sums.values()), sum(s[1] for s in sums.values()))
    batches = [(x, y) for x, y, _ in token_batches(DOCS, tok, 2, 16, 10**9, [])]
    assert ours == pytest.approx(evaluate_bpb(model, batches, tok.token_bytes), rel=1e-6)
