"""Generate the synthetic SFT trajectories, DPO preference pairs and held-out validity prompts from
the local code corpus.

    python -m scripts.gen_synth      # 20000 train + 500 val trajectories, their pairs, 300 prompts
    python -m scripts.gen_synth --num-train 2000 --num-val 100 --workers 2
    python -m scripts.gen_synth --weights run_report=20,no_tool=5   # other weights than the table's

Writes to $NANOCODE_BASE_DIR/sft/: synth_train.jsonl, synth_val.jsonl (conversations, see
nanocode/synth.py for the record format), dpo_train.jsonl, dpo_val.jsonl (preference pairs) and
validity_prompts.jsonl ({"messages": [...ending with a user turn], "kind", "seen", "template"}: the
prompts scripts/code_sft.py measures tool-call validity on, including kinds and phrasings that
training never sees). Train trajectories use functions from the corpus's train split, val ones and
the prompts from its val split, so held-out prompts are about code the model was not fine-tuned on.
Every tool output comes from really running the tool in a scratch directory. Records are
deduplicated (identical conversations count once) and generated until there are as many distinct
ones as asked. Each record depends only on the seed and its index, so the result does not depend
on --workers. A preference pair's rejected side reuses the chosen side's outputs for the calls both
make from the start (the same calls on the same files print the same; tests replay them); only
what differs runs. At the end a diversity table: records per kind, distinct tool-call sequences,
turns, calls, shares.
"""

import argparse
import json
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from itertools import islice, repeat

from nanocode import synth, synth_corpus, synth_pairs, synth_session
from nanocode.common import NanocodeError, get_base_dir, print0, progress, run_main
from nanocode.conversations import validate_conversation, validate_preference, write_jsonl
from nanocode.engine import DENIED


def get_args(argv=None):
    p = argparse.ArgumentParser(description="generate synthetic tool-use trajectories, DPO pairs")
    p.add_argument("--num-train", type=int, default=20000, help="distinct train trajectories")
    p.add_argument("--num-val", type=int, default=500, help="distinct held-out trajectories")
    p.add_argument("--num-prompts", type=int, default=300, help="held-out validity prompts")
    p.add_argument("--pairs", type=int, default=-1, help="pairs from the first N trajectories")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-docs", type=int, default=20000, help="corpus documents per split")
    p.add_argument("--data-name", type=str, default="code", help="corpus name (nanocode.dataset)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--weights",
        default="",
        help="kind=weight,... instead of the table's weights for the trajectories (the validity "
        "prompts keep the table's), e.g. run_report=20",
    )
    args = p.parse_args(argv)
    args.kind_weights = {}
    for item in [w.strip() for w in args.weights.split(",") if w.strip()]:
        kind, _, weight = item.partition("=")
        kind = kind.strip()
        if kind not in synth.TASKS:
            kinds = ", ".join(synth.TASKS)
            raise NanocodeError(f"--weights: {kind!r} is not a kind training draws from ({kinds})")
        try:
            args.kind_weights[kind] = float(weight)
        except ValueError:
            raise NanocodeError(f"--weights: {item!r} is not kind=number") from None
        if args.kind_weights[kind] < 0:
            raise NanocodeError(f"--weights: {item!r}: a weight must be >= 0")
    return args


# each worker's, set once by _init: the corpus is sent to a worker once, not pickled with every job
_CORPUS, _WEIGHTS = None, None


def _init(corpus, weights):
    global _CORPUS, _WEIGHTS
    _CORPUS, _WEIGHTS = corpus, weights


def _traj(job):
    return synth.trajectory(*job, _CORPUS, weights=_WEIGHTS)


def _prompt(job):
    return synth.validity_prompt(*job, _CORPUS)


def load_corpus(split: str, args) -> synth_corpus.Corpus:
    """The Python functions (at most 3,000) and the files of the first --max-docs documents of
    one split of the corpus: what the trajectories are built from. Fewer than 20 functions is an
    error that says how to build a Python corpus."""
    from nanocode.dataset import iter_documents

    docs = list(islice(iter_documents(split, name=args.data_name), args.max_docs))
    funcs = synth_corpus.corpus_functions(docs, limit=3000)
    if len(funcs) < 20:
        raise NanocodeError(
            f"only {len(funcs)} usable Python functions in the {split} split of corpus "
            f"{args.data_name!r} (scanned {args.max_docs} documents): need at least 20; build a "
            "Python corpus with `python -m nanocode.dataset --local`"
        )
    return synth_corpus.Corpus(funcs, synth_corpus.corpus_files(docs))


def distinct(pool, fn, n: int, seed: int, desc: str) -> list:
    """n distinct results of fn((i, seed)) for i = 0, 1, 2, ...: duplicates skipped, more made."""
    out, seen, start = [], set(), 0
    bar = progress(total=n, desc=desc, unit="rec")
    while len(out) < n:
        todo = max(64, int((n - len(out)) * 1.1))  # 10% extra: duplicates get skipped
        for r in pool.map(fn, [(i, seed) for i in range(start, start + todo)], chunksize=16):
            key = json.dumps(r["messages"], sort_keys=True)
            if key not in seen and len(out) < n:
                seen.add(key)
                out.append(r)
                bar.update(1)
        start += todo
        if start > 20 * n + 1000:  # the generator keeps repeating itself: stop, do not loop forever
            raise NanocodeError(f"{desc}: only {len(out)} distinct records in {start} (asked {n})")
    bar.close()
    return out


