"""What grammar-constrained decoding (nanocode.grammar) costs, measured through the engine: time per
decode step with and without a grammar, and a compiled grammar's compile time and memory; first,
what applying the masks to the logits costs, row by row or all rows at once (apply_ms).

    python -m bench.grammar                              # vocab 4096 and 32768, a depth-4 model
    python -m bench.grammar --vocab 32768 --depth 20 --device cuda

Per vocabulary: a tokenizer trained on the first 30 MB of torch's Python sources, a random GPT of
--depth, and three grammars: a client's call under tool_choice "required" (place_order: required,
enum, integer bounds, number, boolean, array, pattern, anyOf, $ref, additionalProperties false), our
five tools under "auto" (the CLI's and agent eval's --constrained), and a json_schema answer (the
same schema). Decode: Engine.chat_batch of --rows rows for --tokens tokens at temperature 1, with no
grammar and with the grammar in turn, 4 times each (no tool runs: a call is answered "tools are
disabled here", forced into the row like any output); per step (one token per row), the median wall
and CPU time (CPU: every thread of the process). Grammar: the median compile time of 30 distinct
schemas (cache misses) and the heap each compiled grammar holds (glibc's mallinfo2: what malloc
handed out and did not get back, which memory freed earlier cannot hide as it hides RSS growth).
Results in bench/results/cpu/grammar.md.
"""

import argparse
import bisect
import ctypes
import functools
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench.kernels import median_ms
from nanocode.engine import Engine
from nanocode.gpt import GPTConfig, build_model
from nanocode.grammar import OUR_TOOLS, apply_bitmask, compile_grammar
from nanocode.tokenizer import Tokenizer

parser = argparse.ArgumentParser(description="the cost of grammar-constrained decoding")
parser.add_argument("--vocab", type=int, nargs="+", default=[4096, 32768])
parser.add_argument("--depth", type=int, default=4)
parser.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="rows decoded together")
parser.add_argument("--tokens", type=int, default=128, help="tokens per row per measurement")
parser.add_argument("--device", default="cpu")


def closed(required: list, **properties) -> dict:
    """A JSON Schema object with these properties and no others."""
    schema = {"type": "object", "properties": properties, "required": required}
    return schema | {"additionalProperties": False}


ORDER = closed(
    ["size", "price", "urgent", "ids", "owner"],
    size={"enum": ["small", "medium", "large"]},
    count={"type": "integer", "minimum": 1, "maximum": 14},
    price={"type": "number", "exclusiveMinimum": 0},
    urgent={"type": "boolean"},
    ids={"type": "array", "items": {"type": "integer"}, "maxItems": 3},
    code={"type": "string", "pattern": "^[A-Z]{2,5}$"},
    note={"anyOf": [{"type": "string", "maxLength": 40}, {"type": "null"}]},
    owner={"$ref": "#/$defs/person"},
) | {"$defs": {"person": closed(["name"], name={"type": "string"})}}
CASES = {  # name: compile_grammar's (tools, tool_choice, answer_schema)
    "client call (required)": ({"place_order": ORDER}, "required", None),
    "our 5 tools (auto)": (OUR_TOOLS, "auto", None),
    "json_schema answer": ({}, "auto", ORDER),
}


HEADER = ["vocab", "grammar", "rows", "wall ms/step: none", "grammar", "CPU ms/step: none"]
HEADER += ["grammar", "compile ms", "KB per grammar"]
KEPT = []


class Mallinfo2(ctypes.Structure):  # glibc's struct mallinfo2: ten size_t
    _fields_ = [(f"field{i}", ctypes.c_size_t) for i in range(10)]


