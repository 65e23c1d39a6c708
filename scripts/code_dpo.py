"""Direct preference optimization of the SFT checkpoint on preference pairs.

    python -m scripts.code_dpo --model-tag d12                 # sft d12 -> dpo d12, synthetic pairs
    python -m scripts.code_dpo --train my_pairs.jsonl --val my_val.jsonl --loss ipo --beta 0.1

Preference pairs (JSONL, one object per line; extra keys are ignored):
    {"prompt":   {"messages": [..., {"role": "user", "content": ...}]},   # a conversation ending with a user turn
     "chosen":   {"role": "assistant", "content": str | [parts]},       # the better next assistant message
     "rejected": {"role": "assistant", "content": str | [parts]}}       # the worse one
Parts are those of any conversation (text, tool_call, tool_output; see nanocode/conversations.py).
Default files: $NANOCODE_BASE_DIR/sft/dpo_{train,val}.jsonl from scripts/gen_synth.py, whose rejected
sides carry one flaw each: a malformed tool call, an edit whose old_string is not unique, a claim no tool
output backs, or SOUL.md's style broken.

The log-probability of a side is the sum over its assistant tokens (the mask of render_conversation, past
the prompt; tool outputs are not the model's and do not count). The reference model is the SFT
checkpoint itself, frozen: its log-probs for every pair the run visits are computed once, before the first
update, so no second model is kept in memory. Losses, with h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)):
    sigmoid (DPO, Rafailov et al. 2023):  -log sigmoid(beta * h)
    ipo     (Azar et al. 2023):           (h' - 1 / (2 beta))^2, h' the same with per-token average log-probs
Rewards are beta * (log pi - log ref) of each side; reward accuracy = share of pairs whose chosen reward
is strictly higher (so at step 0, where policy = reference and every reward is 0, it is 0).

Plus, by default, the chosen side's per-token NLL times --nll-weight (RPO, Pang et al. 2024, weight 1):
DPO alone can lower the chosen side's likelihood as long as the rejected one falls faster, and a small
model then unlearns the exact tool-call format; the NLL term holds it. Tool-call validity (as after SFT,
on the SFT held-out conversations) is measured before and after. With --self-pairs, tasks that have a
verifier add pairs of the model's own replies: a passing one chosen, a failing one rejected.
The loop is nanocode/finetune.py.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from nanocode import finetune
from nanocode.checkpoint import load_model
from nanocode.common import (
    NanocodeError,
    autocast,
    compute_cleanup,
    compute_init,
    get_base_dir,
    print0,
    run_main,
)
from nanocode.conversations import load_jsonl, load_source, pad_batch
from nanocode.report import log_stage


def get_args(argv=None):
    p = argparse.ArgumentParser(
        description="DPO on preference pairs against the frozen SFT checkpoint"
    )
    p.add_argument(
        "--model-tag", type=str, default=None, help="sft checkpoint tag (default: the latest)"
    )
    p.add_argument("--model-step", type=int, default=None)
    p.add_argument(
        "--train", type=str, default="", help="pairs JSONL (default $BASE/sft/dpo_train.jsonl)"
    )
    p.add_argument(
        "--val", type=str, default="", help="held-out pairs JSONL (default $BASE/sft/dpo_val.jsonl)"
    )
    p.add_argument("--loss", type=str, default="sigmoid", choices=["sigmoid", "ipo"])
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=0,
        help="tokens per side (default: the model's sequence_len)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step, all ranks")
    p.add_argument("--num-epochs", type=float, default=1.0)
    p.add_argument(
        "--nll-weight",
        type=float,
        default=1.0,
        help="weight of the chosen side's per-token NLL (0: plain DPO)",
    )
    p.add_argument(
        "--eval-prompts",
        type=int,
        default=64,
        help="held-out tool-call positions for the validity rate (0: skip)",
    )
    p.add_argument(
        "--self-pairs",
        type=str,
        default="",
        help="task sources with verifiers (nanocode.rl_tasks: programs, "
        "corpus, agent, mbpp, *.jsonl): add pairs of the SFT model's own passing (chosen) and failing (rejected) replies",
    )
    p.add_argument(
        "--self-samples", type=int, default=4, help="replies sampled per task for --self-pairs"
    )
    p.add_argument("--self-max-tokens", type=int, default=256)
    finetune.add_args(p, init_lr_frac=0.02, eval_every=50)
    return p.parse_args(argv)


def dpo_loss(pc, pr, rc, rr, beta: float, loss_type: str = "sigmoid", nc=None, nr=None):
    """Per-pair losses and the two rewards. pc/pr: policy log-probs of chosen/rejected (summed over
    their tokens), rc/rr: the reference's; nc/nr: token counts (needed by ipo)."""
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    elif loss_type == "ipo":
        losses = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}: use sigmoid or ipo")
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def render_side(tokenizer, prompt: dict, message: dict, max_len: int):
    """(ids, mask) of prompt + message, the mask kept only on the message's own assistant tokens."""
    prompt_ids = list(tokenizer.render_for_completion(prompt))
    ids, mask = tokenizer.render_conversation(
        {"messages": prompt["messages"] + [message]}, max_tokens=max_len + 1
    )
    ids, mask = list(ids)[: max_len + 1], list(mask)[: max_len + 1]
    n = len(prompt_ids)
    if ids[:n] != prompt_ids[: len(ids)]:
        raise NanocodeError(
            "render_for_completion(prompt) is not a prefix of render_conversation(prompt + reply)"
        )
    return ids, [0] * min(n, len(mask)) + mask[n:]


