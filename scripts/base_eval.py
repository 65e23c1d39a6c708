"""Evaluate a base model: bits per byte on the validation shard, overall and per language, then a
few greedy completions and fill-in-the-middle infillings printed for a look.

    python -m scripts.base_eval                       # latest base checkpoint
    python -m scripts.base_eval --max-docs 2000 --max-tokens 2000000
    torchrun --nproc_per_node=8 -m scripts.base_eval  # documents sharded across ranks

Bits per byte (nanocode/loss_eval.py, one group per language): the validation documents (each
<|bos|> + its tokens) are concatenated into one stream, cut into rows of the model's context, and
every target token's loss (nats) and UTF-8 byte count are summed per language of the document it
belongs to; bpb = nats / (ln 2 * bytes). It does not depend on the tokenizer, so models with
different vocabularies compare. Concatenated rather than one document per row: no padding to
compute on. As in training, a document can attend to the end of the one before it in the same row
(attention is not masked per document); unlike training, a row may start inside a document, so a
few tokens per row see less context than they would in training. --max-docs documents per rank
(balanced across languages), at most --max-tokens tokens per rank.
"""

import argparse
import sys
from collections import defaultdict
from itertools import zip_longest

import torch
import torch.distributed as dist

from nanocode.checkpoint import PHASES
from nanocode.common import NanocodeError, autocast, compute_cleanup, compute_init, print0, run_main
from nanocode.loss_eval import bpb, loss_sums
from nanocode.report import log_stage
from nanocode.training import posint

parser = argparse.ArgumentParser(description="bits per byte per language, and samples")
parser.add_argument("-i", "--source", default="base", choices=PHASES, help="which checkpoint")
parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
parser.add_argument("--max-docs", type=posint, default=1000)
parser.add_argument("--max-tokens", type=posint, default=1_000_000)
parser.add_argument("--batch-size", type=posint, default=8, help="rows per forward pass")
parser.add_argument("--sample-tokens", type=int, default=64, help="per completion (0: none)")
parser.add_argument("--data", default="code", help="corpus name under $NANOCODE_BASE_DIR/data")
parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")

CODE_PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_python_files(directory):\n",
    "class Stack:\n    def __init__(self):\n",
    "#include <stdio.h>\n\nint main(int argc, char **argv) {\n",
    "fn main() {\n",
]
FIM_EXAMPLES = [  # (prefix, suffix): the model writes the middle
    ("def add(a, b):\n    ", "\n\n\nprint(add(2, 3))\n"),
    ("def is_even(n):\n    return ", "\n"),
    ("with open(path) as f:\n", "\nprint(len(lines), 'lines')\n"),
]


def select_docs(docs, max_docs: int) -> list[dict]:
    """Up to max_docs documents taken round-robin across languages, so a small language is not
    crowded out by the shard's order."""
    by_lang = defaultdict(list)
    for d in docs:
        by_lang[d["lang"] or "unknown"].append(d)
    # round r holds the r-th document of each language (None where a language has run out)
    rounds = zip_longest(*(v for _, v in sorted(by_lang.items())))
    return [d for r in rounds for d in r if d is not None][:max_docs]


