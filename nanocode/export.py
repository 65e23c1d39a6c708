"""Shareable weights: a trained model as a directory that needs neither our pickles nor trust to
load.

    out/
      model.safetensors    the state dict (safetensors: a JSON header and raw tensor bytes, no code)
      config.json          {"format": "nanocode", "model_config": {...}, "phase", "step"}
      tokenizer.tiktoken   the tokenizer, as nanocode.tokenizer saves it (ranks, base64)
      tokenizer.json       its split pattern and special tokens

    python -m scripts.export -i sft            # -> $NANOCODE_BASE_DIR/export/sft_<step>/
    model, tokenizer, config = load_exported("out/")

Why not just share the .pt checkpoint: torch.load of a pickle can run any code the file's author put
in it, and needs this codebase's classes on the path. safetensors holds only tensors, loads without
torch.load at all (so also memory-mapped and fast), and any framework can read it.
"""

import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from nanocode.checkpoint import model_from_state
from nanocode.common import NanocodeError

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def export_model(model, tokenizer, out_dir, info: dict | None = None) -> Path:
    """Write model + config + tokenizer to out_dir (replacing it), through a temp dir renamed at the
    end, so a crash never leaves a half-written export that looks complete."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    # beside out_dir (a rename is atomic only within one filesystem), hidden, one per process
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # safetensors refuses tensors that share memory and wants them contiguous: clone each one.
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "nanocode"})
        config = {"format": "nanocode", "model_config": model.config.to_dict(), **(info or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(tmp)
        # os.replace cannot replace a non-empty directory: the old export goes first, so for a
        # moment there is none, but never a half one
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_weights(path, device="cpu") -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a .pt file, without ever running pickled code: .pt
    files go through torch.load(weights_only=True), which unpickles tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise NanocodeError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(device))
        except Exception as e:  # a pickle renamed to .safetensors, a truncated file, a bad header
            raise NanocodeError(
                f"{path} is not a valid safetensors file ({type(e).__name__}: {e}); "
                "nothing in it was executed"
            ) from None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise NanocodeError(
            f"refusing to load {path}: it holds more than tensors (pickled objects or code, "
            f"which weights_only=True loading does not run: {reason}); share weights as "
            f"safetensors (python -m scripts.export)"
        ) from None
    except Exception as e:
        raise NanocodeError(f"cannot read weights from {path} ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NanocodeError(f"{path} is not a state dict of tensors")
    return state


def load_exported(directory, device="cpu"):
    """(model in eval mode on `device`, tokenizer, config dict) of an export_model directory."""
    from nanocode.tokenizer import Tokenizer

    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise NanocodeError(f"no {CONFIG_FILE} in {directory}: not an exported nanocode model")
    try:
        config = json.loads(path.read_text())
        model_config = config["model_config"]
    except (ValueError, KeyError, TypeError) as e:
        raise NanocodeError(f"bad {path}: {type(e).__name__}: {e}") from None
    weights = path.with_name(WEIGHTS_FILE)
    try:  # a bad weights file raises load_weights' own NanocodeError, not caught here
        model = model_from_state(model_config, load_weights(weights, device), device)
    except RuntimeError as e:
        raise NanocodeError(f"{weights} does not match its {CONFIG_FILE}: {e}") from None
    return model, Tokenizer.load(directory), config
