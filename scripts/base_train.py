"""Pretrain the base model on code (with fill-in-the-middle).

    python -m scripts.base_train --depth 12                       # one GPU (or CPU)
    torchrun --nproc_per_node=8 -m scripts.base_train --depth 20  # a node
    python -m scripts.base_train --depth 2 --max-seq-len 256 --device-batch-size 4 --total-batch-size 2048 \
        --num-iterations 200 --eval-every 50 --eval-tokens 16384   # a CPU smoke run

Everything follows from --depth (nanochat's scaling recipe; explicit flags override):
- horizon: D = ratio (12) x the parameters in the blocks' matrices and the head (embeddings excluded:
  nanochat's scaling fits are cleanest so, with a compute-optimal ratio of ~10.5);
- batch: B = 2**19 x (D / D12)**0.383 tokens, rounded to a power of two (Power Lines, Bergsma et al.
  2025: the optimal batch grows as D^0.383), where D12 is the horizon of depth 12 (same vocab and ratio);
- learning rates x sqrt(B / 2**19) (Adam's square-root rule, assumed for Muon too); AdamW's also
  x 1/sqrt(width/768);
- Muon's cautious weight decay 0.28 x sqrt(B / 2**19) x (D12 / D) (keeps B/(lr·wd·D) constant, Wang
  and Aitchison 2024), decaying with the LR schedule;
- --total-batch-size sets the batch and then LRs and weight decay are used as given (training_plan);
- schedule: 40 warmup steps, constant, then the last 65% linearly down to 5% of the peak; Muon's
  momentum 0.85 -> 0.95 over the first 300 steps and back down to 0.90 over the warmdown.
The October 2025 recipe (ratio 20 over all parameters, batch 524,288, no warmup, warmdown 0.2 to 0,
no weight decay, full attention, no value embeddings or lambdas, RoPE base 10,000, N(0, 1) embedding,
the classic Newton-Schulz quintic)
is `--recipe oct2025`; bench/recipe_ab.py compares the two.
"""

import argparse
import math
import sys
import time

import torch

from nanocode.checkpoint import checkpoint_dir, list_steps, load_checkpoint, save_checkpoint
from nanocode.common import (
    NanocodeError,
    autocast,
    compute_cleanup,
    compute_init,
    init_wandb,
    nvtx_range,
    peak_bf16_flops,
    print0,
    run_main,
    set_nvtx,
)
from nanocode.dataloader import DataLoader
from nanocode.dataset import split_shards
from nanocode.gpt import GPT, GPTConfig, build_model, windows_are_slow
from nanocode.loss_eval import evaluate_bpb
from nanocode.optim import NS_COEFFS, all_reduce_gradients
from nanocode.report import log_stage
from nanocode.tokenizer import get_tokenizer


