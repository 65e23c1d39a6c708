"""Direct preference optimization of the SFT checkpoint on preference pairs.

    python -m scripts.code_dpo --model-tag d12                 # sft d12 -> dpo d12, synthetic pairs
    python -m scripts.code_dpo --train my_pairs.jsonl --val my_val.jsonl --loss ipo --beta 0.1

Preference pairs (JSONL, one object per line; extra keys are ignored):
    {"prompt":   {"messages": [..., {"role": "user", "content": ...}]},  # ends with a user turn
     "chosen":   {"role": "assistant", "content": str | [parts]},  # the better next message
     "rejected": {"role": "assistant", "content": str | [parts]}}  # the worse one
Parts are those of any conversation (text, tool_call, tool_output; see nanocode/conversations.py).
Default files: $NANOCODE_BASE_DIR/sft/dpo_{train,val}.jsonl from scripts/gen_synth.py, whose
rejected sides carry one flaw each: a malformed tool call, an edit whose old_string is not unique, a
claim no tool output backs, or SOUL.md's style broken.

The log-probability of a side is the sum over its assistant tokens (the mask of
render_conversation, past the prompt; tool outputs are not the model's and do not count). The
reference model is the SFT checkpoint itself, frozen: its log-probs for every pair the run visits
are computed once, before the first update, so no second model is kept in memory. Losses, with
h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)):
    sigmoid (DPO, Rafailov et al. 2023):  -log sigmoid(beta * h)
    ipo     (Azar et al. 2023):           (h' - 1 / (2 beta))^2, h' the same with per-token average
                                          log-probs
Rewards are beta * (log pi - log ref) of each side; reward accuracy = share of pairs whose chosen
reward is strictly higher (so at step 0, where policy = reference and every reward is 0, it is 0).

Plus, by default, the chosen side's per-token NLL times --nll-weight (RPO, Pang et al. 2024, weight
1): DPO alone can lower the chosen side's likelihood as long as the rejected one falls faster, and a
small model then unlearns the exact tool-call format; the NLL term holds it. Tool-call validity (as
after SFT, on --eval-prompts of the SFT held-out conversations; 0 skips it) is measured before and
after. With --self-pairs SOURCES (task sources with verifiers, nanocode.rl_tasks: programs, corpus,
agent, mbpp, *.jsonl), the SFT model samples --self-samples replies per task: a task with a passing
and a failing reply adds a pair, the passing one chosen. The loop is nanocode/training.py.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from nanocode import training
from nanocode.checkpoint import load_model
from nanocode.common import NanocodeError, autocast, compute_cleanup, compute_init, print0, run_main
from nanocode.conversations import load_jsonl, load_source, pad_batch
from nanocode.report import log_stage
from nanocode.training import posint


def get_args(argv=None):
    p = argparse.ArgumentParser(description="DPO on preference pairs against the SFT checkpoint")
    p.add_argument("--model-tag", default=None, help="sft checkpoint (default: latest)")
    p.add_argument("--model-step", type=int, default=None)
    p.add_argument("--train", default="", help="pairs (default $BASE/sft/dpo_train.jsonl)")
    p.add_argument("--val", default="", help="held-out pairs (default .../dpo_val.jsonl)")
    p.add_argument("--loss", default="sigmoid", choices=["sigmoid", "ipo"])
    # larger beta keeps the policy nearer the reference (both losses); also the rewards' scale
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-seq-len", type=int, default=0, help="tokens per side (default: model's)")
    p.add_argument("--batch-size", type=posint, default=8, help="pairs per step, all ranks")
    p.add_argument("--num-epochs", type=float, default=1.0)
    p.add_argument("--nll-weight", type=float, default=1.0, help="0: plain DPO")
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--self-pairs", default="", help="task sources (see the docstring)")
    p.add_argument("--self-samples", type=int, default=4)
    p.add_argument("--self-max-tokens", type=int, default=256)
    training.add_args(p, init_lr_frac=0.02, eval_every=50)
    return p.parse_args(argv)


def dpo_loss(pc, pr, rc, rr, beta: float, loss_type: str = "sigmoid", nc=None, nr=None):
    """Per-pair losses and the two rewards. pc/pr: policy log-probs of chosen/rejected (summed over
    their tokens), rc/rr: the reference's; nc/nr: token counts (needed by ipo)."""
    if loss_type == "sigmoid":
        # -log P(chosen preferred) under Bradley-Terry, a side's implicit reward being
        # beta x (log pi - log ref); its push on the margin shrinks as it grows but never stops
        losses = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    elif loss_type == "ipo":
        # squared distance to a finite margin, 1 / (2 beta): once reached, no more push; on
        # per-token averages, so the margin is in nats per token whatever the sides' lengths
        losses = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}: use sigmoid or ipo")
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()  # rewards: metrics only


