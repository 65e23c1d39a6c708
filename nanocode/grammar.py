"""Grammar-constrained decoding: tool calls that parse and match their tool's JSON Schema, and
replies that parse and match a response schema, enforced by a mask on the logits before sampling.

    grammar = compile_grammar(tokenizer, {"get_weather": params}, "required")   # cached
    matchers = [Matcher(grammar) for _ in rows]   # one per row; first masks computed at once
    ...   # the model computes the next logits meanwhile
    apply_bitmask(logits, torch.stack([m.bitmask() for m in matchers]))  # -inf where forbidden
    matchers[k].accept(token)             # every token row k takes, sampled or forced

llguidance (github.com/guidance-ai/llguidance) does the work: it compiles a Lark grammar with JSON
Schemas inside it (`%json {...}`) and, for each next token, computes which tokens of our vocabulary
can continue it: a bitmask, one bit per token id. It reads our special tokens by name from the
tiktoken Encoding, so `<|tool_start|>` in a grammar is that one token and never the 14 characters
"<|tool_start|>" a text could spell. The grammar covers the reply only (what the model writes after
<|assistant_start|>); a row's matcher sees its reply's tokens and nothing of the prompt:

    auto:      start: TEXT? (call output TEXT?)*     text, and calls that must match
    required:  start: (call output TEXT?)+           a call first (a named function: one tool)
    call:      <|tool_start|> {"name": NAME, "arguments": {...}} <|tool_end|>
    output:    <|output_start|> TEXT? <|output_end|>       the tool's output, forced by the engine

With an answer schema (response_format), the JSON answer replaces the free text: `(call output)*
answer` in auto, `answer` alone with no tools. <|assistant_end|> (the tokenizer's end of reply for
llguidance) is allowed only where the grammar may end; every other special token is forbidden. JSON
is written as json.dumps writes it (", " and ": ", no other whitespace): the format our tool calls
are trained on, and a random walk cannot spend its tokens on spaces. openai_grammar maps an OpenAI
request's tool_choice and response_format to compile_grammar's arguments (scripts/code_web.py);
OUR_TOOLS is our five tools' argument schemas (the CLI's and agent eval's --constrained).

Overlap: accept() consumes the token (~0.5 us, on the caller's thread) and hands the next mask to a
thread pool; llguidance releases the GIL while it computes, so the mask is computed while the model
computes the logits it will mask, and bitmask() waits for it (normally done by then). That is for a
GPU, whose host has idle cores meanwhile; on a CPU the handoff (~20 us) costs more than the mask
(~8 us) and the thread takes a core from the model, so pass overlap=False there (the mask is then
computed in bitmask()). Never overlapped: accept, apply_bitmask (unpacking 32 bits per int32 and a
masked_fill, on the logits' device: most of the cost on a CPU, ~20 us at vocab 4096, ~55 us at
32768) and compiling a schema the cache has not seen (milliseconds, once). bench/grammar.py measures
all of it.
"""

import functools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import torch
from llguidance.tiktoken import lltokenizer_from_encoding

from nanocode.tools import TOOLS

# JSON Schema keywords we pass to llguidance and test (tests/test_grammar.py); any other keyword is
# refused by name rather than silently ignored (llguidance ignores keywords it does not know).
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$comment"}
CONSTRAINTS = set(
    "type enum const required minimum maximum exclusiveMinimum exclusiveMaximum minLength maxLength"
    " pattern minItems maxItems $ref".split()
)
ONE_SCHEMA = {"items", "additionalProperties"}  # keywords whose value is a schema (or a bool)
SCHEMA_LIST = {"anyOf"}
SCHEMA_MAP = {"properties", "$defs"}
SUPPORTED = ANNOTATIONS | CONSTRAINTS | ONE_SCHEMA | SCHEMA_LIST | SCHEMA_MAP

# json.dumps's separators, and no other whitespace (llguidance's JSON options, set per schema).
JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
OUR_TOOLS = {name: schema["parameters"] for name, schema in TOOLS.items()}  # (--constrained)
TOOL_CHOICES = ("auto", "required")
TEXT_RULE = "TEXT: /(.|\\n)+/\n"  # any text: specials are tokens, never bytes, so it holds none

_POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="grammar")


def check_schema(schema, path: str = "schema") -> None:
    """Raise ValueError naming the first keyword we do not support (with where it is), or a part of
    the schema that is not a schema at all."""
    if isinstance(schema, bool):  # true: anything, false: nothing
        return
    if not isinstance(schema, dict):
        raise ValueError(f"{path} must be a JSON Schema object, got {type(schema).__name__}")
    for key, value in schema.items():
        if key not in SUPPORTED:
            raise ValueError(
                f"unsupported JSON Schema keyword {key!r} in {path}; "
                f"supported: {', '.join(sorted(SUPPORTED))}"
            )
        if key in ONE_SCHEMA:
            check_schema(value, f"{path}.{key}")
        elif key in SCHEMA_LIST:
            if not isinstance(value, list):
                raise ValueError(f"{path}.{key} must be a list of schemas")
            for i, sub in enumerate(value):
                check_schema(sub, f"{path}.{key}[{i}]")
        elif key in SCHEMA_MAP:
            if not isinstance(value, dict):
                raise ValueError(f"{path}.{key} must be an object of schemas")
            for name, sub in value.items():
                check_schema(sub, f"{path}.{key}.{name}")


