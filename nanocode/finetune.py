"""The fine-tuning loop that SFT, DPO and RL share: optimizers from a checkpoint's model, the learning-rate
schedule, gradient accumulation, the evaluation cadence, checkpoints and --resume, the progress line,
wandb and the report's curves. Each script keeps only what is its own: which rows make step s's
micro-batches, and the loss of one micro-batch.

    opts = finetune.setup_optimizers(model, args, rank, world_size)
    result = finetune.train(model, opts, args, phase="sft", tag=tag, num_steps=n,
                            batches=lambda step: [...],          # this rank's micro-batches of step `step`
                            loss_fn=lambda mb: (loss, {"loss": loss.item()}),
                            evaluate=lambda step: {...} or None,  # called on every rank; None: nothing to log
                            meta=lambda: {...})                   # the checkpoint's metadata

A step: loss_fn on each micro-batch, backward of loss / (number of micro-batches), gradients averaged
across ranks, learning rates set to initial_lr * (1 - step / num_steps) (linear decay to zero, as nanochat's
chat_sft and chat_rl), one optimizer step. `batches(step)` must depend on the step alone (not on what ran
before), so that a resumed run sees exactly the batches an uninterrupted one would; the scripts derive
their shuffles and sampling seeds from (--seed, step).

Checkpoints go to checkpoints/<phase>/<tag>/: every --save-every steps with each rank's optimizer state
(what --resume needs) and at the end (model only: a finished run has nothing left to resume). The metadata
holds the curves and evaluations so far, so a resumed run's report covers the whole run.
"""

import time

import torch

from nanocode.checkpoint import checkpoint_dir, list_steps, load_checkpoint, save_checkpoint
from nanocode.common import NanocodeError, get_base_dir, init_wandb, print0, progress
from nanocode.optim import all_reduce_gradients


def add_args(
    p, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, init_lr_frac=0.1, eval_every=100
):
    """The flags every fine-tuning script has; the defaults that differ per script are arguments."""
    p.add_argument(
        "--steps",
        type=int,
        default=-1,
        help="optimizer steps (-1: from --num-epochs where the script has it)",
    )
    p.add_argument("--matrix-lr", type=float, default=matrix_lr, help="Muon")
    p.add_argument("--embedding-lr", type=float, default=embedding_lr)
    p.add_argument("--unembedding-lr", type=float, default=unembedding_lr)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument(
        "--init-lr-frac",
        type=float,
        default=init_lr_frac,
        help="learning rates start at this fraction of the above",
    )
    p.add_argument(
        "--grad-accum", type=int, default=1, help="micro-batches per optimizer step and rank"
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=eval_every,
        help="steps between held-out evals (-1: start and end only)",
    )
    p.add_argument(
        "--save-every",
        type=int,
        default=-1,
        help="steps between resumable checkpoints (-1: the end only)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint of this stage and tag",
    )
    p.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy': no wandb)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (default: autodetect)")


def setup_optimizers(model, args, rank=0, world_size=1):
    """Muon + AdamW at the pretraining learning rates times --init-lr-frac (fine-tuning starts from a
    trained model: full rates would undo it)."""
    optimizers = model.setup_optimizers(
        args.matrix_lr,
        args.embedding_lr,
        args.unembedding_lr,
        args.weight_decay,
        rank=rank,
        world_size=world_size,
    )
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = group["lr"] * args.init_lr_frac
    return optimizers


def split(rows: list, n: int) -> list[list]:
    """`rows` in n micro-batches of (nearly) equal size, in order; empty ones are dropped."""
    k, r = divmod(len(rows), n)
    out, i = [], 0
    for j in range(n):
        size = k + (j < r)
        out.append(rows[i : i + size])
        i += size
    return [mb for mb in out if mb]


def resume(model, optimizers, phase: str, tag: str, num_steps: int, device, rank: int = 0):
    """Load the latest resumable checkpoint of phase/tag into model and optimizers; returns (step, meta)."""
    ckpt_dir = checkpoint_dir(phase, tag)
    steps = [
        s for s in list_steps(ckpt_dir) if (ckpt_dir / f"optim_{s:06d}_rank{rank}.pt").exists()
    ]
    if not steps:
        raise NanocodeError(
            f"--resume: no resumable checkpoint (one saved with --save-every) in {ckpt_dir}"
        )
    model_state, optim_state, meta = load_checkpoint(
        ckpt_dir, steps[-1], device=device, rank=rank, load_optim=True
    )
    if meta.get("num_steps") != num_steps:
        raise NanocodeError(
            f"--resume: the checkpoint in {ckpt_dir} is from a run of {meta.get('num_steps')} steps, "
            f"this one has {num_steps} (the learning-rate schedule depends on it)"
        )
    model.load_state_dict(model_state)
    for opt, sd in zip(optimizers, optim_state["optimizers"]):
        opt.load_state_dict(sd)
    print0(f"resumed from {ckpt_dir} at step {meta['step']}")
    return meta["step"], meta


def fmt_metrics(m: dict) -> str:
    return " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())


