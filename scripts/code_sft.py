"""Supervised fine-tuning of a base checkpoint on tool-use conversations.

    python -m scripts.gen_synth                                   # the synthetic data, once
    python -m scripts.code_sft --model-tag d12                    # base d12 -> sft d12
    python -m scripts.code_sft --mix synth=1,code_alpaca=0.2      # choose the sources and weights
    python -m scripts.code_sft --mix mine.jsonl --val mine_val.jsonl   # your own conversations
    torchrun --nproc_per_node=8 -m scripts.code_sft

Each conversation is rendered with tokenizer.render_conversation, whose mask marks the assistant's
own tokens (its text, its tool calls, <|assistant_end|>). The loss is taken on exactly those: every
other target (the user's turn, tool outputs, padding) is -1, which the model's cross-entropy
ignores. One conversation per row, padded at the end, so no conversation ever attends to another
(attention is causal, padding only follows the real tokens).

--mix names sources with weights: synth, code_alpaca, code_feedback, gsm8k, or *.jsonl files. The
default is the synthetic data plus every hub instruct source already downloaded. A user's JSONL is
checked at load time: every tool call must name a real tool with arguments that fit its schema
(else one error naming the file and line); its held-out split is --val (hub and synthetic sources
bring their own).

Every --eval-every steps, on held-out conversations (a different slice than training):
- loss: mean cross-entropy per assistant token (--eval-convs conversations);
- tool-call validity (nanocode.training.tool_call_validity): at each position where a held-out
  assistant made a tool call (--eval-prompts of them), the model continues greedily (at most
  --gen-tokens, by default the reference call's length + 32); valid, invalid, no call and cut off by
  the token limit are counted apart, held-out kinds never trained on ("seen": false) apart from the
  others.
The training loop itself (schedule, accumulation, checkpoints, --resume) is nanocode/training.py.
"""

import argparse

import torch

from nanocode import training
from nanocode.checkpoint import load_model
from nanocode.common import NanocodeError, autocast, compute_cleanup, compute_init, print0, run_main
from nanocode.conversations import cached_sources, load_jsonl, load_mixture, pad_batch, parse_mix
from nanocode.loss_eval import loss_sums
from nanocode.report import log_stage
from nanocode.tools import validate_tool_call
from nanocode.training import posint


def get_args(argv=None):
    p = argparse.ArgumentParser(description="tool-use SFT (loss on assistant tokens only)")
    p.add_argument("--model-tag", default=None, help="base checkpoint (default: latest)")
    p.add_argument("--model-step", type=int, default=None, help="default: the latest")
    p.add_argument("--mix", default="", help="sources and weights (see the docstring)")
    p.add_argument("--val", default="", help="held-out JSONL for --mix's .jsonl files")
    p.add_argument("--max-seq-len", type=int, default=0, help="tokens per row (default: model's)")
    p.add_argument("--batch-size", type=posint, default=16, help="conversations/step, all ranks")
    p.add_argument("--num-epochs", type=float, default=1.0)
    p.add_argument("--eval-convs", type=int, default=100)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=0, help="per validity prompt (0: ref + 32)")
    # a tenth of the pretraining learning rates: fine-tuning starts from a trained model
    training.add_args(p, init_lr_frac=0.1, eval_every=100)
    return p.parse_args(argv)


def check_tool_calls(path) -> list[dict]:
    """The conversations of a user's JSONL, every tool call checked against the tool schemas: an
    unknown tool or arguments that do not fit -> one error naming the file and line (blank lines
    count)."""
    convs = load_jsonl(path)
    with open(path, encoding="utf-8") as f:
        lines = [i for i, line in enumerate(f, 1) if line.strip()]
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
    mix = parse_mix(spec)
    for name, _ in mix:
        if name.endswith(".jsonl"):
            check_tool_calls(name)
    train = load_mixture(spec, "train", seed)
    # the val mixture leaves out .jsonl sources (their held-out rows are --val): with no other
    # source there is nothing to load
    hub_or_synth = any(not name.endswith(".jsonl") for name, weight in mix if weight > 0)
    val = load_mixture(spec, "val", seed) if hub_or_synth else []
    return train, val + (check_tool_calls(val_path) if val_path else [])


