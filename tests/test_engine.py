"""Engine: KV-cache generation equals plain generation, batched equals one by one, sampling filters,
and the agent's tool loop (real output injected, denial, malformed calls, call cap, context
overflow), with a scripted fake model and with a tiny real checkpoint."""

import pytest
import torch

from nanocode.checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
from nanocode.engine import DENIED, Engine, sample_next
from nanocode.gpt import GPT, GPTConfig
from tests.helpers import ByteTokenizer, naive_generate, real_tokenizer, tiny_model
from tests.scripted_model import ScriptedModel, encode_with_specials


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


def scripted(tok, *turns, **kw):
    model = ScriptedModel(
        [encode_with_specials(tok, t) for t in turns],
        tok.vocab_size,
        tok.special_id("<|assistant_start|>"),
        tok.special_id("<|assistant_end|>"),
        **kw,
    )
    model.inputs = []  # record what the engine feeds, to check forced tokens
    forward = model.forward

    def recording_forward(idx, *a, **k):
        model.inputs.append(idx[0].tolist())
        return forward(idx, *a, **k)

    model.forward = recording_forward
    return model


@pytest.fixture(scope="module")
def real(tok):
    """The tiny model saved as a checkpoint and loaded back (the path code_cli and code_web
    take)."""
    model = tiny_model(tok.vocab_size)
    ckpt = checkpoint_dir("sft", "tiny-engine")
    save_checkpoint(ckpt, 1, model.state_dict(), None, {"model_config": model.config.to_dict()})
    state, _, meta = load_checkpoint(ckpt)
    with torch.device("meta"):
        loaded = GPT(GPTConfig.from_dict(meta["model_config"]))
    loaded.to_empty(device="cpu")
    loaded.init_rotary()
    loaded.load_state_dict(state)
    return loaded.eval()


def prompt(tok, text="def add(a, b):"):
    return [tok.bos_id, 1] + tok.encode(text) + [2, 3]


def cut_at_stop(ids):
    for i, t in enumerate(ids):
        if t in (0, 4):
            return ids[:i]
    return ids


def test_greedy_with_cache_equals_without(tok, real):
    ids = prompt(tok)
    reference = cut_at_stop(list(naive_generate(real, ids, 40)))
    got = Engine(real, tok).generate_batch(ids, max_tokens=40, temperature=0.0)[0]
    assert len(reference) > 5, "the random model stopped too early for a meaningful comparison"
    assert got == reference


def uncached_sampling(model, ids, max_tokens, temperature, top_k, top_p, seed):
    """The plain way: the whole sequence through the model for every token, the engine's sampler."""
    ids, out, gen = list(ids), [], [torch.Generator().manual_seed(seed)]
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[:, -1, :].float()
        t = sample_next(logits, gen, temperature, top_k, top_p).item()
        out.append(t)
        ids.append(t)
    return out


@pytest.mark.parametrize("top_k,top_p", [(20, None), (None, 0.9), (None, None)])
def test_sampling_with_cache_equals_without(tok, real, top_k, top_p):
    ids = prompt(tok, "x = ")
    reference = cut_at_stop(uncached_sampling(real, ids, 30, 0.9, top_k, top_p, seed=3))
    got = Engine(real, tok).generate_batch(
        ids, max_tokens=30, temperature=0.9, top_k=top_k, top_p=top_p, seed=3
    )[0]
    assert got == reference and len(got) > 3


def test_batched_equals_one_by_one(tok, real):
    engine, ids = Engine(real, tok), prompt(tok)
    batch = engine.generate_batch(
        ids, num_samples=3, max_tokens=25, temperature=1.0, top_p=0.9, seed=11
    )
    singles = [
        engine.generate_batch(
            ids, num_samples=1, max_tokens=25, temperature=1.0, top_p=0.9, seed=11 + i
        )[0]
        for i in range(3)
    ]
    assert batch == singles
    assert len({tuple(b) for b in batch}) > 1, "samples with different seeds should differ"
    greedy = engine.generate_batch(ids, num_samples=2, max_tokens=25, temperature=0.0)
    assert greedy[0] == greedy[1] == engine.generate_batch(ids, max_tokens=25, temperature=0.0)[0]