def heap_mb() -> float:
    """MB in use on glibc's heap (every arena: llguidance allocates through malloc too)."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Mallinfo2
    info = libc.mallinfo2()
    return (info.field7 + info.field4) / 1e6  # uordblks (in use) + hblkhd (mmapped chunks)


def tokenizer_for(vocab: int) -> Tokenizer:
    paths = sorted(Path(torch.__file__).parent.rglob("*.py"))
    texts = [p.read_text(errors="replace") for p in paths]
    sizes = list(itertools.accumulate(map(len, texts)))  # the same first 30 MB for each vocab
    return Tokenizer.train(texts[: bisect.bisect(sizes, 30e6)], vocab_size=vocab)


def compiled(tok, tools, choice, answer) -> tuple[float, float]:
    """(median ms to compile, KB of heap per compiled grammar) over 30 distinct schemas: the same
    ones with a title added, so that compile_grammar's cache misses. Every one stays alive (KEPT:
    the cache evicts), so that memory freed meanwhile cannot offset the count."""
    times, mb = [], heap_mb()
    for i in range(30):
        text = json.dumps([tools, answer]).replace('"type"', f'"title": "v{i}", "type"', 1)
        tools_i, answer_i = json.loads(text)
        t0 = time.perf_counter()
        KEPT.append(compile_grammar(tok, tools_i, choice, answer_i))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), 1e3 * (heap_mb() - mb) / 30


def step_time(engine, rows, tokens, grammar, seed) -> tuple[float, float]:
    """(wall, CPU) seconds per decode step of one chat_batch of `rows` rows."""
    ask = [{"messages": [{"role": "user", "content": "What is the weather in Oslo?"}]}] * rows
    t0, c0 = time.perf_counter(), time.process_time()
    results = engine.chat_batch(ask, max_tokens=tokens, temperature=1.0, seed=seed, grammar=grammar)
    # the batch steps until its last row stops: the longest row's sampled tokens. The prompt's
    # prefill is in the time too, the same with and without a grammar (the prompt is the same).
    steps = max(r["usage"]["completion_tokens"] for r in results)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def apply_ms(vocab, rows, device) -> list[float]:
    """Median milliseconds to mask `rows` rows of logits with their bitmasks (random ones): row by
    row, as the engine did before a799471, and all rows at once, as Engine._sample does now."""
    logits = torch.randn(rows, vocab, device=device)
    masks = list(torch.randint(-(2**31), 2**31 - 1, (rows, (vocab + 31) // 32), dtype=torch.int32))

    def mask(at_once):
        if at_once:
            apply_bitmask(logits, torch.stack(masks))
        else:
            for i in range(rows):
                apply_bitmask(logits[i], masks[i])

    ways = [functools.partial(mask, at_once) for at_once in (False, True)]
    return [median_ms(way, device, cpu_repeat=500) for way in ways]


def main():
    args = parser.parse_args()
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, cores {os.cpu_count()}")
    print("\n| vocab | rows | apply ms: row by row | all rows at once |\n|---|---|---|---|")
    for vocab, rows in itertools.product(args.vocab, args.rows):
        cells = [f"{ms:.3f}" for ms in apply_ms(vocab, rows, args.device)]
        print(f"| {vocab} | {rows} | {' | '.join(cells)} |", flush=True)
    print("\n| " + " | ".join(HEADER) + " |\n" + "|---" * len(HEADER) + "|")
    for tok in map(tokenizer_for, args.vocab):
        compile_grammar(tok, {}, "auto")  # llguidance's view of the vocabulary: once per tokenizer
        torch.manual_seed(0)
        config = GPTConfig.from_depth(args.depth, tok.vocab_size, sequence_len=1024)
        engine = Engine(build_model(config, args.device).eval(), tok)
        for name, (tools, choice, answer) in CASES.items():
            ms, kb = compiled(tok, tools, choice, answer)
            grammar = compile_grammar(tok, tools, choice, answer)
            for rows in args.rows:
                runs = [[], []]  # no grammar, the grammar: in turn, so that drift hits both
                for seed, g in enumerate([None, grammar] * 4):
                    runs[seed % 2].append(step_time(engine, rows, args.tokens, g, seed))
                cells = [statistics.median(t[k] for t in run) for k in (0, 1) for run in runs]
                cells = [f"{1e3 * x:.2f}" for x in cells] + [f"{ms:.1f}", f"{kb:.0f}"]
                print(f"| {tok.vocab_size} | {name} | {rows} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
