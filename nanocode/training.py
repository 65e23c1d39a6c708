"""The training loop every stage shares (pretraining, SFT, DPO, RL): the evaluation cadence,
gradient accumulation, the gradient all-reduce, the learning-rate schedule, checkpoints and
--resume, the progress line (tok/s, MFU, ETA), wandb and the report's curves. Each script keeps
only what is its own: which rows make step s's micro-batches, and the loss of one micro-batch.

    opts = training.setup_optimizers(model, args)
    result = training.train(model, opts, args, "sft", tag, num_steps,
                            batches,   # step -> this rank's micro-batches of the step
                            loss_fn,   # micro-batch -> (loss, {"loss": loss.detach(), ...})
                            evaluate)  # step -> {metrics} or None, called on every rank

A step: loss_fn on each micro-batch, backward of loss / (number of micro-batches), gradients
averaged across ranks, learning rates set to initial_lr * schedule(step) (by default
1 - step / num_steps, linear decay to zero, as nanochat's chat_sft and chat_rl), one optimizer step.
`batches(step)` must depend on the step alone (not on what ran before), so that a resumed run sees
exactly the batches an uninterrupted one would; the scripts derive their shuffles and sampling
seeds from (--seed, step), or keep their position in a `stateful` object (base_train's data
loader) that checkpoints save.

Checkpoints go to checkpoints/<phase>/<tag>/: every --save-every steps with each rank's optimizer
and RNG state (what --resume needs) and at the end (model only: a finished run has nothing left to
resume). The metadata holds the curves and evaluations so far, so a resumed run's report covers the
whole run. Last in this file, the evaluation SFT and DPO share: tool-call validity on held-out
prompts, always of the unconstrained model.
"""

import argparse
import json
import random
import time

import torch
import torch.distributed as dist

from nanocode.checkpoint import checkpoint_dir, resume, save_training
from nanocode.common import (
    NanocodeError,
    get_dist_info,
    init_wandb,
    nvtx_range,
    peak_bf16_flops,
    print0,
    set_nvtx,
)
from nanocode.optim import all_reduce_gradients


def posint(text: str) -> int:
    """argparse type of the count and size flags: a bad value is a usage error naming the flag
    (argparse adds the name), not a ZeroDivisionError from deep inside the run."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_loop_args(p, eval_every):
    """The flags of the loop itself, every training script's."""
    p.add_argument("--eval-every", type=int, default=eval_every, help="steps (-1: first, last)")
    p.add_argument("--save-every", type=int, default=-1, help="steps between resumable ones")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy': no wandb)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--profile", action="store_true", help="NVTX ranges for nsys (bench/profile.sh)")


def add_args(p, init_lr_frac=0.1, eval_every=100):
    """The flags every fine-tuning script has; the defaults that differ per script are arguments."""
    p.add_argument("--steps", type=int, default=-1, help="optimizer steps (-1: from --num-epochs)")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon")
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--init-lr-frac", type=float, default=init_lr_frac, help="x the rates above")
    p.add_argument("--grad-accum", type=posint, default=1, help="micro-batches per step and rank")
    add_loop_args(p, eval_every)


def setup_optimizers(model, args):
    """Muon + AdamW at the pretraining learning rates times --init-lr-frac (fine-tuning starts from
    a trained model: full rates would undo it)."""
    _, rank, _, world_size = get_dist_info()
    lrs = (args.matrix_lr, args.embedding_lr, args.unembedding_lr)
    optimizers = model.setup_optimizers(*lrs, args.weight_decay, rank=rank, world_size=world_size)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = group["lr"] * args.init_lr_frac
    return optimizers


