"""Reinforcement learning from unit tests: on-policy, group-relative (a simplified GRPO, no critic, as
nanochat's chat_rl), with the agent's own tool loop.

    python -m scripts.code_rl --model-tag d12                        # sft d12 -> rl d12, synthetic programs
    python -m scripts.code_rl --tasks programs,corpus --val-tasks programs --group-size 8
    torchrun --nproc_per_node=8 -m scripts.code_rl --tasks mbpp

Each step: --tasks-per-step tasks (a seeded draw that depends only on --seed and the step), G samples
per task from the current policy (Engine.chat_batch: temperature > 0, tool calls run in a scratch dir,
bash in nanocode.sandbox), each scored by the task's verifier
(nanocode.rl_tasks): reward = 1 if the written code passes, else 0, plus --valid-call-bonus if the reply
made a valid tool call and --malformed-penalty (subtracted) if it made a malformed one. Advantage =
reward - the mean of its group (divided by the group's std with --std-adv; negative advantages times
--neg-weight, 1 by default: below 1 the step trusts "do more of this" over "do less of that"). Loss,
token level over every
sampled assistant token of the step (tool outputs and the prompt are not the model's: masked):
    L = -sum_t A_row(t) * log pi(token_t) / (sampled tokens of the step, all ranks)
(one gradient step per batch of samples, so the policy that sampled is the one trained: the PPO ratio
is 1 and no clip is needed; --kl-coef > 0 adds the k3 estimate of KL to the starting model).
Groups whose rewards are all equal carry no gradient and are not forwarded again.
Held-out pass@1 (--eval-samples samples per held-out task at the sampling temperature) every
--eval-every steps; the loop (schedule, checkpoints, --resume) is nanocode/finetune.py. Under torchrun
each rank samples and trains on its contiguous share of the step's tasks; sampling seeds depend on the
task's position in the step, not on the rank, so N processes make the same update as one.
"""

import argparse
import copy
import random
import time

import torch

from nanocode import finetune, rl_tasks
from nanocode.checkpoint import load_model
from nanocode.common import NanocodeError, autocast, compute_cleanup, compute_init, print0, run_main
from nanocode.conversations import pad_batch
from nanocode.report import log_stage


def get_args(argv=None):
    p = argparse.ArgumentParser(description="RL from unit tests (group-relative policy gradient)")
    p.add_argument(
        "--source",
        type=str,
        default="sft",
        choices=["sft", "dpo", "rl"],
        help="checkpoint to start from",
    )
    p.add_argument("--model-tag", type=str, default=None)
    p.add_argument("--model-step", type=int, default=None)
    p.add_argument(
        "--save-tag",
        type=str,
        default=None,
        help="save as rl/<this> (default: --model-tag): several runs from one start",
    )
    p.add_argument(
        "--tasks",
        type=str,
        default="programs",
        help="train task sources: programs, corpus, agent, mbpp, *.jsonl",
    )
    p.add_argument(
        "--val-tasks",
        type=str,
        default="",
        help="held-out task sources (default: --tasks' val split)",
    )
    p.add_argument("--eval-tasks", type=int, default=32, help="held-out tasks for pass@1")
    p.add_argument(
        "--eval-samples",
        type=int,
        default=4,
        help="samples per held-out task (pass@1 = mean pass rate)",
    )
    p.add_argument(
        "--eval-seed",
        type=int,
        default=1,
        help="seed of the held-out samples (vary it to measure noise)",
    )
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="only measure held-out pass@1 of the --source checkpoint",
    )
    p.add_argument("--group-size", "-G", type=int, default=8, help="samples per task")
    p.add_argument(
        "--tasks-per-step", type=int, default=8, help="tasks per optimizer step, all ranks"
    )
    p.add_argument(
        "--sample-tasks",
        type=int,
        default=0,
        help="tasks per chat_batch call (0: all of this rank's)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="sampled tokens per reply")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--valid-call-bonus", type=float, default=0.1)
    p.add_argument("--malformed-penalty", type=float, default=0.1)
    p.add_argument(
        "--std-adv",
        action="store_true",
        help="divide advantages by the group's std (GRPO); off: Dr. GRPO",
    )
    p.add_argument(
        "--neg-weight",
        type=float,
        default=1.0,
        help="scale of negative advantages (1: plain group-relative; 0: reinforce above-average samples only)",
    )
    p.add_argument(
        "--kl-coef",
        type=float,
        default=0.0,
        help="k3 KL penalty to the starting model (0: off, no copy kept)",
    )
    p.add_argument("--verify-timeout", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=2, help="parallel verifier processes")
    finetune.add_args(p, init_lr_frac=0.05, eval_every=20)
    args = p.parse_args(argv)
    if args.steps <= 0:
        args.steps = 50
    return args


