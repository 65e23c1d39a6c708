"""The report card: each stage logs what it measured to $NANOCODE_BASE_DIR/report/<stage>.json
(`log_stage`), and `python -m nanocode.report` turns those files into report/report.md with PNG
plots.

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

from nanocode.common import get_base_dir, run_main


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
    # default=str: a value JSON cannot hold (a Path, a numpy int) is logged as text, not a crash
    # at the end of a long stage
    tmp.write_text(json.dumps(current, indent=2, default=str))
    os.replace(tmp, path)
    return path


# The pipeline's stages in order, {name: title}. The name is both the report file's stem and the
# name of runs/speedrun.sh's done-marker for that stage.
STAGES = {
    "dataset": "Data",
    "tokenizer": "Tokenizer",
    "base_train": "Pretraining",
    "base_eval": "Base eval (bits per byte)",
    "synth": "Synthetic SFT/DPO data",
    "sft": "SFT",
    "dpo": "DPO",
    "rl": "RL",
    "code_eval_base": "Code eval (base)",
    "code_eval_sft": "Code eval (SFT)",
    "code_eval_dpo": "Code eval (DPO)",
    "agent_eval_sft": "Agent eval (SFT)",
    "agent_eval_sft_constrained": "Agent eval (SFT, constrained decoding)",
    "agent_eval_dpo": "Agent eval (DPO)",
    "agent_eval_dpo_constrained": "Agent eval (DPO, constrained decoding)",
    "agent_eval_rl": "Agent eval (RL)",
    "agent_eval_rl_constrained": "Agent eval (RL, constrained decoding)",
    "agent_demo": "Agent demo",
}
CURVES = {"base_train": "pretraining", "sft": "SFT", "dpo": "DPO", "rl": "RL"}  # training logs
# stages a run may skip: absent, they get no "missing" row
OPTIONAL = {"code_eval_base", "code_eval_sft", *(k for k in STAGES if k.startswith("agent_eval"))}


# ---- reading


def read_json(path: Path):
    """A JSON file's object, or None when missing or unreadable (one bad file never stops a
    report)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def load_stages(base: Path) -> dict:
    found = {p.stem: read_json(p) for p in sorted((base / "report").glob("*.json"))}
    return {stem: d for stem, d in found.items() if d is not None}


def load_timings(base: Path) -> dict:
    """speedrun stage -> {"seconds", "gpus", "device", ...} from the done-markers, in pipeline
    order."""
    found = {p.stem: read_json(p) for p in (base / "speedrun").glob("*.done")}
    found = {s: d for s, d in found.items() if isinstance(get(d, "seconds"), (int, float))}
    return {s: found[s] for s in sorted(found, key=pipeline_order)}


def pipeline_order(name: str):
    """Sort key: the pipeline's stages in STAGES order, then any others by name."""
    return list(STAGES).index(name) if name in STAGES else len(STAGES), name


def system_info() -> dict:
    """The report's System table: Python, torch and triton versions, platform, CPU model (from
    /proc/cpuinfo on Linux), cores, physical memory, and the GPUs with the CUDA version."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
    }
    if Path("/proc/cpuinfo").exists():  # Linux: the processor's model name
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    if hasattr(os, "sysconf"):
        pages = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        info["memory_gib"] = round(pages / 2**30, 1)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    info["gpu"] = "none (CPU run)"
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        info["cuda"] = torch.version.cuda
    return info


def git_info() -> dict:
    """The report's Git table for the checkout nanocode runs from: commit, branch, whether
    tracked files have changes, and the last commit's subject; just a "n/a" commit without git."""

    def git(*args):
        root = Path(__file__).resolve().parent.parent
        run = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
        return run.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        # untracked files (outputs, caches) do not make the checkout dirty
        changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"commit": "n/a (git not available)"}
    if not commit:
        return {"commit": "n/a (not a git checkout)"}
    return {
        "commit": commit[:12],
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "dirty": f"yes ({len(changed)} tracked files changed)" if changed else "no",
        "message": git("log", "-1", "--format=%s"),
    }


# ---- formatting


