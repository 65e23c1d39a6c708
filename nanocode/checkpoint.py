"""Checkpoints: written atomically (temp file, fsync, rename), metadata JSON written last so its
presence marks a complete checkpoint, and any truncated or corrupt file gives one clear error.
Loading maps the model weights to the device and everything else (optimizer, data loader, RNG
state) to the CPU: the loader's state is numpy-backed and torch.set_rng_state takes CPU tensors;
optimizer.load_state_dict moves its state to each parameter's device itself.

Layout: $NANOCODE_BASE_DIR/checkpoints/<phase>/<tag>/
    model_<step>.pt          model state dict (rank 0)
    optim_<step>_rank<r>.pt  optimizers + RNG (+ data loader) state per rank: what --resume needs
    meta_<step>.json         config, step, curves, and the byte size of each file above

save_training / resume are the one place every training stage (base_train, SFT, DPO, RL: the loop
in nanocode/training.py) saves and restores its state.
"""

import json
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist

from nanocode.common import NanocodeError, get_base_dir, print0

# The training phases, in pipeline order; each has its own checkpoints/<phase>/ directory.
PHASES = ("base", "sft", "dpo", "rl")


def checkpoint_dir(phase: str, tag: str) -> Path:
    return get_base_dir() / "checkpoints" / phase / tag


def _atomic_write(path: Path, write_fn) -> int:
    """Write through a temp file in the same directory, fsync it, rename over `path`, fsync the dir.
    A crash at any point leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the name points at them
        os.replace(tmp, path)  # atomic within one filesystem: hence the temp file beside `path`
    finally:
        tmp.unlink(missing_ok=True)
    # the rename changes the directory: until the directory is synced, a power cut may undo it
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path.stat().st_size


def save_checkpoint(ckpt_dir, step: int, model_state, optim_state, meta: dict, rank: int = 0):
    """Every rank saves its optimizer/loader state, rank 0 the model; then (under DDP, after a
    barrier, so every rank's file is complete) rank 0 writes the metadata with the size of every
    file of the step. A crash anywhere before that leaves the previous step as the latest complete
    one. Under DDP every rank must call this."""
    ckpt_dir = Path(ckpt_dir)
    if optim_state is not None:
        path = ckpt_dir / f"optim_{step:06d}_rank{rank}.pt"
        _atomic_write(path, lambda f: torch.save(optim_state, f))
    if rank == 0 and model_state is not None:
        _atomic_write(ckpt_dir / f"model_{step:06d}.pt", lambda f: torch.save(model_state, f))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    if rank == 0:
        files = {p.name: p.stat().st_size for p in ckpt_dir.glob(f"*_{step:06d}*.pt")}
        text = json.dumps(dict(meta, step=step, files=files), indent=2).encode()
        _atomic_write(ckpt_dir / f"meta_{step:06d}.json", lambda f: f.write(text))


def list_steps(ckpt_dir) -> list[int]:
    ckpt_dir = Path(ckpt_dir)
    names = [p.name for p in ckpt_dir.iterdir()] if ckpt_dir.is_dir() else []
    return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"meta_(\d+)\.json", n)))


def _load_pt(path: Path, sizes: dict, map_location):
    """torch.load of one checkpoint file, tensors mapped to map_location. NanocodeError when it is
    missing, its size differs from the metadata's (sizes: file name -> bytes; a file not in it
    skips the check) or it does not load."""
    if not path.exists():
        raise NanocodeError(f"checkpoint file missing: {path}")
    size, expected_size = path.stat().st_size, sizes.get(path.name)
    if expected_size is not None and size != expected_size:
        raise NanocodeError(
            f"checkpoint file is truncated or corrupt: {path} ({size} bytes, not {expected_size})"
        )
    try:
        # weights_only: tensors and plain containers only, no pickled code runs (a checkpoint from
        # elsewhere is data, not a program). Every file written here is of that kind.
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise NanocodeError(
            f"checkpoint file is corrupt: {path} ({type(e).__name__}: {e})"
        ) from None


def load_meta(ckpt_dir, step: int | None = None) -> dict:
    """The metadata dict of `step` (default: the latest complete one, the highest step with a
    meta_<step>.json). NanocodeError when there is none or it is not valid JSON."""
    ckpt_dir = Path(ckpt_dir)
    steps = list_steps(ckpt_dir)
    if not steps:
        raise NanocodeError(f"no checkpoint found in {ckpt_dir}")
    path = ckpt_dir / f"meta_{steps[-1] if step is None else step:06d}.json"
    if not path.exists():
        raise NanocodeError(f"no checkpoint for step {step} in {ckpt_dir} (have steps {steps})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanocodeError(f"checkpoint metadata is corrupt: {path} ({e})") from None


def load_checkpoint(ckpt_dir, step=None, device="cpu", rank: int = 0, load_optim: bool = False):
    """(model_state on `device`, optim_state on the CPU or None, meta) of `step` (default: the
    latest complete one)."""
    ckpt_dir = Path(ckpt_dir)
    meta = load_meta(ckpt_dir, step)
    files, step = meta.get("files", {}), meta["step"]
    model_state = _load_pt(ckpt_dir / f"model_{step:06d}.pt", files, device)
    optim_path = ckpt_dir / f"optim_{step:06d}_rank{rank}.pt"
    optim_state = _load_pt(optim_path, files, "cpu") if load_optim else None
    return model_state, optim_state, meta


def save_training(ckpt_dir, step, model, optimizers, meta, rank=0, stateful=None, resumable=True):
    """A training checkpoint: the model, and when resumable every rank's optimizers, RNG and
    `stateful` objects (name -> anything with state_dict(), e.g. the data loader)."""
    state = None
    if resumable:
        # torch's generators only (the CPU's, every GPU's): Python's and numpy's are not saved, so
        # their draws are seeded from (seed, step) or a document's place instead (scripts, loader)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {k: obj.state_dict() for k, obj in (stateful or {}).items()}
        state.update(optimizers=[o.state_dict() for o in optimizers], rng=rng)
    save_checkpoint(ckpt_dir, step, model.state_dict() if rank == 0 else None, state, meta, rank)


def resume(ckpt_dir, model, optimizers, device, rank=0, stateful=None, **expect) -> dict:
    """Load the latest resumable checkpoint of ckpt_dir into model, optimizers, RNG and `stateful`;
    `expect` are metadata values this run must share with it (the config, the number of steps the
    schedule depends on). Returns the checkpoint's metadata."""
    ckpt_dir = Path(ckpt_dir)
    steps = [
        s for s in list_steps(ckpt_dir) if (ckpt_dir / f"optim_{s:06d}_rank{rank}.pt").exists()
    ]
    if not steps:
        raise NanocodeError(
            f"--resume: no checkpoint to resume from in {ckpt_dir} (one saved with --save-every)"
        )
    model_state, state, meta = load_checkpoint(ckpt_dir, steps[-1], device, rank, load_optim=True)
    for key, value in expect.items():
        if meta.get(key) != value:
            raise NanocodeError(
                f"--resume: the checkpoint in {ckpt_dir} has {key} {meta.get(key)}, "
                f"this run has {value}"
            )
    model.load_state_dict(model_state)
    for opt, sd in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(sd)
    for k, obj in (stateful or {}).items():
        obj.load_state_dict(state[k])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    print0(f"resumed from {ckpt_dir} at step {meta['step']}")
    return meta