def build(split: str, n: int, n_pairs: int, n_prompts: int, seed: int, args):
    """One split in a process pool (each worker gets the corpus once, through _init): n distinct
    trajectories, n_prompts distinct validity prompts (seed + 7), and a preference pair from each
    of the first n_pairs trajectories (those that give none are dropped), every record validated.
    Returns (trajectories, pairs, prompts)."""
    corpus = load_corpus(split, args)
    t0 = time.time()
    init = (corpus, args.kind_weights or None)
    with ProcessPoolExecutor(args.workers, initializer=_init, initargs=init) as pool:
        records = distinct(pool, _traj, n, seed, f"{split} trajectories")
        # seed + 7: the prompts' random draws are not those of the split's trajectories
        prompts = distinct(pool, _prompt, n_prompts, seed + 7, "prompts") if n_prompts else []
        n_pairs = min(n_pairs, len(records))
        pairs = pool.map(synth_pairs.pair, range(n_pairs), records, repeat(seed), chunksize=16)
        pairs = [p for p in progress(pairs, total=n_pairs, desc=f"{split} pairs") if p]
    # checked before anything is written: a generator bug fails here, not in code_sft or code_dpo
    for r in records:
        validate_conversation(r, f"synthetic {split} trajectory ({r['kind']})")
    for p in prompts:
        validate_conversation(p, f"validity prompt ({p['kind']})", last_role="user")
    for p in pairs:
        validate_preference(p, f"synthetic {split} pair ({p['kind']})")
    seconds = time.time() - t0
    print0(
        f"{split}: {len(corpus)} corpus functions, {len(corpus.others)} other files -> "
        f"{len(records)} trajectories, {len(pairs)} pairs {dict(Counter(p['kind'] for p in pairs))}"
        f", {len(prompts)} prompts in {seconds:.0f}s ({len(records) / max(seconds, 1e-9):.1f} "
        f"trajectories/s with {args.workers} workers)"
    )
    return records, pairs, prompts


def diversity(records, tokenizer=None) -> dict:
    """Counts that say how varied the data is (the table gen_synth prints)."""
    n = max(len(records), 1)
    turns = [sum(m["role"] == "user" for m in r["messages"]) for r in records]
    parts = [[p for turn in synth_session.assistant_turns(r) for p in turn] for r in records]
    calls = [sum(p["type"] == "tool_call" for p in ps) for ps in parts]
    denied = [any(p["type"] == "tool_output" and p["text"] == DENIED for p in ps) for ps in parts]
    out = {
        "records": len(records),
        "kinds": dict(Counter(r["kind"] for r in records).most_common()),
        "shapes": len({synth_session.call_shape(r) for r in records}),
        "turns_mean": sum(turns) / n,
        "turns_max": max(turns, default=0),
        "calls_mean": sum(calls) / n,
        "calls_max": max(calls, default=0),
        "multi_turn": sum(t > 1 for t in turns) / n,
        "no_tool": sum(c == 0 for c in calls) / n,
        "denial": sum(denied) / n,
    }
    if tokenizer is not None:
        toks = sorted(len(tokenizer.render_conversation(r)[0]) for r in records)
        out.update(tokens=sum(toks), tokens_mean=sum(toks) / n, tokens_max=toks[-1] if toks else 0)
        out["tokens_p90"] = toks[int(0.9 * (len(toks) - 1))] if toks else 0
    return out


def print_table(d: dict):
    """Prints diversity()'s counts: records and share per kind, tool-call sequences, turns and
    calls per conversation, the multi-turn / no-tool / denial shares, and the token counts when a
    tokenizer was there to count them."""
    print0(f"{'kind':<20}{'records':>9}{'share':>8}")
    for k, c in d["kinds"].items():
        print0(f"{k:<20}{c:>9}{c / d['records']:>8.1%}")
    print0(
        f"distinct tool-call sequences: {d['shapes']} | turns/conversation: mean "
        f"{d['turns_mean']:.2f}, max {d['turns_max']} | calls/conversation: mean "
        f"{d['calls_mean']:.2f}, max {d['calls_max']}"
    )
    shares = f"{d['multi_turn']:.1%} | without tools {d['no_tool']:.1%} | with a denial"
    print0(f"multi-turn {shares} {d['denial']:.1%}")
    if "tokens" in d:
        print0(
            f"tokens: {d['tokens']:,} in all, mean {d['tokens_mean']:.0f}, p90 {d['tokens_p90']}, "
            f"max {d['tokens_max']}"
        )


def main(argv=None):
    args = get_args(argv)
    n_pairs = args.num_train if args.pairs < 0 else args.pairs
    t0 = time.time()
    # validity prompts from the val split only: held out, as the val trajectories are; the val
    # split has its own seed, so val trajectory i does not repeat train trajectory i's draws
    train, train_pairs, _ = build("train", args.num_train, n_pairs, 0, args.seed, args)
    val, val_pairs, prompts = build(
        "val", args.num_val, args.num_val, args.num_prompts, args.seed + 1, args
    )
    wall = time.time() - t0
    outputs = {"synth_train": train, "synth_val": val, "dpo_train": train_pairs}
    outputs.update(dpo_val=val_pairs, validity_prompts=prompts)
    for name, recs in outputs.items():
        path = write_jsonl(get_base_dir() / "sft" / f"{name}.jsonl", recs)
        print0(f"wrote {len(recs)} records to {path}")
    try:
        from nanocode.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    except Exception:  # noqa: BLE001 -- no tokenizer trained yet: the table leaves out the tokens
        tokenizer = None
    print0(
        f"diversity of the {len(train)} train trajectories (generated in {wall:.0f}s, all splits):"
    )
    print_table(diversity(train, tokenizer))
    seen = sum(p["seen"] for p in prompts)
    kinds = dict(Counter((p["kind"], p["seen"]) for p in prompts).most_common(8))
    print0(f"validity prompts: {kinds} ... {seen} seen, {len(prompts) - seen} unseen")


if __name__ == "__main__":
    run_main(main)
