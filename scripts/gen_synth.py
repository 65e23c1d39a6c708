"""Generate the synthetic SFT trajectories and DPO preference pairs from the local code corpus.

    python -m scripts.gen_synth                      # 3000 train + 200 val trajectories, pairs for all
    python -m scripts.gen_synth --num-train 500 --num-val 50

Writes to $NANOCODE_BASE_DIR/sft/: synth_train.jsonl, synth_val.jsonl (conversations, see
nanocode/synth.py for the record format) and dpo_train.jsonl, dpo_val.jsonl (preference pairs).
Train trajectories use functions from the corpus's train split, val ones from its val split, so the
held-out prompts are about code the model was not fine-tuned on. Every tool output comes from really
running the tool in a scratch directory; the work is spread over processes (each record depends only
on the seed and its index, so the result does not depend on --workers).
"""
import argparse
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from itertools import islice

from nanocode import synth
from nanocode.common import NanocodeError, get_base_dir, print0, run_main
from nanocode.conversations import validate_conversation, validate_preference, write_jsonl


def get_args(argv=None):
    p = argparse.ArgumentParser(description="generate synthetic tool-use trajectories and DPO pairs")
    p.add_argument("--num-train", type=int, default=3000, help="train trajectories")
    p.add_argument("--num-val", type=int, default=200, help="held-out trajectories")
    p.add_argument("--pairs", type=int, default=-1, help="train preference pairs (-1: one per train trajectory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-docs", type=int, default=20000, help="corpus documents scanned per split for functions")
    p.add_argument("--data-name", type=str, default="code", help="corpus name (nanocode.dataset)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    return p.parse_args(argv)


_FUNCS = None


def _init(funcs):
    global _FUNCS
    _FUNCS = funcs


def _traj(job):
    i, seed = job
    return synth.trajectory(i, seed, _FUNCS)


def _pair(job):
    i, record, seed = job
    return synth.pair(i, record, seed)


def build(split: str, n: int, n_pairs: int, seed: int, args):
    from nanocode.dataset import iter_documents
    docs = islice(iter_documents(split, name=args.data_name), args.max_docs)
    funcs = synth.corpus_functions(docs, limit=3000)
    if len(funcs) < 20:
        raise NanocodeError(f"only {len(funcs)} usable Python functions in the {split} split of corpus {args.data_name!r} "
                            f"(scanned {args.max_docs} documents): need at least 20; build a Python corpus with "
                            f"`python -m nanocode.dataset --local`")
    t0 = time.time()
    with ProcessPoolExecutor(args.workers, initializer=_init, initargs=(funcs,)) as pool:
        records = list(pool.map(_traj, [(i, seed) for i in range(n)], chunksize=8))
        pairs = [p for p in pool.map(_pair, [(i, r, seed) for i, r in enumerate(records[:n_pairs])], chunksize=8) if p]
    for r in records:
        validate_conversation(r, f"synthetic {split} trajectory ({r['kind']})")
    for p in pairs:
        validate_preference(p, f"synthetic {split} pair ({p['kind']})")
    print0(f"{split}: {len(funcs)} corpus functions -> {len(records)} trajectories {dict(Counter(r['kind'] for r in records))}, "
           f"{len(pairs)} pairs {dict(Counter(p['kind'] for p in pairs))} in {time.time() - t0:.0f}s")
    return records, pairs


def main(argv=None):
    args = get_args(argv)
    out = get_base_dir() / "sft"
    n_pairs = args.num_train if args.pairs < 0 else args.pairs
    train, train_pairs = build("train", args.num_train, n_pairs, args.seed, args)
    val, val_pairs = build("val", args.num_val, args.num_val, args.seed + 1, args)
    for name, recs in [("synth_train", train), ("synth_val", val), ("dpo_train", train_pairs), ("dpo_val", val_pairs)]:
        path = write_jsonl(out / f"{name}.jsonl", recs)
        print0(f"wrote {len(recs)} records to {path}")


if __name__ == "__main__":
    run_main(main)