def load_model(phase: str, device, tag: str | None = None, step: int | None = None):
    """Build a GPT from a saved checkpoint of `phase` (one of PHASES); returns (model, tokenizer,
    meta). With no tag, the most recently written tag of that phase is used."""
    from nanocode.tokenizer import get_tokenizer

    phase_dir = get_base_dir() / "checkpoints" / phase
    if tag is None:
        tags = [d for d in phase_dir.glob("*") if list_steps(d)] if phase_dir.is_dir() else []
        if not tags:
            raise NanocodeError(
                f"no {phase} checkpoint found under {phase_dir}: run the {phase} stage first"
            )
        tag = max(tags, key=lambda d: d.stat().st_mtime).name
    model_state, _, meta = load_checkpoint(phase_dir / tag, step, device=device)
    return model_from_state(meta["model_config"], model_state, device), get_tokenizer(), meta


def model_from_state(model_config: dict, state: dict, device):
    """A GPT in eval mode on `device` holding `state`, its config from a checkpoint's or an
    export's "model_config"; built on the meta device, so no memory goes to a random init."""
    from nanocode.gpt import GPT, GPTConfig

    try:
        config = GPTConfig.from_dict(model_config)
    except (TypeError, ValueError) as e:  # e.g. the October 2025 recipe, or another version's keys
        raise NanocodeError(f"cannot build the saved model: {e}") from None
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_rotary()  # cos/sin are buffers computed from the config, not stored
    model.load_state_dict(state, strict=True)
    return model.eval()
