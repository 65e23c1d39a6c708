"""Pretrain the base model on code (with fill-in-the-middle).

    python -m scripts.base_train --depth 12                       # one GPU (or CPU)
    torchrun --nproc_per_node=8 -m scripts.base_train --depth 20  # a node
    python -m scripts.base_train --depth 2 --max-seq-len 256 --device-batch-size 4 \\
        --total-batch-size 2048 --num-iterations 200 --eval-every 50 --eval-tokens 16384  # a CPU

Everything follows from --depth (nanochat's scaling recipe; explicit flags override):
- horizon: D = ratio (12) x the parameters in the blocks' matrices and the head (embeddings
  excluded: nanochat's scaling fits are cleanest so, with a compute-optimal ratio of ~10.5);
- batch: B = 2**19 x (D / D12)**0.383 tokens, rounded to a power of two (Power Lines, Bergsma et
  al. 2025: the optimal batch grows as D^0.383), where D12 is the horizon of depth 12 (same vocab
  and ratio);
- learning rates x sqrt(B / 2**19) (Adam's square-root rule, assumed for Muon too); AdamW's also
  x 1/sqrt(width/768);
- Muon's cautious weight decay 0.28 x sqrt(B / 2**19) x (D12 / D) (keeps B/(lr·wd·D) constant, Wang
  and Aitchison 2024), decaying with the LR schedule;
- --total-batch-size sets the batch and then LRs and weight decay are used as given (training_plan);
- schedule: 40 warmup steps, constant, then the last 65% linearly down to 5% of the peak; Muon's
  momentum 0.85 -> 0.95 over the first 300 steps and back down to 0.90 over the warmdown.
Held-out bits per byte every --eval-every steps (and at the start and the end), a few greedy
completions at the evaluations that fall on --sample-every. The loop itself (accumulation,
checkpoints and exact --resume, progress with tok/s, MFU and ETA, wandb) is nanocode/training.py;
the data loader's position is part of every resumable checkpoint.
"""

import argparse
import math
from functools import partial

import torch

from nanocode import training
from nanocode.common import NanocodeError, autocast, compute_cleanup, compute_init, print0, run_main
from nanocode.dataloader import DataLoader
from nanocode.dataset import split_shards
from nanocode.engine import Engine
from nanocode.fp8 import fp8_supported
from nanocode.gpt import GPT, GPTConfig, build_model, windows_are_slow
from nanocode.loss_eval import evaluate_bpb
from nanocode.report import ema, log_stage
from nanocode.tokenizer import get_tokenizer
from nanocode.training import posint


def get_args(argv=None):
    p = argparse.ArgumentParser(description="pretrain the base model")
    p.add_argument("--depth", type=posint, default=12, help="layers; width = 64 * depth")
    p.add_argument("--n-kv-head", type=int, default=None, help="GQA's key/value heads")
    p.add_argument("--max-seq-len", type=posint, default=2048)
    p.add_argument("--device-batch-size", type=posint, default=32, help="rows per pass per process")
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens/step (-1: horizon)")
    p.add_argument("--num-iterations", type=int, default=-1, help="steps (-1: from the ratio)")
    p.add_argument("--target-param-data-ratio", type=float, default=12.0, help="tokens/param")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon, at batch 2**19")
    p.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW, batch 2**19, width 768")
    p.add_argument("--unembedding-lr", type=float, default=0.004, help="as --embedding-lr")
    p.add_argument("--scalar-lr", type=float, default=0.5, help="AdamW, the per-layer scalars")
    p.add_argument("--weight-decay", type=float, default=0.28, help="Muon's, at depth 12")
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--warmdown-ratio", type=float, default=0.65)
    p.add_argument("--final-lr-frac", type=float, default=0.05)
    # attention per layer, tiled: S = a quarter of the context, L = full (the last layer always L)
    p.add_argument("--window-pattern", default="SSSL")
    p.add_argument("--fim-rate", type=float, default=0.5, help="share of documents made FIM")
    p.add_argument("--data-name", default="code")
    # val tokens per evaluation: ten of depth 12's batches (2**19 tokens each)
    p.add_argument("--eval-tokens", type=int, default=10 * 524288)
    p.add_argument("--sample-every", type=int, default=2000, help="steps (-1: never)")
    p.add_argument("--model-tag", default="", help="checkpoint dir (default d<depth>)")
    p.add_argument("--compile", type=int, default=-1, help="torch.compile (default: on CUDA)")
    p.add_argument("--fp8", action="store_true", help="the blocks' matmuls in FP8 (training only)")
    training.add_loop_args(p, eval_every=250)
    args = p.parse_args(argv)
    if args.total_batch_size < 1 and args.total_batch_size != -1:
        raise NanocodeError(f"--total-batch-size must be >= 1 or -1, got {args.total_batch_size}")
    if not args.window_pattern or set(args.window_pattern.upper()) - set("SL"):
        raise NanocodeError(f"--window-pattern must be made of S and L: {args.window_pattern!r}")
    return args