def fmt(v, digits=4):
    """Numbers compactly, everything else as text; None as n/a."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if not isinstance(v, float) or not math.isfinite(v) or v == 0:
        return str(v)
    return f"{v:.3e}" if abs(v) >= 1e6 or abs(v) < 1e-3 else f"{v:.{digits}g}"


def fmt_seconds(s):
    if s is None:
        return "n/a"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}min" if s < 7200 else f"{s / 3600:.2f}h"


def get(d, *keys):
    """d[k1][k2]... or None when any level is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def key_numbers(d):
    """The one-line summary of a stage for the summary table: its headline keys, else a few
    scalars."""
    keys = d.get("headline") or [k for k, v in d.items() if isinstance(v, (int, float))][:5]
    words = [f"{k.replace('_', ' ').replace('.', ' ')} {fmt(get(d, *k.split('.')))}" for k in keys]
    return ", ".join(words) or None


def scalar_rows(d, prefix=""):
    """A stage's JSON flattened to (key, value) rows of scalars; long lists (curves, samples) are
    left out."""
    rows = []
    for k, v in d.items():
        if k in ("curves", "samples", "transcript"):
            continue
        if isinstance(v, dict):
            rows += scalar_rows(v, f"{prefix}{k}.")
        elif not isinstance(v, list):
            text = fmt(v)
            rows.append((prefix + k, text if len(text) < 120 else text[:117] + "..."))
        elif len(v) <= 8 and all(isinstance(x, (int, float, str)) for x in v):
            rows.append((prefix + k, ", ".join(fmt(x) for x in v)))
    return rows


def table(header, rows) -> list[str]:
    """Markdown table lines (and a blank line after it)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


# ---- plots


def series(curves):
    """{"name": [(x, y), ...]} -> {"name": (xs, ys)}; a y that is a dict gives one series per
    numeric key."""
    out = {}
    for name, points in (curves or {}).items():
        for p in points if isinstance(points, list) else []:
            point = isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], (int, float))
            if not point:
                continue
            x, y = p
            for sub, v in y.items() if isinstance(y, dict) else [(None, y)]:
                # bool is an int to isinstance: flags are not plotted as 0/1
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
        # avg starts at 0: dividing by 1 - beta^(i+1) undoes its pull toward 0 on the first points
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use: the stages import this module
    for log_stage only and never load matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (servers, CI), and no GUI backend probing
    import matplotlib.pyplot as plt

    return plt


def save(fig, title, path):
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)
    return path


def plot_curves(title, curves, path):
    """One panel per curve (loss, val bpb, ...); returns the path, or None when there is nothing to
    plot."""
    found = {k: v for k, v in series(curves).items() if v[0]}
    if not found:
        return None
    cols = min(len(found), 3)
    rows = math.ceil(len(found) / cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax in list(axes.flat)[len(found) :]:
        ax.axis("off")
    for ax, (name, (xs, ys)) in zip(axes.flat, found.items()):
        if len(xs) >= 50:  # a noisy per-step series: faint raw values under a smoothed line
            ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
            ax.plot(xs, ema(ys), color="C0", label="EMA 0.9")
            ax.legend(fontsize=7)
        else:
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3)
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
    return save(fig, title, path)


def plot_bars(bars, path, ylabel, title):
    """bars {group: {source: value}} as grouped bars, sources in the order they first appear (the
    callers' pipeline order); None when empty."""
    if not bars:
        return None
    sources = list(dict.fromkeys(s for v in bars.values() for s in v))
    groups = sorted(bars, key=lambda g: (g == "overall", g))  # "overall" last, the rest by name
    width = 0.8 / len(sources)
    fig, ax = pyplot().subplots(figsize=(max(4.5, 1.8 * len(groups)), 3.2))
    for i, s in enumerate(sources):
        xs = [g + (i - (len(sources) - 1) / 2) * width for g in range(len(groups))]
        ys = [bars[g].get(s, 0.0) for g in groups]
        ax.bar(xs, ys, width, label=s)
        for x, y in zip(xs, ys):
            ax.text(x, y, f"{y:.3f}", ha="center", va="bottom", fontsize=7)
    top = max(max(v.values()) for v in bars.values())
    ax.set_xticks(range(len(groups)), groups)
    # headroom for the value labels above the bars; a floor for all-zero bars
    ax.set(ylabel=ylabel, ylim=(0, max(0.05, top * 1.25)))
    ax.legend(fontsize=8)
    return save(fig, title, path)


def by_prefix(stages: dict, prefix: str) -> dict:
    """The stages whose name starts with prefix, by the rest of their name (the checkpoint), in
    pipeline order (STAGES), then any others."""
    names = sorted(stages, key=pipeline_order)
    return {s.removeprefix(prefix): stages[s] for s in names if s.startswith(prefix)}


def numbers(d) -> dict:
    """The numeric entries of a dict (none when it is not one)."""
    if not isinstance(d, dict):
        return {}
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}