def train(
    model,
    optimizers,
    args,
    *,
    phase: str,
    tag: str,
    num_steps: int,
    batches,
    loss_fn,
    evaluate,
    meta,
    rank: int = 0,
    world_size: int = 1,
    device=None,
    step_metrics=None,
):
    """Run steps [start, num_steps) (start = 0, or the resumed step); returns
    {"curves": {name: [(step, value)]}, "evals": [(step, metrics)], "train_time_s": seconds}.
    step_metrics(step) -> dict, optional, called after the step: numbers the script measured while making
    the step's batches (RL: rewards, sampling time), logged with the step."""
    import torch.distributed as dist

    is_ddp = world_size > 1
    curves, evals, start = {}, [], 0
    if args.resume:
        start, saved = resume(model, optimizers, phase, tag, num_steps, device, rank)
        curves, evals = saved.get("curves", {}), [tuple(e) for e in saved.get("evals", [])]
    wandb = init_wandb(args.run, f"nanocode-{phase}", vars(args), master=rank == 0)
    ckpt_dir = checkpoint_dir(phase, tag)

    def checkpoint(step, resumable):
        full = dict(meta(), num_steps=num_steps, curves=curves, evals=evals, args=vars(args))
        optim = {"optimizers": [o.state_dict() for o in optimizers]} if resumable else None
        save_checkpoint(
            ckpt_dir, step, model.state_dict() if rank == 0 else None, optim, full, rank=rank
        )

    bar = progress(total=num_steps, desc=phase, unit="step")
    bar.update(start)
    train_time = 0.0
    model.train()
    for step in range(start, num_steps + 1):
        last = step == num_steps
        if step == 0 or last or (args.eval_every > 0 and step % args.eval_every == 0):
            model.eval()
            m = evaluate(step)
            model.train()
            if m is not None:
                evals.append((step, m))
                wandb.log(
                    {f"val/{k}": v for k, v in m.items() if isinstance(v, (int, float))}, step=step
                )
            if is_ddp:
                dist.barrier()
        if last:
            break
        t0 = time.time()
        micro = batches(step)
        sums = {}
        for mb in micro:
            loss, m = loss_fn(mb)
            (loss / len(micro)).backward()
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
        if not micro:  # nothing on this rank this step: zero gradients still join the all-reduce
            sum(p.sum() * 0.0 for p in model.parameters()).backward()
        all_reduce_gradients(model, world_size)
        lrm = 1.0 - step / num_steps
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
            opt.step()
        model.zero_grad(set_to_none=True)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        train_time += dt
        tokens = sums.pop("tokens", None)
        logged = {k: v / len(micro) for k, v in sums.items()}
        logged.update(step_metrics(step) if step_metrics else {})
        logged["step_s"] = dt
        for k, v in logged.items():
            curves.setdefault(k, []).append((step + 1, v))
        wandb.log({f"train/{k}": v for k, v in logged.items()} | {"lrm": lrm}, step=step + 1)
        line = f"step {step + 1:05d}/{num_steps:05d} | {fmt_metrics({k: v for k, v in logged.items() if k != 'step_s'})} | lrm {lrm:.2f} | dt {dt * 1000:.0f}ms"
        if tokens is not None:
            line += f" | tok/s {tokens * world_size / dt:,.0f}"
        if rank == 0:
            bar.write(line)
        bar.update(1)
        if args.save_every > 0 and (step + 1) % args.save_every == 0 and step + 1 < num_steps:
            checkpoint(step + 1, resumable=True)
    bar.close()
    checkpoint(num_steps, resumable=False)
    wandb.finish()
    return {"curves": curves, "evals": evals, "train_time_s": train_time}


# -----------------------------------------------------------------------------
# tool-call validity (after SFT and after DPO): does the model, at a point where a held-out assistant made
# a tool call, write a call that parses and fits a tool's schema?


def tool_call_prompts(tokenizer, convs, limit: int, max_len: int, seed: int = 0) -> list[dict]:
    """One prompt per tool call of the held-out assistant messages: the conversation up to that point, ending
    where the model should write <|tool_start|>. {"ids", "ref" (the reference call), "ref_tokens" (its length
    as the model would write it), "kind", "seen"}; kind and seen come from the conversation's optional
    "kind" and "seen" fields (seen: False marks kinds or templates held out of training)."""
    import json
    import random

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
                ids, _ = tokenizer.render_conversation(
                    {"messages": msgs[:-1] + [{"role": "assistant", "content": parts[:i]}]}
                )
                ids = list(ids)
                if ids[-1] != assistant_end:
                    raise NanocodeError(
                        "render_conversation did not end an assistant message with <|assistant_end|>"
                    )
                ids = ids[:-1]
            ref_tokens = (
                len(
                    tokenizer.encode(
                        json.dumps({"name": part["name"], "arguments": part["arguments"]})
                    )
                )
                + 2
            )
            if len(ids) + ref_tokens < max_len:
                out.append(
                    {
                        "ids": ids,
                        "ref": part,
                        "ref_tokens": ref_tokens,
                        "kind": str(conv.get("kind", "-")),
                        "seen": conv.get("seen", True) is not False,
                    }
                )
    random.Random(seed).shuffle(out)
    return out[:limit]


