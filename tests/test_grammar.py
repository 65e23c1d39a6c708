"""nanocode.grammar: whatever the logits, a reply sampled under the grammar's mask is in our format,
its tool calls parse and match their schema, and a JSON answer matches its schema. A tiny real
tokenizer and random logits stand in for the model (validity must not depend on the weights); then
the same through the engine (a grammar per row, tool outputs included) and the OpenAI request
fields that choose a grammar."""

import json
import re
import time
from operator import ge, gt, le

import pytest
import torch

from nanocode.engine import Engine
from nanocode.grammar import (
    Matcher,
    apply_bitmask,
    check_schema,
    compile_grammar,
    openai_grammar,
)
from nanocode.tokenizer import N_SPECIAL, SPECIAL_TOKENS
from nanocode.tools import TOOLS
from tests.helpers import corpus_text, nudged_model, real_tokenizer, trained_tokenizer

try:
    from jsonschema import validate
except ImportError:  # the hand check below covers the keywords nanocode.grammar supports
    validate = None

END, CALL, CALL_END, OUT, OUT_END = (
    SPECIAL_TOKENS.index(s)
    for s in (
        "<|assistant_end|>",
        "<|tool_start|>",
        "<|tool_end|>",
        "<|output_start|>",
        "<|output_end|>",
    )
)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "a city"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city"],
    "additionalProperties": False,
}
EVERY_KEYWORD = {
    "title": "every supported keyword",
    "type": "object",
    "properties": {
        "price": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1000},
        "urgent": {"type": "boolean"},
        "ids": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
        "code": {"type": "string", "minLength": 2, "maxLength": 5},
        "word": {"type": "string", "pattern": "^[a-z]+$"},
        "kind": {"const": "order"},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        "owner": {"$ref": "#/$defs/person"},
    },
    "required": ["price", "urgent", "ids", "kind", "owner"],
    "additionalProperties": False,
    "$defs": {
        "person": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": ["integer", "null"]}},
            "required": ["name", "age"],
            "additionalProperties": False,
        }
    },
}
OURS = {name: schema["parameters"] for name, schema in TOOLS.items()}
CLIENT_TOOLS = {"get_weather": WEATHER, "place_order": EVERY_KEYWORD, "ping": None}


@pytest.fixture(scope="module")
def tok():
    texts = [corpus_text("tools"), json.dumps([WEATHER, EVERY_KEYWORD] * 20)]
    return trained_tokenizer(texts, vocab_size=400)


def sample(tok, grammar, seed, stop_at_call=False, max_steps=3000, overlap=True):
    """One reply drawn at temperature 1 from random logits under the mask, as the engine would: each
    call is answered with a forced tool output (or ends the reply: the server's client tools)."""
    gen = torch.Generator().manual_seed(seed)
    # Random logits, a little in favour of the tokens that close things, so replies end soon.
    bias = torch.zeros(tok.vocab_size)
    bias[[END, CALL] + [i for i, b in enumerate(tok.id_bytes) if b in (b'"', b"}", b"]")]] = 3.0
    matcher, ids = Matcher(grammar, overlap), []
    for _ in range(max_steps):
        logits = torch.randn(tok.vocab_size, generator=gen) + bias
        apply_bitmask(logits, matcher.bitmask())
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        matcher.accept(token)
        ids.append(token)
        if token == END or (token == CALL_END and stop_at_call):
            break
        if token == CALL_END:
            forced = [OUT] + tok.encode(f"ran call {seed}\n<|bos|> is text here") + [OUT_END]
            matcher.accept(*forced)
            ids.extend(forced)
    assert ids[-1] in (END, CALL_END), f"no end after {max_steps} tokens: {tok.decode(ids)!r}"
    assert matcher.done == (ids[-1] == END)
    return ids


def parts_of(tok, ids):
    """[(kind, text)]: "text", "call" and "output" parts of a reply, in order."""
    opens, closes = {CALL: "call", OUT: "output"}, {CALL_END, OUT_END}
    parts, kind, held = [], "text", []
    for t in ids + [END]:
        if t in opens or t in closes or t == END:
            if held or kind != "text":
                parts.append((kind, tok.decode(held)))
            kind, held = opens.get(t, "text"), []
            if t == END:
                break
        else:
            assert t >= N_SPECIAL, f"special token {SPECIAL_TOKENS[t]} in {tok.decode(ids)!r}"
            held.append(t)
    return parts


