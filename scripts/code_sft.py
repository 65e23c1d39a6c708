"""Supervised fine-tuning of a base checkpoint on tool-use conversations.

    python -m scripts.gen_synth                                   # the synthetic data, once
    python -m scripts.code_sft --model-tag d12                    # base d12 -> sft d12
    python -m scripts.code_sft --mix synth=1,code_alpaca=0.2      # choose the sources and weights
    python -m scripts.code_sft --mix mine.jsonl --val mine_val.jsonl   # your own conversations
    torchrun --nproc_per_node=8 -m scripts.code_sft

Each conversation is rendered with tokenizer.render_conversation, whose mask marks the assistant's own
tokens (its text, its tool calls, <|assistant_end|>). The loss is taken on exactly those: every other
target (the user's turn, tool outputs, padding) is -1, which the model's cross-entropy ignores. One
conversation per row, padded at the end, so no conversation ever attends to another (attention is
causal, padding only follows the real tokens).

The default mix is the synthetic data plus every hub instruct source already downloaded. A user's
JSONL is checked at load time: every tool call must name a real tool with arguments that fit its schema
(else one error naming the file and line); its held-out split is --val (hub and synthetic sources bring
their own).

Every --eval-every steps, on held-out conversations (a different slice than training):
- loss: mean cross-entropy per assistant token;
- tool-call validity (nanocode.finetune.tool_call_validity): at each position where a held-out assistant
  made a tool call, the model continues greedily; valid, invalid, no call and cut off by the token limit
  are counted apart, held-out kinds never trained on ("seen": false) apart from the others.
The training loop itself (schedule, accumulation, checkpoints, --resume) is nanocode/finetune.py.
"""

import argparse
import random

import torch

from nanocode import finetune
from nanocode.checkpoint import load_model
from nanocode.common import NanocodeError, autocast, compute_cleanup, compute_init, print0, run_main
from nanocode.conversations import cached_sources, load_jsonl, load_mixture, pad_batch, parse_mix
from nanocode.report import log_stage
from nanocode.tools import validate_tool_call


def get_args(argv=None):
    p = argparse.ArgumentParser(
        description="tool-use SFT on conversations (loss on assistant tokens only)"
    )
    p.add_argument(
        "--model-tag", type=str, default=None, help="base checkpoint tag (default: the latest)"
    )
    p.add_argument(
        "--model-step", type=int, default=None, help="base checkpoint step (default: the latest)"
    )
    p.add_argument(
        "--mix",
        type=str,
        default="",
        help="sources and weights: synth, code_alpaca, code_feedback, gsm8k, "
        "*.jsonl (default: synth plus every downloaded instruct source)",
    )
    p.add_argument(
        "--val",
        type=str,
        default="",
        help="held-out conversations JSONL for the .jsonl sources of --mix",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=0,
        help="tokens per row (default: the model's sequence_len)",
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="conversations per optimizer step, all ranks"
    )
    p.add_argument("--num-epochs", type=float, default=1.0)
    p.add_argument(
        "--eval-convs", type=int, default=100, help="held-out conversations for the loss"
    )
    p.add_argument(
        "--eval-prompts",
        type=int,
        default=64,
        help="held-out tool-call positions for the validity rate",
    )
    p.add_argument(
        "--gen-tokens",
        type=int,
        default=0,
        help="max tokens generated per validity prompt "
        "(0: the reference call's length + 32, so the longest call fits)",
    )
    finetune.add_args(p, init_lr_frac=0.1, eval_every=100)
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# data


def default_mix() -> str:
    """synth, plus each instruct source already here (converted, or its hub file cached): none is fetched
    unasked, so an offline run trains on what it has."""
    return ",".join(["synth=1"] + [f"{n}=1" for n in cached_sources()])


def check_tool_calls(path) -> list[dict]:
    """The conversations of a user's JSONL, every tool call checked against the tool schemas: an unknown
    tool or arguments that do not fit -> one error naming the file and line (blank lines count)."""
    convs = load_jsonl(path)
    lines = [i for i, line in enumerate(open(path, encoding="utf-8"), 1) if line.strip()]
    for conv, lineno in zip(convs, lines):
        for m in conv["messages"]:
            for part in m["content"] if isinstance(m["content"], list) else []:
                if part["type"] == "tool_call":
                    err = validate_tool_call({"name": part["name"], "arguments": part["arguments"]})
                    if err:
                        raise NanocodeError(f"{path} line {lineno}: {err}")
    return convs


def load_data(spec: str, val_path: str, seed: int):
    """(train conversations, held-out conversations) of a --mix spec and --val file."""
    for name, _ in parse_mix(spec):
        if name.endswith(".jsonl"):
            check_tool_calls(name)
    train = load_mixture(spec, "train", seed)
    val = (
        load_mixture(spec, "val", seed)
        if any(not n.endswith(".jsonl") for n, w in parse_mix(spec) if w > 0)
        else []
    )
    if val_path:
        val = val + check_tool_calls(val_path)
    return train, val


def render_rows(tokenizer, convs, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) per conversation, cut to max_len + 1 tokens (inputs and targets are shifted by one);
    conversations with no assistant token left after the cut are dropped."""
    rows = []
    for conv in convs:
        ids, mask = tokenizer.render_conversation(conv, max_tokens=max_len + 1)
        ids, mask = list(ids)[: max_len + 1], list(mask)[: max_len + 1]
        if sum(mask[1:]) > 0:
            rows.append((ids, mask))
    return rows


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The row order of an epoch: range(n) shuffled in place once per epoch so far by random.Random(seed)
    (recomputed from the epoch alone, so a resumed run gets the same batches)."""
    rng, order = random.Random(seed), list(range(n))
    for _ in range(epoch + 1):
        rng.shuffle(order)
    return order


