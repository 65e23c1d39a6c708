"""Export a checkpoint as shareable weights: model.safetensors + config.json + the tokenizer files.

    python -m scripts.export -i sft                   # the latest sft checkpoint, to
                                                      #   $NANOCODE_BASE_DIR/export/sft_<step>
    python -m scripts.export -i dpo --tag d4 -o out/  # a chosen one, to a chosen directory

Load it back with nanocode.export.load_exported(dir): no pickle is read on that path (see
nanocode/export.py).
"""

import argparse
import time

from nanocode.checkpoint import PHASES, load_model
from nanocode.common import get_base_dir, run_main
from nanocode.export import export_model, load_exported

parser = argparse.ArgumentParser(description="export a checkpoint as safetensors + tokenizer")
parser.add_argument("-i", "--source", default="sft", choices=PHASES, help="checkpoint phase")
parser.add_argument("--tag", default=None, help="checkpoint tag (default: the most recent)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("-o", "--out", default=None, help="default: $NANOCODE_BASE_DIR/export/...")


def main():
    args = parser.parse_args()
    t0 = time.perf_counter()
    model, tokenizer, meta = load_model(args.source, "cpu", args.tag, args.step)  # CPU: enough
    step = meta["step"]
    name = "_".join([args.source, *([args.tag] if args.tag else []), f"{step:06d}"])
    out = args.out or get_base_dir() / "export" / name
    out = export_model(model, tokenizer, out, {"phase": args.source, "step": step})
    # Read it back through the safe path once: a broken export fails here, not on someone's machine.
    reloaded, _, _ = load_exported(out)
    n_params = sum(p.numel() for p in reloaded.parameters())
    files = sorted(out.iterdir())
    print(
        f"exported {args.source} step {step} ({n_params:,} parameters, "
        f"{sum(f.stat().st_size for f in files) / 1e6:.1f} MB) to {out} in "
        f"{time.perf_counter() - t0:.1f}s: {', '.join(f.name for f in files)}"
    )


if __name__ == "__main__":
    run_main(main)