def test_generate_streams_and_stops_at_context_end(tok, real):
    engine, ids = Engine(real, tok), prompt(tok)
    steps = list(engine.generate(ids, num_samples=2, max_tokens=1000, temperature=1.0, seed=0))
    assert all(len(s) == 2 for s in steps)
    stopped = all(any(t in (0, 4) for t in col) for col in zip(*steps))
    assert (
        stopped or len(ids) + len(steps) == real.config.sequence_len + 1
    )  # the last token needs no cache slot
    with pytest.raises(ValueError, match="temperature"):
        next(engine.generate(ids, temperature=-1))
    with pytest.raises(ValueError, match="no room"):
        next(engine.generate([0] * real.config.sequence_len))


def test_samples_share_one_prefill(tok, real):
    """generate's samples feed their prompt once (its keys and values are copied to every row);
    then every row decodes one token per step, in one batch."""
    fed = []

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.config = real, real.config

        def forward(self, idx, kv_cache=None):
            fed.append((list(kv_cache.rows), idx.size(1)))
            return self.model(idx, kv_cache=kv_cache)

    engine, ids = Engine(Recording(), tok), prompt(tok)
    list(engine.generate(ids, num_samples=3, max_tokens=4, temperature=1.0))
    assert fed == [([0], len(ids))] + [([0, 1, 2], 1)] * 3
    fed.clear()  # chat_batch: each row's prompt is its own (a scripted model may tell rows apart)
    same, other = [{"messages": [{"role": "user", "content": t}]} for t in ("hi", "a longer one")]
    engine.chat_batch([same, other, same], max_tokens=2, temperature=1.0)
    n0, n1 = (len(tok.render_for_completion(c)) for c in (same, other))
    assert fed == [([0], n0), ([1], n1), ([2], n0), ([0, 1, 2], 1)]