def token_batches(docs, tokenizer, batch_size: int, seq_len: int, max_tokens: int, langs: list):
    """(inputs, targets, target_lang) of shape (B, T): consecutive slices of one stream of
    documents, each <|bos|> + text. target_lang indexes `langs` (appended to as new languages
    appear)."""
    ids, lang_ids, total = [], [], 0

    def take(rows, t):
        # n inputs need n + 1 tokens (targets are shifted by one); token n stays in the stream, the
        # next row's first input, so no target is skipped or counted twice. A target counts under
        # the language of its own document.
        n = rows * t
        x, y, lab = ids[:n], ids[1 : n + 1], lang_ids[1 : n + 1]
        del ids[:n], lang_ids[:n]
        return [torch.tensor(v).view(rows, t) for v in (x, y, lab)]

    for doc in docs:
        if total >= max_tokens:
            break
        lang = doc["lang"] or "unknown"
        if lang not in langs:
            langs.append(lang)
        doc_ids = [tokenizer.bos_id] + tokenizer.encode(doc["text"])
        ids += doc_ids
        lang_ids += [langs.index(lang)] * len(doc_ids)
        total += len(doc_ids)
        while len(ids) > batch_size * seq_len:  # ">": one token more than the rows hold
            yield take(batch_size, seq_len)
    # the rest of the stream: as many full rows as it fills, then one shorter row
    if len(ids) > seq_len:
        yield take((len(ids) - 1) // seq_len, seq_len)
    if len(ids) > 1:
        yield take(1, len(ids) - 1)


def bpb_per_language(model, tokenizer, docs, batch_size, seq_len, max_tokens, device, langs=None):
    """{lang: (nats, bytes, tokens)} summed over the documents (and over the ranks under DDP, where
    every rank must pass the same `langs`, default: the documents' languages). Special tokens (0
    bytes) count for neither nats nor bytes."""
    langs = list(langs or sorted({d["lang"] or "unknown" for d in docs}))
    rows = token_batches(docs, tokenizer, batch_size, seq_len, max_tokens, langs)
    batches = ([t.to(device) for t in row] for row in rows)
    token_bytes = tokenizer.token_bytes.to(device)
    with autocast(device):
        sums = loss_sums(model, batches, device, token_bytes, len(langs)).tolist()
    return {lang: (nats, int(nbytes), int(n)) for lang, (nats, nbytes, n) in zip(langs, sums)}


def encode_fim(tokenizer, prefix: str, suffix: str) -> list[int]:
    """A PSM prompt as training lays out a FIM document (nanocode/fim.py), cut where the middle
    would start: <|bos|> <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|>."""
    sid, encode = tokenizer.special_id, tokenizer.encode
    prefix_ids = [tokenizer.bos_id, sid("<|fim_prefix|>")] + encode(prefix)
    return prefix_ids + [sid("<|fim_suffix|>")] + encode(suffix) + [sid("<|fim_middle|>")]


def main():
    args = parser.parse_args()
    from nanocode.checkpoint import load_model
    from nanocode.dataset import iter_documents

    is_ddp, rank, _, world_size, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model(args.source, device, tag=args.tag, step=args.step)
    seq_len = model.config.sequence_len

    # rank r reads rows r, r + w, ... of the val shard: the ranks' documents are disjoint
    docs = iter_documents("val", name=args.data, rank=rank, world_size=world_size)
    docs = select_docs(docs, args.max_docs)
    langs = sorted({d["lang"] or "unknown" for d in docs})
    # every rank sums into the same languages: the all-reduce adds the (languages, 3) sums row by
    # row, so row i must be the same language on every rank
    if is_ddp:
        every = [None] * world_size
        dist.all_gather_object(every, langs)
        langs = sorted(set().union(*every))
    sums = bpb_per_language(
        model, tokenizer, docs, args.batch_size, seq_len, args.max_tokens, device, langs
    )
    total_nats, total_bytes, total_tokens = (sum(s[i] for s in sums.values()) for i in range(3))
    if total_bytes == 0:
        raise NanocodeError(f"no validation text to evaluate in corpus {args.data!r}")
    overall = bpb(total_nats, total_bytes)
    per_lang = {lang: bpb(nats, nbytes) for lang, (nats, nbytes, _) in sums.items() if nbytes}
    print0(
        f"{args.source} model, step {meta.get('step', '?')}: {len(docs)} validation documents per "
        f"rank x {world_size} ranks, context {seq_len}"
    )
    print0(f"{'language':<12} {'tokens':>10} {'bytes':>12} {'bytes/tok':>9} {'bpb':>7}")
    for lang, (nats, nbytes, n) in sums.items():
        ratio = nbytes / max(n, 1)
        print0(f"{lang:<12} {n:>10,} {nbytes:>12,} {ratio:>9.2f} {bpb(nats, nbytes):>7.4f}")
    print0(f"{'all':<12} {total_tokens:>10,} {total_bytes:>12,} {'':>9} {overall:>7.4f}")

    samples = []
    if rank == 0 and args.sample_tokens > 0:
        from nanocode.engine import Engine

        engine = Engine(model, tokenizer)
        on, off = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")  # the model's, bold

        def complete(ids):
            ids = ids[-(seq_len - args.sample_tokens) :]  # room for the completion
            out = engine.generate_batch(ids, max_tokens=args.sample_tokens, temperature=0.0)
            return tokenizer.decode(out[0])

        for prompt in CODE_PROMPTS:
            out = complete([tokenizer.bos_id] + tokenizer.encode(prompt))
            samples.append({"prompt": prompt, "completion": out})
            print(f"\n--- completion ---\n{prompt}{on}{out}{off}")
        for prefix, suffix in FIM_EXAMPLES:
            out = complete(encode_fim(tokenizer, prefix, suffix))
            samples.append({"prefix": prefix, "suffix": suffix, "middle": out})
            print(f"\n--- fill in the middle ---\n{prefix}{on}{out}{off}{suffix}")
    if rank == 0:
        log_stage(
            "base_eval",
            headline=["bpb"],
            bpb=overall,
            bpb_per_lang=per_lang,
            samples=samples,
            source=args.source,
            step=meta.get("step"),
        )
    print0(f"\nbpb: {overall:.4f}")
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
