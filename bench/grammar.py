"""What grammar-constrained decoding (nanocode.grammar) costs: per generated token, and per compiled
grammar.

    python -m bench.grammar                              # vocab 4096 and 32768, a depth-4 model
    python -m bench.grammar --vocab 32768 --depth 20 --device cuda

Per vocabulary: a real tokenizer (trained in seconds on the Python sources next to torch, or
--tokenizer DIR) and three grammars: a client's tool call under tool_choice "required" (required,
enum, integer bounds, additionalProperties false), our five tools under "auto", and a json_schema
answer using most supported keywords. For each:
- compile time of 30 distinct schemas (cache misses; llguidance's view of the tokenizer is built
  once before, reported apart); the heap each compiled grammar holds, and each row matcher 100
  tokens on (llguidance builds lexer states as they are met); glibc's count of bytes in use, which
  memory freed earlier cannot hide as it hides RSS growth;
- the matcher alone, in CPU time per token of one row: accept, the mask, apply_bitmask, inline;
- decode: a random model at --depth decoding one row with a KV cache, per token with no grammar,
  with the mask computed on the pool while the model runs (overlap) and computed inline; wall and
  CPU time (of every thread), and the grammar's wall time on the main thread (waiting for the
  mask, apply_bitmask, accept). The three loops alternate in chunks.
Replies are drawn from random logits (or the random model) at temperature 1, with the tokens that
close strings, arrays and objects favoured (+3) so that replies end and the grammar's states vary.
Times are medians; results in bench/results/cpu/grammar.md.
"""

import argparse
import ctypes
import json
import os
import statistics
import time
from pathlib import Path

import torch

from nanocode.engine import KVCache, sample_next
from nanocode.gpt import GPTConfig, build_model
from nanocode.grammar import Matcher, apply_bitmask, compile_grammar
from nanocode.tokenizer import SPECIAL_TOKENS, Tokenizer
from nanocode.tools import TOOLS

parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument("--vocab", type=int, nargs="+", default=[4096, 32768])
parser.add_argument("--tokenizer", help="a saved tokenizer directory (default: train one)")
parser.add_argument("--depth", type=int, default=4)
parser.add_argument("--steps", type=int, default=400, help="timed tokens per measurement")
parser.add_argument("--device", default="cpu")

END, CALL, CALL_END, OUT, OUT_END = (
    SPECIAL_TOKENS.index(f"<|{s}|>")
    for s in ("assistant_end", "tool_start", "tool_end", "output_start", "output_end")
)
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "price": {"type": "number", "exclusiveMinimum": 0},
        "urgent": {"type": "boolean"},
        "ids": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
        "code": {"type": "string", "pattern": "^[A-Z]{2,5}$"},
        "note": {"anyOf": [{"type": "string", "maxLength": 40}, {"type": "null"}]},
        "owner": {"$ref": "#/$defs/person"},
    },
    "required": ["price", "urgent", "ids", "owner"],
    "additionalProperties": False,
    "$defs": {"person": {"type": "object", "properties": {"name": {"type": "string"}}}},
}
CASES = {  # name: (tools, tool_choice, answer_schema)
    "client call (required)": ({"get_weather": WEATHER}, "required", None),
    "our 5 tools (auto)": ({n: s["parameters"] for n, s in TOOLS.items()}, "auto", None),
    "json_schema answer": ({}, "auto", ORDER),
}


class Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in "arena ordblks smblks hblks hblkhd usmblks "
        "fsmblks uordblks fordblks keepcost".split()
    ]


def heap_mb() -> float:
    """MB that malloc has handed out and not got back (glibc, every arena; llguidance allocates
    through it): unlike RSS, not hidden by the reuse of memory freed earlier."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Mallinfo2
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 1e6


def tokenizer_for(vocab: int, directory) -> Tokenizer:
    if directory:
        return Tokenizer.load(directory)
    files, texts, size = sorted(Path(torch.__file__).parent.rglob("*.py")), [], 0
    for f in files:  # the same 30 MB of Python for every vocabulary size
        texts.append(f.read_text(errors="replace"))
        size += len(texts[-1])
        if size > 30e6:
            break
    return Tokenizer.train(texts, vocab_size=vocab)


def closing_bias(tok) -> torch.Tensor:
    bias = torch.zeros(tok.vocab_size)
    bias[[END, CALL] + [i for i, b in enumerate(tok.id_bytes) if b in (b'"', b"}", b"]")]] = 3.0
    return bias


def next_reply(matcher, token, tok):
    """After `token`: the row's matcher for its next step (a fresh one once the reply is over), with
    a tool's output forced in after a call."""
    if token == END:
        return Matcher(matcher.grammar, matcher.overlap)
    if token == CALL_END:
        matcher.accept(OUT, *tok.encode("a tool's output"), OUT_END)
    return matcher


def matcher_alone(tok, grammar, steps):
    """(CPU seconds of the grammar's work for each token of one row, all of it on this thread:
    accept, the mask, apply_bitmask; the row's matcher at the end). Random logits, sampling not
    timed."""
    gen, bias = torch.Generator().manual_seed(0), closing_bias(tok)
    matcher, times = Matcher(grammar, overlap=False), []
    for _ in range(steps):
        logits = torch.randn(tok.vocab_size, generator=gen) + bias
        t0 = time.process_time()
        apply_bitmask(logits, matcher.bitmask())
        t1 = time.process_time()
        token = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).item()
        t2 = time.process_time()
        matcher.accept(token)
        times.append(t1 - t0 + time.process_time() - t2)
        matcher = next_reply(matcher, token, tok)
    return times, matcher


