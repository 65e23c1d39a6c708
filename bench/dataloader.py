"""Throughput of the whole pretraining loader in one process: read shards, FIM, tokenize, pack.

    python -m bench.dataloader                      # B=32, T=2048, the tokenizer in $NANOCODE_BASE_DIR/tokenizer
    python -m bench.dataloader --max-doc-chars 0    # no chunking of long files: nanochat-style crop only

Prints tokens/s (batches handed to the caller, B*T tokens each, after a warmup that fills the prefetch queue and
lets the best-fit buffer reach its steady state), the fraction of tokens lost to cropping while timing, and the
tokens per CPU-second of the whole process (all its threads), which says what a core does even on a busy
machine. Aims: >= 1M tokens/s per process on 2 cores (each GPU's rank runs its own loader, which must
stay ahead of the GPU's training steps), cropping <= 35% at T=2048. Needs a corpus (python -m nanocode.dataset --local) and a
tokenizer (python -m scripts.tok_train).
"""

import argparse
import os
import time

from nanocode.common import run_main
from nanocode.dataloader import DataLoader
from nanocode.tokenizer import get_tokenizer


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--B", type=int, default=32)
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=100, help="batches timed after the warmup")
    parser.add_argument(
        "--warmup",
        type=int,
        default=60,
        help="batches before timing: fills the prefetch queue and lets the packing buffer settle",
    )
    parser.add_argument("--threads", type=int, default=4, help="tokenizer threads")
    parser.add_argument(
        "--buffer-size", type=int, default=512, help="documents in the best-fit buffer"
    )
    parser.add_argument(
        "--max-doc-chars",
        type=int,
        default=None,
        help="chunk longer documents (default 2*T, 0: never)",
    )
    parser.add_argument("--fim-rate", type=float, default=0.5)
    parser.add_argument("--split", default="train")
    parser.add_argument("--name", default="code")
    args = parser.parse_args()

    tok = get_tokenizer()
    loader = DataLoader(
        tok,
        args.B,
        args.T,
        split=args.split,
        fim_rate=args.fim_rate,
        name=args.name,
        buffer_size=args.buffer_size,
        max_doc_chars=args.max_doc_chars,
        tokenizer_threads=args.threads,
    )
    for _ in range(args.warmup):
        next(loader)
    before, start_cpu, t0 = loader.state_dict(), os.times(), time.perf_counter()
    for _ in range(args.batches):
        next(loader)
    dt, end_cpu = time.perf_counter() - t0, os.times()
    sd = loader.state_dict()
    loader.close()
    tokens = args.batches * args.B * args.T
    cpu = (end_cpu.user + end_cpu.system) - (start_cpu.user + start_cpu.system)
    n_cropped = sd["tokens_cropped"] - before["tokens_cropped"]
    n_read = n_cropped + sd["tokens_packed"] - before["tokens_packed"]
    print(
        f"tokenizer: vocab {tok.vocab_size:,}; B={args.B} T={args.T} buffer={args.buffer_size} "
        f"max_doc_chars={loader.max_doc_chars} fim_rate={loader.fim_rate} threads={args.threads}; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"throughput: {tokens / dt:,.0f} tokens/s ({args.batches} batches of {args.B * args.T:,} tokens in {dt:.2f} s); "
        f"{cpu / dt:.2f} cores busy, {tokens / cpu:,.0f} tokens per CPU-second"
    )
    print(
        f"cropped: {n_cropped / n_read:.1%} of the tokens read while timing ({n_cropped:,} of {n_read:,}); epoch {sd['epoch']}"
    )


if __name__ == "__main__":
    run_main(main)