def render_pairs(tokenizer, pairs, max_len: int):
    """[(chosen row, rejected row)] for pairs where both sides keep at least one token after the cut and
    still differ (two long sides cut to the same prefix carry no preference), and each pair's "kind"
    (the synthetic flaw, or "-")."""
    out, kinds = [], []
    for p in pairs:
        c, r = (
            render_side(tokenizer, p["prompt"], p["chosen"], max_len),
            render_side(tokenizer, p["prompt"], p["rejected"], max_len),
        )
        if sum(c[1][1:]) and sum(r[1][1:]) and c != r:
            out.append((c, r))
            kinds.append(str(p.get("kind", "-")))
    return out, kinds


def side_logps(model, rows, pad_id: int, device, amp):
    """Summed log-prob of each row's masked tokens, and the token counts."""
    x, y = pad_batch(rows, pad_id, device)
    with amp:
        nll = model(x, y, loss_reduction="none").float().view(x.shape)
    return -nll.sum(1), (y != -1).sum(1).float()


def pair_logps(model, pairs, pad_id, device, amp):
    rows = [c for c, _ in pairs] + [r for _, r in pairs]
    logp, n = side_logps(model, rows, pad_id, device, amp)
    k = len(pairs)
    return logp[:k], logp[k:], n[:k], n[k:]


@torch.no_grad()
def reference_logps(model, pairs, batch_size, pad_id, device, amp):
    out = [
        pair_logps(model, pairs[i : i + batch_size], pad_id, device, amp)[:2]
        for i in range(0, len(pairs), batch_size)
    ]
    return torch.cat([c for c, _ in out]), torch.cat([r for _, r in out])


@torch.no_grad()
def evaluate_pairs(model, pairs, kinds, ref_c, ref_r, args, pad_id, device, amp) -> dict:
    losses, cr, rr_, pref = [], [], [], []
    for i in range(0, len(pairs), args.batch_size):
        pc, pr, nc, nr = pair_logps(model, pairs[i : i + args.batch_size], pad_id, device, amp)
        l, c, r = dpo_loss(
            pc, pr, ref_c[i : i + len(pc)], ref_r[i : i + len(pc)], args.beta, args.loss, nc, nr
        )
        losses.append(l), cr.append(c), rr_.append(r), pref.append(pc / nc > pr / nr)
    losses, cr, rr_, pref = torch.cat(losses), torch.cat(cr), torch.cat(rr_), torch.cat(pref)
    right = cr > rr_  # the chosen side's reward is strictly higher
    by_kind = {
        k: sum(r for r, kk in zip(right.tolist(), kinds) if kk == k) / kinds.count(k)
        for k in sorted(set(kinds))
    }
    return {
        "loss": losses.mean().item(),
        "reward_accuracy": right.float().mean().item(),
        "ties": (cr == rr_).float().mean().item(),
        "margin": (cr - rr_).mean().item(),
        "chosen_reward": cr.mean().item(),
        "rejected_reward": rr_.mean().item(),
        "logp_accuracy": pref.float().mean().item(),
        "pairs": len(pairs),
        "reward_accuracy_by_kind": by_kind,
    }


def fmt(m: dict) -> str:
    return (
        f"loss {m['loss']:.4f} | reward accuracy {m['reward_accuracy']:.3f} (ties {m['ties']:.2f}) | "
        f"margin {m['margin']:+.4f} | chosen {m['chosen_reward']:+.4f} rejected {m['rejected_reward']:+.4f} | "
        f"policy prefers chosen per token {m['logp_accuracy']:.3f}"
    )