@torch.no_grad()
def eval_loss(model, rows, batch_size: int, pad_id: int, device, amp) -> float:
    """Mean loss per assistant token over `rows`."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x, y = pad_batch(rows[i : i + batch_size], pad_id, device)
        with amp:
            loss = model(x, y, loss_reduction="none")
        total += loss.float().sum().item()
        count += (y != -1).sum().item()
    return total / max(count, 1)


# -----------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    is_ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    torch.manual_seed(args.seed)
    amp = autocast(device)

    model, tokenizer, base_meta = load_model(
        "base", device, tag=args.model_tag, step=args.model_step
    )
    config = model.config
    T = args.max_seq_len or config.sequence_len
    if T > model.rotary_len:
        raise NanocodeError(
            f"--max-seq-len {T} exceeds the model's rotary table ({model.rotary_len})"
        )
    config.sequence_len = (
        T  # the context of the fine-tuned model (the engine's limit too); saved in its config
    )
    tag = args.model_tag or f"d{config.n_layer}"
    pad_id = tokenizer.bos_id  # never a target: pad targets are -1

    mix = args.mix or default_mix()
    train_convs, val_convs = load_data(mix, args.val, args.seed)
    train_rows = render_rows(tokenizer, train_convs, T)
    val_rows = render_rows(tokenizer, val_convs[: args.eval_convs], T)
    prompts = finetune.tool_call_prompts(tokenizer, val_convs, args.eval_prompts, T - 8, args.seed)
    prompts += finetune.validity_file_prompts(tokenizer, prompts, args.eval_prompts, T - 8)
    if not train_rows:
        raise NanocodeError(f"no training conversations with assistant tokens in --mix {mix!r}")
    if not val_rows:
        raise NanocodeError(
            f"no held-out conversations for --mix {mix!r}: give your .jsonl's held-out split with "
            f"--val, or include synth or a hub source"
        )
    if args.batch_size % world_size:
        raise NanocodeError(
            f"--batch-size {args.batch_size} is not divisible by the {world_size} processes"
        )
    per_rank = args.batch_size // world_size
    steps_per_epoch = max(1, len(train_rows) // args.batch_size)
    num_steps = args.steps if args.steps > 0 else max(1, round(args.num_epochs * steps_per_epoch))
    n_tokens = sum(sum(m[1:]) for _, m in train_rows)
    print0(
        f"model: {tag}, depth {config.n_layer}, width {config.n_embd}, {model.num_params():,} parameters; rows of {T} tokens"
    )
    print0(
        f"data: --mix {mix}: {len(train_rows)} train conversations ({n_tokens:,} assistant tokens), {len(val_rows)} "
        f"held-out, {len(prompts)} held-out tool-call prompts; {num_steps} steps of {args.batch_size} conversations "
        f"({num_steps / steps_per_epoch:.2f} epochs)"
    )

    def batches(step):
        epoch, k = divmod(step, steps_per_epoch)
        order = epoch_order(len(train_rows), epoch, args.seed)
        rows = [train_rows[i] for i in order[k * args.batch_size : (k + 1) * args.batch_size]][
            rank::world_size
        ]
        return [pad_batch(mb, pad_id, device) for mb in finetune.split(rows, args.grad_accum)]

    def loss_fn(xy):
        x, y = xy
        with amp:
            loss = model(x, y)
        return loss, {"loss": loss.item(), "tokens": x.numel()}

    def evaluate(step):
        if rank != 0:
            return None
        loss = eval_loss(model, val_rows, per_rank, pad_id, device, amp)
        with amp:
            v = finetune.tool_call_validity(model, tokenizer, prompts, args.gen_tokens)
        print0(f"step {step:05d} | val loss {loss:.4f} | {finetune.fmt_validity(v)}")
        return {"val_loss": loss, "validity": v["validity"], "detail": v}

    result = finetune.train(
        model,
        finetune.setup_optimizers(model, args, rank, world_size),
        args,
        phase="sft",
        tag=tag,
        num_steps=num_steps,
        batches=batches,
        loss_fn=loss_fn,
        evaluate=evaluate,
        rank=rank,
        world_size=world_size,
        device=device,
        meta=lambda: {
            "model_config": config.to_dict(),
            "base_step": base_meta.get("step"),
            "sft_args": vars(args),
            "mix": mix,
        },
    )
    if rank == 0:
        (_, first), (_, last) = result["evals"][0], result["evals"][-1]
        curves = {
            "loss": result["curves"]["loss"],
            "val_loss": [(s, m["val_loss"]) for s, m in result["evals"]],
            "validity": [(s, m["validity"]) for s, m in result["evals"]],
        }
        log_stage(
            "sft",
            headline=[
                "val_loss_before",
                "val_loss",
                "tool_call_validity_before",
                "tool_call_validity",
            ],
            model_tag=tag,
            steps=num_steps,
            batch_size=args.batch_size,
            mix=mix,
            train_conversations=len(train_rows),
            train_assistant_tokens=n_tokens,
            train_time_s=result["train_time_s"],
            val_loss_before=first["val_loss"],
            val_loss=last["val_loss"],
            tool_call_validity_before=first["validity"],
            tool_call_validity=last["validity"],
            validity_before=first["detail"],
            validity_after=last["detail"],
            curves=curves,
            device=str(device),
        )
        print0(
            f"saved sft/{tag}; tool-call validity {first['validity']:.3f} -> {last['validity']:.3f} "
            f"(valid per prompt), val loss {first['val_loss']:.4f} -> {last['val_loss']:.4f}"
        )
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
