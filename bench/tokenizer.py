"""Tokenizer training throughput: our rustbpe vs the PyPI `rustbpe` package vs HuggingFace
`tokenizers`.

All three train on the same corpus (Python source found on this machine: the standard library, then
the virtualenv's site-packages, in sorted path order, up to --mb megabytes), with the same split
pattern, at the same vocab size. Each runs in its own subprocess so that its peak RSS (ru_maxrss) is
its own: the corpus is first read into a list of str (the same for all three: reported as "corpus
loaded"), then the clock runs over train_from_iterator alone. Our merges are checked to be identical
to PyPI rustbpe's, token by token.

The PyPI package is installed apart so it does not shadow ours:
    .venv/bin/pip install --target .bench_deps/pypi_rustbpe rustbpe
Run:  python -m bench.tokenizer [--mb 100] [--vocab-size 32768] [--repeat 3]

Columns: wall seconds of train_from_iterator, MB/s (UTF-8 bytes), CPU seconds of the process (all
threads), peak RSS, peak RSS above the RSS with the corpus loaded, and the 1-minute load average
before/after the run (the machine is shared: a load above the core count slows every trainer).
"""

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# nanocode.tokenizer.SPLIT_PATTERN, copied so that the workers do not import nanocode (and torch
# with it, which would add ~700 MB to every RSS measured); main() checks that the two are the same.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
TRAINERS = {"ours": "nanocode rustbpe", "pypi": "PyPI rustbpe", "hf": "HF tokenizers"}
INSTALL = "`.venv/bin/pip install --target {} rustbpe`"


def read_corpus(mb: float) -> list[str]:
    """Texts of .py files (stdlib first, then site-packages), sorted, until their size reaches
    `mb` MB."""
    docs, total = [], 0
    for root in (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for path in (Path(dirpath) / n for n in sorted(filenames) if n.endswith(".py")):
                if total >= mb * 1e6:
                    return docs
                total += path.stat().st_size
                try:
                    text = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                if text:
                    docs.append(text)
    return docs


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train(trainer: str, docs: list[str], vocab_size: int, pypi_dir: str) -> list[bytes]:
    """Train one trainer; returns the token bytes in id order (for the rustbpes)."""
    if trainer == "hf":
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

        # the same work as the rustbpes: our split pattern, then bytes (ByteLevel maps each byte
        # to a printable char; use_regex=False so it adds no split of its own), all 256 bytes in
        # the vocabulary from the start, and no minimum pair count
        tok = Tokenizer(models.BPE(byte_fallback=False))
        split = pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        options = dict(show_progress=False, min_frequency=0, special_tokens=[])
        bpe = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, **options)
        tok.train_from_iterator(docs, bpe)
        return []
    if trainer == "pypi":
        sys.path.insert(0, pypi_dir)
    import rustbpe

    origin = Path(rustbpe.__file__).resolve()
    if (trainer == "pypi") != (Path(pypi_dir).resolve() in origin.parents):
        raise SystemExit(
            f"error: {trainer} run imported rustbpe from {origin}; install the PyPI package with "
            + INSTALL.format(pypi_dir)
        )
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(docs), vocab_size, pattern=SPLIT_PATTERN)
    return [bytes(b) for b, _ in tok.get_mergeable_ranks()]


def worker(args):
    """The body of one `run` subprocess (--worker NAME): reads the corpus, times training alone,
    writes the token bytes (pickled) to --tokens-out for the merge check, and prints its numbers
    as one JSON line on stdout for `run` to parse."""
    docs = read_corpus(args.mb)
    rss_loaded = max_rss_mb()
    # wall and CPU clocks around training alone: reading the corpus stays outside the timing
    t0, cpu0 = time.perf_counter(), time.process_time()
    tokens = train(args.worker, docs, args.vocab_size, args.pypi_dir)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    Path(args.tokens_out).write_bytes(pickle.dumps(tokens))
    mb = sum(len(d.encode()) for d in docs) / 1e6
    result = dict(seconds=seconds, cpu_seconds=cpu, mb=mb, docs=len(docs), rss_loaded_mb=rss_loaded)
    print(json.dumps({**result, "peak_rss_mb": max_rss_mb()}))


def run(name: str, args, tokens_out: Path) -> dict:
    """One run of one trainer in a fresh process: its worker's numbers and the load around it."""
    load_before = os.getloadavg()[0]
    options = ["--mb", args.mb, "--vocab-size", args.vocab_size, "--pypi-dir", args.pypi_dir]
    cmd = [sys.executable, "-m", "bench.tokenizer", "--worker", name, "--tokens-out", tokens_out]
    proc = subprocess.run(list(map(str, cmd + options)), cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {name} run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "load": (load_before, os.getloadavg()[0])}


