"""Agentic evaluation: the agent gets small coding tasks (nanocode.agent_tasks) and must finish them
with its tools; a verifier says whether it did. Tool calls are auto-approved (except what a task's
user refuses) and run in the sandbox, in a scratch dir per task; tasks decode together
(Engine.chat_batch).

    python -m scripts.agent_eval -i sft                           # the shipped suite (28 tasks)
    python -m scripts.agent_eval -i dpo --seed 1 --num-tasks 140  # a generated suite
    python -m scripts.agent_eval --samples transcripts.jsonl      # re-verify anyone's transcripts
    torchrun --nproc_per_node=8 -m scripts.agent_eval -i sft      # tasks sharded across ranks

Writes <out>_transcripts.jsonl (one record per task: the reply, passed, usage, the verifier's
output) and prints success per kind, the valid-call rate, calls and tokens per task and the cut-offs
(replies that hit the token budget). The last line printed is `success: <value>`.

    python -m scripts.agent_eval -i sft --constrained   # the same under nanocode.grammar

--constrained decodes under a grammar of our five tools (every call parses and matches its tool's
schema), logged as agent_eval_<source>_constrained: next to the unconstrained run it shows how much
of the success the model learned and how much decoding enforces (SFT/DPO's own tool-call validity
numbers stay unconstrained).
"""

import argparse
import json
import time
from pathlib import Path

from nanocode import agent_tasks
from nanocode.checkpoint import PHASES
from nanocode.common import (
    compute_cleanup,
    compute_init,
    gather_records,
    get_base_dir,
    progress,
    run_main,
)
from nanocode.report import log_stage
from nanocode.training import posint

parser = argparse.ArgumentParser(description="agentic coding tasks, verified")
add = parser.add_argument
add("-i", "--source", default="sft", choices=PHASES, help="checkpoint to run")
add("--suite", help="JSONL suite file (default: nanocode/data/agent_suite.jsonl)")
add("--seed", type=int, help="generate a suite from this seed instead")
add("--num-tasks", type=int, help="tasks to generate, or the first N of the suite")
add("--samples", help="JSONL of {task, message}: re-verify these, load no model")
add("--batch-size", type=posint, default=8, help="tasks decoded together per rank")
add("-t", "--temperature", type=float, default=0.0)
add("--top-k", type=int, default=50)
add("--max-tokens", type=int, help="override every task's token budget")
add("--max-tool-calls", type=int, help="override every task's tool-call budget")
add("--tag", help="checkpoint tag (default: the latest)")
add("--step", type=int, help="checkpoint step (default: the latest)")
add("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
add("--out", help="output path prefix (default: in $NANOCODE_BASE_DIR/eval)")
add("--constrained", action="store_true", help="calls must match our tools' schemas")


def main():
    args = parser.parse_args()
    if args.seed is not None:  # 28 as the shipped suite: the seven kinds in turn, four of each
        tasks = agent_tasks.make_suite(args.seed, args.num_tasks or 28)
    else:
        tasks = agent_tasks.load_suite(args.suite)[: args.num_tasks]
    # re-verifying transcripts needs no model: the CPU, whatever --device-type says
    _, rank, _, world_size, device = compute_init("cpu" if args.samples else args.device_type)
    source = "samples" if args.samples else args.source + "_constrained" * args.constrained

    t0 = time.time()
    if args.samples:
        pairs = agent_tasks.read_transcripts(args.samples, {t["id"]: t for t in tasks})
        records = [agent_tasks.replay_record(t, m) for t, m in pairs[rank::world_size]]
    else:
        from nanocode.checkpoint import load_model
        from nanocode.engine import Engine
        from nanocode.grammar import OUR_TOOLS, compile_grammar

        model, tokenizer, _ = load_model(args.source, device, tag=args.tag, step=args.step)
        grammar = compile_grammar(tokenizer, OUR_TOOLS) if args.constrained else None
        mine = tasks[rank::world_size]
        bar = progress(total=len(mine), desc="tasks", unit="task")  # rank 0's share, rate, ETA
        top_k = args.top_k if args.temperature > 0 else None
        decoding = dict(temperature=args.temperature, top_k=top_k, grammar=grammar)
        budgets = dict(max_tokens=args.max_tokens, max_tool_calls=args.max_tool_calls)
        engine = Engine(model, tokenizer)
        records = agent_tasks.run_tasks(
            engine, mine, args.batch_size, on_done=lambda _: bar.update(1), **decoding, **budgets
        )
        bar.close()
    seconds = time.time() - t0
    # every rank's records, in suite order: the transcripts file does not depend on the ranks
    records = gather_records(records, world_size, {t["id"]: i for i, t in enumerate(tasks)}, "task")
    if rank == 0:
        stats = agent_tasks.summarize(records)
        out = Path(args.out or get_base_dir() / "eval" / f"agent_eval_{source}")
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{out}_transcripts.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        log_stage(f"agent_eval_{source}", agent_tasks.HEADLINE, **stats, seconds=round(seconds, 1))
        print(
            f"agent eval ({source}): {stats['tasks']} tasks in {seconds:.1f}s "
            f"({world_size} ranks); wrote {out}_transcripts.jsonl"
        )
        for kind, v in stats["per_kind"].items():
            print(f"  {kind:10s} {v:.3f}")
        rate = stats["valid_call_rate"]
        print(
            f"valid-call rate: {'n/a (no calls)' if rate is None else f'{rate:.3f}'}; "
            f"calls/task {stats['calls_per_task']:.2f}; "
            f"tokens/task {stats['tokens_per_task']:.1f}; cut-offs {stats['cut_offs']}"
        )
        print(f"success: {stats['success']:.4f}")
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
