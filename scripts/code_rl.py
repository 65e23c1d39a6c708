"""Reinforcement learning from unit tests: on-policy, group-relative (a simplified GRPO, no critic,
as nanochat's chat_rl), with the agent's own tool loop.

    python -m scripts.code_rl --model-tag d12               # sft d12 -> rl d12, synthetic programs
    python -m scripts.code_rl --tasks programs,corpus --val-tasks programs --group-size 8
    torchrun --nproc_per_node=8 -m scripts.code_rl --tasks mbpp

Each step: --tasks-per-step tasks (a seeded draw that depends only on --seed and the step), G
samples per task from the current policy (Engine.chat_batch: temperature > 0, top-k, tool calls run
in a scratch dir, bash in nanocode.sandbox; --sample-tasks tasks per chat_batch call, 0: all of
this rank's), each scored by the task's verifier (nanocode.rl_tasks; --workers processes,
--verify-timeout seconds): reward = 1 if the written code passes, else 0, plus --valid-call-bonus if
the reply made a valid tool call and --malformed-penalty (subtracted) if it made a malformed one.
Advantage = reward - the mean of its group (divided by the group's std with --std-adv, GRPO; off:
Dr. GRPO), negative advantages times --neg-weight (1 by default; below 1 the step trusts "do more
of this" over "do less of that", 0 reinforces only the samples above their group's mean). Loss,
token level over every sampled assistant token of the step (tool outputs and the prompt are not the
model's: masked):
    L = -sum_t A_row(t) * log pi(token_t) / (sampled tokens of the step, all ranks)
(one gradient step per batch of samples, so the policy that sampled is the one trained: the PPO
ratio is 1 and no clip is needed; --kl-coef > 0 adds the k3 estimate of KL to the starting model,
kept as a frozen copy). Groups whose rewards are all equal carry no gradient and are not forwarded
again. Held-out pass@1 (--eval-samples samples per held-out task, --eval-tasks of them, at the
sampling temperature and the seed --eval-seed) every --eval-every steps; --eval-only measures the
--source checkpoint and stops. --save-tag saves as rl/<save-tag>: several runs from one start. The
loop (schedule, checkpoints, --resume) is nanocode/training.py. Under torchrun each rank samples and
trains on its contiguous share of the step's tasks; sampling seeds depend on the task's position in
the step, not on the rank, so N processes make the same update as one.
"""

import argparse
import copy
import random
import time

import torch
import torch.distributed as dist

from nanocode import rl_tasks, training
from nanocode.checkpoint import load_model
from nanocode.common import NanocodeError, autocast, compute_cleanup, compute_init, print0, run_main
from nanocode.conversations import pad_batch
from nanocode.engine import Engine
from nanocode.report import log_stage
from nanocode.training import posint


def get_args(argv=None):
    p = argparse.ArgumentParser(description="RL from unit tests (group-relative policy gradient)")
    p.add_argument("--source", default="sft", choices=["sft", "dpo", "rl"])
    p.add_argument("--model-tag", default=None)
    p.add_argument("--model-step", type=int, default=None)
    p.add_argument("--save-tag", default=None, help="rl/<this> (default: --model-tag)")
    p.add_argument("--tasks", default="programs", help="programs,corpus,agent,mbpp,*.jsonl")
    p.add_argument("--val-tasks", default="", help="default: --tasks' val split")
    p.add_argument("--eval-tasks", type=int, default=32)
    p.add_argument("--eval-samples", type=posint, default=4, help="per held-out task")
    p.add_argument("--eval-seed", type=int, default=1)
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--group-size", "-G", type=posint, default=8, help="samples per task")
    p.add_argument("--tasks-per-step", type=posint, default=8, help="all ranks")
    p.add_argument("--sample-tasks", type=int, default=0)
    p.add_argument("--max-new-tokens", type=posint, default=256, help="sampled tokens per reply")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--valid-call-bonus", type=float, default=0.1)
    p.add_argument("--malformed-penalty", type=float, default=0.1)
    p.add_argument("--std-adv", action="store_true")
    # 1: the plain loss (nanochat's); 0 helped a weak 2M-parameter model (bench/results/cpu/rl.md)
    p.add_argument("--neg-weight", type=float, default=1.0)
    p.add_argument("--kl-coef", type=float, default=0.0)
    p.add_argument("--verify-timeout", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=2, help="verifier processes at once")
    # init-lr-frac 0.05, temperature 1, top-k 50, 256 new tokens: nanochat's chat_rl settings
    training.add_args(p, init_lr_frac=0.05, eval_every=20)
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps > 0 else 50  # tasks are drawn per step: no epochs here
    if args.temperature <= 0:
        raise NanocodeError("--temperature must be > 0: the samples of a group must differ")
    return args


