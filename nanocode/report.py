"""The report card: each stage logs what it measured to $NANOCODE_BASE_DIR/report/<stage>.json
(`log_stage`), and `python -m nanocode.report` turns those files into report/report.md with PNG plots.

    python -m nanocode.report                          # build $NANOCODE_BASE_DIR/report/report.md
    python -m nanocode.report --gpu-hour-cost 2.5      # price of one GPU-hour for the cost column

Wall times come from runs/speedrun.sh's done-markers ($NANOCODE_BASE_DIR/speedrun/<stage>.done, one
JSON object each: seconds, gpus, device). A stage that never logged anything is shown as missing.
"""

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
from pathlib import Path

from nanocode.checkpoint import PHASES
from nanocode.common import get_base_dir


def log_stage(stage: str, headline=(), **data):
    """Merge `data` into the stage's JSON file (written atomically: a crash never leaves half a
    file). `headline` names the keys the summary table shows ("a.b" reaches into a dict), so each
    stage picks its key numbers where it logs them; the names add up over a stage's calls."""
    path = get_base_dir() / "report" / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(data)
    if headline:
        current["headline"] = list(dict.fromkeys([*current.get("headline", []), *headline]))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(current, indent=2, default=str))
    os.replace(tmp, path)
    return path


# The pipeline's stages in order: (name, title). The name is both the report file's stem and the
# name of runs/speedrun.sh's done-marker for that stage.
STAGES = [
    ("dataset", "Data"),
    ("tokenizer", "Tokenizer"),
    ("base_train", "Pretraining"),
    ("base_eval", "Base eval (bits per byte)"),
    ("synth", "Synthetic SFT/DPO data"),
    ("sft", "SFT"),
    ("dpo", "DPO"),
    ("rl", "RL"),
    ("code_eval_base", "Code eval (base)"),
    ("code_eval_sft", "Code eval (SFT)"),
    ("code_eval_dpo", "Code eval (DPO)"),
    ("agent_eval_sft", "Agent eval (SFT)"),
    ("agent_eval_dpo", "Agent eval (DPO)"),
    ("agent_eval_rl", "Agent eval (RL)"),
    ("agent_demo", "Agent demo"),
]
OPTIONAL = {
    "code_eval_base",
    "code_eval_sft",
    "agent_eval_sft",
    "agent_eval_dpo",
    "agent_eval_rl",
}  # not shown as missing


# ---- reading


def read_json(path: Path):
    """A JSON file's object, or None when missing or unreadable (a report never crashes on one bad file)."""
    try:
        obj = json.loads(path.read_text())
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def load_stages(base: Path) -> dict:
    report_dir = base / "report"
    return {p.stem: d for p in sorted(report_dir.glob("*.json")) if (d := read_json(p)) is not None}


def load_timings(base: Path) -> dict:
    """speedrun stage -> {"seconds", "gpus", "device", ...} from the done-markers."""
    out = {}
    for p in sorted((base / "speedrun").glob("*.done")):
        d = read_json(p)
        if d is not None and isinstance(d.get("seconds"), (int, float)):
            out[p.stem] = d
    return out


def system_info() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["memory_gib"] = round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
        )
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        info["gpu"] = f"{n} x {torch.cuda.get_device_name(0)}"
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = "none (CPU run)"
    return info


def git_info() -> dict:
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=20
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        if not commit:
            return {"commit": "n/a (not a git checkout)"}
        changed = [
            line
            for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
            if line
        ]
        return {
            "commit": commit[:12],
            "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": f"yes ({len(changed)} tracked files changed)" if changed else "no",
            "message": git("log", "-1", "--format=%s"),
        }
    except (OSError, subprocess.SubprocessError):
        return {"commit": "n/a (git not available)"}


# ---- formatting