def get_args(argv=None):
    p = argparse.ArgumentParser(description="pretrain the base model")
    p.add_argument("--depth", type=int, default=12, help="layers; width = 64 * depth")
    p.add_argument(
        "--n-kv-head", type=int, default=None, help="key/value heads for GQA (default: = heads)"
    )
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument(
        "--device-batch-size", type=int, default=32, help="rows per forward pass per process"
    )
    p.add_argument(
        "--total-batch-size",
        type=int,
        default=-1,
        help="tokens per optimizer step, all ranks "
        "(-1: from the horizon, B = 2**19 * (D / D12)**0.383)",
    )
    p.add_argument(
        "--num-iterations", type=int, default=-1, help="optimizer steps (-1: from the data ratio)"
    )
    p.add_argument(
        "--target-param-data-ratio",
        type=float,
        default=12.0,
        help="training tokens per scaling parameter (blocks' matrices + head)",
    )
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon, at batch 2**19")
    p.add_argument(
        "--embedding-lr", type=float, default=0.2, help="AdamW, at batch 2**19 and width 768"
    )
    p.add_argument(
        "--unembedding-lr", type=float, default=0.004, help="AdamW, at batch 2**19 and width 768"
    )
    p.add_argument(
        "--scalar-lr", type=float, default=0.5, help="AdamW, the per-layer lambdas, at batch 2**19"
    )
    p.add_argument(
        "--weight-decay", type=float, default=0.28, help="Muon's cautious weight decay at depth 12"
    )
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--warmdown-ratio", type=float, default=0.65)
    p.add_argument("--final-lr-frac", type=float, default=0.05)
    p.add_argument(
        "--window-pattern",
        type=str,
        default="SSSL",
        help="attention per layer, tiled: S = a quarter of the context, L = full (last layer always L)",
    )
    p.add_argument(
        "--value-embeds", type=int, default=1, help="value embeddings on alternating layers"
    )
    p.add_argument("--lambdas", type=int, default=1, help="per-layer residual and x0 scalars")
    p.add_argument("--rope-base", type=float, default=100_000.0)
    p.add_argument(
        "--ns-coeffs",
        type=str,
        default="polar",
        choices=list(NS_COEFFS),
        help="Muon's Newton-Schulz coefficients: Polar Express per step, or the classic quintic",
    )
    p.add_argument(
        "--recipe",
        type=str,
        default="",
        choices=["", "oct2025"],
        help="oct2025: the October 2025 recipe (sets every flag above; later flags still override)",
    )
    p.add_argument("--fim-rate", type=float, default=0.5)
    p.add_argument("--data-name", type=str, default="code")
    p.add_argument(
        "--eval-every",
        type=int,
        default=250,
        help="steps between validation bpb (-1: only at the end)",
    )
    p.add_argument("--eval-tokens", type=int, default=10 * 524288)
    p.add_argument(
        "--sample-every",
        type=int,
        default=2000,
        help="steps between sample completions (-1: never)",
    )
    p.add_argument(
        "--save-every", type=int, default=-1, help="steps between checkpoints (-1: only at the end)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint of --model-tag"
    )
    p.add_argument(
        "--model-tag", type=str, default="", help="checkpoint dir name (default d<depth>)"
    )
    p.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument(
        "--compile", type=int, default=-1, help="torch.compile the model (default: on CUDA)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="NVTX ranges for nsys (data, fwd, bwd, optim, kernels)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy': no wandb)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--recipe" in argv or "--recipe=oct2025" in argv:
        p.set_defaults(**OCT2025)
    args = p.parse_args(argv)
    if args.depth < 1:
        raise NanocodeError(f"--depth must be >= 1, got {args.depth}")
    if args.total_batch_size < 1 and args.total_batch_size != -1:
        raise NanocodeError(
            f"--total-batch-size must be >= 1 (or -1: from the horizon), got {args.total_batch_size}"
        )
    if not args.window_pattern or set(args.window_pattern.upper()) - set("SL"):
        raise NanocodeError(
            f"--window-pattern must be made of S and L, got {args.window_pattern!r}"
        )
    for name in ("max_seq_len", "device_batch_size"):
        if getattr(args, name) < 1:
            raise NanocodeError(
                f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
            )
    return args


OCT2025 = dict(
    total_batch_size=524288,
    target_param_data_ratio=20.0,
    weight_decay=0.0,
    warmup_steps=0,
    warmdown_ratio=0.2,
    final_lr_frac=0.0,
    window_pattern="L",
    value_embeds=0,
    lambdas=0,
    rope_base=10000.0,
    ns_coeffs="classic",
)
B_REF = 2**19  # tokens per step at depth 12, nanochat's measured optimum
WD_REF = 0.28  # Muon weight decay at depth 12 (nanochat)
MAX_EPOCHS = (
    4  # repeated data is worth about as much as new for up to ~4 epochs (Muennighoff et al. 2023)
)


def training_plan(
    scaling_params, ref_scaling_params, ratio, total_batch_size=-1, weight_decay=WD_REF
):
    """Horizon, batch, LR factor and weight decay from the tokens:params ratio, depth 12 as the reference
    (see the module docstring). Returns (tokens, batch, lr_scale, weight_decay).

    A batch given explicitly (total_batch_size > 0) keeps the learning rates and weight decay as given:
    the rules are fits around depth 12's 2**19 tokens and extrapolate badly far from it. Measured on the
    CPU (depth 2, batch 4,096, 120 steps): with the square-root rule's LRs (x 0.088) the loss was 8.26
    after 25 steps, as at init, against 7.01 with the LRs as given; and D12 / D makes the decay
    hundreds of times the reference at a CPU's horizon."""
    tokens = ratio * scaling_params
    if total_batch_size > 0:
        return tokens, total_batch_size, 1.0, weight_decay
    ref_tokens = ratio * ref_scaling_params
    batch = 2 ** round(math.log2(B_REF * (tokens / ref_tokens) ** 0.383))
    lr_scale = math.sqrt(batch / B_REF)
    return tokens, batch, lr_scale, weight_decay * lr_scale * ref_tokens / tokens


def lr_multiplier(step, num_iterations, warmup_steps, warmdown_ratio, final_lr_frac):
    """Linear warmup, constant, then linear warmdown to final_lr_frac."""
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step, num_iterations, warmdown_ratio):
    """0.85 -> 0.95 over the first 300 steps (momentum is noise until the buffer has seen a few hundred
    gradients), then from the warmdown's start linearly to 0.90 (a smaller step wants less inertia)."""
    momentum = 0.85 + 0.10 * min(step / 300, 1)
    warmdown = round(warmdown_ratio * num_iterations)
    if warmdown > 0 and step > num_iterations - warmdown:
        progress = (step - (num_iterations - warmdown)) / warmdown
        momentum = min(momentum, 0.95 - 0.05 * progress)
    return momentum