def distinct(i, tools, answer):
    """The same schemas with a title added, so that compile_grammar's cache misses."""
    text = json.dumps([tools, answer]).replace('"type"', f'"title": "v{i}", "type"', 1)
    return json.loads(text)


@torch.inference_mode()
def decode(model, tok, matcher, steps, seed):
    """Per token of one row decoding `steps` tokens (under `matcher`'s grammar, unless None): wall
    seconds, CPU seconds of the process, wall seconds of the grammar's work on this thread."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    bias = closing_bias(tok).to(device)
    cache, token, times = None, END, []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        if cache is None or cache.pos == cache.max_len:  # a full cache: start over
            cache = KVCache(1, model.config.n_layer, model.config.sequence_len)
        logits = model(torch.tensor([[token]], device=device), kv_cache=cache)[:, -1].float()
        logits += bias
        g0 = time.perf_counter()
        if matcher:
            apply_bitmask(logits, matcher.bitmask())
        g1 = time.perf_counter()
        token = sample_next(logits, [gen], 1.0, None, None).item()
        g2 = time.perf_counter()
        if matcher:
            matcher.accept(token)
            matcher = next_reply(matcher, token, tok)
        t3 = time.perf_counter()
        times.append((t3 - t0, time.process_time() - c0, g1 - g0 + t3 - g2))
    return times


def compile_and_match(tok, tools, choice, answer, steps, kept):
    """Table cells: compile ms (a cache miss), KB per compiled grammar, KB per row matcher 100
    tokens on, CPU ms of a new grammar's first token, CPU us per token after that."""
    grammars, rows, compile_ms, first = [], [], [], []
    kept.append((grammars, rows))  # nothing measured is freed (the cache evicts some)
    mb0 = heap_mb()
    for i in range(30):  # distinct schemas: every one a cache miss
        some_tools, some_answer = distinct(i, tools, answer)
        t0 = time.perf_counter()
        grammars.append(compile_grammar(tok, some_tools, choice, some_answer))
        compile_ms.append(1e3 * (time.perf_counter() - t0))
    mb1 = heap_mb()
    for grammar in grammars:  # llguidance builds a grammar's lexer states as they are met
        times, row = matcher_alone(tok, grammar, 100)
        first.append(times[0])
        rows.append(row)
    mb2 = heap_mb()
    alone = statistics.median(matcher_alone(tok, grammars[0], steps)[0])
    kb = [f"{1e3 * mb / len(grammars):.0f}" for mb in (mb1 - mb0, mb2 - mb1)]
    median_first = 1e3 * statistics.median(first)
    return [
        f"{statistics.median(compile_ms):.1f}",
        *kb,
        f"{median_first:.2f}",
        f"{1e6 * alone:.0f}",
    ]


def decode_cells(model, tok, grammar, steps):
    """Table cells: wall ms per token with no grammar, overlapped and inline; the same in CPU ms;
    the grammar's wall us per token on the main thread, overlapped and inline."""
    runs = {"none": [], "overlap": [], "inline": []}
    for chunk in range(4):  # alternate, so drift on a shared machine hits all alike
        for mode, run in runs.items():
            matcher = None if mode == "none" else Matcher(grammar, mode == "overlap")
            run += decode(model, tok, matcher, steps // 4, chunk)
    cells = []
    for k, scale in ((0, 1e3), (1, 1e3), (2, 1e6)):
        modes = list(runs) if k < 2 else ["overlap", "inline"]
        cells += [f"{scale * statistics.median(t[k] for t in runs[m]):.2f}" for m in modes]
    return cells


def main():
    args = parser.parse_args()
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, cores {os.cpu_count()}")
    compiled, decoded, kept = [], [], []
    for vocab in args.vocab:
        tok = tokenizer_for(vocab, args.tokenizer)
        t0, mb0 = time.perf_counter(), heap_mb()
        compile_grammar(tok, {}, "auto")  # builds llguidance's view of the vocabulary, once
        view = f"{time.perf_counter() - t0:.2f} s and {heap_mb() - mb0:.1f} MB"
        print(f"vocab {tok.vocab_size}: llguidance's view of the tokenizer took {view}")
        torch.manual_seed(0)
        config = GPTConfig.from_depth(args.depth, tok.vocab_size, sequence_len=256)
        model = build_model(config, args.device).eval()
        for name, (tools, choice, answer) in CASES.items():
            head = f"| {tok.vocab_size} | {name} | "
            cells = compile_and_match(tok, tools, choice, answer, args.steps, kept)
            compiled.append(head + " | ".join(cells) + " |")
            grammar = compile_grammar(tok, tools, choice, answer)
            decoded.append(head + " | ".join(decode_cells(model, tok, grammar, args.steps)) + " |")
    print("\nCompile, memory and the matcher alone (CPU)\n")
    print(
        "| vocab | grammar | compile ms | KB per grammar | KB per row | first token ms "
        "| CPU us/token |\n" + "|---" * 7 + "|"
    )
    print("\n".join(compiled))
    print(f"\nDecode, one row, a random depth-{args.depth} model on {args.device}\n")
    print(
        "| vocab | grammar | wall ms/token: none | overlap | inline | CPU ms/token: none | overlap "
        "| inline | main thread us/token: overlap | inline |\n" + "|---" * 10 + "|"
    )
    print("\n".join(decoded))


if __name__ == "__main__":
    main()