# ---- the report's sections, each a list of markdown lines


def summary_lines(stages: dict, timings: dict) -> list[str]:
    """Every pipeline stage (optional ones only when they ran), then anything else that logged."""
    rows = []
    for stem, title in {**STAGES, **{s: s for s in stages if s not in STAGES}}.items():
        d, t = stages.get(stem), timings.get(stem)
        if d is None and t is None and stem in OPTIONAL:
            continue
        status = "done" if d is not None else "missing" if t is None else "ran (logged no numbers)"
        key = (key_numbers(d) if d is not None else None) or "-"
        rows.append([title, status, key, fmt_seconds(get(t, "seconds"))])
    return ["## Summary", ""] + table(["stage", "status", "key numbers", "wall time"], rows)


def compression_lines(stages: dict) -> list[str]:
    """Bytes per token of our tokenizer beside the reference tokenizers scripts.tok_eval found."""
    comp = get(stages, "tokenizer", "compression")
    comp = {k: m for k, m in comp.items() if isinstance(m, dict)} if isinstance(comp, dict) else {}
    if not comp:
        return []
    names = list(dict.fromkeys(k for m in comp.values() for k in m if k != "bytes"))
    rows = [[k, fmt(m.get("bytes")), *(fmt(m.get(n), 3) for n in names)] for k, m in comp.items()]
    title = "## Tokenizer compression (bytes per token, higher is better)"
    return [title, ""] + table(["sample", "bytes", *names], rows)


def agent_lines(agent: dict) -> list[str]:
    """Agent eval: task success per kind, one column per checkpoint."""
    if not agent:
        return []
    kinds = sorted({k for d in agent.values() for k in numbers(d.get("per_kind"))})
    rows = [[k, *(fmt(get(d, "per_kind", k), 3) for d in agent.values())] for k in kinds]
    rows.append(["overall", *(fmt(get(d, "success"), 3) for d in agent.values())])
    note = (
        "Tasks: small scratch repositories with a request and a verifier (tests that must pass, an "
        "answer that must contain a value); the agent runs with its tools auto-approved in the "
        "sandbox (nanocode.agent_tasks, scripts/agent_eval.py)."
    )
    return ["## Agent eval: task success per kind", ""] + table(["kind", *agent], rows) + [note, ""]


def cost_lines(timings: dict, gpu_hour_cost: float) -> list[str]:
    """A row per timed stage, the total, and the dollar cost of the GPU-hours."""
    lines = ["## Wall time and cost", ""]
    if not timings:
        return lines + ["No stage timings (no runs/speedrun.sh done-markers in this base dir).", ""]
    rows, seconds, cpu_seconds, gpu_hours = [], 0.0, 0.0, 0.0

    def hours(h):
        return fmt(h, 3) if h else "-"

    for name, t in timings.items():
        stage_hours, cpu = t["seconds"] * t.get("gpus", 0) / 3600, t.get("cpu_seconds")
        seconds += t["seconds"]
        cpu_seconds += cpu if isinstance(cpu, (int, float)) else 0
        gpu_hours += stage_hours
        times = [fmt_seconds(t["seconds"]), fmt_seconds(cpu)]
        rows.append([name, *times, t.get("device", "?"), t.get("gpus", 0), hours(stage_hours)])
    cpu = fmt_seconds(cpu_seconds) if cpu_seconds else "n/a"
    rows.append(["**total**", f"**{fmt_seconds(seconds)}**", cpu, "", "", hours(gpu_hours)])
    lines += table(["stage", "wall time", "CPU time", "device", "GPUs", "GPU-hours"], rows)
    lines.append(
        "CPU time is user + system time of the stage's processes (all cores): on a machine shared "
        "with other work it tells the stage's cost better than wall time does."
    )
    if not gpu_hours:
        return lines + ["", "CPU run: no GPU cost.", ""]
    return lines + [
        "",
        f"Estimated cost: {gpu_hours:.2f} GPU-hours x ${gpu_hour_cost:.2f}/GPU-hour = "
        f"**${gpu_hours * gpu_hour_cost:.2f}** (a stage is charged for every GPU of the run "
        "while it runs, idle ones included).",
        "",
    ]