def group_advantages(rewards: torch.Tensor, std=False, neg_weight=1.0) -> torch.Tensor:
    """rewards (tasks, G) -> advantages (tasks, G): reward minus its group's mean, optionally /
    group std, negative ones times neg_weight."""
    # the group's mean is the baseline: a sample is scored against the other tries at the same
    # task, so no critic is needed, and a task every sample passes (or fails) teaches nothing
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if std:  # + 1e-6: a group of equal rewards has std 0 (and advantages 0 already)
        adv = adv / (rewards.std(dim=1, unbiased=False, keepdim=True) + 1e-6)
    return torch.where(adv < 0, adv * neg_weight, adv)


def pg_loss(model, rows, adv, norm: float, pad_id: int, device, amp, ref_model=None, kl_coef=0.0):
    """Token-level policy-gradient loss of rows [(ids, mask)] (mask 1 on sampled tokens) with one
    advantage per row: sum over masked tokens of -A * log pi, divided by `norm`; plus kl_coef * k3
    KL to ref_model on the same tokens."""
    x, y = pad_batch(rows, pad_id, device)
    valid = (y != -1).float()
    with amp:
        nll = model(x, y, loss_reduction="none").float().view(x.shape) * valid
    # -A * log pi = A * nll: minimizing it raises log pi where A > 0 and lowers it where A < 0
    loss = (nll * torch.as_tensor(adv, dtype=torch.float32, device=x.device)[:, None]).sum() / norm
    if kl_coef:
        with torch.no_grad(), amp:
            ref_nll = ref_model(x, y, loss_reduction="none").float().view(x.shape) * valid
        d = nll - ref_nll  # log ref - log pi
        # k3 = r - log r - 1 with r = ref / pi: >= 0 on every token, and its mean over tokens pi
        # sampled is an unbiased estimate of KL(pi || ref)
        loss = loss + kl_coef * ((torch.exp(d) - d - 1) * valid).sum() / norm
    return loss


def rollout_row(r: dict, max_len: int):
    """A chat_batch result as a training row (ids, mask): the prompt (mask 0), then the reply's
    sampled (1) and forced (0) tokens, cut to the model's context."""
    ids, mask = list(r["prompt_ids"]) + list(r["ids"]), [0] * len(r["prompt_ids"]) + list(r["mask"])
    return ids[: max_len + 1], mask[: max_len + 1]


# verifier statuses counted per step, by the name they are logged under
STATUSES = {"no_code": "no code written", "no_verifier": "no verifier", "timed_out": "timed out"}


def sample_and_score(engine, tasks, first_index, args, seed, G):
    """G samples for each task (seeds by the task's global position `first_index + j`, so not by
    rank), their training rows and rewards. Returns (rows, rewards (n, G), stats: sums over the
    samples, and the times)."""
    t0 = time.time()
    seed += first_index * G  # sample j of the task at position p: seed + p * G + j
    temperature, top_k, timeout = args.temperature, args.top_k, args.verify_timeout
    results = rl_tasks.sample(
        engine, tasks, G, seed, args.max_new_tokens, temperature, top_k, timeout, args.sample_tasks
    )
    sample_s, t0 = time.time() - t0, time.time()
    flat = [t for t in tasks for _ in range(G)]
    verdicts = rl_tasks.score(flat, results, workers=args.workers, timeout=timeout)
    stats = dict.fromkeys(["passed", "valid_call", "malformed_call", "cut_off", *STATUSES], 0)
    rewards = []
    for r, (passed, status) in zip(results, verdicts):
        # at most one bonus and one penalty per reply, however many calls it made
        valid, malformed = (n > 0 for n in rl_tasks.call_counts(r["message"]))
        rewards.append(passed + args.valid_call_bonus * valid - args.malformed_penalty * malformed)
        stats["passed"] += passed
        stats["valid_call"] += valid
        stats["malformed_call"] += malformed
        stats["cut_off"] += r["finish_reason"] == "length"
        for key, text in STATUSES.items():
            stats[key] += status == text
    stats.update(reward=sum(rewards), completions=len(results), sample_s=sample_s)
    stats.update(sampled_tokens=sum(sum(r["mask"]) for r in results), verify_s=time.time() - t0)
    rows = [rollout_row(r, engine.max_len) for r in results]
    return rows, torch.tensor(rewards, dtype=torch.float32).view(len(tasks), G), stats