def check(instance, schema):
    if validate is not None:
        validate(instance, schema)
    hand_check(instance, schema, schema)  # always, so that the hand check is itself checked


def hand_check(value, schema, root):
    """The keywords of nanocode.grammar.SUPPORTED, checked by hand (when jsonschema is missing)."""
    if "$ref" in schema:
        return hand_check(value, root["$defs"][schema["$ref"].split("/")[-1]], root)
    if "anyOf" in schema:
        errors = []
        for sub in schema["anyOf"]:
            try:
                return hand_check(value, sub, root)
            except AssertionError as e:
                errors.append(e)
        raise AssertionError(f"{value!r} matches no anyOf: {errors}")
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    types.update(integer=int, number=(int, float))
    wanted = schema.get("type", [])
    wanted = [wanted] if isinstance(wanted, str) else wanted
    assert not wanted or any(
        isinstance(value, types[t]) and not (t in ("integer", "number") and value is True)
        for t in wanted
    ), f"{value!r} is not {wanted}"
    assert "enum" not in schema or value in schema["enum"]
    assert "const" not in schema or value == schema["const"]
    for key, holds in {"minimum": ge, "maximum": le, "exclusiveMinimum": gt}.items():
        assert key not in schema or holds(value, schema[key]), f"{value!r} breaks {key}"
    assert "exclusiveMaximum" not in schema or value < schema["exclusiveMaximum"]
    for key, holds in {"minLength": ge, "maxLength": le, "minItems": ge, "maxItems": le}.items():
        assert key not in schema or holds(len(value), schema[key]), f"{value!r} breaks {key}"
    assert "pattern" not in schema or re.search(schema["pattern"], value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        assert set(schema.get("required", [])) <= set(value), f"{value!r} misses required keys"
        for key, item in value.items():
            sub = props.get(key, schema.get("additionalProperties", True))
            assert sub is not False, f"{key!r} is not allowed"
            hand_check(item, {} if sub is True else sub, root)
    if isinstance(value, list):
        for item in value:
            hand_check(item, schema.get("items", {}), root)


def check_calls(parts, tools):
    calls = [text for kind, text in parts if kind == "call"]
    for text in calls:
        call = json.loads(text)
        outside_strings = re.sub(r'"(\\.|[^"\\])*"', '""', text)
        spaces = re.sub(r", |: ", "", outside_strings)
        assert not re.search(r"\s", spaces), f"json.dumps's separators only: {text!r}"
        assert set(call) == {"name", "arguments"} and call["name"] in tools
        params = tools[call["name"]]
        check(
            call["arguments"],
            {"type": "object", "additionalProperties": False} if params is None else params,
        )
    return calls


@pytest.mark.parametrize(
    "tools, draws",
    [({"get_weather": WEATHER}, 50), (CLIENT_TOOLS, 30), (OURS, 20)],
    ids=["named", "client-tools", "our-tools"],
)
def test_required_replies_open_with_a_valid_call(tok, tools, draws):
    grammar = compile_grammar(tok, tools, "required")
    names = set()
    for seed in range(draws):
        parts = parts_of(tok, sample(tok, grammar, seed, seed % 2 == 0, overlap=seed % 3 > 0))
        assert parts[0][0] == "call", parts
        names.update(json.loads(t)["name"] for t in check_calls(parts, tools))
    assert names == set(tools), "every tool is reachable"


def test_done_waits_for_the_mask_being_computed(tok, monkeypatch):
    """With overlap, accept() starts the next mask on a thread, which holds the matcher: reading
    `done` meanwhile raised "Already mutably borrowed" (seen once in CI). It must wait instead."""
    finished, compute = [], Matcher._compute

    def slow_compute(self):
        time.sleep(0.2)
        bits = compute(self)
        finished.append(True)
        return bits

    monkeypatch.setattr(Matcher, "_compute", slow_compute)
    matcher = Matcher(compile_grammar(tok, {"get_weather": WEATHER}, "required"), overlap=True)
    matcher.accept(CALL)  # waits for the first mask, then starts the next one
    assert len(finished) == 1
    assert not matcher.done
    assert len(finished) == 2, "done read the matcher while its next mask was being computed"


def test_auto_text_and_calls_that_match(tok):
    grammar = compile_grammar(tok, CLIENT_TOOLS, "auto")
    texts = calls = 0
    for seed in range(30):
        parts = parts_of(tok, sample(tok, grammar, seed))
        calls += len(check_calls(parts, CLIENT_TOOLS))
        texts += sum(kind == "text" for kind, _ in parts)
    assert calls and texts, (calls, texts)


def test_no_tools_means_text_only(tok):
    grammar = compile_grammar(tok, {}, "auto")
    for seed in range(20):
        parts = parts_of(tok, sample(tok, grammar, seed))
        assert [kind for kind, _ in parts] in ([], ["text"])


@pytest.mark.parametrize(
    "schema",
    [{"type": "object"}, EVERY_KEYWORD, {"type": "array", "items": WEATHER, "maxItems": 3}],
    ids=["json_object", "every-keyword", "array-of-objects"],
)
def test_answer_parses_and_matches(tok, schema):
    grammar = compile_grammar(tok, {}, "auto", answer_schema=schema)
    for seed in range(25):
        parts = parts_of(tok, sample(tok, grammar, seed))
        assert [kind for kind, _ in parts] == ["text"], parts
        check(json.loads(parts[0][1]), schema)


def test_answer_after_calls(tok):
    """Tools and a response schema: calls (with their outputs) first, then the JSON answer."""
    grammar = compile_grammar(tok, {"get_weather": WEATHER}, "auto", answer_schema=WEATHER)
    called = 0
    for seed in range(15):
        parts = parts_of(tok, sample(tok, grammar, seed))
        called += len(check_calls(parts, {"get_weather": WEATHER}))
        kinds = [kind for kind, _ in parts]
        assert kinds == ["call", "output"] * (len(kinds) // 2) + ["text"], kinds
        check(json.loads(parts[-1][1]), WEATHER)
    assert called


@pytest.mark.parametrize("overlap", [True, False])
def test_forced_tokens(tok, overlap):
    """The engine's forced tokens (a named call's opening, a tool's output) are taken like sampled
    ones; a token the grammar forbids is refused, naming the tokens."""
    matcher = Matcher(compile_grammar(tok, {"get_weather": WEATHER}, "required"), overlap)
    opening = tok.encode('{"name": "get_weather", "arguments":')
    for t in [CALL] + opening:
        matcher.accept(t)
    matcher.accept(*tok.encode(' {"city": "Paris", "days": 3}}'), CALL_END)
    matcher.accept(OUT, *tok.encode("sunny <|tool_start|> 20 C"), OUT_END)
    assert not matcher.done
    matcher.accept(*tok.encode("Sunny."), END)
    assert matcher.done
    matcher = Matcher(compile_grammar(tok, {"get_weather": WEATHER}, "required"))
    with pytest.raises(ValueError, match=r"tokens \[\d+\] break the grammar"):
        matcher.accept(tok.encode("Hi")[0])  # required: no text before the call
    matcher = Matcher(compile_grammar(tok, {"get_weather": WEATHER}, "required"))
    with pytest.raises(ValueError, match="break the grammar"):
        matcher.accept(CALL, *tok.encode('{"name": "get_weather", "arguments": {"town"'))


@pytest.mark.parametrize("overlap", [True, False])
def test_mask_allows_exactly_what_may_follow(tok, overlap):
    matcher = Matcher(compile_grammar(tok, {"get_weather": WEATHER}, "required"), overlap)
    logits = torch.zeros(tok.vocab_size)
    apply_bitmask(logits, matcher.bitmask())
    assert (logits == 0).nonzero().flatten().tolist() == [CALL]
    matcher.accept(CALL, *tok.encode('{"name": "get_weather", "arguments": {"city": "X"}}'))
    logits = torch.zeros(2, tok.vocab_size + 40)  # rows of a batch; a model vocab past the mask's
    apply_bitmask(logits, torch.stack([matcher.bitmask()] * 2))
    assert [row.nonzero().flatten().tolist() for row in (logits == 0)] == [[CALL_END]] * 2


def test_rows_are_independent_and_grammars_cached(tok):
    grammar = compile_grammar(tok, {"get_weather": dict(WEATHER)}, "required")
    assert compile_grammar(tok, {"get_weather": json.loads(json.dumps(WEATHER))}, "required") is (
        grammar
    )
    assert compile_grammar(tok, {"get_weather": WEATHER}, "auto") is not grammar
    a, b = Matcher(grammar), Matcher(grammar)
    a.accept(CALL)
    assert not torch.equal(a.bitmask(), b.bitmask())
    b.accept(CALL)
    assert torch.equal(a.bitmask(), b.bitmask())


@pytest.mark.parametrize(
    "schema, keyword, where",
    [
        ({"oneOf": [{"type": "string"}]}, "oneOf", "schema"),
        ({"type": "string", "format": "email"}, "format", "schema"),
        ({"properties": {"a": {"type": "array", "uniqueItems": True}}}, "uniqueItems", "a"),
        ({"items": {"not": {"type": "null"}}}, "not", "schema.items"),
        ({"anyOf": [{"if": {}}]}, "if", "anyOf[0]"),
        ({"patternProperties": {"^x": {}}}, "patternProperties", "schema"),
        ({"type": "object", "x-guidance": {"lenient": True}}, "x-guidance", "schema"),
    ],
)
def test_unsupported_keywords_are_named(schema, keyword, where):
    with pytest.raises(
        ValueError, match=f"unsupported JSON Schema keyword {keyword!r} in .*{re.escape(where)}"
    ):
        check_schema(schema)


def test_bad_requests_are_refused(tok):
    with pytest.raises(ValueError, match="keyword 'format' in the parameters of 'f'"):
        compile_grammar(tok, {"f": {"type": "string", "format": "date"}}, "auto")
    with pytest.raises(ValueError, match="response schema must be a JSON Schema object"):
        compile_grammar(tok, {}, "auto", answer_schema=[])
    with pytest.raises(ValueError, match="tool_choice must be one of"):
        compile_grammar(tok, {"get_weather": WEATHER}, "any")
    with pytest.raises(ValueError, match='"required" needs at least one tool'):
        compile_grammar(tok, {}, "required")
    with pytest.raises(ValueError, match="could not be compiled"):
        compile_grammar(tok, {"f": {"$ref": "#/$defs/missing"}}, "auto")
    with pytest.raises(ValueError, match=r"schema.properties.a must be a JSON Schema object"):
        check_schema({"properties": {"a": "string"}})


@pytest.mark.parametrize(
    "value",
    [
        {"city": 3},
        {"unit": "celsius"},
        {"city": "x", "wind": 1},
        {"city": "x", "unit": "kelvin"},
        {"city": "x", "days": 0},
        {"city": "x", "days": True},
    ],
)
def test_hand_check_refuses(value):
    with pytest.raises(AssertionError):
        hand_check(value, WEATHER, WEATHER)


def test_hand_check_refuses_every_keyword():
    good = {"price": 1.5, "urgent": False, "ids": [1], "kind": "order"}
    good["owner"] = {"name": "a", "age": None}
    hand_check(good, EVERY_KEYWORD, EVERY_KEYWORD)
    for key, bad in [
        ("price", 0),
        ("price", 1000),
        ("ids", []),
        ("ids", [1, 2, 3, 4]),
        ("code", "x"),
        ("code", "toolong"),
        ("word", "Abc"),
        ("kind", "other"),
        ("note", 3),
        ("counts", {"a": "b"}),
        ("owner", {"name": "a", "age": "3"}),
    ]:
        with pytest.raises(AssertionError):
            hand_check({**good, key: bad}, EVERY_KEYWORD, EVERY_KEYWORD)


def test_a_grammar_per_row_with_tool_outputs_and_its_end(tmp_path):
    """chat_batch(grammar=...): each row decodes under its own matcher, which is told the tool
    outputs (text that spells a special token included); a row whose grammar is complete ends
    there (finish_reason stop, no <|assistant_end|> sampled), the others at max_tokens."""
    tok = real_tokenizer()
    engine = Engine(nudged_model(2, tok.vocab_size, 256), tok)  # flat enough to vary by row
    units = {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}}
    units.update(required=["unit"], additionalProperties=False)
    grammar = compile_grammar(tok, {"weather": units}, "required", answer_schema={"enum": [1, 2]})
    ask = {"messages": [{"role": "user", "content": "weather?"}]}
    results = engine.chat_batch(
        [ask] * 6,
        approve=lambda name, arguments: True,
        workdirs=[tmp_path] * 6,
        tool_runner=lambda name, arguments, workdir: "sunny <|tool_end|>",
        tools={"weather": {}},
        grammar=grammar,
        temperature=1.0,
        max_tokens=80,
    )
    assert len({str(r["message"]) for r in results}) > 1
    assert "stop" in {r["finish_reason"] for r in results}
    for r in results:
        parts = r["message"]["content"]
        calls, outputs = parts[0 : len(parts) - 1 : 2], parts[1 : len(parts) - 1 : 2]
        assert calls and all(c["type"] == "tool_call" and c["name"] == "weather" for c in calls)
        assert all(c["arguments"]["unit"] in ("celsius", "fahrenheit") for c in calls)
        assert all(o == {"type": "tool_output", "text": "sunny <|tool_end|>"} for o in outputs)
        if r["finish_reason"] == "stop":
            assert parts[-1]["text"] in ("1", "2") and r["ids"][-1] != engine.assistant_end
        else:
            assert r["usage"]["completion_tokens"] == 80


def test_openai_requests_map_to_grammars():
    """tool_choice and response_format of the OpenAI protocol, as compile_grammar's arguments: every
    value honoured, or refused naming it."""
    both, ours = {"get_weather": WEATHER, "ping": None}, {"bash": OURS["bash"]}
    ping = {"type": "function", "function": {"name": "ping"}}
    allowed = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [ping]}}
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "w", "strict": True, "schema": WEATHER},
    }
    obj = {"type": "json_object"}
    for request, tools, expected in [
        ({}, None, None),  # no tools, no format: free decoding (our tools' calls as trained)
        ({"tool_choice": "auto", "response_format": {"type": "text"}}, None, None),
        ({}, both, (both, "auto", None)),
        ({"tool_choice": "none"}, both, ({}, "auto", None)),
        ({"tool_choice": "none"}, None, ({}, "auto", None)),
        ({"tool_choice": "required"}, both, (both, "required", None)),
        ({"tool_choice": "required"}, None, (ours, "required", None)),  # (--allow-tools)
        ({"tool_choice": ping}, both, ({"ping": None}, "required", None)),
        ({"tool_choice": allowed}, both, ({"ping": None}, "required", None)),
        ({"response_format": obj}, None, (ours, "auto", {"type": "object"})),
        ({"response_format": schema, "tool_choice": None}, both, (both, "auto", WEATHER)),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, {}, ({}, "auto", {})),
    ]:
        assert openai_grammar(request, tools, ours) == expected, request
    for request, message in [
        ({"tool_choice": "any"}, "'tool_choice' must be 'auto', 'none', 'required', {type:"),
        ({"tool_choice": {"type": "custom", "custom": {"name": "x"}}}, "got {'type': 'custom'"),
        ({"tool_choice": {"type": "function", "function": "ping"}}, "'tool_choice' must be"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "names 'nope'"),
        ({"response_format": {"type": "xml"}}, "type must be text, json_object or json_schema"),
        ({"response_format": {"type": "json_schema"}}, "expected {name, schema, strict}"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            openai_grammar(request, both, ours)


def test_bench_times_masking_row_by_row_and_at_once():
    """bench/grammar.py's first table, on a vocabulary that is no multiple of 32."""
    from bench.grammar import apply_ms

    times = apply_ms(100, 3, "cpu")
    assert len(times) == 2 and all(t > 0 for t in times)
