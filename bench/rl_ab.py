"""RL configurations on a tiny model: held-out pass@1 before and after, with the noise of both.

    python -m bench.rl_ab                               # setup (once), then every row, 2 at a time
    python -m bench.rl_ab --rows plain positive-only --seeds 0 1
    python -m bench.rl_ab --collect                     # the table and plot from finished runs

Setup, in $NANOCODE_BASE_DIR, skipped where its checkpoint exists (needs a corpus and a tokenizer:
python -m nanocode.dataset --local --max-mb 20; python -m scripts.tok_train --vocab-size 4096):
base_train at depth 2 for 80 steps (1.97M parameters, barely trained), then SFT on 400 synthetic
write-and-run conversations (synth kind write_run) for 250 steps, saved as sft/rl_ab.
Rows: code_rl flags on top of the shared ones (--tasks programs, 8 samples per task, 256 new
tokens at temperature 1); each row trains once per --seeds, from sft/rl_ab, saved as
rl/rl_ab_<row>_s<seed>. Held-out pass@1: the same 60 held-out tasks (requests never trained on) x 4
samples, for the SFT checkpoint and for every run, at each of --eval-seeds. Two noises: the sd over
eval seeds of one checkpoint (sampling), and the spread between the training seeds of one row.
Every training or evaluation is one child process (`run`), its output in --log-dir.

Writes bench/results/cpu/rl_ab.{json,md,png} (or --out): per checkpoint the pass@1 of each eval
seed and their mean; per run the training curve (reward, pass rate and malformed-call rate of each
step's samples).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nanocode.checkpoint import checkpoint_dir, list_steps, load_meta
from nanocode.common import NanocodeError, run_main
from nanocode.report import ema

ROWS = {  # name -> code_rl flags on top of the shared ones
    "plain": "--init-lr-frac 0.05 --steps 100",
    "plain 32 tasks/step": "--init-lr-frac 0.05 --steps 50 --tasks-per-step 32",
    "positive-only": "--init-lr-frac 0.05 --steps 100 --neg-weight 0",
    "positive-only lr x2": "--init-lr-frac 0.1 --steps 120 --neg-weight 0",
}
SHARED = (
    "--tasks programs --eval-tasks 60 --eval-samples 4 --max-new-tokens 256 --temperature 1.0 "
    "--group-size 8 --tasks-per-step 8 --eval-every 50 --device-type cpu"
).split()
BASE = (
    "--depth 2 --max-seq-len 384 --device-batch-size 4 --total-batch-size 1536 --num-iterations 80 "
    "--eval-every 80 --eval-tokens 16384 --sample-every -1 --fim-rate 0.5 --device-type cpu"
).split()
SFT = (
    "--batch-size 8 --steps 250 --init-lr-frac 0.5 --max-seq-len 384 --eval-every -1 "
    "--eval-convs 16 --eval-prompts 16 --device-type cpu"
).split()
SFT_TAG = "rl_ab"
REPO = Path(__file__).resolve().parents[1]


def run(module, flags, log):
    """`python -m module flags` in a child process (one thread: several run at once), its output
    in `log`."""
    with open(log, "w") as f:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", module, *flags]
        if subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise RuntimeError(f"{module} {' '.join(flags)} failed; see {log}")


def setup(log_dir):
    """The base and SFT checkpoints every row starts from."""
    if not list_steps(checkpoint_dir("base", SFT_TAG)):
        run("scripts.base_train", [*BASE, "--model-tag", SFT_TAG], log_dir / "rl_ab_base.log")
    if not list_steps(checkpoint_dir("sft", SFT_TAG)):
        from nanocode import synth
        from nanocode.conversations import write_jsonl

        data = {"": (400, 11), "_val": (40, 12)}  # file suffix -> (conversations, seed)
        for suffix, (n, seed) in data.items():
            convs = [synth.trajectory(i, seed, [], ["write_run"]) for i in range(n)]
            write_jsonl(log_dir / f"rl_ab_sft{suffix}.jsonl", convs)
        mix, val = log_dir / "rl_ab_sft.jsonl", log_dir / "rl_ab_sft_val.jsonl"
        flags = [*SFT, "--model-tag", SFT_TAG, "--mix", str(mix), "--val", str(val)]
        run("scripts.code_sft", flags, log_dir / "rl_ab_sft.log")


def tag_of(name, seed):
    return f"rl_ab_{re.sub('[^a-z0-9]+', '_', name)}_s{seed}"


def read_eval(log_dir, tag, seed):
    """pass@1 from an eval log (NanocodeError if the eval has not run)."""
    log = log_dir / f"{tag}_eval{seed}.log"
    m = re.search(r"held-out pass@1 (\S+)", log.read_text()) if log.exists() else None
    if m is None:
        raise NanocodeError(f"no held-out pass@1 in {log}")
    return float(m.group(1))


def evaluate(source, tag, eval_seed, log_dir):
    """pass@1 of checkpoint source/tag on the held-out tasks at one eval seed (run once, then read
    from its log)."""
    try:
        return read_eval(log_dir, tag, eval_seed)
    except NanocodeError:
        flags = [*SHARED, "--eval-only", "--source", source, "--model-tag", tag]
        log = log_dir / f"{tag}_eval{eval_seed}.log"
        run("scripts.code_rl", flags + ["--eval-seed", str(eval_seed)], log)
        return read_eval(log_dir, tag, eval_seed)


def train(name, seed, args):
    """Trains one row at one seed from sft/rl_ab (skipped when its rl checkpoint exists), then
    evaluates it at every eval seed; returns those pass@1 values (main reads them back from the
    logs through run_result)."""
    tag, log_dir = tag_of(name, seed), Path(args.log_dir)
    if not list_steps(checkpoint_dir("rl", tag)):
        t0 = time.time()
        flags = ["--model-tag", SFT_TAG, "--save-tag", tag, *SHARED, *ROWS[name].split()]
        run("scripts.code_rl", flags + ["--seed", str(seed)], log_dir / f"{tag}.log")
        print(f"{name} seed {seed}: trained in {time.time() - t0:.0f}s", flush=True)
    return [evaluate("rl", tag, s, log_dir) for s in args.eval_seeds]


def run_result(name, seed, args):
    """One run from its checkpoint's metadata (curves) and its eval logs; None if it has not
    finished."""
    tag = tag_of(name, seed)
    try:
        c = load_meta(checkpoint_dir("rl", tag))["curves"]
        evals = [read_eval(Path(args.log_dir), tag, s) for s in args.eval_seeds]
    except NanocodeError as e:  # a run that never finished has no checkpoint or eval log
        print(f"{name} seed {seed}: no result ({e})")
        return None
    curve = {k: [v for _, v in points] for k, points in c.items()}
    step_s = sum(curve["step_s"])
    return dict(
        row=name,
        seed=seed,
        flags=ROWS[name].split(),
        pass_at_1=evals,
        mean=statistics.mean(evals),
        reward=curve["reward"],
        pass_rate=curve["pass_rate"],
        malformed=curve["malformed_call"],
        step_seconds=round(step_s),
        sampling_share=sum(curve["sample_s"]) / step_s,
        verifying_share=sum(curve["verify_s"]) / step_s,
        completions_per_s=statistics.median(curve["completions_per_s"]),
    )


def sd(xs):
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


def write(before, runs, args, wall):
    """Writes rl_ab.json (the setup, the SFT checkpoint's pass@1 per eval seed `before`, every
    run), rl_ab.md (a line per run, then per row the mean and sd of its runs' means) and
    rl_ab.png (reward and malformed-call curves, EMA-smoothed, and each run's mean pass@1 +- 2
    standard errors against the SFT band). wall: the bench's seconds."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count()
    info = dict(shared=SHARED, eval_seeds=args.eval_seeds, seeds=args.seeds)
    info.update(wall_seconds=round(wall), cpus=cpus, load_average=os.getloadavg())
    result = json.dumps(dict(setup=info, before=before, runs=runs), indent=1)
    (out / "rl_ab.json").write_text(result)
    b_mean, b_sd = statistics.mean(before), sd(before)
    # the standard error of the mean over eval seeds: sd / sqrt(n). +- 2 s.e. is roughly a 95%
    # interval: a change within it cannot be told apart from the eval's sampling noise
    se = b_sd / len(before) ** 0.5
    command = " ".join(a for a in sys.argv[1:] if a != "--collect")
    lines = [
        f"# RL configurations on a 2M-parameter model (CPU, {cpus} cores shared)",
        "",
        f"`python -m bench.rl_ab {command}`. Held-out pass@1: 60 tasks x 4 samples at temperature "
        f"1, at eval seeds {', '.join(map(str, args.eval_seeds))}; the SFT checkpoint: "
        f"{', '.join(f'{x:.3f}' for x in before)}, mean **{b_mean:.4f}**, sd {b_sd:.4f} over eval "
        f"seeds (standard error of a {len(before)}-seed mean {se:.4f}). Change = a run's mean "
        f"over the same eval seeds minus the SFT checkpoint's.",
        "",
        "| row | flags | seed | pass@1 per eval seed | mean | change | train reward, first -> last "
        "25 steps | malformed calls, first -> last 25 | time in steps (sampling, verifying) | "
        "completions/s sampling (median step) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        reward, malformed = r["reward"], r["malformed"]
        first, final = statistics.mean(reward[:25]), statistics.mean(reward[-25:])
        bad_first, bad_final = statistics.mean(malformed[:25]), statistics.mean(malformed[-25:])
        lines.append(
            f"| {r['row']} | `{' '.join(r['flags'])}` | {r['seed']} | "
            f"{' '.join(f'{x:.3f}' for x in r['pass_at_1'])} | {r['mean']:.4f} | "
            f"{r['mean'] - b_mean:+.4f} | {first:.3f} -> {final:.3f} | {bad_first:.3f} -> "
            f"{bad_final:.3f} | {r['step_seconds']} s ({r['sampling_share']:.0%}, "
            f"{r['verifying_share']:.0%}) | {r['completions_per_s']:.1f} |"
        )
    lines += ["", "| row | runs | mean of the runs' means | change | spread between runs (sd) |"]
    lines.append("|---|---|---|---|---|")
    names = list(dict.fromkeys(r["row"] for r in runs))
    for name in names:
        means = [r["mean"] for r in runs if r["row"] == name]
        m = statistics.mean(means)
        lines.append(f"| {name} | {len(means)} | {m:.4f} | {m - b_mean:+.4f} | {sd(means):.4f} |")
    (out / "rl_ab.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in runs:
        color, style = f"C{names.index(r['row'])}", "-" if r["seed"] == args.seeds[0] else "--"
        label = f"{r['row']} s{r['seed']}"
        for ax, key in zip(axes[:2], ("reward", "malformed")):
            ax.plot(range(1, len(r[key]) + 1), ema(r[key], 0.95), style, color=color, label=label)
        err = 2 * sd(r["pass_at_1"]) / len(r["pass_at_1"]) ** 0.5
        x = names.index(r["row"]) + 0.1 * r["seed"]
        axes[2].errorbar([x], [r["mean"]], yerr=[err], fmt="o", color=color, label=label, capsize=3)
    label = "SFT: mean +- 2 s.e."
    axes[2].axhspan(b_mean - 2 * se, b_mean + 2 * se, color="gray", alpha=0.3, label=label)
    axes[2].set_xticks(range(len(names)), names, fontsize=7)
    titles = (
        "train reward per step (EMA 0.95)",
        "malformed tool calls per step (EMA 0.95)",
        "held-out pass@1 (mean over eval seeds, +- 2 s.e.)",
    )
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[:2]:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "rl_ab.png", dpi=80)
    print(f"wrote {out}/rl_ab.{{json,md,png}}")


def main():
    formatter = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds per row")
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu"))
    p.add_argument("--log-dir", default="/tmp", help="each process's output (evals are read back)")
    p.add_argument("--collect", action="store_true", help="no training: table and plot only")
    args = p.parse_args()
    log_dir = Path(args.log_dir)
    t0 = time.time()
    if args.collect:
        before = [read_eval(log_dir, SFT_TAG, s) for s in args.eval_seeds]
    else:
        setup(log_dir)
        # the threads only wait on child processes (run limits each to one thread), so the GIL
        # costs nothing and --jobs runs share the cores
        with ThreadPoolExecutor(args.jobs) as pool:
            before = list(pool.map(lambda s: evaluate("sft", SFT_TAG, s, log_dir), args.eval_seeds))
            jobs = [(n, s) for n in args.rows for s in args.seeds]
            list(pool.map(lambda job: train(*job, args), jobs))
    runs = [run_result(n, s, args) for n in args.rows for s in args.seeds]
    write(before, [r for r in runs if r], args, time.time() - t0)


if __name__ == "__main__":
    run_main(main)