def fmt(v, digits=4):
    """Numbers compactly, everything else as text; None as n/a."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v) or v == 0:
            return str(v)
        return f"{v:.3e}" if abs(v) >= 1e6 or abs(v) < 1e-3 else f"{v:.{digits}g}"
    return str(v)


def fmt_seconds(s):
    if s is None:
        return "n/a"
    s = float(s)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}min" if s < 7200 else f"{s / 3600:.2f}h"


def get(d, *keys):
    """d[k1][k2]... or None when any level is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def key_numbers(d):
    """The one-line summary of a stage for the summary table: its headline keys, else a few scalars."""
    keys = d.get("headline") or [k for k, v in d.items() if isinstance(v, (int, float))][:5]
    return (
        ", ".join(
            f"{k.replace('_', ' ').replace('.', ' ')} {fmt(get(d, *k.split('.')))}" for k in keys
        )
        or None
    )


def scalar_rows(d, prefix=""):
    """Flatten a stage's JSON to (key, value) rows of scalars; long lists (curves, samples) are skipped."""
    rows = []
    for k, v in d.items():
        if k in ("curves", "samples", "transcript"):
            continue
        if isinstance(v, dict):
            rows += scalar_rows(v, f"{prefix}{k}.")
        elif isinstance(v, list):
            if len(v) <= 8 and all(isinstance(x, (int, float, str)) for x in v):
                rows.append((prefix + k, ", ".join(fmt(x) for x in v)))
        else:
            text = fmt(v)
            rows.append((prefix + k, text if len(text) < 120 else text[:117] + "..."))
    return rows


# ---- plots


def series(curves):
    """{"name": [(x, y), ...]} -> {"name": (xs, ys)}; a y that is a dict gives one series per numeric key."""
    out = {}
    for name, points in (curves or {}).items():
        if not isinstance(points, list):
            continue
        for p in points:
            if not (
                isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], (int, float))
            ):
                continue
            x, y = p
            items = y.items() if isinstance(y, dict) else [(None, y)]
            for sub, v in items:
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    xs, ys = out.setdefault(name if sub is None else f"{name}.{sub}", ([], []))
                    xs.append(x)
                    ys.append(v)
    return out


def ema(ys, beta=0.9):
    """Debiased exponential moving average, as base_train prints its loss."""
    out, avg = [], 0.0
    for i, y in enumerate(ys):
        avg = beta * avg + (1 - beta) * y
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def plot_curves(title, curves, path):
    """One panel per curve (loss, val bpb, ...); returns the path, or None when there is nothing to plot."""
    s = {k: v for k, v in series(curves).items() if v[0]}
    if not s:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (servers, CI), and no GUI backend probing
    import matplotlib.pyplot as plt

    n = len(s)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, (xs, ys)) in zip(axes.flat, s.items()):
        if len(xs) >= 50:  # a noisy per-step series: faint raw values under a smoothed line
            ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
            ax.plot(xs, ema(ys), color="C0", label="EMA 0.9")
            ax.legend(fontsize=7)
        else:
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_pass_at_k(evals, path):
    """Grouped bars: for each (task, k), one bar per checkpoint source (base, sft, dpo)."""
    bars = {}  # (task, k) -> {source: value}
    for stem, d in evals.items():
        source = stem.removeprefix("code_eval_")
        for task, m in d.items():
            if isinstance(m, dict):
                for k, v in m.items():
                    if k.startswith("pass@") and isinstance(v, (int, float)):
                        bars.setdefault(f"{task} {k}", {})[source] = v
    return plot_bars(bars, path, "pass@k", "code eval: pass@k")


def plot_agent_success(agent, path):
    """Grouped bars: agent-eval success overall and per kind, one bar per checkpoint (sft, dpo, rl)."""
    bars = {}
    for source, d in agent.items():
        if isinstance(d.get("success"), (int, float)):
            bars.setdefault("overall", {})[source] = d["success"]
        for kind, v in (d.get("per_kind") or {}).items():
            if isinstance(v, (int, float)):
                bars.setdefault(kind, {})[source] = v
    return plot_bars(bars, path, "task success", "agent eval: success per checkpoint")