@dataclass(frozen=True)
class Grammar:
    lark: str  # the grammar, as llguidance reads it
    start: llguidance.LLMatcher  # a matcher in the start state: each row gets a copy
    vocab_size: int


def compile_grammar(
    tokenizer, tools: dict, tool_choice: str = "auto", answer_schema: dict | None = None
) -> Grammar:
    """The grammar of a reply (cached per tokenizer and arguments).
    tools: {name: JSON Schema of its arguments, or None for none}: the only tools a call may name
    ({} with "auto": no calls at all).
    tool_choice: "auto" (text, and calls that match) or "required" (the reply opens with a call; a
    named function is "required" with that one tool).
    answer_schema: the reply's own text must be JSON that matches it (response_format json_schema;
    json_object is {"type": "object"}).
    Raises ValueError naming an unsupported keyword (check_schema) or what llguidance refused."""
    if tool_choice not in TOOL_CHOICES:
        raise ValueError(f"tool_choice must be one of {TOOL_CHOICES}, got {tool_choice!r}")
    if tool_choice == "required" and not tools:
        raise ValueError('tool_choice "required" needs at least one tool')
    # The key keeps the schemas' property order: it is the order the JSON is written in.
    return _compile(tokenizer, json.dumps([tools, tool_choice, answer_schema]))


# The OpenAI protocol's tool_choice values and response_format types (json_schema: its "schema").
CHOICES = (
    "'auto', 'none', 'required', {type: 'function', function: {name}} or {type: 'allowed_tools', "
    "allowed_tools: {mode: 'auto'|'required', tools: [{type: 'function', function: {name}}]}}"
)
ANSWERS = {"text": None, "json_object": {"type": "object"}}


def openai_grammar(request: dict, tools: dict | None, ours: dict) -> tuple | None:
    """compile_grammar's (tools, tool_choice, answer_schema) for an OpenAI chat-completions request:
    its "tool_choice" and "response_format", with tools {name: parameters} (None: the request has
    no "tools", and its calls may name `ours`). None where nothing is constrained (no tools, auto,
    no response_format: the model writes our tools' calls as trained). Raises ValueError naming a
    value the protocol does not have or a tool that is not offered."""
    choice = request.get("tool_choice") or "auto"
    try:
        if isinstance(choice, str):
            mode, names = choice, None
        elif choice["type"] == "function":
            mode, names = "required", [choice["function"]["name"]]
        else:
            allowed = choice["allowed_tools"] if choice["type"] == "allowed_tools" else {}
            mode, names = allowed["mode"], [t["function"]["name"] for t in allowed["tools"]]
    except (KeyError, TypeError):
        mode = None
    if mode not in ("auto", "none", "required"):
        raise ValueError(f"'tool_choice' must be {CHOICES}, got {choice!r}")
    fmt = request.get("response_format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in (*ANSWERS, "json_schema"):
        raise ValueError(
            f"'response_format' type must be text, json_object or json_schema, got {fmt!r}"
        )
    answer = ANSWERS.get(kind)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError("'response_format' json_schema: expected {name, schema, strict}")
        answer = spec.get("schema", {})
    if tools is None and choice == "auto" and answer is None:
        return None
    callable_ = ours if tools is None else tools
    for name in names or []:
        if not isinstance(name, str) or name not in callable_:
            raise ValueError(f"'tool_choice' names {name!r}, which is not in 'tools'")
    if mode == "none":
        callable_, mode = {}, "auto"
    elif names is not None:
        callable_ = {name: callable_[name] for name in names}
    return callable_, mode, answer


@functools.lru_cache(maxsize=64)
def _compile(tokenizer, key: str) -> Grammar:
    """compile_grammar's work, cached by its arguments as one JSON string (dicts are not
    hashable): the Lark grammar of the module docstring, validated against the tokenizer."""
    tools, tool_choice, answer_schema = json.loads(key)
    rules = [TEXT_RULE]
    if tools:
        calls = " | ".join(_call(name, params) for name, params in tools.items())
        rules.append(f"call: <|tool_start|> ({calls}) <|tool_end|>\n")
        rules.append("output: <|output_start|> TEXT? <|output_end|>\n")
    # The reply's own words: free text, or else the JSON answer, which then comes last.
    text, answer = "TEXT?", ""
    if answer_schema is not None:
        text, answer = "", "answer"
        rules.append(f"answer: {_json_schema(answer_schema, 'the response schema')}\n")
    start = [text if tool_choice == "auto" else ""]
    if tools:
        start.append(f"(call output {text})" + ("+" if tool_choice == "required" else "*"))
    lark = "start: " + " ".join(start + [answer]) + "\n" + "".join(rules)
    llt = _lltokenizer(tokenizer)
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    if error := llguidance.LLMatcher.validate_grammar(grammar, llt):
        raise ValueError(f"the grammar could not be compiled: {error}")
    return Grammar(lark, llguidance.LLMatcher(llt, grammar), tokenizer.vocab_size)


def _call(name: str, params) -> str:
    """One tool's call as Lark: its opening as a literal, so that the arguments' schema stays the
    root of its own %json (a "$ref": "#/$defs/..." in it then resolves as the client meant)."""
    opening = json.dumps({"name": name, "arguments": 0})[:-2]  # '{"name": NAME, "arguments": '
    params = NO_ARGUMENTS if params is None else params
    return f"{json.dumps(opening)} {_json_schema(params, f'the parameters of {name!r}')} " + '"}"'


def _json_schema(schema, what: str) -> str:
    """A checked JSON Schema as a Lark `%json` item, written as json.dumps writes JSON."""
    if not isinstance(schema, dict):
        raise ValueError(f"{what} must be a JSON Schema object, got {type(schema).__name__}")
    check_schema(schema, what)
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE})


