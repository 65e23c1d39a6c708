"""Supervised fine-tuning of a base checkpoint on tool-use conversations.

    python -m scripts.gen_synth                                   # the synthetic data, once
    python -m scripts.code_sft --model-tag d12                    # base d12 -> sft d12
    python -m scripts.code_sft --mix synth=1,code_alpaca=0.2      # add hub data (when online)
    torchrun --nproc_per_node=8 -m scripts.code_sft

Each conversation is rendered with tokenizer.render_conversation, whose mask marks the assistant's own
tokens (its text, its tool calls, <|assistant_end|>). The loss is taken on exactly those: every other
target (the user's turn, tool outputs, padding) is -1, which the model's cross-entropy ignores. One
conversation per row, padded at the end, so no conversation ever attends to another (attention is
causal, padding only follows the real tokens).

Every --eval-every steps, on held-out conversations (a different slice of the corpus than training):
- loss: mean cross-entropy per assistant token;
- tool-call validity: at every position where a held-out assistant made a tool call, the model continues
  greedily from the conversation up to that point; a generated call (the text between <|tool_start|> and
  <|tool_end|>) is valid if it parses as JSON and names a real tool with the right arguments
  (nanocode.tools.parse_tool_call). Reported as valid / generated calls, and valid / prompts.
"""
import argparse
import random
import time

import torch

from nanocode.checkpoint import checkpoint_dir, load_model, save_checkpoint
from nanocode.common import NanocodeError, autocast, compute_cleanup, compute_init, print0, run_main
from nanocode.conversations import load_mixture, pad_batch
from nanocode.optim import all_reduce_gradients
from nanocode.report import log_stage
from nanocode.tools import parse_tool_call


def get_args(argv=None):
    p = argparse.ArgumentParser(description="tool-use SFT on conversations (loss on assistant tokens only)")
    p.add_argument("--model-tag", type=str, default=None, help="base checkpoint tag (default: the latest)")
    p.add_argument("--model-step", type=int, default=None, help="base checkpoint step (default: the latest)")
    p.add_argument("--mix", type=str, default="synth=1", help="sources and weights: synth, code_alpaca, code_feedback, gsm8k, *.jsonl")
    p.add_argument("--max-seq-len", type=int, default=0, help="tokens per row (default: the model's sequence_len)")
    p.add_argument("--batch-size", type=int, default=16, help="conversations per optimizer step, all ranks")
    p.add_argument("--num-epochs", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=-1, help="optimizer steps (-1: from --num-epochs)")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon")
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--init-lr-frac", type=float, default=0.1, help="learning rates start at this fraction of the above")
    p.add_argument("--eval-every", type=int, default=100, help="steps between held-out evals (-1: start and end only)")
    p.add_argument("--eval-convs", type=int, default=100, help="held-out conversations for the loss")
    p.add_argument("--eval-prompts", type=int, default=64, help="held-out tool-call positions for the validity rate")
    p.add_argument("--gen-tokens", type=int, default=160, help="max tokens generated per validity prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (default: autodetect)")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# data

def render_rows(tokenizer, convs, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) per conversation, cut to max_len + 1 tokens (inputs and targets are shifted by one);
    conversations with no assistant token left after the cut are dropped."""
    rows = []
    for conv in convs:
        ids, mask = tokenizer.render_conversation(conv, max_tokens=max_len + 1)
        ids, mask = list(ids)[:max_len + 1], list(mask)[:max_len + 1]
        if sum(mask[1:]) > 0:
            rows.append((ids, mask))
    return rows


@torch.no_grad()
def eval_loss(model, rows, batch_size: int, pad_id: int, device, amp) -> float:
    """Mean loss per assistant token over `rows`."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        x, y = pad_batch(rows[i:i + batch_size], pad_id, device)
        with amp:
            loss = model(x, y, loss_reduction="none")
        total += loss.float().sum().item()
        count += (y != -1).sum().item()
    return total / max(count, 1)


