"""Old pretraining recipe against the new one, same tokens, data and seed, on this machine.

    python -m bench.recipe_ab                                  # depths 2 and 4, the rows below
    python -m bench.recipe_ab --depths 2 --steps 50 --jobs 1   # a quick look

Rows per depth: `oct2025` (scripts/base_train.py --recipe oct2025: ratio 20 over all parameters, no
warmup, warmdown 20% to 0, no weight decay, full attention, RoPE 10k, no value embeddings or lambdas),
`new` (the defaults), and leave-one-out rows: `new -value embeds`, `new -sliding window` and `new -polar express`
(Muon with the classic Newton-Schulz quintic instead of the Polar Express coefficients).
Every row trains the same --steps x --batch tokens (the batch is given, so both recipes use their
learning rates as given: no batch-size rule) and is evaluated on the same first --eval-tokens of the
val split. Each row is one base_train process (--jobs of them at a time, one thread each).

Writes bench/results/cpu/recipe_ab.{json,md,png} (or --out): final val bpb per row, the last train loss
(debiased EMA over steps), wall time; the plot has train loss (EMA) and val bpb per depth.
Needs a corpus and a tokenizer in $NANOCODE_BASE_DIR (python -m nanocode.dataset --local --max-mb 20;
python -m scripts.tok_train --vocab-size 4096).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nanocode.checkpoint import checkpoint_dir, load_meta
from nanocode.common import run_main
from nanocode.report import ema

ROWS = {  # name -> base_train flags on top of the shared ones
    "oct2025": ["--recipe", "oct2025"],
    "new": [],
    "new -value embeds": ["--value-embeds", "0"],
    "new -sliding window": ["--window-pattern", "L"],
    "new -polar express": ["--ns-coeffs", "classic"],
}
REPO = Path(__file__).resolve().parents[1]


def tag_of(depth, name):
    return f"recipe_ab_d{depth}_{name.replace(' ', '').replace('-', '_no_')}"


def row_result(depth, name, seconds=None):
    """One row from its run's last checkpoint (meta: curves, val bpb, training time)."""
    meta = load_meta(checkpoint_dir("base", tag_of(depth, name)))
    losses = [l for _, l in meta["curves"]["loss"]]
    return dict(
        depth=depth,
        row=name,
        flags=ROWS[name],
        val_bpb=meta["val_bpb"],
        val_curve=meta["curves"]["val_bpb"],
        loss_ema=ema(losses),
        final_loss_ema=ema(losses)[-1],
        train_seconds=round(meta["total_time"]),
        seconds=seconds,
        steps=meta["step"],
    )