@functools.lru_cache(maxsize=4)
def _lltokenizer(tokenizer):
    """llguidance's view of our vocabulary (0.4 s for 32768 tokens, so once per tokenizer)."""
    return lltokenizer_from_encoding(
        tokenizer.encoding,
        n_vocab=tokenizer.vocab_size,
        eos_token=tokenizer.special_id("<|assistant_end|>"),
    )


class Matcher:
    """One row's place in a grammar. bitmask() is the mask for the row's next token; accept(*tokens)
    moves past tokens the row took (sampled or forced) and raises ValueError if the grammar forbids
    them; done is True once nothing but <|assistant_end|> can follow (or it was taken).
    overlap: compute the next mask on a thread as soon as a token is accepted (for a GPU); False
    computes it in bitmask(), on the caller's thread (for a CPU; see the module docstring)."""

    def __init__(self, grammar: Grammar, overlap: bool = True):
        self.matcher = grammar.start.deep_copy()  # ~25 us: the compiled grammar is shared
        self.words = (grammar.vocab_size + 31) // 32  # int32 words of a bitmask
        self.overlap = overlap
        self._start()

    def _start(self):
        self.pending = _POOL.submit(self._compute) if self.overlap else None

    def _compute(self) -> torch.Tensor:
        bits = torch.empty(self.words, dtype=torch.int32)
        self.matcher.unsafe_compute_mask_ptr(bits.data_ptr(), 4 * self.words)  # drops the GIL
        return bits

    def bitmask(self) -> torch.Tensor:
        """(ceil(vocab / 32),) int32 on the CPU: bit j of word w allows token 32 * w + j."""
        return self._compute() if self.pending is None else self.pending.result()

    def _wait(self) -> None:
        """The mask computation holds the matcher (llguidance raises "Already mutably borrowed" at
        any other call meanwhile): let it finish."""
        if self.pending is not None:
            self.pending.result()

    def accept(self, *tokens: int) -> None:
        """Consume `tokens` in order, then start the next mask (on a thread with overlap). Raises
        ValueError with llguidance's error where the grammar forbids one."""
        self._wait()
        # One by one: consume_tokens([<|assistant_end|>]) fails once the grammar is complete, where
        # consume_token takes it (llguidance 1.9.1).
        if not all(self.matcher.consume_token(t) for t in tokens):
            error = self.matcher.get_error().partition("\n")[0]  # (then the parser's state)
            raise ValueError(f"tokens {list(tokens)} break the grammar: {error}")
        self._start()

    @property
    def done(self) -> bool:
        self._wait()
        return self.matcher.is_stopped()


_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set logits (..., V) to -inf, in place, wherever bitmask (..., ceil(V' / 32)) has a 0 bit (and
    past the mask's end, when the model's vocabulary V is larger than the tokenizer's V')."""
    bits = bitmask.to(logits.device, non_blocking=True)
    # a word with bit 31 set is negative, and >> shifts ones in from the left; & 1 reads bit j
    # all the same, so (w >> j) & 1 is right for every int32
    allowed = ((bits.unsqueeze(-1) >> _SHIFTS.to(logits.device)) & 1).bool().flatten(-2)
    vocab = logits.size(-1)
    if allowed.size(-1) < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.size(-1)))
    return logits.masked_fill_(~allowed[..., :vocab], float("-inf"))
