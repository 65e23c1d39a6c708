"""Throughput of the whole pretraining loader in one process: read shards, FIM, tokenize, pack.

    python -m bench.dataloader                    # B=32, T=2048, $NANOCODE_BASE_DIR/tokenizer
    python -m bench.dataloader --max-doc-chars 0  # no chunking of long files: nanochat-style crop

Prints tokens/s (batches handed to the caller, B*T tokens each, after a warmup that fills the
prefetch queue and lets the best-fit buffer reach its steady state), the fraction of tokens lost to
cropping while timing, and the tokens per CPU-second of the whole process (all its threads), which
says what a core does even on a busy machine. Aims: >= 1M tokens/s per process on 2 cores (each
GPU's rank runs its own loader, which must stay ahead of the GPU's training steps), cropping <= 35%
at T=2048. Needs a corpus (python -m nanocode.dataset --local) and a tokenizer (python -m
scripts.tok_train).
"""

import argparse
import os
import time

from nanocode.common import run_main
from nanocode.dataloader import DataLoader
from nanocode.tokenizer import get_tokenizer


def main():
    parser = argparse.ArgumentParser(description="throughput of the pretraining loader")
    add = parser.add_argument
    add("--B", type=int, default=32)
    add("--T", type=int, default=2048)
    add("--batches", type=int, default=100, help="batches timed after the warmup")
    add("--warmup", type=int, default=60, help="batches to fill the queue and settle the buffer")
    add("--threads", type=int, default=4, dest="tokenizer_threads", help="tokenizer threads")
    add("--buffer-size", type=int, default=512, help="documents in the best-fit buffer")
    add("--max-doc-chars", type=int, default=None, help="chunk longer documents (0: never)")
    add("--fim-rate", type=float, default=0.5)
    add("--split", default="train")
    add("--name", default="code")
    args = parser.parse_args()

    tok = get_tokenizer()
    names = ("split", "fim_rate", "name", "buffer_size", "max_doc_chars", "tokenizer_threads")
    loader = DataLoader(tok, args.B, args.T, **{k: getattr(args, k) for k in names})
    for _ in range(args.warmup):
        next(loader)
    # counters and clocks read after the warmup: cropping and CPU time cover the timed batches
    # only. os.times() is this process's user + system CPU, every thread (packing, tokenizer).
    before, start_cpu, t0 = loader.state_dict(), os.times(), time.perf_counter()
    for _ in range(args.batches):
        next(loader)
    dt, end_cpu, after = time.perf_counter() - t0, os.times(), loader.state_dict()
    loader.close()
    tokens = args.batches * args.B * args.T
    cpu = (end_cpu.user + end_cpu.system) - (start_cpu.user + start_cpu.system)
    cropped = after["tokens_cropped"] - before["tokens_cropped"]
    read = cropped + after["tokens_packed"] - before["tokens_packed"]
    config = loader.config
    print(
        f"tokenizer: vocab {tok.vocab_size:,}; B={args.B} T={args.T} buffer={args.buffer_size} "
        f"max_doc_chars={config['max_doc_chars']} fim_rate={config['fim_rate']} threads="
        f"{args.tokenizer_threads}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"throughput: {tokens / dt:,.0f} tokens/s ({args.batches} batches of "
        f"{args.B * args.T:,} tokens in {dt:.2f} s); {cpu / dt:.2f} cores busy, "
        f"{tokens / cpu:,.0f} tokens per CPU-second"
    )
    print(
        f"cropped: {cropped / read:.1%} of the tokens read while timing ({cropped:,} of "
        f"{read:,}); epoch {after['epoch']}"
    )


if __name__ == "__main__":
    run_main(main)