def main():
    parser = argparse.ArgumentParser(description="tokenizer training throughput")
    add = parser.add_argument
    add("--mb", type=float, default=100, help="corpus size in MB of source code")
    add("--vocab-size", type=int, default=32768)
    add("--trainers", default="ours,pypi,hf", help="comma-separated subset of ours,pypi,hf")
    add("--repeat", type=int, default=1, help="runs per trainer; reports the median time")
    pypi_dir = str(REPO / ".bench_deps" / "pypi_rustbpe")
    add("--pypi-dir", default=pypi_dir, help="where the PyPI rustbpe was installed (--target)")
    add("--worker", choices=list(TRAINERS), help=argparse.SUPPRESS)
    add("--tokens-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    trainers = args.trainers.split(",")
    if unknown := set(trainers) - set(TRAINERS):
        raise SystemExit(f"error: unknown trainers {sorted(unknown)}; choose from {list(TRAINERS)}")
    if "pypi" in trainers and not (Path(args.pypi_dir) / "rustbpe").is_dir():
        raise SystemExit(
            f"error: PyPI rustbpe not found in {args.pypi_dir}; install it with "
            f"{INSTALL.format(args.pypi_dir)} (or leave pypi out of --trainers)"
        )
    results, tokens = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in trainers:
            # The median of --repeat runs: other processes sharing the cores make one run noisy.
            runs = [run(name, args, Path(tmp) / name) for _ in range(args.repeat)]
            runs.sort(key=lambda r: r["seconds"])
            results[name] = dict(runs[len(runs) // 2], all_seconds=[r["seconds"] for r in runs])
            tokens[name] = pickle.loads((Path(tmp) / name).read_bytes())

    # Imported only now: a child's ru_maxrss starts from its parent's RSS at fork time (Linux keeps
    # it across exec), so the parent must stay small while the workers run.
    from nanocode.tokenizer import SPLIT_PATTERN as nanocode_pattern

    assert SPLIT_PATTERN == nanocode_pattern, "bench/tokenizer.py's SPLIT_PATTERN is out of date"

    first = next(iter(results.values()))
    print(
        f"corpus: {first['mb']:.1f} MB of Python source ({first['docs']} files), vocab "
        f"{args.vocab_size}, {os.cpu_count()} cores, corpus loaded in each process: "
        f"{first['rss_loaded_mb']:.0f} MB RSS"
    )
    if args.repeat > 1:
        print(f"median of {args.repeat} runs each (the runs' seconds in brackets)")
    print(
        f"{'trainer':<18} {'seconds':>8} {'MB/s':>7} {'CPU s':>7} {'peak RSS MB':>12} "
        f"{'over corpus MB':>15} {'load avg':>11}"
    )
    for name, r in results.items():
        runs = " ".join(f"{t:.2f}" for t in r["all_seconds"])
        print(
            f"{TRAINERS[name]:<18} {r['seconds']:>8.2f} {r['mb'] / r['seconds']:>7.1f} "
            f"{r['cpu_seconds']:>7.2f} {r['peak_rss_mb']:>12.0f} "
            f"{r['peak_rss_mb'] - r['rss_loaded_mb']:>15.0f} "
            f"{r['load'][0]:>5.1f}/{r['load'][1]:<5.1f}"
            + (f"  [{runs}]" if args.repeat > 1 else "")
        )
    ours = results.get("ours")
    for name, r in results.items():
        if ours and name != "ours":
            over = ours["peak_rss_mb"] - ours["rss_loaded_mb"]
            over /= max(r["peak_rss_mb"] - r["rss_loaded_mb"], 1)
            print(
                f"vs {TRAINERS[name]}: {r['seconds'] / ours['seconds']:.2f}x throughput, "
                f"{ours['peak_rss_mb'] / r['peak_rss_mb']:.2f}x peak RSS ({over:.2f}x over the "
                "corpus)"
            )
    if "ours" in tokens and "pypi" in tokens:
        a, b = tokens["ours"], tokens["pypi"]
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        verdict = "yes" if a == b else f"NO, first difference at token {first}"
        print(f"merges identical to PyPI rustbpe: {verdict} ({len(a) - 256} vs {len(b) - 256})")
        if a != b:
            sys.exit(1)


if __name__ == "__main__":
    main()