def self_pairs(model, tokenizer, spec: str, G: int, max_tokens: int, seed: int):
    """Preference pairs from the model's own replies: G samples per task of `spec`, scored by the task's
    verifier; a task with a passing and a failing reply gives one pair (the first of each), so the rejected
    side is a mistake this model really makes. Returns (pairs, tasks sampled)."""
    from nanocode import rl_tasks
    from nanocode.conversations import validate_preference
    from nanocode.engine import Engine

    tasks = rl_tasks.load_tasks(spec, "train", seed)
    results = rl_tasks.sample(
        Engine(model, tokenizer), tasks, G, seed, max_tokens, temperature=1.0, top_k=50, timeout=5.0
    )
    verdicts = rl_tasks.score([t for t in tasks for _ in range(G)], results)
    pairs = []
    for j, task in enumerate(tasks):
        rows = list(zip(results[j * G : (j + 1) * G], verdicts[j * G : (j + 1) * G]))
        good = [r["message"] for r, (ok, _) in rows if ok]
        bad = [r["message"] for r, (ok, _) in rows if not ok]
        if good and bad:
            pair = {
                "prompt": {"messages": [{"role": "user", "content": task["prompt"]}]},
                "chosen": good[0],
                "rejected": bad[0],
                "kind": "own_failure",
            }
            pairs.append(validate_preference(pair, f"self pair of task {task['id']}"))
    return pairs, len(tasks)


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The pair order of an epoch: the (epoch+1)-th torch.randperm of a generator seeded `seed`."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epoch + 1):
        order = torch.randperm(n, generator=g).tolist()
    return order