def test_a_constraint_masks_its_rows_logits(tok, real):
    """The hook for constrained decoding: a row's constraint gives the bitmask of the tokens it
    allows before each draw and is told every token drawn; the other rows sample freely."""

    class OnlyDigits:
        def __init__(self):
            self.told = []

        def bitmask(self):  # bit j of int32 word w allows token 32 * w + j
            allowed = torch.zeros(-(-tok.vocab_size // 32) * 32, dtype=torch.int64)
            allowed[tok.encode("0123456789")] = 1
            words = (allowed.view(-1, 32) << torch.arange(32)).sum(-1)
            return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

        def accept(self, token):
            self.told.append(token)

    class Constrained(Engine):
        def _row(self, ids, seed, **state):  # row 1 (seed 42 + 1) gets the constraint
            row = super()._row(ids, seed, **state)
            row.constraint = constraint if seed == 43 else None
            return row

    engine, constraint = Constrained(real, tok), OnlyDigits()
    out = engine.generate_batch(prompt(tok), num_samples=2, max_tokens=12, temperature=1.0)
    assert tok.decode(out[1]).isdigit() and len(out[1]) == 12 and constraint.told == out[1]
    assert not tok.decode(out[0]).isdigit()


def test_sample_next_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).repeat(2, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    assert sample_next(logits, gens, 0.0, None, None).tolist() == [0, 0]
    draws = torch.stack([sample_next(logits, gens, 1.0, 2, None) for _ in range(200)])
    assert set(draws.flatten().tolist()) == {0, 1}
    draws = torch.stack([sample_next(logits, gens, 1.0, None, 0.5) for _ in range(50)])
    assert set(draws.flatten().tolist()) == {0}  # p(0) = 0.64 > 0.5 already
    draws = torch.stack([sample_next(logits, gens, 1.0, None, None) for _ in range(400)])
    assert set(draws.flatten().tolist()) == {0, 1, 2, 3}


def test_scripted_generation_stops_at_assistant_end(tok):
    engine = Engine(scripted(tok, "hello<|assistant_end|>ignored"), tok)
    assert (
        engine.generate_batch(prompt(tok), num_samples=2, max_tokens=50)
        == [tok.encode("hello")] * 2
    )


def chat(engine, text, **kw):
    return list(engine.chat({"messages": [{"role": "user", "content": text}]}, **kw))


def test_tool_loop_runs_call_and_injects_real_output(tok, tmp_path):
    (tmp_path / "hello.txt").write_text("hi there\n")
    call = '{"name": "bash", "arguments": {"command": "cat hello.txt"}}'
    model = scripted(tok, f"Let me look.<|tool_start|>{call}<|tool_end|>It says hi.")
    asked = []
    events = chat(
        Engine(model, tok),
        "what is in hello.txt?",
        workdir=tmp_path,
        approve=lambda name, args: asked.append((name, args)) or True,
    )
    assert asked == [("bash", {"command": "cat hello.txt"})]
    assert [e["type"] for e in events if e["type"] != "text"] == [
        "tool_call",
        "tool_output",
        "done",
    ]
    assert "".join(e["text"] for e in events if e["type"] == "text") == "Let me look.It says hi."
    assert events[-1]["message"]["content"] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_call", "name": "bash", "arguments": {"command": "cat hello.txt"}},
        {"type": "tool_output", "text": "hi there\n"},
        {"type": "text", "text": "It says hi."},
    ]
    assert events[-1]["finish_reason"] == "stop"
    # <|tool_end|> and the real output between its delimiters were fed in one forward
    assert [6, 7] + tok.encode("hi there\n") + [8] in model.inputs


def test_denied_call_injects_denial(tok, tmp_path):
    call = '{"name": "write_file", "arguments": {"path": "x.txt", "content": "pwned"}}'
    model = scripted(tok, f"<|tool_start|>{call}<|tool_end|>ok")
    events = chat(Engine(model, tok), "write", workdir=tmp_path, approve=lambda name, args: False)
    outputs = [e["text"] for e in events if e["type"] == "tool_output"]
    assert outputs == [DENIED]
    assert not (tmp_path / "x.txt").exists()
    assert [6, 7] + tok.encode(DENIED) + [8] in model.inputs
    assert events[-1]["message"]["content"][-1] == {"type": "text", "text": "ok"}


@pytest.mark.parametrize(
    "raw,expect",
    [
        ('{"name": bash', "error: the tool call is not valid JSON"),
        ('{"name": "rm", "arguments": {}}', "error: unknown tool 'rm'"),
        (
            '{"name": "bash", "arguments": {"cmd": "ls"}}',
            "error: bash is missing required argument 'command'",
        ),
    ],
)
def test_malformed_call_gets_error_and_generation_continues(tok, tmp_path, raw, expect):
    model = scripted(tok, f"<|tool_start|>{raw}<|tool_end|>sorry")
    events = chat(
        Engine(model, tok), "go", workdir=tmp_path, approve=lambda n, a: pytest.fail("must not ask")
    )
    outputs = [e["text"] for e in events if e["type"] == "tool_output"]
    assert len(outputs) == 1 and outputs[0].startswith(expect)
    assert events[-1]["message"]["content"][-1] == {"type": "text", "text": "sorry"}


def test_tool_call_cap_and_disabled_tools(tok, tmp_path):
    call = '<|tool_start|>{"name": "bash", "arguments": {"command": "echo run"}}<|tool_end|>'
    events = chat(
        Engine(scripted(tok, call * 3 + "end"), tok),
        "go",
        workdir=tmp_path,
        approve=lambda n, a: True,
        max_tool_calls=2,
    )
    outputs = [e["text"] for e in events if e["type"] == "tool_output"]
    assert outputs[:2] == ["run\n", "run\n"] and outputs[2].startswith(
        "error: tool-call limit reached"
    )
    events = chat(
        Engine(scripted(tok, call + "end"), tok), "go", approve=lambda n, a: True
    )  # no workdir
    assert [e["text"] for e in events if e["type"] == "tool_output"] == [
        "error: tools are disabled here"
    ]


def test_max_tokens_gives_length(tok):
    events = chat(Engine(scripted(tok, "abcdefgh"), tok), "go", max_tokens=3)
    assert events[-1]["finish_reason"] == "length"
    assert events[-1]["message"]["content"] == [{"type": "text", "text": "abc"}]
    assert events[-1]["usage"]["completion_tokens"] == 3


def test_stop_strings_end_the_reply(tok):
    """The reply ends before a stop string (finish_reason stop); text that might start one is held
    back until it cannot, so no streamed delta ever shows part of a stop string."""
    events = chat(Engine(scripted(tok, "Hello world. Bye."), tok), "go", stop=["xyz", "wor"])
    deltas = [e["text"] for e in events if e["type"] == "text"]
    assert "".join(deltas) == "Hello " and not any("w" in d for d in deltas)
    assert events[-1]["finish_reason"] == "stop" and events[-1]["usage"]["completion_tokens"] == 9
    events = chat(Engine(scripted(tok, "Hello wo!"), tok), "go", stop=["world"])
    assert "".join(e["text"] for e in events if e["type"] == "text") == "Hello wo!"
    assert events[-1]["message"]["content"] == [{"type": "text", "text": "Hello wo!"}]


def test_utf8_split_across_tokens_is_held_back(tok):
    events = chat(Engine(scripted(tok, "é!"), tok), "go")
    deltas = [e["text"] for e in events if e["type"] == "text"]
    assert deltas == ["é", "!"]


def test_context_overflow_drops_oldest_turns(tok, tmp_path):
    call = '<|tool_start|>{"name": "bash", "arguments": {"command": "printf %0150d 0"}}<|tool_end|>'
    history = [
        {"role": "user", "content": "first question " * 5},
        {"role": "assistant", "content": "answer " * 5},
        {"role": "user", "content": "second"},
    ]
    model = scripted(tok, call + "done", sequence_len=128)
    engine = Engine(model, tok)
    events = list(engine.chat({"messages": history}, workdir=tmp_path, approve=lambda n, a: True))
    assert any(e["type"] == "notice" for e in events)
    assert events[-1]["finish_reason"] == "stop"
    assert events[-1]["message"]["content"][-1] == {"type": "text", "text": "done"}
    assert max(len(i) for i in model.inputs) <= 128

    # the real model too: a prompt longer than its context is cut, generation goes on
    real_model = tiny_model(tok.vocab_size, sequence_len=64)
    events = list(
        Engine(real_model, tok).chat({"messages": history}, max_tokens=80, temperature=0.0)
    )
    assert events[0]["type"] == "notice" and events[-1]["type"] == "done"


def test_chat_with_real_checkpoint(tok, real, tmp_path):
    kw = dict(workdir=tmp_path, approve=lambda n, a: True, max_tokens=30, temperature=0.0)
    done = chat(Engine(real, tok), "hello", **kw)[-1]
    assert done["type"] == "done" and done["usage"]["completion_tokens"] <= 30
    again = chat(Engine(real, tok), "hello", **kw)
    assert again[-1]["message"] == done["message"]  # greedy is deterministic


def test_tool_loop_with_real_tokenizer(tmp_path):
    tok = real_tokenizer()
    (tmp_path / "a.py").write_text("print('hi')\n")
    call = '{"name": "read_file", "arguments": {"path": "a.py"}}'
    model = scripted(tok, f"Reading.<|tool_start|>{call}<|tool_end|>It prints hi.")
    events = chat(
        Engine(model, tok), "what does a.py do?", workdir=tmp_path, approve=lambda n, a: True
    )
    assert events[-1]["message"]["content"] == [
        {"type": "text", "text": "Reading."},
        {"type": "tool_call", "name": "read_file", "arguments": {"path": "a.py"}},
        {"type": "tool_output", "text": "     1\tprint('hi')"},
        {"type": "text", "text": "It prints hi."},
    ]


# -------------------------------------------------------------------------------------------------
# the batched tool loop


class Steered(torch.nn.Module):
    """A real model whose rows are made to write given tokens at given sampled steps (tool calls at
    chosen moments); every other step samples from the real model (without tool or stop tokens
    before step `free_after`). plan(prompt ids) -> {step: token}."""

    def __init__(self, model, plan, free_after=120):
        super().__init__()
        self.model, self.plan, self.config, self.free_after = model, plan, model.config, free_after

    def forward(self, idx, kv_cache=None, **kw):
        logits = self.model(idx, kv_cache=kv_cache, **kw)
        states = kv_cache.__dict__.setdefault("steered", {})
        for b, r in enumerate(kv_cache.rows):
            if r not in states:  # the prompt's prefill
                states[r] = {"plan": self.plan(idx[b].tolist()), "step": 0}
            forced = states[r]["plan"].get(states[r]["step"])
            logits[b, -1, [5, 6, 7, 8]] = -30.0  # no calls but the planned ones
            if states[r]["step"] < self.free_after:
                logits[b, -1, [0, 4]] = -30.0  # and no stop before the plan is done
            if forced is not None:
                logits[b, -1] = -30.0
                logits[b, -1, forced] = 30.0
            states[r]["step"] += 1
        return logits


def call_tokens(tok, command):
    return encode_with_specials(
        tok,
        f'<|tool_start|>{{"name": "bash", "arguments": {{"command": "{command}"}}}}<|tool_end|>',
    )


def steered_engine(tok, real):
    """Rows 0..3 (prompt 'task k') call tools at different steps; row 2 never does."""
    starts = {0: [2], 1: [5, 80], 2: [], 3: [0]}

    def plan(prompt_ids):
        k = int(tok.decode(prompt_ids).split("task ")[1][0])
        steps = {}
        for s in starts[k]:
            steps.update(
                {s + j: t for j, t in enumerate(call_tokens(tok, f"echo {'x' * (3 + 5 * k)}"))}
            )
        return steps

    return Engine(Steered(real, plan), tok)


def fake_runner(name, args, workdir):
    return f"ran {args.get('command', '')!r}\n"


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_chat_batch_equals_one_by_one_with_tool_calls(tok, real, tmp_path, temperature):
    engine = steered_engine(tok, real)
    convs = [
        {"messages": [{"role": "user", "content": f"task {k}" + " pad" * k}]} for k in range(4)
    ]
    kw = dict(
        approve=lambda n, a: True,
        max_tokens=150,
        temperature=temperature,
        top_k=50,
        seed=5,
        tool_runner=fake_runner,
    )
    events = {i: [] for i in range(4)}
    batch = engine.chat_batch(
        convs, workdirs=[tmp_path] * 4, on_event=lambda i, e: events[i].append(e), **kw
    )
    for i, conv in enumerate(convs):
        single = engine.chat_batch([conv], workdirs=[tmp_path], **dict(kw, seed=5 + i))[0]
        assert batch[i]["ids"] == single["ids"] and batch[i]["mask"] == single["mask"], f"row {i}"
        assert batch[i]["message"] == single["message"] and batch[i]["usage"] == single["usage"]
        streamed = list(engine.chat(conv, workdir=tmp_path, **dict(kw, seed=5 + i)))
        assert streamed == events[i]
        assert streamed[-1]["message"] == batch[i]["message"]
    # the forced tool outputs went into rows 0, 1, 3 at different steps; row 2 never called
    first_forced = [r["mask"].index(0) if 0 in r["mask"] else None for r in batch]
    assert first_forced[2] is None and len({first_forced[0], first_forced[1], first_forced[3]}) == 3
    assert sum(p["type"] == "tool_call" for p in batch[1]["message"]["content"]) == 2
    for r in (
        batch
    ):  # ids: sampled (mask 1) and forced (mask 0); the forced spans are exactly the outputs
        forced = [t for t, m in zip(r["ids"], r["mask"]) if m == 0]
        outputs = [p["text"] for p in r["message"]["content"] if p["type"] == "tool_output"]
        assert forced == [t for o in outputs for t in [7] + tok.encode(o) + [8]]
        assert r["usage"]["completion_tokens"] == sum(r["mask"])


def test_chat_batch_greedy_equals_uncached_generation(tok, real):
    """Rows of different prompt lengths, each at its own positions, decode what the plain uncached
    model decodes (so the per-row rotary positions and masks are right, not only consistent)."""
    convs = [
        {"messages": [{"role": "user", "content": text}]}
        for text in ["a", "def add(a, b):", "x = 1\ny ="]
    ]
    results = Engine(real, tok).chat_batch(convs, max_tokens=30, temperature=0.0)
    for conv, r in zip(convs, results):
        reference = list(naive_generate(real, tok.render_for_completion(conv), 30))
        cut = r["ids"][:-1] if r["finish_reason"] == "stop" else r["ids"]
        assert cut == reference[: len(cut)] and (
            r["finish_reason"] == "length" or r["ids"][-1] == reference[len(cut)]
        )


def test_chat_batch_rows_overflow_and_finish_independently(tok, tmp_path):
    call = '<|tool_start|>{"name": "bash", "arguments": {"command": "printf %0150d 0"}}<|tool_end|>'
    scripts = {
        "long": encode_with_specials(tok, call + "done"),
        "short": encode_with_specials(tok, "hi"),
    }
    model = ScriptedModel(
        [],
        tok.vocab_size,
        3,
        4,
        sequence_len=128,
        pick=lambda ids: scripts["long" if "second" in tok.decode(ids) else "short"],
    )
    history = [
        {"role": "user", "content": "first question " * 5},
        {"role": "assistant", "content": "answer " * 5},
        {"role": "user", "content": "second"},
    ]
    convs = [{"messages": history}, {"messages": [{"role": "user", "content": "hello"}]}]
    events = []
    results = Engine(model, tok).chat_batch(
        convs,
        workdirs=[tmp_path, None],
        approve=[lambda n, a: True, None],
        on_event=lambda i, e: events.append((i, e["type"])),
    )
    assert (0, "notice") in events and (1, "notice") not in events
    assert results[0]["message"]["content"][-1] == {"type": "text", "text": "done"}
    assert results[1]["message"]["content"] == [{"type": "text", "text": "hi"}]
    assert [r["finish_reason"] for r in results] == ["stop", "stop"]
    assert events.index((1, "done")) < events.index((0, "done"))  # the short row finished first
    with pytest.raises(ValueError, match="2 conversations need 2"):
        Engine(model, tok).chat_batch(convs, workdirs=[tmp_path])


def test_reply_state_machine(tok):
    """Reply alone: text deltas, a call closed and answered, a malformed call kept as text."""
    from nanocode.engine import Reply

    reply = Reply(tok, 5, 6)
    events = [
        e
        for t in encode_with_specials(
            tok, 'hé<|tool_start|>{"name": "grep", "arguments": {"pattern": "x"}}<|tool_end|>'
        )
        for e in reply.feed(t)
    ]
    assert [e["text"] for e in events] == ["h", "é"]
    assert reply.closed == (
        {"type": "tool_call", "name": "grep", "arguments": {"pattern": "x"}},
        None,
    )
    assert (
        reply.tool_output("a.py:1:x") == {"type": "tool_output", "text": "a.py:1:x"}
        and reply.closed is None
    )
    for t in encode_with_specials(tok, "<|tool_start|>{bad<|tool_end|>"):
        reply.feed(t)
    part, err = reply.closed
    assert part is None and err.startswith("error: the tool call is not valid JSON")
    reply.tool_output(err)
    for t in encode_with_specials(tok, 'ok<|tool_start|>{"na'):
        reply.feed(t)
    assert reply.finish() == [{"type": "text", "text": '{"na'}]  # cut inside a call: kept as text
    assert reply.parts == [
        {"type": "text", "text": "hé"},
        {"type": "tool_call", "name": "grep", "arguments": {"pattern": "x"}},
        {"type": "tool_output", "text": "a.py:1:x"},
        {"type": "text", "text": "{bad"},
        {"type": "tool_output", "text": err},
        {"type": "text", "text": "ok"},
        {"type": "text", "text": '{"na'},
    ]


def test_a_slow_tool_stalls_only_its_own_row(tok, tmp_path):
    """Row 0's command waits until row 1 has finished its reply: the other rows sample on while a
    tool runs."""
    import threading

    call = '<|tool_start|>{"name": "bash", "arguments": {"command": "slow"}}<|tool_end|>'
    scripts = {
        "slow": encode_with_specials(tok, call + "after"),
        "fast": encode_with_specials(tok, "quick answer"),
    }
    model = ScriptedModel(
        [],
        tok.vocab_size,
        3,
        4,
        pick=lambda ids: scripts["slow" if "slow" in tok.decode(ids) else "fast"],
    )
    row1_done = threading.Event()

    def runner(name, args, workdir):
        return "row 1 was done first\n" if row1_done.wait(timeout=60) else "row 1 was not done\n"

    def on_event(i, e):
        if i == 1 and e["type"] == "done":
            row1_done.set()

    convs = [{"messages": [{"role": "user", "content": text}]} for text in ("slow", "fast")]
    results = Engine(model, tok).chat_batch(
        convs,
        approve=lambda n, a: True,
        workdirs=[tmp_path] * 2,
        tool_runner=runner,
        on_event=on_event,
    )
    assert results[0]["message"]["content"][-2:] == [
        {"type": "tool_output", "text": "row 1 was done first\n"},
        {"type": "text", "text": "after"},
    ]
    assert results[1]["message"]["content"] == [{"type": "text", "text": "quick answer"}]


def test_sample_next_draws_the_right_distribution():
    """The per-row exponential draw samples softmax(logits / T), with and without top-k (fixed
    seeds)."""
    logits = torch.log(torch.tensor([[0.6, 0.25, 0.1, 0.05]])).repeat(4, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    for top_k, want in ((None, [0.6, 0.25, 0.1, 0.05]), (2, [0.6 / 0.85, 0.25 / 0.85, 0.0, 0.0])):
        draws = torch.cat([sample_next(logits, gens, 1.0, top_k, None) for _ in range(1500)])
        freq = torch.bincount(draws, minlength=4).float() / draws.numel()
        assert torch.allclose(freq, torch.tensor(want), atol=0.02), (top_k, freq)