def request_prompts(tokenizer, records, limit: int, max_len: int, ref_tokens: int) -> list[dict]:
    """Validity prompts from bare user requests (gen_synth's validity_prompts.jsonl: {"messages", "kind",
    "seen"}), which hold the kinds and phrasings training never sees. They have no reference call, so
    each gets the budget of the longest reference call among the held-out conversations (ref_tokens)."""
    out = []
    for rec in records[:limit]:
        ids = list(tokenizer.render_for_completion({"messages": rec["messages"]}))
        if len(ids) + ref_tokens < max_len:
            out.append(
                {
                    "ids": ids,
                    "ref": None,
                    "ref_tokens": ref_tokens,
                    "kind": str(rec.get("kind", "-")),
                    "seen": rec.get("seen", True) is not False,
                }
            )
    return out


def validity_file_prompts(tokenizer, prompts, limit: int, max_len: int) -> list[dict]:
    """gen_synth's held-out requests ($BASE/sft/validity_prompts.jsonl, when present): kinds and phrasings
    training never saw, reported apart from the seen ones; each gets the longest held-out call's budget."""
    from nanocode.conversations import load_jsonl

    path = get_base_dir() / "sft" / "validity_prompts.jsonl"
    if not path.exists() or limit <= 0:
        return []
    longest = max((p["ref_tokens"] for p in prompts), default=64)
    return request_prompts(tokenizer, load_jsonl(path, kind="prompt"), limit, max_len, longest)


def first_tool_call(engine, ids, max_tokens: int):
    """Generate greedily from `ids` until the first tool call is closed. (outcome, call text):
    "call" (closed by <|tool_end|>), "no_call" (the message ended without one), "cut_off" (the token
    budget or the context ran out first, inside a call or before one)."""
    call = None
    for (t,) in engine.generate(ids, max_tokens=max_tokens, temperature=0.0):
        if call is None:
            if t == engine.tool_start:
                call = []
            elif t in engine.stop_ids:
                return "no_call", None
        elif t == engine.tool_end:
            return "call", engine.tokenizer.decode(call)
        elif (
            t in engine.stop_ids
        ):  # the message ended inside the call: a call that never closes is invalid
            return "unclosed", engine.tokenizer.decode(call)
        else:
            call.append(t)
    return "cut_off", None if call is None else engine.tokenizer.decode(call)


def _counts(rows) -> dict:
    n = len(rows)
    c = {k: sum(r[0] == k for r in rows) for k in ("valid", "invalid", "no_call", "cut_off")}
    c.update(
        prompts=n,
        same_tool=sum(r[1] for r in rows),
        validity=c["valid"] / n if n else 0.0,
        validity_of_calls=c["valid"] / (c["valid"] + c["invalid"])
        if c["valid"] + c["invalid"]
        else None,
    )
    return c


@torch.no_grad()
def tool_call_validity(model, tokenizer, prompts, max_tokens: int = 0) -> dict:
    """Counts over the prompts, kept apart: valid, invalid (malformed JSON, unknown tool, wrong arguments, or a
    call the message ended inside), no_call, cut_off (out of tokens). validity = valid / prompts (a prompt
    with no call scores 0, it is not left out); validity_of_calls = valid / (valid + invalid), None when no call was written. The budget
    per prompt is max_tokens, or by default (0) the prompt's reference call length + 32: enough for the
    call the held-out assistant made, and any short text before it. Split by seen/unseen and by kind."""
    from nanocode.engine import Engine
    from nanocode.tools import parse_tool_call

    engine = Engine(model, tokenizer)
    rows = []
    for p in prompts:
        budget = min(max_tokens or p["ref_tokens"] + 32, model.config.sequence_len - len(p["ids"]))
        outcome, text = first_tool_call(engine, p["ids"], budget)
        obj = parse_tool_call(text)[0] if outcome == "call" else None
        status = (
            "valid"
            if obj is not None
            else "invalid"
            if outcome in ("call", "unclosed")
            else outcome
        )
        same_tool = obj is not None and p["ref"] is not None and obj["name"] == p["ref"]["name"]
        rows.append((status, same_tool, p["kind"], p["seen"]))
    out = _counts(rows)
    out["seen"] = _counts([r for r in rows if r[3]])
    out["unseen"] = _counts([r for r in rows if not r[3]])
    out["by_kind"] = {
        k: _counts([r for r in rows if r[2] == k])["validity"] for k in sorted({r[2] for r in rows})
    }
    return out


def fmt_validity(v: dict) -> str:
    s = (
        f"tool-call validity {v['validity']:.3f} of {v['prompts']} prompts ({v['valid']} valid, {v['invalid']} invalid, "
        f"{v['no_call']} no call, {v['cut_off']} cut off by the token limit; {v['same_tool']} picked the reference's tool)"
    )
    if v["unseen"]["prompts"]:
        s += f"; seen kinds {v['seen']['validity']:.3f} ({v['seen']['prompts']}), unseen {v['unseen']['validity']:.3f} ({v['unseen']['prompts']})"
    return s