def corpus_tokens(tokenizer, name, sample_docs=200):
    """About how many tokens one epoch of the train split holds: its characters (parquet, one column read)
    times the tokens per character of its first documents."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    chars, sample = 0, []
    for path in split_shards("train", name):
        texts = pq.read_table(path, columns=["text"]).column("text")
        chars += pc.sum(pc.utf8_length(texts)).as_py() or 0
        if len(sample) < sample_docs:
            sample += texts.slice(0, sample_docs - len(sample)).to_pylist()
    sample_chars = sum(len(t) for t in sample)
    return chars * sum(len(ids) for ids in tokenizer.encode_batch(sample)) / max(1, sample_chars)


def get_rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sample_completions(model, tokenizer, prompts, max_tokens=24):
    for prompt in prompts:
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
        out = list(model.generate(ids, max_tokens=max_tokens, temperature=0.0))
        print0(f"  {prompt!r} -> {tokenizer.decode(out)!r}")


def main(argv=None):
    args = get_args(argv)

    # ---- setup
    is_ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    set_nvtx(args.profile)
    torch.manual_seed(args.seed)
    amp = autocast(device)
    tokenizer = get_tokenizer()
    token_bytes = tokenizer.token_bytes.to(device)

    B, T = args.device_batch_size, args.max_seq_len
    recipe = dict(
        window_pattern=args.window_pattern,
        value_embeds=bool(args.value_embeds),
        lambdas=bool(args.lambdas),
        rope_base=args.rope_base,
    )
    if args.recipe == "oct2025":
        recipe.update(embed_init_std=1.0, mlp_init_scale=1.0)
    config = GPTConfig.from_depth(args.depth, tokenizer.vocab_size, T, args.n_kv_head, **recipe)
    model = build_model(config, device)
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    scaling_params = num_params if args.recipe == "oct2025" else model.num_scaling_params()
    with torch.device("meta"):
        d12 = GPT(GPTConfig.from_depth(12, tokenizer.vocab_size, T, **recipe))
    ref_params = d12.num_params() if args.recipe == "oct2025" else d12.num_scaling_params()
    planned_tokens, total_batch_size, lr_scale, weight_decay = training_plan(
        scaling_params,
        ref_params,
        args.target_param_data_ratio,
        args.total_batch_size,
        args.weight_decay,
    )
    if (
        args.total_batch_size == -1
        and total_batch_size < B * T * world_size
        and total_batch_size >= T * world_size
    ):
        B = total_batch_size // (
            T * world_size
        )  # a small model's batch from the horizon: fewer rows per pass
        print0(
            f"batch from the horizon ({total_batch_size:,} tokens) is less than one pass of --device-batch-size "
            f"rows on every process: {B} rows per pass instead"
        )
    tokens_per_fwd = B * T * world_size
    if total_batch_size % tokens_per_fwd:
        raise NanocodeError(
            f"total batch size {total_batch_size} (--total-batch-size) is not divisible by device "
            f"batch x seq len x processes = {B} x {T} x {world_size} = {tokens_per_fwd}"
        )
    grad_accum_steps = total_batch_size // tokens_per_fwd
    num_iterations = args.num_iterations
    if num_iterations < 0:
        num_iterations = max(1, round(planned_tokens / total_batch_size))
    optimizers = model.setup_optimizers(
        args.matrix_lr * lr_scale,
        args.embedding_lr * lr_scale,
        args.unembedding_lr * lr_scale,
        weight_decay,
        rank=rank,
        world_size=world_size,
        scalar_lr=args.scalar_lr * lr_scale,
        ns_coeffs=NS_COEFFS[args.ns_coeffs],
    )
    adamw, muon = optimizers
    use_compile = args.compile == 1 or (args.compile == -1 and device.type == "cuda")
    train_model = torch.compile(model, dynamic=False) if use_compile else model

    tag = args.model_tag or f"d{args.depth}"
    ckpt_dir = checkpoint_dir("base", tag)
    train_loader = DataLoader(
        tokenizer,
        B,
        T,
        split="train",
        device=device,
        rank=rank,
        world_size=world_size,
        fim_rate=args.fim_rate,
        seed=args.seed,
        name=args.data_name,
    )

    step, total_time, smooth_loss, curves = 0, 0.0, 0.0, {"loss": [], "val_bpb": []}
    if args.resume:
        if not list_steps(ckpt_dir):
            raise NanocodeError(f"--resume: no checkpoint to resume from in {ckpt_dir}")
        model_state, train_state, meta = load_checkpoint(
            ckpt_dir, device=device, rank=rank, load_optim=True
        )
        if meta["model_config"] != config.to_dict():
            raise NanocodeError(
                f"--resume: checkpoint in {ckpt_dir} has config {meta['model_config']}, "
                f"these flags give {config.to_dict()}"
            )
        model.load_state_dict(model_state)
        for opt, sd in zip(optimizers, train_state["optimizers"]):
            opt.load_state_dict(sd)
        train_loader.load_state_dict(train_state["loader"])
        set_rng_state(train_state["rng"])
        step, total_time, smooth_loss, curves = (
            meta["step"],
            meta["total_time"],
            meta["smooth_loss"],
            meta["curves"],
        )
        num_iterations = meta["num_iterations"]
        print0(f"resumed from {ckpt_dir} at step {step}")

    train_tokens = num_iterations * total_batch_size
    print0(
        f"model: depth {config.n_layer}, width {config.n_embd}, heads {config.n_head} (kv {config.n_kv_head}), "
        f"windows {[w or T for w in config.window_sizes()]}, {num_params:,} parameters ({scaling_params:,} for "
        f"scaling), {flops_per_token:.3e} FLOPs/token"
    )
    print0(
        f"batch: {total_batch_size:,} tokens/step{' (from the horizon)' if args.total_batch_size == -1 else ''} = "
        f"{B} rows x {T} tokens x {world_size} processes x {grad_accum_steps} accumulation steps; "
        f"{num_iterations:,} steps = {train_tokens:,} tokens ({train_tokens / scaling_params:.1f} per scaling parameter)"
    )
    print0(
        f"optimizer: learning rates x {lr_scale:.4f} (batch {total_batch_size:,} vs {B_REF:,}"
        f"{'' if args.total_batch_size == -1 else ', given: no scaling'}), Muon weight decay "
        f"{weight_decay:.4f} (cautious), warmup {args.warmup_steps} steps, warmdown {args.warmdown_ratio:.0%} to "
        f"{args.final_lr_frac:g} of the peak"
    )
    if rank == 0:  # the data horizon: how many times this run reads the corpus
        unique = corpus_tokens(tokenizer, args.data_name)
        epochs = train_tokens / max(unique, 1)
        print0(
            f"data: ~{unique / 1e6:,.1f}M unique train tokens in corpus {args.data_name!r}; this run reads "
            f"{train_tokens / 1e6:,.1f}M = {epochs:.2f} epochs"
        )
        if epochs > MAX_EPOCHS:
            print0(
                f"WARNING: {epochs:.1f} epochs of the same data: past ~{MAX_EPOCHS} epochs repeated tokens are worth "
                f"much less than new ones (Muennighoff et al. 2023), the model memorizes and val bpb stops "
                f"following train loss. Use more data (nanocode.dataset), a smaller --depth or "
                f"--target-param-data-ratio."
            )
    if windows_are_slow(config, device):
        print0(
            f"WARNING: sliding windows ({args.window_pattern}) without FlashAttention run as a banded mask on "
            f"PyTorch SDPA: slower than full attention, not faster (pip install flash-attn on CUDA, or "
            f"--window-pattern L)"
        )
    wandb_run = init_wandb(
        args.run,
        "nanocode-base",
        dict(
            vars(args),
            total_batch_size=total_batch_size,
            num_iterations=num_iterations,
            lr_scale=lr_scale,
            weight_decay=weight_decay,
            num_params=num_params,
            scaling_params=scaling_params,
        ),
        master=rank == 0,
    )
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak_flops = peak_bf16_flops(gpu_name)

    def run_eval():
        eval_steps = max(1, args.eval_tokens // tokens_per_fwd)
        val_loader = DataLoader(
            tokenizer,
            B,
            T,
            split="val",
            device=device,
            rank=rank,
            world_size=world_size,
            fim_rate=0.0,
            seed=0,
            name=args.data_name,
        )
        model.eval()
        with amp:
            bpb = evaluate_bpb(model, (next(val_loader) for _ in range(eval_steps)), token_bytes)
        model.train()
        return bpb

    def save(step):
        train_state = {
            "optimizers": [o.state_dict() for o in optimizers],
            "loader": train_loader.state_dict(),
            "rng": get_rng_state(),
        }
        meta = {
            "model_config": config.to_dict(),
            "train_args": vars(args),
            "num_iterations": num_iterations,
            "total_time": total_time,
            "smooth_loss": smooth_loss,
            "curves": curves,
            "val_bpb": curves["val_bpb"][-1][1] if curves["val_bpb"] else None,
        }
        # every rank: its optimizer, loader and RNG state; rank 0 also the model, and the meta last
        save_checkpoint(
            ckpt_dir, step, model.state_dict() if rank == 0 else None, train_state, meta, rank=rank
        )
        print0(f"saved checkpoint step {step} to {ckpt_dir}")

    # ---- loop
    start_step = step
    sample_prompts = ["def fibonacci(n):", "import os\n", "class Stack:\n    def"]
    val_bpb = None
    while True:
        last_step = step == num_iterations
        if (args.eval_every > 0 and step % args.eval_every == 0) or last_step:
            val_bpb = run_eval()
            curves["val_bpb"].append((step, val_bpb))
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            wandb_run.log({"step": step, "val/bpb": val_bpb, "total_training_time": total_time})
        if rank == 0 and (
            (args.sample_every > 0 and step % args.sample_every == 0 and step > 0) or last_step
        ):
            model.eval()
            with amp:
                sample_completions(model, tokenizer, sample_prompts)
            model.train()
        if last_step or (args.save_every > 0 and step % args.save_every == 0 and step > start_step):
            save(step)
        if last_step:
            break

        # one optimizer step: grad_accum_steps micro-batches, then all-reduce, then update
        t0 = time.time()
        for micro in range(grad_accum_steps):
            with nvtx_range("data"):
                x, y = next(train_loader)
            with nvtx_range("forward"), amp:
                loss = train_model(x, y)
            with nvtx_range("backward"):
                (loss / grad_accum_steps).backward()
        with nvtx_range("optimizer"):
            all_reduce_gradients(model, world_size)
            lrm = lr_multiplier(
                step, num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac
            )
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
            momentum = muon_momentum(step, num_iterations, args.warmdown_ratio)
            for group in muon.param_groups:
                group["momentum"] = momentum
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        step += 1

        # progress: the first steps (compilation, warm caches) do not count towards time and speed
        loss_f = loss.item()
        smooth_loss = 0.9 * smooth_loss + 0.1 * loss_f
        debiased = smooth_loss / (1 - 0.9**step)
        curves["loss"].append((step, loss_f))
        if step > 3:
            total_time += dt
        tok_s = total_batch_size / dt
        steps_timed = max(1, step - 3)
        eta = (num_iterations - step) * (total_time / steps_timed if step > 3 else dt)
        mfu = (
            f" | mfu {100 * flops_per_token * tok_s / (peak_flops * world_size):.1f}%"
            if peak_flops
            else ""
        )
        print0(
            f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.1f}%) | loss {debiased:.4f} | "
            f"lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | tok/s {tok_s:,.0f}{mfu} | eta {eta / 60:.1f}m"
        )
        wandb_run.log(
            {
                "step": step,
                "train/loss": debiased,
                "train/loss_raw": loss_f,
                "train/lrm": lrm,
                "train/muon_momentum": momentum,
                "train/dt": dt,
                "train/tok_per_sec": tok_s,
                "total_training_time": total_time,
            }
        )

    # ---- report
    if rank == 0:
        log_stage(
            "base_train",
            headline=["depth", "num_params", "tokens", "final_val_bpb", "final_loss"],
            depth=args.depth,
            model_tag=tag,
            num_params=num_params,
            num_iterations=num_iterations,
            tokens=train_tokens,
            total_batch_size=total_batch_size,
            flops_per_token=flops_per_token,
            train_time_s=total_time,
            final_val_bpb=val_bpb,
            final_loss=smooth_loss / (1 - 0.9 ** max(step, 1)),
            curves=curves,
            device=str(device),
            world_size=world_size,
            gpu=gpu_name,
        )
    print0(f"done: {step} steps, {total_time / 60:.2f} min of training, val bpb {val_bpb:.4f}")
    wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