def render_rows(tokenizer, convs, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) per conversation, cut to max_len + 1 tokens (inputs and targets are shifted by
    one); conversations with no assistant token left after the cut are dropped."""
    rows = [tokenizer.render_conversation(conv, max_tokens=max_len + 1) for conv in convs]
    # mask[1:]: the targets' mask (token 0 is never a target)
    return [(ids, mask) for ids, mask in rows if sum(mask[1:]) > 0]


def main(argv=None):
    """Setup (the base checkpoint, the mix rendered to rows, the held-out tool-call prompts), the
    closures the loop calls (batches, loss_fn, evaluate), the loop and its checkpoints
    (training.train), then the report (log_stage, rank 0): the first evaluation against the last."""
    args = get_args(argv)
    _, rank, _, world_size, device = compute_init(args.device_type)
    torch.manual_seed(args.seed)
    amp = autocast(device)

    model, tokenizer, base_meta = load_model("base", device, args.model_tag, args.model_step)
    config = model.config
    T = args.max_seq_len or config.sequence_len
    if T > model.rotary_len:
        raise NanocodeError(f"--max-seq-len {T} exceeds the rotary table ({model.rotary_len})")
    config.sequence_len = T  # the fine-tuned model's context (the engine's limit too), saved
    tag = args.model_tag or f"d{config.n_layer}"
    pad_id = tokenizer.bos_id  # never a target: pad targets are -1

    # by default synth, plus each instruct source already here (converted, or its hub file
    # cached): none is fetched unasked, so an offline run trains on what it has
    mix = args.mix or ",".join(["synth=1"] + [f"{n}=1" for n in cached_sources()])
    train_convs, val_convs = load_data(mix, args.val, args.seed)
    train_rows = render_rows(tokenizer, train_convs, T)
    val_rows = render_rows(tokenizer, val_convs[: args.eval_convs], T)
    prompts = training.tool_call_prompts(tokenizer, val_convs, args.eval_prompts, T - 8, args.seed)
    prompts += training.validity_file_prompts(tokenizer, prompts, args.eval_prompts, T - 8)
    if not train_rows:
        raise NanocodeError(f"no training conversations with assistant tokens in --mix {mix!r}")
    if not val_rows:
        raise NanocodeError(
            f"no held-out conversations for --mix {mix!r}: give your .jsonl's held-out split with "
            f"--val, or include synth or a hub source"
        )
    num_steps = training.count_steps(args, len(train_rows))
    n_tokens = sum(sum(m[1:]) for _, m in train_rows)  # assistant targets: what the loss sees
    print0(
        f"model: {tag}, depth {config.n_layer}, width {config.n_embd}, {model.num_params():,} "
        f"parameters; rows of {T} tokens"
    )
    print0(
        f"data: --mix {mix}: {len(train_rows)} train conversations ({n_tokens:,} assistant "
        f"tokens), {len(val_rows)} held-out, {len(prompts)} held-out tool-call prompts; "
        f"{num_steps} steps of {args.batch_size} conversations"
    )

    def batches(step):
        # every rank draws the step's same --batch-size rows (seeded by the step) and takes its
        # strided share, cut into --grad-accum micro-batches: a micro-batch holds about
        # batch_size / (world_size x grad_accum) conversations
        idx = training.epoch_rows(len(train_rows), step, args.batch_size, args.seed)
        rows = [train_rows[i] for i in idx[rank::world_size]]
        return [pad_batch(mb, pad_id, device) for mb in training.split(rows, args.grad_accum)]

    def loss_fn(xy):
        # the mean over this micro-batch's assistant targets (-1 is ignored); the loop averages
        # micro-batches alike, whatever their numbers of targets
        with amp:
            loss = model(*xy)
        # tokens (for tok/s): every position of the padded rows, padding included
        return loss, {"loss": loss.detach(), "tokens": xy[0].numel()}

    mine, size = val_rows[rank::world_size], args.batch_size // world_size

    def evaluate(step):
        """Held-out loss per assistant token (each rank sums its share of the rows, loss_sums
        all-reduces), then on rank 0 alone the greedy tool-call validity of `prompts`. Returns
        the metrics on rank 0, None on the others."""
        val = (pad_batch(mine[i : i + size], pad_id, device) for i in range(0, len(mine), size))
        with amp:  # every rank its share of the held-out rows
            # no token_bytes: each assistant target counts as one "byte", so count = targets
            nats, _, count = loss_sums(model, val, device)[0].tolist()
        if rank != 0:  # greedy generation prompt by prompt is not sharded: rank 0 does it all
            return None
        with amp:
            v = training.tool_call_validity(model, tokenizer, prompts, args.gen_tokens)
        print0(f"step {step:05d} | val loss {nats / count:.4f} | {training.fmt_validity(v)}")
        return {"val_loss": nats / count, "validity": v["validity"], "detail": v}

    opts = training.setup_optimizers(model, args)
    meta = {"base_step": base_meta.get("step"), "mix": mix}
    # no schedule: the loop's default, 1 - step / num_steps, so the learning rates fall linearly
    # from --init-lr-frac x the pretraining rates toward 0
    result = training.train(
        model, opts, args, "sft", tag, num_steps, batches, loss_fn, evaluate, meta=meta
    )
    if rank == 0:
        evals = result["evals"]
        (_, first), (_, last) = evals[0], evals[-1]  # step 0 (the base model) and the last step
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
            curves={
                "loss": result["curves"]["loss"],
                "val_loss": [(s, m["val_loss"]) for s, m in evals],
                "validity": [(s, m["validity"]) for s, m in evals],
            },
            device=str(device),
        )
        print0(
            f"saved sft/{tag}; tool-call validity {first['validity']:.3f} -> "
            f"{last['validity']:.3f} (valid per prompt), val loss {first['val_loss']:.4f} -> "
            f"{last['val_loss']:.4f}"
        )
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