# -----------------------------------------------------------------------------
# the pieces the tests check by hand


def group_advantages(
    rewards: torch.Tensor, std: bool = False, neg_weight: float = 1.0
) -> torch.Tensor:
    """rewards (tasks, G) -> advantages (tasks, G): reward minus its group's mean, optionally / group std,
    negative ones times neg_weight."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if std:
        adv = adv / (rewards.std(dim=1, unbiased=False, keepdim=True) + 1e-6)
    return torch.where(adv < 0, adv * neg_weight, adv)


def pg_loss(
    model, rows, adv, norm: float, pad_id: int, device, amp, ref_model=None, kl_coef: float = 0.0
):
    """Token-level policy-gradient loss of rows [(ids, mask)] (mask 1 on sampled tokens) with one
    advantage per row: sum over masked tokens of -A * log pi, divided by `norm`; plus kl_coef * k3 KL
    to ref_model on the same tokens. Returns (loss, summed log-probs of the masked tokens)."""
    x, y = pad_batch(rows, pad_id, device)
    valid = (y != -1).float()
    with amp:
        nll = model(x, y, loss_reduction="none").float().view(x.shape) * valid
    loss = (nll * torch.as_tensor(adv, dtype=torch.float32, device=x.device)[:, None]).sum() / norm
    if kl_coef:
        with torch.no_grad(), amp:
            ref_nll = ref_model(x, y, loss_reduction="none").float().view(x.shape) * valid
        d = nll - ref_nll  # log ref - log pi
        loss = loss + kl_coef * ((torch.exp(d) - d - 1) * valid).sum() / norm
    return loss, -nll.sum()


def rollout_row(r: dict, max_len: int):
    """A chat_batch result as a training row (ids, mask): the prompt (mask 0), then the reply's sampled
    (1) and forced (0) tokens, cut to the model's context."""
    ids, mask = list(r["prompt_ids"]) + list(r["ids"]), [0] * len(r["prompt_ids"]) + list(r["mask"])
    return ids[: max_len + 1], mask[: max_len + 1]


# -----------------------------------------------------------------------------
# sampling and scoring


def sample_and_score(engine, tasks, first_index, args, seed, G):
    """G samples for each task (seeds by the task's global position `first_index + j`, so not by rank), their
    training rows and rewards. Returns (rows, rewards (n, G), stats: sums over the samples, and times)."""
    t0 = time.time()
    results = rl_tasks.sample(
        engine,
        tasks,
        G,
        seed + first_index * G,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.verify_timeout,
        args.sample_tasks,
    )
    t_sample = time.time() - t0
    t0 = time.time()
    flat_tasks = [t for t in tasks for _ in range(G)]
    verdicts = rl_tasks.score(
        flat_tasks, results, workers=args.workers, timeout=args.verify_timeout
    )
    t_verify = time.time() - t0
    rewards, stats = (
        [],
        {
            "passed": 0,
            "valid_call": 0,
            "malformed_call": 0,
            "no_code": 0,
            "no_verifier": 0,
            "timed_out": 0,
            "cut_off": 0,
            "completions": len(results),
            "sampled_tokens": sum(sum(r["mask"]) for r in results),
        },
    )
    for r, (passed, status) in zip(results, verdicts):
        valid, malformed = rl_tasks.call_counts(r["message"])
        rewards.append(
            float(passed)
            + args.valid_call_bonus * (valid > 0)
            - args.malformed_penalty * (malformed > 0)
        )
        stats["passed"] += passed
        stats["valid_call"] += valid > 0
        stats["malformed_call"] += malformed > 0
        stats["no_code"] += status == "no code written"
        stats["no_verifier"] += status == "no verifier"
        stats["timed_out"] += status == "timed out"
        stats["cut_off"] += r["finish_reason"] == "length"
    stats["reward"] = sum(rewards)
    stats["sample_s"], stats["verify_s"] = t_sample, t_verify
    rows = [rollout_row(r, engine.max_len) for r in results]
    return rows, torch.tensor(rewards).view(len(tasks), G), stats


