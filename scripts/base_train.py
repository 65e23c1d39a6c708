"""Pretrain the base model on code (with fill-in-the-middle).

    python -m scripts.base_train --depth 12                       # one GPU (or CPU)
    torchrun --nproc_per_node=8 -m scripts.base_train --depth 20  # a node
    python -m scripts.base_train --depth 2 --max-seq-len 256 --device-batch-size 4 --total-batch-size 2048 \
        --num-iterations 200 --eval-every 50 --eval-tokens 16384   # a CPU smoke run

Everything follows from --depth: width 64*depth, heads of 128, learning rates scaled by width, and
the number of steps from a tokens:parameters ratio (20, Chinchilla). Explicit flags override.
"""
import argparse
import time

import torch

from nanocode.checkpoint import checkpoint_dir, list_steps, load_checkpoint, save_checkpoint
from nanocode.common import (NanocodeError, autocast, compute_cleanup, compute_init, nvtx_range, peak_bf16_flops,
                             print0, run_main, set_nvtx)
from nanocode.dataloader import DataLoader
from nanocode.gpt import GPTConfig, build_model
from nanocode.loss_eval import evaluate_bpb
from nanocode.optim import all_reduce_gradients
from nanocode.report import log_stage
from nanocode.tokenizer import get_tokenizer