def render_side(tokenizer, prompt: dict, message: dict, max_len: int):
    """(ids, mask) of prompt + message, the mask kept only on the message's own assistant tokens."""
    prompt_ids = list(tokenizer.render_for_completion(prompt))
    conv = {"messages": prompt["messages"] + [message]}
    ids, mask = tokenizer.render_conversation(conv, max_tokens=max_len + 1)
    n = len(prompt_ids)
    # the mask is zeroed over the first n tokens, which must be the prompt's: a renderer that laid
    # them out otherwise would shift the mask onto the wrong tokens
    if ids[:n] != prompt_ids[: len(ids)]:
        raise NanocodeError("render_for_completion(prompt) is not a prefix of the rendered pair")
    # the prompt's own assistant turns are context here, not the side being compared
    return ids, [0] * min(n, len(mask)) + mask[n:]


def render_pairs(tokenizer, pairs, max_len: int):
    """[(chosen row, rejected row)] for pairs where both sides keep at least one token after the
    cut and still differ (two long sides cut to the same prefix carry no preference), and each
    pair's "kind" (the synthetic flaw, or "-")."""
    out, kinds = [], []
    for p in pairs:
        c = render_side(tokenizer, p["prompt"], p["chosen"], max_len)
        r = render_side(tokenizer, p["prompt"], p["rejected"], max_len)
        if sum(c[1][1:]) and sum(r[1][1:]) and c != r:
            out.append((c, r))
            kinds.append(str(p.get("kind", "-")))
    return out, kinds


def side_logps(model, rows, pad_id: int, device, amp):
    """Summed log-prob of each row's masked tokens, and the token counts."""
    x, y = pad_batch(rows, pad_id, device)
    with amp:  # per-token NLL, 0 where the target is -1: the row sum is over the side's tokens
        nll = model(x, y, loss_reduction="none").float().view(x.shape)
    return -nll.sum(1), (y != -1).sum(1).float()


def pair_logps(model, pairs, pad_id, device, amp):
    """(chosen log-probs, rejected log-probs, chosen token counts, rejected token counts)."""
    # both sides of every pair in one padded batch: one forward
    logp, n = side_logps(model, [c for c, _ in pairs] + [r for _, r in pairs], pad_id, device, amp)
    k = len(pairs)
    return logp[:k], logp[k:], n[:k], n[k:]


@torch.no_grad()
def evaluate_pairs(model, pairs, kinds, ref_c, ref_r, args, pad_id, device, amp) -> dict:
    """Held-out metrics of the policy against the reference log-probs ref_c / ref_r (one per
    pair, in order), in batches of args.batch_size: the DPO/IPO loss without the NLL term, reward
    accuracy (also per kind), ties, margin, the mean rewards, and logp_accuracy (chosen has the
    higher per-token log-prob under the policy alone, no reference)."""
    parts = []
    for i in range(0, len(pairs), args.batch_size):
        pc, pr, nc, nr = pair_logps(model, pairs[i : i + args.batch_size], pad_id, device, amp)
        ref = slice(i, i + len(pc))
        losses, cr, rr = dpo_loss(pc, pr, ref_c[ref], ref_r[ref], args.beta, args.loss, nc, nr)
        parts.append(torch.stack([losses, cr, rr, (pc / nc > pr / nr).float()]))
    losses, cr, rr, prefers = torch.cat(parts, dim=1)
    right = (cr > rr).tolist()  # the chosen side's reward is strictly higher
    by_kind = {
        k: sum(r for r, kind in zip(right, kinds) if kind == k) / kinds.count(k)
        for k in sorted(set(kinds))
    }
    return {
        "loss": losses.mean().item(),
        "reward_accuracy": sum(right) / len(right),
        "ties": (cr == rr).float().mean().item(),
        "margin": (cr - rr).mean().item(),
        "chosen_reward": cr.mean().item(),
        "rejected_reward": rr.mean().item(),
        "logp_accuracy": prefers.mean().item(),  # the policy prefers chosen per token
        "pairs": len(pairs),
        "reward_accuracy_by_kind": by_kind,
    }