def plot_lines(stages: dict, agent: dict, out_dir: Path) -> list[str]:
    """The plots as PNGs beside report.md: training curves, bpb per language, pass@k per
    checkpoint, agent success per checkpoint."""
    plots = []
    for stem, title in CURVES.items():
        path = plot_curves(title, get(stages, stem, "curves"), out_dir / f"{stem}_curves.png")
        plots.append((f"{title} curves", path))
    bpb = {k: {"base": v} for k, v in numbers(get(stages, "base_eval", "bpb_per_lang")).items()}
    title = "base eval: bpb per language"
    path = plot_bars(bpb, out_dir / "base_eval_bpb.png", "bits per byte", title)
    plots.append(("bpb per language", path))
    pass_at_k = {}  # "task pass@k" -> {checkpoint: value}
    for source, d in by_prefix(stages, "code_eval_").items():
        for task, m in d.items():
            for k, v in numbers(m).items():
                if k.startswith("pass@"):
                    pass_at_k.setdefault(f"{task} {k}", {})[source] = v
    path = plot_bars(pass_at_k, out_dir / "code_eval_pass_at_k.png", "pass@k", "code eval: pass@k")
    plots.append(("pass@k", path))
    if agent:
        success = {}  # kind or "overall" -> {checkpoint: value}
        for source, d in agent.items():
            kinds = numbers(d.get("per_kind"))
            if "success" in numbers(d):
                kinds["overall"] = d["success"]
            for kind, v in kinds.items():
                success.setdefault(kind, {})[source] = v
        title = "agent eval: success per checkpoint"
        path = plot_bars(success, out_dir / "agent_eval_success.png", "task success", title)
        plots.append(("agent eval", path))
    lines = ["## Plots", ""]
    for title, path in plots:
        lines.append(f"![{title}]({path.name})" if path else f"- {title}: missing (nothing logged)")
        lines.append("")
    return lines


def detail_lines(stages: dict) -> list[str]:
    """Every scalar each stage logged, and the agent demo's transcript."""
    lines = ["## Stage details", ""]
    for stem, d in stages.items():
        # a "|" would end a markdown table cell, a newline the row
        rows = [(k, str(v).replace("|", "/").replace("\n", " ")) for k, v in scalar_rows(d)]
        lines += [f"### {stem}", ""] + table(["key", "value"], rows)
        if isinstance(d.get("transcript"), str):
            # a tilde fence: the transcript may hold ``` blocks; a "~~~~" in it would close it early
            lines += ["~~~~", d["transcript"].rstrip().replace("~~~~", "~ ~ ~ ~"), "~~~~", ""]
    return lines


def build_report(base: Path | None = None, gpu_hour_cost: float = 3.0) -> Path:
    """Write base/report/report.md (and its PNGs beside it); returns the path."""
    base = Path(base) if base else get_base_dir()
    out_dir = base / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    stages, timings = load_stages(base), load_timings(base)
    agent = by_prefix(stages, "agent_eval_")  # columns in pipeline order, anything else after
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = ["# nanocode report card", "", f"Generated {now:%Y-%m-%d %H:%M UTC} from `{base}`.", ""]
    for title, info in (("System", system_info()), ("Git", git_info())):
        lines += [f"## {title}", ""] + [f"- {k}: {v}" for k, v in info.items()] + [""]
    lines += summary_lines(stages, timings) + compression_lines(stages) + agent_lines(agent)
    lines += cost_lines(timings, gpu_hour_cost) + plot_lines(stages, agent, out_dir)
    lines += detail_lines(stages)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="build report.md from the stages' logs")
    p.add_argument("--gpu-hour-cost", type=float, default=3.0, help="$ per GPU-hour (an H100: 3)")
    path = build_report(gpu_hour_cost=p.parse_args(argv).gpu_hour_cost)
    print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