def get_args(argv=None):
    p = argparse.ArgumentParser(description="pretrain the base model")
    p.add_argument("--depth", type=int, default=12, help="layers; width = 64 * depth")
    p.add_argument("--n-kv-head", type=int, default=None, help="key/value heads for GQA (default: = heads)")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass per process")
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step, all ranks")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from the data ratio)")
    p.add_argument("--target-param-data-ratio", type=float, default=20.0, help="training tokens per parameter")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon")
    p.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW, scaled by 1/sqrt(width/768)")
    p.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW, scaled by 1/sqrt(width/768)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.0)
    p.add_argument("--warmdown-ratio", type=float, default=0.2)
    p.add_argument("--final-lr-frac", type=float, default=0.0)
    p.add_argument("--fim-rate", type=float, default=0.5)
    p.add_argument("--data-name", type=str, default="code")
    p.add_argument("--eval-every", type=int, default=250, help="steps between validation bpb (-1: only at the end)")
    p.add_argument("--eval-tokens", type=int, default=10 * 524288)
    p.add_argument("--sample-every", type=int, default=2000, help="steps between sample completions (-1: never)")
    p.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of --model-tag")
    p.add_argument("--model-tag", type=str, default="", help="checkpoint dir name (default d<depth>)")
    p.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--compile", type=int, default=-1, help="torch.compile the model (default: on CUDA)")
    p.add_argument("--profile", action="store_true", help="NVTX ranges for nsys (data, fwd, bwd, optim, kernels)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.depth < 1:
        raise NanocodeError(f"--depth must be >= 1, got {args.depth}")
    for name in ("max_seq_len", "device_batch_size", "total_batch_size"):
        if getattr(args, name) < 1:
            raise NanocodeError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def lr_multiplier(step, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Linear warmup, constant, then linear warmdown to final_lr_frac."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step):
    """Muon's momentum ramps from 0.85 to 0.95 over the first 300 steps."""
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


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
    tokens_per_fwd = B * T * world_size
    if args.total_batch_size % tokens_per_fwd:
        raise NanocodeError(f"--total-batch-size {args.total_batch_size} is not divisible by device batch x seq len x "
                            f"processes = {B} x {T} x {world_size} = {tokens_per_fwd}")
    grad_accum_steps = args.total_batch_size // tokens_per_fwd

    config = GPTConfig.from_depth(args.depth, tokenizer.vocab_size, T, args.n_kv_head)
    model = build_model(config, device)
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    num_iterations = args.num_iterations
    if num_iterations < 0:
        num_iterations = max(1, round(args.target_param_data_ratio * num_params / args.total_batch_size))
    optimizers = model.setup_optimizers(args.matrix_lr, args.embedding_lr, args.unembedding_lr, args.weight_decay,
                                        rank=rank, world_size=world_size)
    adamw, muon = optimizers
    use_compile = args.compile == 1 or (args.compile == -1 and device.type == "cuda")
    train_model = torch.compile(model, dynamic=False) if use_compile else model

    tag = args.model_tag or f"d{args.depth}"
    ckpt_dir = checkpoint_dir("base", tag)
    train_loader = DataLoader(tokenizer, B, T, split="train", device=device, rank=rank, world_size=world_size,
                              fim_rate=args.fim_rate, seed=args.seed, name=args.data_name)

    step, total_time, smooth_loss, curves = 0, 0.0, 0.0, {"loss": [], "val_bpb": []}
    if args.resume:
        if not list_steps(ckpt_dir):
            raise NanocodeError(f"--resume: no checkpoint to resume from in {ckpt_dir}")
        model_state, train_state, meta = load_checkpoint(ckpt_dir, device=device, rank=rank, load_optim=True)
        if meta["model_config"] != config.to_dict():
            raise NanocodeError(f"--resume: checkpoint in {ckpt_dir} has config {meta['model_config']}, "
                                f"these flags give {config.to_dict()}")
        model.load_state_dict(model_state)
        for opt, sd in zip(optimizers, train_state["optimizers"]):
            opt.load_state_dict(sd)
        train_loader.load_state_dict(train_state["loader"])
        set_rng_state(train_state["rng"])
        step, total_time, smooth_loss, curves = meta["step"], meta["total_time"], meta["smooth_loss"], meta["curves"]
        num_iterations = meta["num_iterations"]
        print0(f"resumed from {ckpt_dir} at step {step}")

    print0(f"model: depth {config.n_layer}, width {config.n_embd}, heads {config.n_head} (kv {config.n_kv_head}), "
           f"{num_params:,} parameters, {flops_per_token:.3e} FLOPs/token")
    print0(f"batch: {args.total_batch_size:,} tokens/step = {B} rows x {T} tokens x {world_size} processes x "
           f"{grad_accum_steps} accumulation steps; {num_iterations:,} steps = "
           f"{num_iterations * args.total_batch_size:,} tokens ({num_iterations * args.total_batch_size / num_params:.1f} per parameter)")
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak_flops = peak_bf16_flops(gpu_name)

    def run_eval():
        eval_steps = max(1, args.eval_tokens // tokens_per_fwd)
        val_loader = DataLoader(tokenizer, B, T, split="val", device=device, rank=rank, world_size=world_size,
                                fim_rate=0.0, seed=0, name=args.data_name)
        model.eval()
        with amp:
            bpb = evaluate_bpb(model, (next(val_loader) for _ in range(eval_steps)), token_bytes)
        model.train()
        return bpb

    def save(step):
        train_state = {"optimizers": [o.state_dict() for o in optimizers], "loader": train_loader.state_dict(),
                       "rng": get_rng_state()}
        meta = {"model_config": config.to_dict(), "train_args": vars(args), "num_iterations": num_iterations,
                "total_time": total_time, "smooth_loss": smooth_loss, "curves": curves,
                "val_bpb": curves["val_bpb"][-1][1] if curves["val_bpb"] else None}
        # every rank: its optimizer, loader and RNG state; rank 0 also the model, and the meta last
        save_checkpoint(ckpt_dir, step, model.state_dict() if rank == 0 else None, train_state, meta, rank=rank)
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
        if rank == 0 and ((args.sample_every > 0 and step % args.sample_every == 0 and step > 0) or last_step):
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
            lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
            for group in muon.param_groups:
                group["momentum"] = muon_momentum(step)
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
        debiased = smooth_loss / (1 - 0.9 ** step)
        curves["loss"].append((step, loss_f))
        if step > 3:
            total_time += dt
        tok_s = args.total_batch_size / dt
        steps_timed = max(1, step - 3)
        eta = (num_iterations - step) * (total_time / steps_timed if step > 3 else dt)
        mfu = f" | mfu {100 * flops_per_token * tok_s / (peak_flops * world_size):.1f}%" if peak_flops else ""
        print0(f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.1f}%) | loss {debiased:.4f} | "
               f"lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | tok/s {tok_s:,.0f}{mfu} | eta {eta / 60:.1f}m")

    # ---- report
    if rank == 0:
        log_stage("base_train", depth=args.depth, model_tag=tag, num_params=num_params, num_iterations=num_iterations,
                  tokens=num_iterations * args.total_batch_size, total_batch_size=args.total_batch_size,
                  flops_per_token=flops_per_token, train_time_s=total_time, final_val_bpb=val_bpb,
                  final_loss=smooth_loss / (1 - 0.9 ** max(step, 1)), curves=curves, device=str(device),
                  world_size=world_size, gpu=gpu_name)
    print0(f"done: {step} steps, {total_time / 60:.2f} min of training, val bpb {val_bpb:.4f}")
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