B_REF = 2**19  # tokens per step at depth 12, nanochat's measured optimum
WD_REF = 0.28  # Muon weight decay at depth 12 (nanochat)
# repeated data is worth about as much as new for ~4 epochs (Muennighoff et al. 2023)
MAX_EPOCHS = 4


def training_plan(scaling_params, ref_params, ratio, total_batch_size=-1, weight_decay=WD_REF):
    """Horizon, batch, LR factor and weight decay from the tokens:params ratio, depth 12 (whose
    scaling parameters are ref_params) as the reference (see the module docstring). Returns
    (tokens, batch, lr_scale, weight_decay).

    A batch given explicitly (total_batch_size > 0) keeps the learning rates and weight decay as
    given: the rules are fits around depth 12's 2**19 tokens and extrapolate badly far from it.
    Measured on the CPU (depth 2, batch 4,096, 120 steps): with the square-root rule's LRs (x 0.088)
    the loss was 8.26 after 25 steps, as at init, against 7.01 with the LRs as given; and D12 / D
    makes the decay hundreds of times the reference at a CPU's horizon."""
    tokens = ratio * scaling_params
    if total_batch_size > 0:
        return tokens, total_batch_size, 1.0, weight_decay
    ref_tokens = ratio * ref_params
    batch = 2 ** round(math.log2(B_REF * (tokens / ref_tokens) ** 0.383))  # nearest power of two
    lr_scale = math.sqrt(batch / B_REF)
    # B / (lr·wd·D) constant: B grows as lr_scale**2 and lr as lr_scale, so wd goes as lr_scale / D
    return tokens, batch, lr_scale, weight_decay * lr_scale * ref_tokens / tokens


def lr_multiplier(step, num_iterations, warmup_steps, warmdown_ratio, final_lr_frac):
    """Linear warmup, constant, then linear warmdown to final_lr_frac."""
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps  # step + 1: never a zero LR
    if step <= num_iterations - warmdown:
        return 1.0
    # 1 where the warmdown starts, 0 at num_iterations; the last step run is num_iterations - 1,
    # so it ends one warmdown step above final_lr_frac
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step, num_iterations, warmdown_ratio):
    """0.85 -> 0.95 over the first 300 steps (momentum is noise until the buffer has seen a few
    hundred gradients), then from the warmdown's start linearly to 0.90 (a smaller step wants less
    inertia)."""
    momentum = 0.85 + 0.10 * min(step / 300, 1)
    warmdown = round(warmdown_ratio * num_iterations)
    if warmdown > 0 and step > num_iterations - warmdown:
        progress = (step - (num_iterations - warmdown)) / warmdown
        momentum = min(momentum, 0.95 - 0.05 * progress)
    return momentum


def corpus_tokens(tokenizer, name, sample_docs=200):
    """About how many tokens one epoch of the train split holds: its characters (parquet, one
    column read) times the tokens per character of its first documents."""
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