def all_reduce_stats(stats: dict, device) -> dict:
    """The stats summed over ranks (times: the max, the slowest rank sets the pace)."""
    if not dist.is_initialized():
        return stats
    out = dict(stats)
    for op, is_time in ((dist.ReduceOp.SUM, False), (dist.ReduceOp.MAX, True)):
        keys = [k for k in sorted(stats) if k.endswith("_s") == is_time]
        values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(values, op=op)
        out.update(zip(keys, values.tolist()))
    return out


def main(argv=None):
    """Setup (the source checkpoint, the train and held-out tasks, a frozen copy for --kl-coef),
    the closures the loop calls (batches: sampling and scoring the step's rollouts; loss_fn,
    step_metrics, evaluate), --eval-only's early exit, the loop and its checkpoints
    (training.train), then the report (log_stage, rank 0)."""
    args = get_args(argv)
    _, rank, _, world_size, device = compute_init(args.device_type)
    torch.manual_seed(args.seed)
    amp = autocast(device)
    G, K, num_steps = args.group_size, args.tasks_per_step, args.steps
    if K % world_size:
        raise NanocodeError(f"--tasks-per-step {K} is not divisible by the {world_size} processes")

    model, tokenizer, src_meta = load_model(args.source, device, args.model_tag, args.model_step)
    tag = args.save_tag or args.model_tag or f"d{model.config.n_layer}"
    pad_id = tokenizer.bos_id
    train_tasks = rl_tasks.load_tasks(args.tasks, "train", args.seed)
    try:
        # the held-out tasks do not depend on --seed: runs with other seeds meet the same tasks
        val_tasks = rl_tasks.load_tasks(args.val_tasks or args.tasks, "val", 1)[: args.eval_tasks]
    except NanocodeError as e:
        if "gave no" not in str(e):
            raise
        val_tasks = []  # e.g. a small synthetic val split without a write-and-run conversation
        print0(f"warning: {e}; held-out pass@1 is not measured (give --val-tasks)")
    k = K // world_size  # this rank's tasks per step
    ref_model = copy.deepcopy(model).eval() if args.kl_coef else None  # frozen before any update
    engine = Engine(model, tokenizer)
    print0(
        f"model: {args.source} {tag}, {model.num_params():,} parameters | {len(train_tasks)} train "
        f"tasks ({args.tasks}), {len(val_tasks)} held-out | {num_steps} steps of {K} tasks x {G} "
        f"samples, {args.max_new_tokens} new tokens at temperature {args.temperature}"
    )

    last = {}  # the step's sampling stats, all ranks: for its loss's scale and its metrics

    def batches(step):
        """The step's rollouts as micro-batches of (row, advantage). The K tasks are a draw
        seeded by --seed and the step alone (a task list shorter than K wraps around); this rank
        samples and scores its contiguous share in eval mode. Rows with advantage 0 carry no
        gradient and are left out unless the KL term needs them. The step's all-rank stats and
        the loss's scale go to `last`."""
        rng = random.Random(args.seed * 1_000_003 + step)
        picks = rng.sample(range(max(K, len(train_tasks))), K)
        mine = [train_tasks[i % len(train_tasks)] for i in picks][rank * k : (rank + 1) * k]
        model.eval()
        # the step's K x G samples take seeds seed .. seed + K*G - 1: no two steps share one
        seed = args.seed * 7919 + step * K * G
        rows, rewards, stats = sample_and_score(engine, mine, rank * k, args, seed, G)
        model.train()
        adv = group_advantages(rewards, args.std_adv, args.neg_weight).flatten().tolist()
        last.update(all_reduce_stats(stats, device))
        # advantage 0: e.g. each sample of an all-equal group, or below its mean at --neg-weight 0
        micro = [(row, a) for row, a in zip(rows, adv) if a != 0 or args.kl_coef]
        micro = training.split(micro, args.grad_accum)
        # The loop backpropagates loss / len(micro) and averages over ranks: dividing each
        # micro-batch's sum by tokens / (len(micro) * world) makes the update
        # sum(-A log pi) / tokens, tokens: every sampled token of the step, all ranks.
        # the rows left out count too: their terms are 0, so leaving them out changes nothing
        tokens = max(last["sampled_tokens"], 1.0)
        last["norm"] = tokens / (max(len(micro), 1) * world_size)
        return micro

    def loss_fn(mb):
        rows, adv = [r for r, _ in mb], [a for _, a in mb]
        loss = pg_loss(model, rows, adv, last["norm"], pad_id, device, amp, ref_model, args.kl_coef)
        return loss, {"pg_loss": loss.detach()}

    def step_metrics(step):
        """The step's logged metrics from `last` (all ranks): per completion the mean reward, pass
        rate and the call, cut-off and verifier-status rates; the sampling and verifying seconds,
        sampled tokens, completions per second of sampling."""
        n, sample_s = max(last["completions"], 1), last["sample_s"]
        rates = ["reward", "valid_call", "malformed_call", "cut_off", *STATUSES]
        out = {key: last[key] / n for key in rates}
        out.update(pass_rate=last["passed"] / n, sample_s=sample_s, verify_s=last["verify_s"])
        out.update(completions_per_s=n / max(sample_s, 1e-9), sampled_tokens=last["sampled_tokens"])
        return out

    def evaluate(step):
        """Held-out pass@1, mean reward and valid-call rate: --eval-samples samples per held-out
        task at a seed set by --eval-seed alone, the tasks split into contiguous shares over
        ranks and the counts all-reduced. Returns the metrics on rank 0, None on the others."""
        per = -(-len(val_tasks) // world_size)  # ceil: every task on some rank
        mine = val_tasks[rank * per : (rank + 1) * per]
        stats = dict.fromkeys(["passed", "reward", "valid_call", "completions"], 0)
        if mine:
            # by --eval-seed alone (10**9 up: away from the training draws' seeds), so every
            # evaluation, in this run or another, samples with the same seeds: they differ by model
            seed = 10**9 + args.eval_seed * 7919
            scored = sample_and_score(engine, mine, rank * per, args, seed, args.eval_samples)[2]
            stats = {key: scored[key] for key in stats}
        stats = all_reduce_stats(stats, device)
        n = stats["completions"]
        m = {k: stats[k] / n if n else float("nan") for k in ("passed", "reward", "valid_call")}
        m = {"pass@1": m.pop("passed"), **m, "samples": int(n)}
        if val_tasks:
            print0(
                f"step {step:05d} | held-out pass@1 {m['pass@1']:.4f} ({int(stats['passed'])}/"
                f"{m['samples']} samples of {len(val_tasks)} tasks) | mean reward "
                f"{m['reward']:.4f} | valid call {m['valid_call']:.3f}"
            )
        return m if rank == 0 else None

    if args.eval_only:
        model.eval()
        evaluate(0)
        compute_cleanup()
        return
    opts = training.setup_optimizers(model, args)
    meta = {"source": args.source, "source_step": src_meta.get("step")}
    # no schedule: the loop's default, linear decay from --init-lr-frac x the pretraining rates
    loop = dict(meta=meta, step_metrics=step_metrics)
    result = training.train(
        model, opts, args, "rl", tag, num_steps, batches, loss_fn, evaluate, **loop
    )
    if rank == 0:
        c, evals = result["curves"], result["evals"]
        (_, before), (_, after) = evals[0], evals[-1]  # step 0 (the source model) and the last
        sample_s, verify_s, step_s = (
            sum(v for _, v in c[k]) for k in ("sample_s", "verify_s", "step_s")
        )
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
            completions_per_s=len(c["reward"]) * K * G / max(sample_s, 1e-9),
            time_share={
                "sampling": sample_s / step_s,
                "verifying": verify_s / step_s,
                "training": 1 - (sample_s + verify_s) / step_s,
            },
            curves={
                "reward": c["reward"],
                "pass_rate": c["pass_rate"],
                "valid_call": c["valid_call"],
                "val_pass@1": [(s, e["pass@1"]) for s, e in evals],
            },
            device=str(device),
        )
        print0(
            f"saved rl/{tag}; held-out pass@1 {before['pass@1']:.4f} -> {after['pass@1']:.4f}, "
            f"held-out mean reward {before['reward']:.4f} -> {after['reward']:.4f}; time: sampling "
            f"{sample_s:.1f}s, verifying {verify_s:.1f}s, all steps {step_s:.1f}s"
        )
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
