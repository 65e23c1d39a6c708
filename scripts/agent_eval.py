"""Agentic evaluation: the agent gets small coding tasks (nanocode.agent_tasks) and must finish them with
its tools; a verifier says whether it did. Tool calls are auto-approved (except what a task's user
refuses) and run in the sandbox, in a scratch dir per task; tasks decode together (Engine.chat_batch).

    python -m scripts.agent_eval -i sft                          # the shipped suite (28 tasks)
    python -m scripts.agent_eval -i dpo --seed 1 --num-tasks 140 # a generated suite, held-out templates
    python -m scripts.agent_eval --samples transcripts.jsonl     # re-verify anyone's transcripts, no model
    torchrun --nproc_per_node=8 -m scripts.agent_eval -i sft     # tasks sharded across ranks

Writes <out>_transcripts.jsonl (one record per task: the reply, passed, usage, the verifier's output)
and prints success per kind, the valid-call rate, calls and tokens per task and the cut-offs
(replies that hit the token budget). The last line printed is `success: <value>`.
"""

import argparse
import json
import time
from pathlib import Path

from nanocode.agent_tasks import (
    HEADLINE,
    load_suite,
    make_suite,
    read_transcripts,
    replay,
    run_tasks,
    summarize,
    task_record,
)
from nanocode.checkpoint import PHASES
from nanocode.common import (
    NanocodeError,
    compute_cleanup,
    compute_init,
    gather_records,
    get_base_dir,
    progress,
    run_main,
)
from nanocode.report import log_stage

parser = argparse.ArgumentParser(description="agentic coding tasks, verified")
parser.add_argument("-i", "--source", default="sft", choices=PHASES, help="which checkpoint to run")
parser.add_argument(
    "--suite",
    default=None,
    help="JSONL suite file (default: the shipped nanocode/data/agent_suite.jsonl)",
)
parser.add_argument(
    "--seed", type=int, default=None, help="generate a suite from this seed instead of reading one"
)
parser.add_argument(
    "--num-tasks",
    type=int,
    default=None,
    help="tasks to generate (with --seed), or the first N of the suite",
)
parser.add_argument(
    "--samples", default=None, help="JSONL of {task, message}: re-verify these, load no model"
)
parser.add_argument("--batch-size", type=int, default=8, help="tasks decoded together per rank")
parser.add_argument("-t", "--temperature", type=float, default=0.0)
parser.add_argument("--top-k", type=int, default=50)
parser.add_argument(
    "--max-tokens", type=int, default=None, help="override every task's token budget"
)
parser.add_argument(
    "--max-tool-calls", type=int, default=None, help="override every task's tool-call budget"
)
parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
parser.add_argument(
    "--out",
    default=None,
    help="output path prefix (default: $NANOCODE_BASE_DIR/eval/agent_eval_<source>)",
)


def main():
    args = parser.parse_args()
    if args.batch_size < 1:
        raise NanocodeError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seed is not None:
        tasks = make_suite(args.seed, args.num_tasks or 28)
    else:
        tasks = load_suite(args.suite)[: args.num_tasks]
    _, rank, _, world_size, device = compute_init("cpu" if args.samples else args.device_type)
    source = "samples" if args.samples else args.source

    t0 = time.time()
    if args.samples:
        pairs = read_transcripts(args.samples, {t["id"]: t for t in tasks})
        mine = pairs[rank::world_size]
        records = []
        for task, message in mine:
            passed, tail = replay(task, message)
            records.append(
                task_record(
                    task,
                    message,
                    "stop",
                    {"prompt_tokens": 0, "completion_tokens": 0},
                    passed,
                    tail,
                )
            )
    else:
        from nanocode.checkpoint import load_model
        from nanocode.engine import Engine

        model, tokenizer, _ = load_model(args.source, device, tag=args.tag, step=args.step)
        mine = tasks[rank::world_size]
        bar = progress(
            total=len(mine), desc="tasks", unit="task"
        )  # rank 0's share, with rate and ETA
        records = run_tasks(
            Engine(model, tokenizer),
            mine,
            args.batch_size,
            args.temperature,
            args.top_k if args.temperature > 0 else None,
            max_tokens=args.max_tokens,
            max_tool_calls=args.max_tool_calls,
            on_done=lambda record: bar.update(1),
        )
        bar.close()
    seconds = time.time() - t0
    records = gather_records(records, world_size, {t["id"]: i for i, t in enumerate(tasks)}, "task")
    if rank == 0:
        stats = summarize(records)
        out = Path(args.out) if args.out else get_base_dir() / "eval" / f"agent_eval_{source}"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{out}_transcripts.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        log_stage(f"agent_eval_{source}", HEADLINE, **stats, seconds=round(seconds, 1))
        print(
            f"agent eval ({source}): {stats['tasks']} tasks in {seconds:.1f}s ({world_size} ranks); "
            f"wrote {out}_transcripts.jsonl"
        )
        for kind, v in stats["per_kind"].items():
            print(f"  {kind:10s} {v:.3f}")
        rate = stats["valid_call_rate"]
        print(
            f"valid-call rate: {'n/a (no calls)' if rate is None else f'{rate:.3f}'}; "
            f"calls/task {stats['calls_per_task']:.2f}; tokens/task {stats['tokens_per_task']:.1f}; "
            f"cut-offs {stats['cut_offs']}"
        )
        print(f"success: {stats['success']:.4f}")
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