def tool_call_prompts(tokenizer, convs, limit: int, max_len: int, seed: int = 0):
    """(prompt ids, reference call) at every tool call of the held-out assistant messages: the
    conversation up to that point, ending where the model should write <|tool_start|>."""
    assistant_end = tokenizer.special_id("<|assistant_end|>")
    out = []
    for conv in convs:
        msgs = conv["messages"]
        if msgs[-1]["role"] != "assistant" or isinstance(msgs[-1]["content"], str):
            continue
        parts = msgs[-1]["content"]
        for i, part in enumerate(parts):
            if part["type"] != "tool_call":
                continue
            if i == 0:
                ids = list(tokenizer.render_for_completion({"messages": msgs[:-1]}))
            else:
                ids, _ = tokenizer.render_conversation({"messages": msgs[:-1] + [{"role": "assistant", "content": parts[:i]}]})
                ids = list(ids)
                if ids[-1] != assistant_end:
                    raise NanocodeError("render_conversation did not end an assistant message with <|assistant_end|>")
                ids = ids[:-1]
            if len(ids) < max_len:
                out.append((ids, part))
    random.Random(seed).shuffle(out)
    return out[:limit]


def first_tool_call(engine, ids, max_tokens: int) -> str | None:
    """Generate greedily from `ids`; the text of the first tool call (None if the model wrote none).
    A call cut off by max_tokens or the end of the message is returned as far as it got."""
    call = None
    for (t,) in engine.generate(ids, max_tokens=max_tokens, temperature=0.0):
        if call is None:
            if t == engine.tool_start:
                call = []
            elif t in engine.stop_ids:
                return None
        elif t == engine.tool_end or t in engine.stop_ids:
            break
        else:
            call.append(t)
    return None if call is None else engine.tokenizer.decode(call)


@torch.no_grad()
def tool_call_validity(model, tokenizer, prompts, max_tokens: int) -> dict:
    from nanocode.engine import Engine
    engine = Engine(model, tokenizer)
    calls = valid = same_tool = 0
    for ids, ref in prompts:
        text = first_tool_call(engine, ids, min(max_tokens, model.config.sequence_len - len(ids)))
        if text is None:
            continue
        calls += 1
        obj, _ = parse_tool_call(text)
        if obj is not None:
            valid += 1
            same_tool += obj["name"] == ref["name"]
    n = len(prompts)
    return {"prompts": n, "calls": calls, "valid": valid, "same_tool": same_tool,
            "validity": valid / calls if calls else 0.0, "valid_per_prompt": valid / n if n else 0.0}


def fmt_validity(v: dict) -> str:
    return (f"tool-call validity {v['validity']:.3f} ({v['valid']}/{v['calls']} generated calls valid; "
            f"{v['calls']}/{v['prompts']} prompts produced a call; {v['valid_per_prompt']:.3f} valid per prompt; "
            f"{v['same_tool']} picked the reference's tool)")


# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    is_ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    torch.manual_seed(args.seed)
    amp = autocast(device)

    model, tokenizer, base_meta = load_model("base", device, tag=args.model_tag, step=args.model_step)
    config = model.config
    T = args.max_seq_len or config.sequence_len
    if T > model.rotary_len:
        raise NanocodeError(f"--max-seq-len {T} exceeds the model's rotary table ({model.rotary_len})")
    config.sequence_len = T  # the context of the fine-tuned model (the engine's limit too); saved in its config
    tag = args.model_tag or f"d{config.n_layer}"
    pad_id = tokenizer.bos_id  # never a target: pad targets are -1

    train_convs = load_mixture(args.mix, "train", args.seed)
    val_convs = load_mixture(args.mix, "val", args.seed)
    train_rows = render_rows(tokenizer, train_convs, T)
    val_rows = render_rows(tokenizer, val_convs[:args.eval_convs], T)
    prompts = tool_call_prompts(tokenizer, val_convs, args.eval_prompts, T - 8, args.seed)
    if not train_rows:
        raise NanocodeError(f"no training conversations with assistant tokens in --mix {args.mix!r}")
    if not val_rows:
        raise NanocodeError(f"no held-out conversations for --mix {args.mix!r}: .jsonl files are training-only; "
                            f"include synth or a hub source")
    if args.batch_size % world_size:
        raise NanocodeError(f"--batch-size {args.batch_size} is not divisible by the {world_size} processes")
    per_rank = args.batch_size // world_size
    steps_per_epoch = max(1, len(train_rows) // args.batch_size)
    num_steps = args.steps if args.steps > 0 else max(1, round(args.num_epochs * steps_per_epoch))
    n_tokens = sum(sum(m[1:]) for _, m in train_rows)
    print0(f"model: {tag}, depth {config.n_layer}, width {config.n_embd}, {model.num_params():,} parameters; rows of {T} tokens")
    print0(f"data: {len(train_rows)} train conversations ({n_tokens:,} assistant tokens), {len(val_rows)} held-out, "
           f"{len(prompts)} held-out tool-call prompts; {num_steps} steps of {args.batch_size} conversations "
           f"({num_steps / steps_per_epoch:.2f} epochs)")

    optimizers = model.setup_optimizers(args.matrix_lr, args.embedding_lr, args.unembedding_lr, args.weight_decay,
                                        rank=rank, world_size=world_size)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = group["lr"] * args.init_lr_frac

    def evaluate(step):
        model.eval()
        loss = eval_loss(model, val_rows, per_rank, pad_id, device, amp)
        with amp:
            v = tool_call_validity(model, tokenizer, prompts, args.gen_tokens)
        model.train()
        print0(f"step {step:05d} | val loss {loss:.4f} | {fmt_validity(v)}")
        return loss, v

    curves = {"loss": [], "val_loss": [], "validity": []}
    order, pos, epoch = list(range(len(train_rows))), len(train_rows), 0
    rng = random.Random(args.seed)
    validity_before = None
    model.train()
    total_time = 0.0
    for step in range(num_steps + 1):
        last = step == num_steps
        if rank == 0 and (step == 0 or last or (args.eval_every > 0 and step % args.eval_every == 0)):
            val_loss, v = evaluate(step)
            curves["val_loss"].append((step, val_loss))
            curves["validity"].append((step, v["validity"]))
            validity_before = validity_before or v
        if is_ddp:
            torch.distributed.barrier()
        if last:
            break
        # the next batch: one shuffled pass over the rows per epoch; this rank takes its share
        if pos + args.batch_size > len(order):
            rng.shuffle(order)
            pos, epoch = 0, epoch + 1
        batch = [train_rows[i] for i in order[pos:pos + args.batch_size]][rank::world_size]
        pos += args.batch_size
        t0 = time.time()
        x, y = pad_batch(batch, pad_id, device)
        with amp:
            loss = model(x, y)
        loss.backward()
        all_reduce_gradients(model, world_size)
        lrm = 1.0 - step / num_steps  # linear decay to zero
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
            opt.step()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        total_time += dt
        tokens = (y != -1).sum().item() * world_size
        curves["loss"].append((step + 1, loss.item()))
        print0(f"step {step + 1:05d}/{num_steps:05d} | loss {loss.item():.4f} | lrm {lrm:.2f} | epoch {epoch} | "
               f"dt {dt * 1000:.0f}ms | tok/s {x.numel() * world_size / dt:,.0f} ({tokens / dt:,.0f} assistant)")

    if rank == 0:
        out_dir = checkpoint_dir("sft", tag)
        meta = {"model_config": config.to_dict(), "base_step": base_meta.get("step"), "sft_args": vars(args),
                "val_loss": val_loss, "validity": v, "validity_before": validity_before}
        save_checkpoint(out_dir, num_steps, model.state_dict(), None, meta)
        log_stage("sft", model_tag=tag, steps=num_steps, batch_size=args.batch_size, mix=args.mix,
                  train_conversations=len(train_rows), train_assistant_tokens=n_tokens, train_time_s=total_time,
                  val_loss_before=curves["val_loss"][0][1], val_loss=val_loss,
                  tool_call_validity_before=validity_before["validity"], tool_call_validity=v["validity"],
                  validity_before=validity_before, validity_after=v, curves=curves, device=str(device))
        print0(f"saved {out_dir}; tool-call validity {validity_before['validity']:.3f} -> {v['validity']:.3f}, "
               f"valid per prompt {validity_before['valid_per_prompt']:.3f} -> {v['valid_per_prompt']:.3f}, "
               f"val loss {curves['val_loss'][0][1]:.4f} -> {val_loss:.4f}")
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