def main(argv=None):
    """Setup (the model and the plan that follows from its size: batch, steps, learning rates,
    weight decay; optimizers, the data loader, the data-horizon check), the closures the loop calls
    (evaluate, loss_fn, schedule, batches), the loop and its checkpoints (training.train), then
    the report (log_stage, rank 0)."""
    args = get_args(argv)
    _, rank, _, world_size, device = compute_init(args.device_type)
    # the same seed on every rank: nothing broadcasts the initial weights, so an identical init is
    # what starts the DDP replicas equal (averaged gradients then keep them so)
    torch.manual_seed(args.seed)
    amp = autocast(device)
    tokenizer = get_tokenizer()

    # ---- the model, and the plan that follows from its size
    B, T, V = args.device_batch_size, args.max_seq_len, tokenizer.vocab_size
    pattern = args.window_pattern
    config = GPTConfig.from_depth(args.depth, V, T, args.n_kv_head, window_pattern=pattern)
    model = build_model(config, device)
    if args.fp8:  # before anything slow: a device or a shape without FP8 matmuls stops here
        ok, why = fp8_supported(device)
        if not ok:
            raise NanocodeError(f"--fp8: {why}")
        try:
            model.enable_fp8()
        except ValueError as e:
            raise NanocodeError(f"--fp8: {e}") from e
    num_params, scaling_params = model.num_params(), model.num_scaling_params()
    flops_per_token = model.estimate_flops()  # 6 x scaling params + attention: for MFU
    with torch.device("meta"):  # depth 12 counted on the meta device: shapes only, no memory
        ref_params = GPT(GPTConfig.from_depth(12, V, T)).num_scaling_params()
    given = (args.target_param_data_ratio, args.total_batch_size, args.weight_decay)
    plan = training_plan(scaling_params, ref_params, *given)
    planned_tokens, batch, lr_scale, weight_decay = plan
    from_horizon = args.total_batch_size == -1
    if from_horizon and T * world_size <= batch < B * T * world_size:
        B = batch // (T * world_size)  # a small model's batch from the horizon: fewer rows per pass
        print0(
            f"batch from the horizon ({batch:,} tokens) is less than one pass of "
            f"--device-batch-size rows on every process: {B} rows per pass instead"
        )
    # one forward/backward on every rank reads B x T x world_size tokens; a step accumulates
    # gradients over grad_accum such passes, so batch = B x T x world_size x grad_accum exactly
    tokens_per_pass = B * T * world_size
    if batch % tokens_per_pass:
        raise NanocodeError(
            f"total batch size {batch} (--total-batch-size) is not divisible by device batch x seq "
            f"len x processes = {B} x {T} x {world_size} = {tokens_per_pass}"
        )
    grad_accum = batch // tokens_per_pass
    num_steps = args.num_iterations
    if num_steps < 0:  # the horizon (ratio x scaling params) in whole batches
        num_steps = max(1, round(planned_tokens / batch))
    train_tokens = num_steps * batch  # what the run really reads: the horizon rounded to steps
    lrs = [lr * lr_scale for lr in (args.matrix_lr, args.embedding_lr, args.unembedding_lr)]
    optimizers = model.setup_optimizers(
        *lrs, weight_decay, rank=rank, world_size=world_size, scalar_lr=args.scalar_lr * lr_scale
    )
    use_compile = args.compile == 1 or (args.compile == -1 and device.type == "cuda")
    # only the training forward is compiled (fixed shapes: B x T); evaluation and sampling call the
    # uncompiled `model`, which shares its parameters, so their other shapes cause no recompiles
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    loader = partial(DataLoader, tokenizer, B, T, device=device, rank=rank, world_size=world_size)
    train_loader = loader(fim_rate=args.fim_rate, seed=args.seed, name=args.data_name)

    print0(
        f"model: depth {args.depth}, width {config.n_embd}, heads {config.n_head} (kv "
        f"{config.n_kv_head}), windows {[w or T for w in config.window_sizes()]}, {num_params:,} "
        f"parameters ({scaling_params:,} for scaling), {flops_per_token:.3e} FLOPs/token"
        + (", the blocks' matmuls in FP8 while training" if args.fp8 else "")
    )
    print0(
        f"batch: {batch:,} tokens/step{' (from the horizon)' if from_horizon else ''} = {B} rows x "
        f"{T} tokens x {world_size} processes x {grad_accum} accumulation steps; {num_steps:,} "
        f"steps = {train_tokens:,} tokens ({train_tokens / scaling_params:.1f} per scaling param)"
    )
    print0(
        f"optimizer: learning rates x {lr_scale:.4f} (batch {batch:,} vs {B_REF:,}"
        f"{'' if from_horizon else ', given: no scaling'}), Muon weight decay {weight_decay:.4f} "
        f"(cautious), warmup {args.warmup_steps} steps, warmdown {args.warmdown_ratio:.0%} to "
        f"{args.final_lr_frac:g} of the peak"
    )
    if rank == 0:  # the data horizon: how many times this run reads the corpus
        unique = corpus_tokens(tokenizer, args.data_name)
        epochs = train_tokens / max(unique, 1)
        print0(
            f"data: ~{unique / 1e6:,.1f}M unique train tokens in corpus {args.data_name!r}; this "
            f"run reads {train_tokens / 1e6:,.1f}M = {epochs:.2f} epochs"
        )
        if epochs > MAX_EPOCHS:
            print0(
                f"WARNING: {epochs:.1f} epochs of the same data: past ~{MAX_EPOCHS} epochs "
                f"repeated tokens are worth much less than new ones (Muennighoff et al. 2023), "
                f"the model memorizes and val bpb stops following train loss. Use more data "
                f"(nanocode.dataset), a smaller --depth or --target-param-data-ratio."
            )
    if windows_are_slow(config, device):
        print0(
            f"WARNING: sliding windows ({pattern}) without FlashAttention run as a banded mask on "
            f"PyTorch SDPA: slower than full attention, not faster (pip install flash-attn on "
            f"CUDA, or --window-pattern L)"
        )

    # ---- what the loop calls
    token_bytes = tokenizer.token_bytes.to(device)  # UTF-8 bytes per token id: bpb's denominator
    eval_steps = max(1, args.eval_tokens // tokens_per_pass)  # --eval-tokens over all ranks
    prompts = ["def fibonacci(n):", "import os\n", "class Stack:\n    def"]

    def evaluate(step):
        """Held-out bits per byte over eval_steps batches of the val split, without FIM and with
        seed 0, so every evaluation reads the same tokens; rank 0 also prints greedy completions
        of `prompts` at the --sample-every steps and at the last one."""
        val_loader = loader(split="val", fim_rate=0.0, seed=0, name=args.data_name)
        with amp:
            bpb = evaluate_bpb(model, (next(val_loader) for _ in range(eval_steps)), token_bytes)
        print0(f"step {step:05d} | val bpb {bpb:.4f}")
        sample = args.sample_every > 0 and step > 0 and step % args.sample_every == 0
        if rank == 0 and (sample or step == num_steps):
            engine = Engine(model, tokenizer)
            for prompt in prompts:  # <|bos|> first, as every training document starts
                ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
                with amp:
                    out = engine.generate_batch(ids, max_tokens=24, temperature=0.0)[0]
                print0(f"  {prompt!r} -> {tokenizer.decode(out)!r}")
        return {"bpb": bpb}

    def loss_fn(xy):
        with amp:
            loss = train_model(*xy)  # targets given: the mean cross-entropy (fused kernel)
        return loss, {"loss": loss.detach(), "tokens": xy[0].numel()}

    def schedule(step):
        """The loop's LR multiplier for `step`; Muon's momentum is set here too (the loop itself
        sets only the learning rates)."""
        for group in optimizers[1].param_groups:  # Muon's
            group["momentum"] = muon_momentum(step, num_steps, args.warmdown_ratio)
        warmup, warmdown, final = args.warmup_steps, args.warmdown_ratio, args.final_lr_frac
        return lr_multiplier(step, num_steps, warmup, warmdown, final)

    tag = args.model_tag or f"d{args.depth}"
    meta = dict(total_batch_size=batch, lr_scale=lr_scale, weight_decay=weight_decay)

    def batches(step):
        # the next grad_accum batches: the loader's position, saved in every checkpoint
        # (`stateful`), is what a resumed run continues from, not `step`
        return [next(train_loader) for _ in range(grad_accum)]

    loop = dict(meta=meta, schedule=schedule, stateful={"loader": train_loader})
    result = training.train(
        model, optimizers, args, "base", tag, num_steps, batches, loss_fn, evaluate, **loop
    )

    # ---- report
    losses, evals = result["curves"].get("loss", []), result["evals"]
    val_bpb = evals[-1][1]["bpb"]  # the loop always evaluates at the last step
    if rank == 0:
        log_stage(
            "base_train",
            headline=["depth", "num_params", "tokens", "final_val_bpb", "final_loss"],
            depth=args.depth,
            model_tag=tag,
            num_params=num_params,
            num_iterations=num_steps,
            tokens=train_tokens,
            total_batch_size=batch,
            flops_per_token=flops_per_token,
            fp8=args.fp8,
            train_time_s=result["train_time_s"],
            final_val_bpb=val_bpb,
            # smoothed: one step's loss is one batch's, noisy
            final_loss=ema([v for _, v in losses])[-1] if losses else None,
            curves={"loss": losses, "val_bpb": [(s, m["bpb"]) for s, m in evals]},
            device=str(device),
            world_size=world_size,
            gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "",
        )
    minutes = result["train_time_s"] / 60
    print0(f"done: {num_steps} steps, {minutes:.2f} min of training, val bpb {val_bpb:.4f}")
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