def fmt(m: dict) -> str:
    return (
        f"loss {m['loss']:.4f} | reward accuracy {m['reward_accuracy']:.3f} (ties {m['ties']:.2f}) "
        f"| margin {m['margin']:+.4f} | chosen {m['chosen_reward']:+.4f} rejected "
        f"{m['rejected_reward']:+.4f} | policy prefers chosen per token {m['logp_accuracy']:.3f}"
    )


def self_pairs(model, tokenizer, spec: str, G: int, max_tokens: int, seed: int):
    """Preference pairs from the model's own replies: G samples per task of `spec`, scored by the
    task's verifier; a task with a passing and a failing reply gives one pair (the first of each),
    so the rejected side is a mistake this model really makes. Returns (pairs, tasks sampled)."""
    from nanocode import rl_tasks
    from nanocode.conversations import validate_preference
    from nanocode.engine import Engine

    tasks = rl_tasks.load_tasks(spec, "train", seed)
    engine = Engine(model, tokenizer)
    # temperature 1: a task gives a pair only if its G replies differ, some passing, some failing
    results = rl_tasks.sample(engine, tasks, G, seed, max_tokens, 1.0, top_k=50, timeout=5.0)
    verdicts = rl_tasks.score([t for t in tasks for _ in range(G)], results)
    pairs = []
    for j, task in enumerate(tasks):
        rows = list(zip(results[j * G : (j + 1) * G], verdicts[j * G : (j + 1) * G]))
        good = [r["message"] for r, (ok, _) in rows if ok]
        bad = [r["message"] for r, (ok, _) in rows if not ok]
        if good and bad:
            prompt = {"messages": [{"role": "user", "content": task["prompt"]}]}
            pair = dict(prompt=prompt, chosen=good[0], rejected=bad[0], kind="own_failure")
            pairs.append(validate_preference(pair, f"self pair of task {task['id']}"))
    return pairs, len(tasks)


