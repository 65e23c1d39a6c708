"""Batched tool-loop throughput: sampled tokens/s of Engine.chat_batch with tool calls in flight.

    python -m bench.agent_batch                       # CPU, depth 4 (the CPU speedrun's model), batch 1 8 32
    python -m bench.agent_batch --device cuda --depth 20 --seq-len 2048 --batch 1 8 32 128

A random model (throughput does not depend on the weights) is made to write a tool call every
`--call-every` sampled tokens, each row starting at a different offset, so at most steps some row is
taking in a tool's output (a fixed 22-token text) while the others sample. Stop tokens are masked so
every row runs its full `--max-tokens`. Prints tokens/s per batch size and the speedup over the first
batch size, per wall second and per CPU second of this process (on a shared machine the wall clock
mostly measures the neighbours; with one thread the CPU clock does not).
"""

import argparse
import time

import torch

from nanocode.engine import Engine, encode_with_specials
from nanocode.gpt import GPTConfig, build_model

parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument("--depth", type=int, default=4)
parser.add_argument("--seq-len", type=int, default=256)
parser.add_argument("--vocab-size", type=int, default=4096)
parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
parser.add_argument("--max-tokens", type=int, default=160)
parser.add_argument("--call-every", type=int, default=80)
parser.add_argument("--device", default="cpu")
parser.add_argument(
    "--repeats", type=int, default=2, help="timed runs per batch size (the best is kept)"
)


class ByteTokenizer:
    """12 specials then the 256 bytes: all the engine needs (a trained tokenizer changes nothing here)."""

    SPECIALS = [
        "<|bos|>",
        "<|user_start|>",
        "<|user_end|>",
        "<|assistant_start|>",
        "<|assistant_end|>",
        "<|tool_start|>",
        "<|tool_end|>",
        "<|output_start|>",
        "<|output_end|>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
    ]
    bos_id = 0

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def special_id(self, name):
        return self.SPECIALS.index(name)

    def encode(self, text):
        return [12 + b for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 12 for i in ids if 12 <= i < 268).decode(errors="replace")

    def render_for_completion(self, conv):
        return [0, 1] + self.encode(conv["messages"][0]["content"]) + [2, 3]


class ToolCalling(torch.nn.Module):
    """Wraps a model: row r writes `call` starting at sampled steps offset_r + k * every; no stops."""

    def __init__(self, model, call, every):
        super().__init__()
        self.model, self.call, self.every, self.config = model, call, every, model.config

    def forward(self, idx, kv_cache=None):
        logits = self.model(idx, kv_cache=kv_cache)
        steps = kv_cache.__dict__.setdefault("bench_steps", {})
        for b, r in enumerate(kv_cache.rows):
            step = steps.get(r, -1) + 1
            steps[r] = step
            logits[b, -1, :12] = -1e4  # no stray specials: calls happen where planned
            j = (step - 7 * r) % self.every
            if step >= 7 * r and j < len(self.call):
                logits[b, -1, self.call[j]] = 1e4
        return logits


def main():
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = GPTConfig.from_depth(args.depth, args.vocab_size, args.seq_len)
    model = build_model(cfg, args.device).eval()
    tok = ByteTokenizer(args.vocab_size)
    call = encode_with_specials(
        tok, '<|tool_start|>{"name": "bash", "arguments": {"command": "ls"}}<|tool_end|>'
    )
    engine = Engine(ToolCalling(model, call, args.call_every), tok)
    output = "x" * 20

    def run(batch):
        convs = [
            {"messages": [{"role": "user", "content": f"list the files, please ({i})"}]}
            for i in range(batch)
        ]
        t0, c0 = time.perf_counter(), time.process_time()
        results = engine.chat_batch(
            convs,
            approve=lambda n, a: True,
            workdirs=["."] * batch,
            temperature=1.0,
            max_tokens=args.max_tokens,
            tool_runner=lambda n, a, w: output,
        )
        if args.device == "cuda":
            torch.cuda.synchronize()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        sampled = sum(r["usage"]["completion_tokens"] for r in results)
        calls = sum(p["type"] == "tool_call" for r in results for p in r["message"]["content"])
        return sampled / dt, sampled / cpu, sampled, calls

    run(min(args.batch))  # warm-up
    print(
        f"depth {args.depth} (width {cfg.n_embd}), context {args.seq_len}, {args.max_tokens} sampled tokens per row, "
        f"a call every {args.call_every}, device {args.device}, threads {torch.get_num_threads()}"
    )
    base = None
    for batch in args.batch:
        tps, tpc, sampled, calls = max(run(batch) for _ in range(args.repeats))
        base = base or (tps, tpc)
        print(
            f"batch {batch:4d}: {tps:8.1f} sampled tokens/s wall (x{tps / base[0]:.1f}), {tpc:8.1f} per CPU second "
            f"(x{tpc / base[1]:.1f})  [{sampled} tokens, {calls} tool calls]"
        )


if __name__ == "__main__":
    main()