def train(depth, name, args):
    tag = tag_of(depth, name)
    flags = [
        "--depth",
        str(depth),
        "--max-seq-len",
        str(args.seq_len),
        "--device-batch-size",
        str(args.batch // args.seq_len),
        "--total-batch-size",
        str(args.batch),
        "--num-iterations",
        str(args.steps),
        "--eval-every",
        str(max(1, args.steps // 2)),
        "--eval-tokens",
        str(args.eval_tokens),
        "--sample-every",
        "-1",
        "--device-type",
        "cpu",
        "--compile",
        "0",
        "--seed",
        str(args.seed),
        "--model-tag",
        tag,
    ] + ROWS[name]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = Path(args.log_dir) / f"{tag}.log"
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run(
            [sys.executable, "-m", "scripts.base_train", *flags],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if r.returncode:
        raise RuntimeError(f"{name} at depth {depth} failed; see {log}")
    result = row_result(depth, name, round(time.time() - t0))
    print(
        f"depth {depth} {name:20s} val bpb {result['val_bpb']:.4f} ({result['seconds']}s)",
        flush=True,
    )
    return result


def write(results, args, wall):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = dict(
        depths=args.depths,
        steps=args.steps,
        batch=args.batch,
        seq_len=args.seq_len,
        seed=args.seed,
        tokens_per_row=args.steps * args.batch,
        eval_tokens=args.eval_tokens,
        wall_seconds=round(wall),
        load_average=os.getloadavg(),
        cpus=os.cpu_count(),
    )
    (out / "recipe_ab.json").write_text(json.dumps(dict(setup=setup, rows=results), indent=1))
    lines = [
        f"# Old vs new pretraining recipe (CPU, {os.cpu_count()} cores shared)",
        "",
        f"{args.steps} steps x {args.batch:,} tokens = {args.steps * args.batch:,} tokens per row, seq len "
        f"{args.seq_len}, seed {args.seed}, val bpb on the first {args.eval_tokens:,} tokens of the val split. "
        f"`python -m bench.recipe_ab {' '.join(a for a in sys.argv[1:] if a != '--collect')}`"
        + (
            ""
            if args.collect
            else f"; {wall / 60:.0f} min wall, load average {os.getloadavg()[0]:.1f} at the end"
        )
        + ". Train s: training time of the run (evaluation excluded), on a machine shared with other jobs.",
        "",
        "| depth | recipe | val bpb | vs oct2025 | train loss (EMA, nats) | train s |",
        "|---|---|---|---|---|---|",
    ]
    for depth in args.depths:
        rows = [r for r in results if r["depth"] == depth]
        base = next((r["val_bpb"] for r in rows if r["row"] == "oct2025"), None)
        for r in rows:
            delta = (
                f"{r['val_bpb'] - base:+.4f}" if base is not None and r["row"] != "oct2025" else ""
            )
            lines.append(
                f"| {depth} | {r['row']} | {r['val_bpb']:.4f} | {delta} | {r['final_loss_ema']:.3f} | "
                f"{r['train_seconds']} |"
            )
    missing = [
        f"depth {d} {n}"
        for d in args.depths
        for n in args.rows
        if not any(r["depth"] == d and r["row"] == n for r in results)
    ]
    if missing:
        lines += ["", f"Not run (out of time on this machine): {', '.join(missing)}."]
    (out / "recipe_ab.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(args.depths), figsize=(5 * len(args.depths), 7), squeeze=False)
    for col, depth in enumerate(args.depths):
        for i, r in enumerate(x for x in results if x["depth"] == depth):
            style = "--" if r["row"].startswith("new -") else "-"  # leave-one-out rows dashed
            axes[0, col].plot(
                range(1, len(r["loss_ema"]) + 1),
                r["loss_ema"],
                style,
                color=f"C{i}",
                label=r["row"],
            )
            steps, bpb = zip(*r["val_curve"])
            axes[1, col].plot(steps, bpb, style, marker="o", color=f"C{i}", label=r["row"])
        axes[0, col].set_title(f"depth {depth}: train loss (EMA 0.9, nats/token)")
        axes[1, col].set_title(f"depth {depth}: val bpb")
        for ax in axes[:, col]:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0, col].set_ylim(top=min(8.5, axes[0, col].get_ylim()[1]))
    fig.tight_layout()
    fig.savefig(out / "recipe_ab.png", dpi=80)
    print(f"wrote {out}/recipe_ab.{{json,md,png}}")


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--depths", type=int, nargs="+", default=[2, 4])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=2048, help="tokens per step (as the CPU speedrun)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu"))
    p.add_argument("--log-dir", default="/tmp", help="each run's base_train output")
    p.add_argument(
        "--collect",
        action="store_true",
        help="no training: the table and plot from the rows' "
        "checkpoints (those that finished) of an earlier run with the same flags",
    )
    args = p.parse_args()
    if args.batch % args.seq_len:
        raise SystemExit(f"--batch {args.batch} must be a multiple of --seq-len {args.seq_len}")
    # the head-to-head rows first, so a run cut short still has them
    order = [(d, n) for n in ("oct2025", "new") if n in args.rows for d in args.depths]
    order += [(d, n) for n in args.rows if n not in ("oct2025", "new") for d in args.depths]
    t0 = time.time()
    if args.collect:
        results = []
        for depth, name in order:
            try:
                results.append(row_result(depth, name))
            except Exception as e:  # a row that never finished has no complete checkpoint
                print(f"depth {depth} {name}: no result ({e})")
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda job: train(*job, args), order))
    results.sort(key=lambda r: (r["depth"], list(ROWS).index(r["row"])))
    write(results, args, time.time() - t0)


if __name__ == "__main__":
    run_main(main)