def main(argv=None):
    """Setup (the SFT model, its own pairs with --self-pairs, the rendered pairs, the validity
    prompts), the reference log-probs computed once before any update, the closures the loop
    calls (batches, loss_fn, evaluate), the loop and its checkpoints (training.train), then the
    report (log_stage, rank 0)."""
    args = get_args(argv)
    _, rank, _, world_size, device = compute_init(args.device_type)
    torch.manual_seed(args.seed)
    amp = autocast(device)
    if args.beta <= 0:
        raise NanocodeError(f"--beta must be > 0, got {args.beta}")

    model, tokenizer, sft_meta = load_model("sft", device, args.model_tag, args.model_step)
    T = args.max_seq_len or model.config.sequence_len
    tag = args.model_tag or f"d{model.config.n_layer}"
    pad_id = tokenizer.bos_id
    from nanocode.common import get_base_dir

    sft_dir = get_base_dir() / "sft"
    own = []
    if args.self_pairs:
        G, max_tokens = args.self_samples, args.self_max_tokens
        own, n_tasks = self_pairs(model, tokenizer, args.self_pairs, G, max_tokens, args.seed)
        print0(f"self pairs: {len(own)} of {n_tasks} tasks had a passing and a failing reply")
    train_pairs = load_jsonl(args.train or sft_dir / "dpo_train.jsonl", kind="preference")
    val_pairs = load_jsonl(args.val or sft_dir / "dpo_val.jsonl", kind="preference")
    train, _ = render_pairs(tokenizer, train_pairs + own, T)
    val, val_kinds = render_pairs(tokenizer, val_pairs, T)
    if not train or not val:
        raise NanocodeError(
            f"no usable pairs ({len(train)} train, {len(val)} val) after cutting to {T} tokens"
        )
    # validity prompts: the SFT held-out conversations, so the numbers compare with SFT's own
    has_convs = args.eval_prompts and (sft_dir / "synth_val.jsonl").exists()
    convs = load_source("synth", "val") if has_convs else []
    prompts = training.tool_call_prompts(tokenizer, convs, args.eval_prompts, T - 8, args.seed)
    prompts += training.validity_file_prompts(tokenizer, prompts, args.eval_prompts, T - 8)
    num_steps = training.count_steps(args, len(train))
    print0(
        f"model: sft {tag}, {model.num_params():,} parameters | {len(train)} train pairs, "
        f"{len(val)} held-out | {args.loss} loss, beta {args.beta}, NLL weight {args.nll_weight} | "
        f"{num_steps} steps of {args.batch_size} pairs | {len(prompts)} validity prompts"
    )

    def batches(step):
        # pair indices, not tensors: loss_fn renders the rows and looks up their reference log-probs
        idx = training.epoch_rows(len(train), step, args.batch_size, args.seed)
        return training.split(idx[rank::world_size], args.grad_accum)

    # the reference: the SFT model's log-probs, once, before any update, of the train pairs this
    # rank's steps use (a short run visits few of them) and of the held-out pairs
    model.eval()  # (the loop puts it back in training mode)
    t0 = time.time()
    # batches depend on the step alone, so the pairs every step will use are known now
    used = sorted({i for s in range(num_steps) for mb in batches(s) for i in mb})

    @torch.no_grad()
    def reference(pairs):  # (2, pairs): chosen and rejected log-probs, --batch-size pairs a pass
        chunks = [pairs[i : i + args.batch_size] for i in range(0, len(pairs), args.batch_size)]
        logps = [torch.stack(pair_logps(model, c, pad_id, device, amp)[:2]) for c in chunks]
        return torch.cat(logps, dim=1)

    ref_train = torch.zeros(2, len(train), device=device)  # unused pairs' zeros: never read
    if used:
        ref_train[:, used] = reference([train[i] for i in used])
    ref_val = reference(val)
    print0(
        f"reference log-probs of {len(used)} train and {len(val)} held-out pairs in "
        f"{time.time() - t0:.1f}s"
    )

    def loss_fn(idx):
        """One micro-batch of train pair indices: the mean DPO/IPO loss against the precomputed
        reference, plus --nll-weight times the chosen sides' per-token NLL (RPO); the metrics are
        the micro-batch's."""
        pc, pr, nc, nr = pair_logps(model, [train[i] for i in idx], pad_id, device, amp)
        rc, rr = ref_train[:, idx]
        losses, c_reward, r_reward = dpo_loss(pc, pr, rc, rr, args.beta, args.loss, nc, nr)
        nll = (-pc / nc).mean()  # per token of each chosen side, then over the pairs
        loss = losses.mean() + args.nll_weight * nll if args.nll_weight else losses.mean()
        return loss, {
            "loss": loss.detach(),
            "dpo_loss": losses.detach().mean(),
            "chosen_nll": nll.detach(),
            "reward_acc": (c_reward > r_reward).float().mean(),
            "margin": (c_reward - r_reward).mean(),
            "tokens": nc.sum() + nr.sum(),  # the scored tokens of both sides (padding not counted)
        }

    def evaluate(step):
        """Rank 0 only (the others return None): the held-out pair metrics, and tool-call
        validity at the first and the last step alone (the report gives those two apart)."""
        if rank != 0:
            return None
        m = evaluate_pairs(model, val, val_kinds, *ref_val, args, pad_id, device, amp)
        print0(f"step {step:05d} | held-out {fmt(m)}")
        if prompts and step in (0, num_steps):  # generation is slow: before and after only
            with amp:
                m["validity"] = training.tool_call_validity(model, tokenizer, prompts)
            print0(f"step {step:05d} | {training.fmt_validity(m['validity'])}")
        return m

    opts, meta = training.setup_optimizers(model, args), {"sft_step": sft_meta.get("step")}
    # no schedule: the loop's default, linear decay from --init-lr-frac x the pretraining rates
    result = training.train(
        model, opts, args, "dpo", tag, num_steps, batches, loss_fn, evaluate, meta=meta
    )
    if rank == 0:
        evals, c = result["evals"], result["curves"]
        before, m = evals[0][1], evals[-1][1]
        validity = {}
        if prompts:  # measured at the first and the last step only: reported apart
            first, final = before.pop("validity"), m.pop("validity")
            validity = dict(validity_before=first, validity_after=final)
            validity.update(tool_call_validity_before=first["validity"])
            validity.update(tool_call_validity=final["validity"])
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
            curves={
                "loss": c["loss"],
                "reward_accuracy": c["reward_acc"],
                "margin": c["margin"],
                "chosen_nll": c["chosen_nll"],
                "val": evals,
            },
            device=str(device),
            **validity,
        )
        by_kind = m["reward_accuracy_by_kind"].items()
        print0(
            f"saved dpo/{tag}; held-out preference (reward) accuracy "
            f"{before['reward_accuracy']:.3f} -> {m['reward_accuracy']:.3f}, margin "
            f"{before['margin']:+.4f} -> {m['margin']:+.4f}, "
            f"per-token log-prob preference {before['logp_accuracy']:.3f} -> "
            f"{m['logp_accuracy']:.3f}; by kind: "
            + ", ".join(f"{k} {v:.3f} ({val_kinds.count(k)})" for k, v in by_kind)
        )
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