def main(argv=None):
    args = get_args(argv)
    is_ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    torch.manual_seed(args.seed)
    amp = autocast(device)
    if args.beta <= 0:
        raise NanocodeError(f"--beta must be > 0, got {args.beta}")

    model, tokenizer, sft_meta = load_model("sft", device, tag=args.model_tag, step=args.model_step)
    config = model.config
    T = args.max_seq_len or config.sequence_len
    tag = args.model_tag or f"d{config.n_layer}"
    pad_id = tokenizer.bos_id
    sft_dir = get_base_dir() / "sft"
    train_pairs = load_jsonl(args.train or sft_dir / "dpo_train.jsonl", kind="preference")
    own = []
    if args.self_pairs:
        own, n_tasks = self_pairs(
            model, tokenizer, args.self_pairs, args.self_samples, args.self_max_tokens, args.seed
        )
        print0(
            f"self pairs: {len(own)} of {n_tasks} tasks had a passing and a failing reply among {args.self_samples} samples"
        )
    train, _ = render_pairs(tokenizer, train_pairs + own, T)
    val, val_kinds = render_pairs(
        tokenizer, load_jsonl(args.val or sft_dir / "dpo_val.jsonl", kind="preference"), T
    )
    if not train or not val:
        raise NanocodeError(
            f"no usable pairs ({len(train)} train, {len(val)} val) after cutting to {T} tokens"
        )
    if args.batch_size % world_size:
        raise NanocodeError(
            f"--batch-size {args.batch_size} is not divisible by the {world_size} processes"
        )
    # validity prompts: the SFT held-out conversations, so the numbers compare with SFT's own
    convs = (
        load_source("synth", "val")
        if args.eval_prompts and (sft_dir / "synth_val.jsonl").exists()
        else []
    )
    prompts = finetune.tool_call_prompts(tokenizer, convs, args.eval_prompts, T - 8, args.seed)
    prompts += finetune.validity_file_prompts(tokenizer, prompts, args.eval_prompts, T - 8)
    steps_per_epoch = max(1, len(train) // args.batch_size)
    num_steps = args.steps if args.steps > 0 else max(1, round(args.num_epochs * steps_per_epoch))
    print0(
        f"model: sft {tag}, {model.num_params():,} parameters | {len(train)} train pairs, {len(val)} held-out | "
        f"{args.loss} loss, beta {args.beta}, NLL weight {args.nll_weight} | {num_steps} steps of {args.batch_size} pairs "
        f"| {len(prompts)} tool-call validity prompts"
    )

    def batches(step):
        epoch, k = divmod(step, steps_per_epoch)
        idx = epoch_order(len(train), epoch, args.seed)[
            k * args.batch_size : (k + 1) * args.batch_size
        ][rank::world_size]
        return finetune.split(idx, args.grad_accum)

    # the reference: the SFT model's log-probs, once, before any update, of the train pairs this rank's
    # steps use (a short run visits few of them) and of the held-out pairs
    model.eval()
    t0 = time.time()
    used = sorted({i for s in range(num_steps) for mb in batches(s) for i in mb})
    ref_train = [torch.zeros(len(train), device=device), torch.zeros(len(train), device=device)]
    if used:
        c, r = reference_logps(
            model, [train[i] for i in used], args.batch_size, pad_id, device, amp
        )
        ref_train[0][used], ref_train[1][used] = c, r
    ref_val = reference_logps(model, val, args.batch_size, pad_id, device, amp)
    print0(
        f"reference log-probs of {len(used) + len(val)} pairs ({len(used)} train pairs the steps use, "
        f"{len(val)} held-out) in {time.time() - t0:.1f}s"
    )

    def loss_fn(idx):
        pc, pr, nc, nr = pair_logps(model, [train[i] for i in idx], pad_id, device, amp)
        losses, cr, rr = dpo_loss(
            pc, pr, ref_train[0][idx], ref_train[1][idx], args.beta, args.loss, nc, nr
        )
        loss = losses.mean()
        nll = (-pc / nc).mean()
        if args.nll_weight:
            loss = loss + args.nll_weight * nll
        return loss, {
            "loss": loss.item(),
            "dpo_loss": losses.mean().item(),
            "chosen_nll": nll.item(),
            "reward_acc": (cr > rr).float().mean().item(),
            "margin": (cr - rr).mean().item(),
            "tokens": (nc.sum() + nr.sum()).item(),
        }

    def evaluate(step):
        if rank != 0:
            return None
        m = evaluate_pairs(model, val, val_kinds, *ref_val, args, pad_id, device, amp)
        print0(f"step {step:05d} | held-out {fmt(m)}")
        if prompts and (step == 0 or step == num_steps):
            with amp:
                m["validity"] = finetune.tool_call_validity(model, tokenizer, prompts)
            print0(f"step {step:05d} | {finetune.fmt_validity(m['validity'])}")
        return m

    result = finetune.train(
        model,
        finetune.setup_optimizers(model, args, rank, world_size),
        args,
        phase="dpo",
        tag=tag,
        num_steps=num_steps,
        batches=batches,
        loss_fn=loss_fn,
        evaluate=evaluate,
        rank=rank,
        world_size=world_size,
        device=device,
        meta=lambda: {
            "model_config": sft_meta["model_config"],
            "sft_step": sft_meta.get("step"),
            "dpo_args": vars(args),
        },
    )
    if rank == 0:
        before, m = result["evals"][0][1], result["evals"][-1][1]
        c = result["curves"]
        curves = {
            "loss": c["loss"],
            "reward_accuracy": c["reward_acc"],
            "margin": c["margin"],
            "chosen_nll": c["chosen_nll"],
            "val": [
                (s, {k: v for k, v in e.items() if k != "validity"}) for s, e in result["evals"]
            ],
        }
        validity = (
            {
                "tool_call_validity_before": before["validity"]["validity"],
                "tool_call_validity": m["validity"]["validity"],
                "validity_before": before["validity"],
                "validity_after": m["validity"],
            }
            if prompts
            else {}
        )
        log_stage(
            "dpo",
            headline=["preference_accuracy_before", "preference_accuracy"],
            model_tag=tag,
            steps=num_steps,
            loss_type=args.loss,
            beta=args.beta,
            nll_weight=args.nll_weight,
            train_pairs=len(train),
            self_pairs=len(own),
            val_pairs=len(val),
            val_before=before,
            val_after=m,
            preference_accuracy_before=before["reward_accuracy"],
            preference_accuracy=m["reward_accuracy"],
            curves=curves,
            device=str(device),
            **validity,
        )
        print0(
            f"saved dpo/{tag}; held-out preference (reward) accuracy {before['reward_accuracy']:.3f} -> "
            f"{m['reward_accuracy']:.3f}, margin {before['margin']:+.4f} -> {m['margin']:+.4f}, per-token "
            f"log-prob preference {before['logp_accuracy']:.3f} -> {m['logp_accuracy']:.3f}"
        )
        if prompts:
            print0(
                f"tool-call validity {before['validity']['validity']:.3f} -> {m['validity']['validity']:.3f} (valid per prompt)"
            )
        print0(
            "held-out reward accuracy by kind: "
            + ", ".join(
                f"{k} {v:.3f} ({val_kinds.count(k)})"
                for k, v in m["reward_accuracy_by_kind"].items()
            )
        )
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