def split(rows: list, n: int) -> list[list]:
    """`rows` in n micro-batches of (nearly) equal size, in order; empty ones are dropped."""
    k, r = divmod(len(rows), n)
    bounds = [j * k + min(j, r) for j in range(n + 1)]
    return [rows[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def epoch_rows(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The rows of step `step` (SFT's conversations, DPO's pairs): consecutive slices of a fresh
    shuffle per epoch, the (epoch+1)-th torch.randperm of a generator seeded `seed`, recomputed from
    the step alone, so a resumed run gets the same batches. A partial last slice is dropped."""
    epoch, k = divmod(step, max(1, n // batch_size))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epoch + 1):
        order = torch.randperm(n, generator=g)
    return order[k * batch_size : (k + 1) * batch_size].tolist()


def count_steps(args, n: int) -> int:
    """--steps, or --num-epochs over n rows in batches of --batch-size (whole batches per epoch),
    which must split evenly over the ranks."""
    world_size = get_dist_info()[3]
    if args.batch_size % world_size:
        raise NanocodeError(
            f"--batch-size {args.batch_size} is not divisible by {world_size} ranks"
        )
    per_epoch = max(1, n // args.batch_size)
    return args.steps if args.steps > 0 else max(1, round(args.num_epochs * per_epoch))


def train(
    model,
    optimizers,
    args,
    phase,
    tag,
    num_steps,
    batches,
    loss_fn,
    evaluate,
    *,
    meta=None,
    step_metrics=None,
    schedule=None,
    stateful=None,
):
    """Run steps [start, num_steps) (start = 0, or the resumed step); returns
    {"curves": {name: [(step, value)]}, "evals": [(step, metrics)], "train_time_s": seconds}.
    loss_fn's metrics are averaged over the micro-batches (tensors are fine: read once per step);
    "tokens" is summed instead, for tok/s. step_metrics(step) -> dict, optional: numbers the script
    measured while making the step's batches (RL: rewards, sampling time), logged with the step.
    schedule(step) -> the learning-rate multiplier (it may set other hyperparameters too). meta:
    what the checkpoints' metadata adds to the config, args and num_steps."""
    _, rank, _, world_size = get_dist_info()
    device = next(model.parameters()).device
    set_nvtx(args.profile)
    ckpt_dir = checkpoint_dir(phase, tag)
    meta = dict(meta or {}, model_config=model.config.to_dict(), args=vars(args))
    meta["num_steps"] = num_steps
    curves, evals, start, train_time = {}, [], 0, 0.0
    if args.resume:
        expect = {k: meta[k] for k in ("model_config", "num_steps")}
        saved = resume(ckpt_dir, model, optimizers, device, rank, stateful, **expect)
        curves, evals = saved["curves"], [tuple(e) for e in saved["evals"]]
        start, train_time = saved["step"], saved["train_time_s"]
    wandb = init_wandb(args.run, f"nanocode-{phase}", meta, master=rank == 0)
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    flops_per_token = model.estimate_flops()  # for MFU

    def save(step, resumable):
        state = dict(meta, curves=curves, evals=evals, train_time_s=train_time)
        save_training(ckpt_dir, step, model, optimizers, state, rank, stateful, resumable)

    model.train()
    timed = 0.0
    for step in range(start, num_steps + 1):
        last = step == num_steps
        if step == 0 or last or (args.eval_every > 0 and step % args.eval_every == 0):
            model.eval()
            m = evaluate(step)
            model.train()
            if m is not None:
                evals.append((step, m))
                numbers = {k: v for k, v in m.items() if isinstance(v, (int, float))}
                wandb.log({f"val/{k}": v for k, v in numbers.items()}, step=step)
            if world_size > 1:
                dist.barrier()
        if last:
            break
        t0 = time.time()
        with nvtx_range("data"):
            micro = batches(step)
        sums = {}
        for mb in micro:
            with nvtx_range("forward"):
                loss, m = loss_fn(mb)
            with nvtx_range("backward"):
                (loss / len(micro)).backward()
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
        if not micro:  # nothing on this rank this step: zero gradients still join the all-reduce
            sum(p.sum() * 0.0 for p in model.parameters()).backward()
        with nvtx_range("optimizer"):
            all_reduce_gradients(model, world_size)
            lrm = schedule(step) if schedule else 1.0 - step / num_steps
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
                opt.step()
            # None, not zeros: the next backward writes fresh gradients instead of adding into
            # zeroed ones, and the evaluation in between holds no gradient memory
            model.zero_grad(set_to_none=True)
        if device.type == "cuda":  # kernels run asynchronously: time the work, not its launch
            torch.cuda.synchronize()
        dt = time.time() - t0

        # progress: the ETA leaves out the first steps (compilation, warm caches)
        train_time += dt
        timed += dt if step - start >= 3 else 0.0
        eta = (num_steps - step - 1) * (timed / (step - start - 2) if step - start >= 3 else dt)
        tokens = float(sums.pop("tokens", 0)) * world_size
        logged = {k: float(v) / len(micro) for k, v in sums.items()}
        logged.update(step_metrics(step) if step_metrics else {})
        shown = " | ".join(f"{k} {v:.4f}" for k, v in logged.items())
        logged["step_s"] = dt
        for k, v in logged.items():
            curves.setdefault(k, []).append((step + 1, v))
        wandb.log({f"train/{k}": v for k, v in logged.items()} | {"lrm": lrm}, step=step + 1)
        line = f"step {step + 1:05d}/{num_steps:05d} | {shown} | lrm {lrm:.2f}"
        line += f" | dt {dt * 1e3:.0f}ms"
        if tokens:
            line += f" | tok/s {tokens / dt:,.0f}"
        if tokens and peak:
            line += f" | mfu {100 * flops_per_token * tokens / dt / (peak * world_size):.1f}%"
        print0(f"{line} | eta {eta / 60:.1f}m")
        if args.save_every > 0 and (step + 1) % args.save_every == 0 and step + 1 < num_steps:
            save(step + 1, resumable=True)
    save(num_steps, resumable=False)
    wandb.finish()
    return {"curves": curves, "evals": evals, "train_time_s": train_time}


# -----------------------------------------------------------------------------
# tool-call validity (after SFT and after DPO): does the model, at a point where a held-out
# assistant made a tool call, write a call that parses and fits a tool's schema?


def _prompt(ids, ref, ref_tokens, record) -> dict:
    kind, seen = str(record.get("kind", "-")), record.get("seen", True) is not False
    return dict(ids=ids, ref=ref, ref_tokens=ref_tokens, kind=kind, seen=seen)


def tool_call_prompts(tokenizer, convs, limit: int, max_len: int, seed: int = 0) -> list[dict]:
    """One prompt per tool call of the held-out assistant messages: the conversation up to that
    point, ending where the model should write <|tool_start|>. {"ids", "ref" (the reference call),
    "ref_tokens" (its length as the model would write it), "kind", "seen"}; kind and seen come from
    the conversation's optional "kind" and "seen" fields (seen: False marks kinds or templates held
    out of training)."""
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
                before = msgs[:-1] + [{"role": "assistant", "content": parts[:i]}]
                ids = list(tokenizer.render_conversation({"messages": before})[0])
                if ids[-1] != assistant_end:
                    raise NanocodeError("render_conversation did not end with <|assistant_end|>")
                ids = ids[:-1]
            call = json.dumps({"name": part["name"], "arguments": part["arguments"]})
            ref_tokens = len(tokenizer.encode(call)) + 2  # and <|tool_start|>, <|tool_end|>
            if len(ids) + ref_tokens < max_len:
                out.append(_prompt(ids, part, ref_tokens, conv))
    random.Random(seed).shuffle(out)
    return out[:limit]


def validity_file_prompts(tokenizer, prompts, limit: int, max_len: int) -> list[dict]:
    """gen_synth's held-out requests ($BASE/sft/validity_prompts.jsonl, when present: bare user
    requests {"messages", "kind", "seen"}): kinds and phrasings training never saw, reported apart
    from the seen ones. They have no reference call, so each gets the budget of the longest
    reference call among `prompts`."""
    from nanocode.common import get_base_dir
    from nanocode.conversations import load_jsonl

    path = get_base_dir() / "sft" / "validity_prompts.jsonl"
    if not path.exists() or limit <= 0:
        return []
    budget = max((p["ref_tokens"] for p in prompts), default=64)
    out = []
    for rec in load_jsonl(path, kind="prompt")[:limit]:
        ids = list(tokenizer.render_for_completion({"messages": rec["messages"]}))
        if len(ids) + budget < max_len:
            out.append(_prompt(ids, None, budget, rec))
    return out


def first_tool_call(engine, ids, max_tokens: int):
    """Generate greedily from `ids` until the first tool call is closed. (outcome, call text):
    "call" (closed by <|tool_end|>), "no_call" (the message ended without one), "unclosed" (the
    message ended inside the call: a call that never closes is invalid), "cut_off" (the token
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
        elif t in engine.stop_ids:
            return "unclosed", engine.tokenizer.decode(call)
        else:
            call.append(t)
    return "cut_off", None if call is None else engine.tokenizer.decode(call)


def _counts(rows) -> dict:
    """tool_call_validity's numbers for rows of (status, same_tool, kind, seen): the count of each
    status, prompts, same_tool, validity and validity_of_calls."""
    c = {k: sum(r[0] == k for r in rows) for k in ("valid", "invalid", "no_call", "cut_off")}
    calls = c["valid"] + c["invalid"]
    c.update(prompts=len(rows), same_tool=sum(r[1] for r in rows))
    c["validity"] = c["valid"] / len(rows) if rows else 0.0
    c["validity_of_calls"] = c["valid"] / calls if calls else None
    return c


@torch.no_grad()
def tool_call_validity(model, tokenizer, prompts, max_tokens: int = 0) -> dict:
    """Counts over the prompts, kept apart: valid, invalid (malformed JSON, unknown tool, wrong
    arguments, or a call the message ended inside), no_call, cut_off (out of tokens).
    validity = valid / prompts (a prompt with no call scores 0, it is not left out);
    validity_of_calls = valid / (valid + invalid), None when no call was written. The budget per
    prompt is max_tokens, or by default (0) the prompt's reference call length + 32: enough for the
    call the held-out assistant made, and any short text before it. Split by seen/unseen and by
    kind."""
    from nanocode.engine import Engine
    from nanocode.tools import parse_tool_call

    engine = Engine(model, tokenizer)
    rows = []
    for p in prompts:
        budget = min(max_tokens or p["ref_tokens"] + 32, model.config.sequence_len - len(p["ids"]))
        outcome, text = first_tool_call(engine, p["ids"], budget)
        obj = parse_tool_call(text)[0] if outcome == "call" else None
        status = outcome
        if outcome in ("call", "unclosed"):
            status = "valid" if obj is not None else "invalid"
        same_tool = obj is not None and p["ref"] is not None and obj["name"] == p["ref"]["name"]
        rows.append((status, same_tool, p["kind"], p["seen"]))
    out = _counts(rows)
    out["seen"] = _counts([r for r in rows if r[3]])
    out["unseen"] = _counts([r for r in rows if not r[3]])
    kinds = sorted({r[2] for r in rows})
    out["by_kind"] = {k: _counts([r for r in rows if r[2] == k])["validity"] for k in kinds}
    return out


def fmt_validity(v: dict) -> str:
    """One log line from tool_call_validity's dict; the seen/unseen split only when there are
    unseen prompts."""
    s = (
        f"tool-call validity {v['validity']:.3f} of {v['prompts']} prompts ({v['valid']} valid, "
        f"{v['invalid']} invalid, {v['no_call']} no call, {v['cut_off']} cut off by the token "
        f"limit; {v['same_tool']} picked the reference's tool)"
    )
    seen, unseen = v["seen"], v["unseen"]
    if unseen["prompts"]:
        s += f"; seen kinds {seen['validity']:.3f} ({seen['prompts']}), "
        s += f"unseen {unseen['validity']:.3f} ({unseen['prompts']})"
    return s