def plot_bars(bars, path, ylabel, title):
    """bars {group: {source: value}} as grouped bars, sources in pipeline order; None when empty."""
    if not bars:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = sorted(
        {s for v in bars.values() for s in v}, key=lambda s: PHASES.index(s) if s in PHASES else 9
    )
    groups = sorted(bars, key=lambda g: (g == "overall", g))
    width = 0.8 / len(sources)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.8 * len(groups)), 3.2))
    for i, s in enumerate(sources):
        xs = [g + (i - (len(sources) - 1) / 2) * width for g in range(len(groups))]
        ys = [bars[g].get(s, 0.0) for g in groups]
        ax.bar(xs, ys, width, label=s)
        for x, y in zip(xs, ys):
            ax.text(x, y, f"{y:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(0.05, max(max(v.values()) for v in bars.values()) * 1.25))
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_bpb_per_lang(per_lang, path):
    items = [(k, v) for k, v in (per_lang or {}).items() if isinstance(v, (int, float))]
    if not items:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(items)), 3.2))
    ax.bar([k for k, _ in items], [v for _, v in items])
    ax.set_ylabel("bits per byte")
    ax.set_title("base eval: bpb per language")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---- the report


def build_report(base: Path | None = None, gpu_hour_cost: float = 3.0) -> Path:
    """Write base/report/report.md (and its PNGs beside it); returns the path."""
    base = Path(base) if base else get_base_dir()
    out_dir = base / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = load_stages(base)
    order = {stem: i for i, (stem, _) in enumerate(STAGES)}
    timings = dict(
        sorted(load_timings(base).items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    )
    sysinfo, gitinfo = system_info(), git_info()
    lines = [
        "# nanocode report card",
        "",
        f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} from `{base}`.",
        "",
    ]

    lines += ["## System", ""] + [f"- {k}: {v}" for k, v in sysinfo.items()] + [""]
    lines += ["## Git", ""] + [f"- {k}: {v}" for k, v in gitinfo.items()] + [""]

    # summary table: every pipeline stage, then anything else that logged
    known = {stem for stem, _ in STAGES}
    extra = [(stem, stem) for stem in stages if stem not in known]
    lines += ["## Summary", "", "| stage | status | key numbers | wall time |", "|---|---|---|---|"]
    for stem, title in STAGES + extra:
        d, t = stages.get(stem), timings.get(stem)
        if d is None and t is None:
            if stem in OPTIONAL:
                continue
            status, numbers = "missing", "-"
        else:
            status = "done" if d is not None else "ran (logged no numbers)"
            numbers = (key_numbers(d) if d is not None else None) or "-"
        lines.append(f"| {title} | {status} | {numbers} | {fmt_seconds(get(t, 'seconds'))} |")
    lines.append("")

    # tokenizer compression beside the reference tokenizers scripts.tok_eval found
    comp = get(stages, "tokenizer", "compression")
    if isinstance(comp, dict) and comp:
        names = list(
            dict.fromkeys(
                k for m in comp.values() if isinstance(m, dict) for k in m if k != "bytes"
            )
        )
        lines += [
            "## Tokenizer compression (bytes per token, higher is better)",
            "",
            "| sample | bytes | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        for lang, m in comp.items():
            if isinstance(m, dict):
                lines.append(
                    f"| {lang} | {fmt(m.get('bytes'))} | "
                    + " | ".join(fmt(m.get(n), 3) for n in names)
                    + " |"
                )
        lines.append("")

    # agent eval: task success per kind, one column per checkpoint
    agent = {
        stem.removeprefix("agent_eval_"): d
        for stem, d in stages.items()
        if stem.startswith("agent_eval_")
    }
    pipeline = [
        "sft",
        "dpo",
        "rl",
    ]  # columns in pipeline order, anything else (e.g. rescored samples) after
    agent = dict(
        sorted(
            agent.items(), key=lambda kv: (pipeline.index(kv[0]) if kv[0] in pipeline else 9, kv[0])
        )
    )
    if agent:
        kinds = sorted(
            {
                k
                for d in agent.values()
                if isinstance(d.get("per_kind"), dict)
                for k in d["per_kind"]
            }
        )
        lines += [
            "## Agent eval: task success per kind",
            "",
            "| kind | " + " | ".join(agent) + " |",
            "|---|" + "---|" * len(agent),
        ]
        for kind in kinds + ["overall"]:
            cells = [
                get(d, "success") if kind == "overall" else get(d, "per_kind", kind)
                for d in agent.values()
            ]
            lines.append(f"| {kind} | " + " | ".join(fmt(c, 3) for c in cells) + " |")
        lines += [
            "",
            "Tasks: small scratch repositories with a request and a verifier (tests that must pass, an "
            "answer that must contain a value); the agent runs with its tools auto-approved in the sandbox "
            "(nanocode.agent_tasks, scripts/agent_eval.py).",
            "",
        ]

    # time and cost
    lines += ["## Wall time and cost", ""]
    if timings:
        total_s = sum(t["seconds"] for t in timings.values())
        gpu_hours = {name: t["seconds"] * t.get("gpus", 0) / 3600 for name, t in timings.items()}
        cpu = {name: t.get("cpu_seconds") for name, t in timings.items()}
        lines += [
            "| stage | wall time | CPU time | device | GPUs | GPU-hours |",
            "|---|---|---|---|---|---|",
        ]
        for name, t in timings.items():
            lines.append(
                f"| {name} | {fmt_seconds(t['seconds'])} | {fmt_seconds(cpu[name])} | {t.get('device', '?')} | "
                f"{t.get('gpus', 0)} | {fmt(gpu_hours[name], 3) if gpu_hours[name] else '-'} |"
            )
        total_gh = sum(gpu_hours.values())
        total_cpu = sum(v for v in cpu.values() if isinstance(v, (int, float)))
        lines.append(
            f"| **total** | **{fmt_seconds(total_s)}** | {fmt_seconds(total_cpu) if total_cpu else 'n/a'} | | | "
            f"{fmt(total_gh, 3) if total_gh else '-'} |"
        )
        lines.append("")
        lines.append(
            "CPU time is user + system time of the stage's processes (all cores): on a machine shared "
            "with other work it tells the stage's cost better than wall time does."
        )
        lines.append("")
        if total_gh:
            lines.append(
                f"Estimated cost: {total_gh:.2f} GPU-hours x ${gpu_hour_cost:.2f}/GPU-hour = "
                f"**${total_gh * gpu_hour_cost:.2f}** (a stage is charged for every GPU of the run "
                f"while it runs, idle ones included)."
            )
        else:
            lines.append("CPU run: no GPU cost.")
    else:
        lines.append("No stage timings (no runs/speedrun.sh done-markers in this base dir).")
    lines.append("")

    # plots
    lines += ["## Plots", ""]
    plots = []
    for stem, title in (
        ("base_train", "pretraining"),
        ("sft", "SFT"),
        ("dpo", "DPO"),
        ("rl", "RL"),
    ):
        p = plot_curves(title, get(stages, stem, "curves"), out_dir / f"{stem}_curves.png")
        plots.append((f"{title} curves", p))
    plots.append(
        (
            "bpb per language",
            plot_bpb_per_lang(
                get(stages, "base_eval", "bpb_per_lang"), out_dir / "base_eval_bpb.png"
            ),
        )
    )
    evals = {s: d for s, d in stages.items() if s.startswith("code_eval_")}
    plots.append(("pass@k", plot_pass_at_k(evals, out_dir / "code_eval_pass_at_k.png")))
    if agent:
        plots.append(("agent eval", plot_agent_success(agent, out_dir / "agent_eval_success.png")))
    for title, p in plots:
        lines.append(f"![{title}]({p.name})" if p else f"- {title}: missing (nothing logged)")
        lines.append("")

    # details
    lines += ["## Stage details", ""]
    for stem, d in stages.items():
        rows = scalar_rows(d)
        lines += [f"### {stem}", "", "| key | value |", "|---|---|"]
        lines += [
            f"| {k} | {str(v).replace('|', '/').replace(chr(10), ' ')} |" for k, v in rows
        ] + [""]
        if isinstance(d.get("transcript"), str):
            lines += ["~~~~", d["transcript"].rstrip().replace("~~~~", "~ ~ ~ ~"), "~~~~", ""]

    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="build report.md from the stages' logs")
    p.add_argument(
        "--gpu-hour-cost",
        type=float,
        default=3.0,
        help="dollars per GPU-hour (default: $3, an H100)",
    )
    args = p.parse_args(argv)
    path = build_report(gpu_hour_cost=args.gpu_hour_cost)
    print(f"wrote {path}")


if __name__ == "__main__":
    from nanocode.common import run_main

    run_main(main)