def all_reduce_sums(stats: dict, world_size: int) -> dict:
    """Sum the stats across ranks (times: the max, the slowest rank sets the pace)."""
    if world_size == 1:
        return stats
    import torch.distributed as dist

    keys = sorted(stats)
    sums = torch.tensor([stats[k] for k in keys if not k.endswith("_s")], dtype=torch.float64)
    times = torch.tensor([stats[k] for k in keys if k.endswith("_s")], dtype=torch.float64)
    dist.all_reduce(sums)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    out = dict(zip([k for k in keys if not k.endswith("_s")], sums.tolist()))
    out.update(zip([k for k in keys if k.endswith("_s")], times.tolist()))
    return out


# -----------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    is_ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    torch.manual_seed(args.seed)
    amp = autocast(device)
    for name in ("group_size", "tasks_per_step", "max_new_tokens", "eval_samples"):
        if getattr(args, name) < 1:
            raise NanocodeError(
                f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
            )
    if args.temperature <= 0:
        raise NanocodeError(
            "--temperature must be > 0: the samples of a group must differ for their rewards to"
        )
    if args.tasks_per_step % world_size:
        raise NanocodeError(
            f"--tasks-per-step {args.tasks_per_step} is not divisible by the {world_size} processes"
        )

    model, tokenizer, src_meta = load_model(
        args.source, device, tag=args.model_tag, step=args.model_step
    )
    config = model.config
    tag = args.save_tag or args.model_tag or f"d{config.n_layer}"
    pad_id = tokenizer.bos_id
    train_tasks = rl_tasks.load_tasks(args.tasks, "train", args.seed)
    try:
        # the held-out tasks do not depend on --seed: runs with different seeds are measured on the same tasks
        val_tasks = rl_tasks.load_tasks(args.val_tasks or args.tasks, "val", 1)[: args.eval_tasks]
    except NanocodeError as e:
        if "gave no" not in str(e):
            raise
        val_tasks = []  # e.g. a small synthetic val split without a write-and-run conversation: train on, say so
        print0(f"warning: {e}; held-out pass@1 is not measured (give --val-tasks)")
    G, K, num_steps = args.group_size, args.tasks_per_step, args.steps
    k = K // world_size  # this rank's tasks per step
    ref_model = copy.deepcopy(model).eval() if args.kl_coef else None
    from nanocode.engine import Engine

    engine = Engine(model, tokenizer)
    print0(
        f"model: {args.source} {tag}, {model.num_params():,} parameters | {len(train_tasks)} train tasks "
        f"({args.tasks}), {len(val_tasks)} held-out | {num_steps} steps of {K} tasks x {G} samples, "
        f"{args.max_new_tokens} new tokens at temperature {args.temperature}"
    )

    def step_tasks(step):
        rng = random.Random(args.seed * 1_000_003 + step)
        return [
            train_tasks[i % len(train_tasks)]
            for i in rng.sample(range(max(K, len(train_tasks))), K)
        ]

    last = {}

    def batches(step):
        mine = step_tasks(step)[rank * k : (rank + 1) * k]
        model.eval()
        rows, rewards, stats = sample_and_score(
            engine, mine, rank * k, args, seed=args.seed * 7919 + step * K * G, G=G
        )
        model.train()
        adv = group_advantages(rewards, args.std_adv, args.neg_weight).flatten().tolist()
        stats = all_reduce_sums(stats, world_size)
        norm_tokens = max(stats["sampled_tokens"], 1.0)  # all sampled tokens of the step, all ranks
        keep = [i for i, a in enumerate(adv) if a != 0 or args.kl_coef]
        micro = finetune.split([(rows[i], adv[i]) for i in keep], args.grad_accum)
        # finetune.train backpropagates loss / len(micro) and averages over ranks: dividing each micro-batch's
        # sum by norm_tokens / (len(micro) * world) makes the update that of sum(-A log pi) / norm_tokens
        last.clear()
        last.update(stats, norm=norm_tokens / (max(len(micro), 1) * world_size))
        return micro

    def loss_fn(mb):
        rows, adv = [r for r, _ in mb], [a for _, a in mb]
        loss, _ = pg_loss(
            model, rows, adv, last["norm"], pad_id, device, amp, ref_model, args.kl_coef
        )
        return loss, {"pg_loss": loss.item()}

    def step_metrics(step):
        n = max(last["completions"], 1)
        return {
            "reward": last["reward"] / n,
            "pass_rate": last["passed"] / n,
            "valid_call": last["valid_call"] / n,
            "malformed_call": last["malformed_call"] / n,
            "no_code": last["no_code"] / n,
            "no_verifier": last["no_verifier"] / n,
            "timed_out": last["timed_out"] / n,
            "cut_off": last["cut_off"] / n,
            "sample_s": last["sample_s"],
            "verify_s": last["verify_s"],
            "completions_per_s": last["completions"] / max(last["sample_s"], 1e-9),
            "sampled_tokens": last["sampled_tokens"],
        }

    def evaluate(step):
        if not val_tasks:
            return (
                {
                    "pass@1": float("nan"),
                    "reward": float("nan"),
                    "valid_call": float("nan"),
                    "samples": 0,
                }
                if rank == 0
                else None
            )
        mine_n = -(-len(val_tasks) // world_size)
        mine = val_tasks[rank * mine_n : (rank + 1) * mine_n]
        stats = {"passed": 0, "reward": 0, "completions": 0, "valid_call": 0}
        if mine:
            _, _, s = sample_and_score(
                engine,
                mine,
                rank * mine_n,
                args,
                seed=10**9 + args.eval_seed * 7919,
                G=args.eval_samples,
            )
            stats = {key: s[key] for key in stats}
        stats = all_reduce_sums(stats, world_size)
        n = max(stats["completions"], 1)
        m = {
            "pass@1": stats["passed"] / n,
            "reward": stats["reward"] / n,
            "valid_call": stats["valid_call"] / n,
            "samples": int(stats["completions"]),
        }
        print0(
            f"step {step:05d} | held-out pass@1 {m['pass@1']:.4f} ({int(stats['passed'])}/{m['samples']} samples of "
            f"{len(val_tasks)} tasks) | mean reward {m['reward']:.4f} | valid call {m['valid_call']:.3f}"
        )
        return m if rank == 0 else None

    if args.eval_only:
        model.eval()
        evaluate(0)
        compute_cleanup()
        return
    result = finetune.train(
        model,
        finetune.setup_optimizers(model, args, rank, world_size),
        args,
        phase="rl",
        tag=tag,
        num_steps=num_steps,
        batches=batches,
        loss_fn=loss_fn,
        evaluate=evaluate,
        rank=rank,
        world_size=world_size,
        device=device,
        step_metrics=step_metrics,
        meta=lambda: {
            "model_config": config.to_dict(),
            "source": args.source,
            "source_step": src_meta.get("step"),
            "rl_args": vars(args),
        },
    )
    if rank == 0:
        c, evals = result["curves"], result["evals"]
        (_, before), (_, after) = evals[0], evals[-1]
        sample_s, verify_s, step_s = (
            sum(v for _, v in c.get(key, [])) for key in ("sample_s", "verify_s", "step_s")
        )
        completions = len(c.get("reward", [])) * K * G
        log_stage(
            "rl",
            headline=["pass_at_1_before", "pass_at_1", "val_reward_before", "val_reward"],
            model_tag=tag,
            source=args.source,
            steps=num_steps,
            tasks=args.tasks,
            train_tasks=len(train_tasks),
            val_tasks=len(val_tasks),
            group_size=G,
            tasks_per_step=K,
            temperature=args.temperature,
            pass_at_1_before=before["pass@1"],
            pass_at_1=after["pass@1"],
            val_reward_before=before["reward"],
            val_reward=after["reward"],
            evals=evals,
            completions_per_s=completions / max(sample_s, 1e-9) if sample_s else None,
            time_share={
                "sampling": sample_s / max(step_s, 1e-9),
                "verifying": verify_s / max(step_s, 1e-9),
                "training": 1 - (sample_s + verify_s) / max(step_s, 1e-9),
            },
            curves={
                "reward": c.get("reward", []),
                "pass_rate": c.get("pass_rate", []),
                "valid_call": c.get("valid_call", []),
                "val_pass@1": [(s, e["pass@1"]) for s, e in evals],
            },
            device=str(device),
        )
        print0(
            f"saved rl/{tag}; held-out pass@1 {before['pass@1']:.4f} -> {after['pass@1']:.4f}, held-out mean reward "
            f"{before['reward']:.4f} -> {after['reward']:.4f}; time: sampling {sample_s:.1f}s, verifying {verify_s:.1f}s, "
            f"all steps {step_s:.1f}s"
        )
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
