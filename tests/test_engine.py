"""Engine: KV-cache generation equals plain generation, batched equals one by one, sampling filters,
and the agent's tool loop (real output injected, denial, malformed calls, call cap, context overflow),
with a scripted fake model and with a tiny real checkpoint."""
import pytest
import torch

from nanocode.checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
from nanocode.engine import DENIED, Engine, KVCache, ScriptedModel, encode_with_specials, sample_next
from nanocode.gpt import GPT, GPTConfig
from tests.helpers import ByteTokenizer, real_tokenizer, tiny_model


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


def scripted(tok, *turns, **kw):
    model = ScriptedModel([encode_with_specials(tok, t) for t in turns], tok.vocab_size,
                          tok.special_id("<|assistant_start|>"), tok.special_id("<|assistant_end|>"), **kw)
    model.inputs = []  # record what the engine feeds, to check forced tokens
    forward = model.forward

    def recording_forward(idx, *a, **k):
        model.inputs.append(idx[0].tolist())
        return forward(idx, *a, **k)
    model.forward = recording_forward
    return model


@pytest.fixture(scope="module")
def real(tok):
    """The tiny model saved as a checkpoint and loaded back (the path code_cli and code_web take)."""
    model = tiny_model(tok.vocab_size)
    ckpt = checkpoint_dir("sft", "tiny-engine")
    save_checkpoint(ckpt, 1, model.state_dict(), None, {"model_config": model.config.to_dict()})
    state, _, meta = load_checkpoint(ckpt)
    with torch.device("meta"):
        loaded = GPT(GPTConfig(**meta["model_config"]))
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


def test_kv_cache_protocol():
    cache = KVCache(batch_size=2, num_layers=2, max_len=5)
    k, v = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    k_all, v_all = cache.update(0, k, v)
    assert k_all.shape == (2, 3, 1, 4) and torch.equal(k_all, k) and torch.equal(v_all, v)
    cache.advance(3)
    k2 = torch.randn(2, 2, 1, 4)
    k_all, _ = cache.update(0, k2, k2)
    assert torch.equal(k_all, torch.cat([k, k2], dim=1))
    cache.advance(2)
    with pytest.raises(ValueError, match="KV cache overflow"):
        cache.update(0, k2[:, :1], k2[:, :1])


def test_greedy_with_cache_equals_without(tok, real):
    ids = prompt(tok)
    reference = cut_at_stop(list(real.generate(ids, max_tokens=40)))
    got = Engine(real, tok).generate_batch(ids, max_tokens=40, temperature=0.0)[0]
    assert len(reference) > 5, "the random model stopped too early for a meaningful comparison"
    assert got == reference


def test_sampling_with_cache_equals_without(tok, real):
    ids = prompt(tok, "x = ")
    reference = cut_at_stop(list(real.generate(ids, max_tokens=30, temperature=0.9, top_k=20, seed=3)))
    got = Engine(real, tok).generate_batch(ids, max_tokens=30, temperature=0.9, top_k=20, seed=3)[0]
    assert got == reference


def test_batched_equals_one_by_one(tok, real):
    engine, ids = Engine(real, tok), prompt(tok)
    batch = engine.generate_batch(ids, num_samples=3, max_tokens=25, temperature=1.0, top_p=0.9, seed=11)
    singles = [engine.generate_batch(ids, num_samples=1, max_tokens=25, temperature=1.0, top_p=0.9, seed=11 + i)[0]
               for i in range(3)]
    assert batch == singles
    assert len({tuple(b) for b in batch}) > 1, "samples with different seeds should differ"
    greedy = engine.generate_batch(ids, num_samples=2, max_tokens=25, temperature=0.0)
    assert greedy[0] == greedy[1] == engine.generate_batch(ids, max_tokens=25, temperature=0.0)[0]


def test_generate_streams_and_stops_at_context_end(tok, real):
    engine, ids = Engine(real, tok), prompt(tok)
    steps = list(engine.generate(ids, num_samples=2, max_tokens=1000, temperature=1.0, seed=0))
    assert all(len(s) == 2 for s in steps)
    stopped = all(any(t in (0, 4) for t in col) for col in zip(*steps))
    assert stopped or len(ids) + len(steps) == real.config.sequence_len + 1  # the last token needs no cache slot
    with pytest.raises(ValueError, match="temperature"):
        next(engine.generate(ids, temperature=-1))
    with pytest.raises(ValueError, match="no room"):
        next(engine.generate([0] * real.config.sequence_len))


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
    assert engine.generate_batch(prompt(tok), num_samples=2, max_tokens=50) == [tok.encode("hello")] * 2


def chat(engine, text, **kw):
    return list(engine.chat({"messages": [{"role": "user", "content": text}]}, **kw))


def test_tool_loop_runs_call_and_injects_real_output(tok, tmp_path):
    (tmp_path / "hello.txt").write_text("hi there\n")
    call = '{"name": "bash", "arguments": {"command": "cat hello.txt"}}'
    model = scripted(tok, f"Let me look.<|tool_start|>{call}<|tool_end|>It says hi.")
    asked = []
    events = chat(Engine(model, tok), "what is in hello.txt?", workdir=tmp_path,
                  approve=lambda name, args: asked.append((name, args)) or True)
    assert asked == [("bash", {"command": "cat hello.txt"})]
    assert [e["type"] for e in events if e["type"] != "text"] == ["tool_call", "tool_output", "done"]
    assert "".join(e["text"] for e in events if e["type"] == "text") == "Let me look.It says hi."
    assert events[-1]["message"]["content"] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_call", "name": "bash", "arguments": {"command": "cat hello.txt"}},
        {"type": "tool_output", "text": "hi there\n"},
        {"type": "text", "text": "It says hi."}]
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


@pytest.mark.parametrize("raw,expect", [
    ('{"name": bash', "error: the tool call is not valid JSON"),
    ('{"name": "rm", "arguments": {}}', "error: unknown tool 'rm'"),
    ('{"name": "bash", "arguments": {"cmd": "ls"}}', "error: bash is missing required argument 'command'"),
])
def test_malformed_call_gets_error_and_generation_continues(tok, tmp_path, raw, expect):
    model = scripted(tok, f"<|tool_start|>{raw}<|tool_end|>sorry")
    events = chat(Engine(model, tok), "go", workdir=tmp_path, approve=lambda n, a: pytest.fail("must not ask"))
    outputs = [e["text"] for e in events if e["type"] == "tool_output"]
    assert len(outputs) == 1 and outputs[0].startswith(expect)
    assert events[-1]["message"]["content"][-1] == {"type": "text", "text": "sorry"}


def test_tool_call_cap_and_disabled_tools(tok, tmp_path):
    call = '<|tool_start|>{"name": "bash", "arguments": {"command": "echo run"}}<|tool_end|>'
    events = chat(Engine(scripted(tok, call * 3 + "end"), tok), "go", workdir=tmp_path,
                  approve=lambda n, a: True, max_tool_calls=2)
    outputs = [e["text"] for e in events if e["type"] == "tool_output"]
    assert outputs[:2] == ["run\n", "run\n"] and outputs[2].startswith("error: tool-call limit reached")
    events = chat(Engine(scripted(tok, call + "end"), tok), "go", approve=lambda n, a: True)  # no workdir
    assert [e["text"] for e in events if e["type"] == "tool_output"] == ["error: tools are disabled here"]


def test_max_tokens_gives_length(tok):
    events = chat(Engine(scripted(tok, "abcdefgh"), tok), "go", max_tokens=3)
    assert events[-1]["finish_reason"] == "length"
    assert events[-1]["message"]["content"] == [{"type": "text", "text": "abc"}]
    assert events[-1]["usage"]["completion_tokens"] == 3


def test_utf8_split_across_tokens_is_held_back(tok):
    events = chat(Engine(scripted(tok, "é!"), tok), "go")
    deltas = [e["text"] for e in events if e["type"] == "text"]
    assert deltas == ["é", "!"]


def test_context_overflow_drops_oldest_turns(tok, tmp_path):
    call = '<|tool_start|>{"name": "bash", "arguments": {"command": "printf %0150d 0"}}<|tool_end|>'
    history = [{"role": "user", "content": "first question " * 5}, {"role": "assistant", "content": "answer " * 5},
               {"role": "user", "content": "second"}]
    model = scripted(tok, call + "done", sequence_len=128)
    engine = Engine(model, tok)
    events = list(engine.chat({"messages": history}, workdir=tmp_path, approve=lambda n, a: True))
    assert any(e["type"] == "notice" for e in events)
    assert events[-1]["finish_reason"] == "stop"
    assert events[-1]["message"]["content"][-1] == {"type": "text", "text": "done"}
    assert max(len(i) for i in model.inputs) <= 128

    # the real model too: a prompt longer than its context is cut, generation goes on
    real_model = tiny_model(tok.vocab_size, sequence_len=64)
    events = list(Engine(real_model, tok).chat({"messages": history}, max_tokens=80, temperature=0.0))
    assert events[0]["type"] == "notice" and events[-1]["type"] == "done"


def test_chat_with_real_checkpoint(tok, real, tmp_path):
    events = chat(Engine(real, tok), "hello", workdir=tmp_path, approve=lambda n, a: True, max_tokens=30,
                  temperature=0.0)
    done = events[-1]
    assert done["type"] == "done" and done["usage"]["completion_tokens"] <= 30
    again = chat(Engine(real, tok), "hello", workdir=tmp_path, approve=lambda n, a: True, max_tokens=30,
                 temperature=0.0)
    assert again[-1]["message"] == done["message"]  # greedy is deterministic


def test_tool_loop_with_real_tokenizer(tmp_path):
    tok = real_tokenizer()
    (tmp_path / "a.py").write_text("print('hi')\n")
    call = '{"name": "read_file", "arguments": {"path": "a.py"}}'
    model = scripted(tok, f"Reading.<|tool_start|>{call}<|tool_end|>It prints hi.")
    events = chat(Engine(model, tok), "what does a.py do?", workdir=tmp_path, approve=lambda n, a: True)
    assert events[-1]["message"]["content"] == [
        {"type": "text", "text": "Reading."},
        {"type": "tool_call", "name": "read_file", "arguments": {"path": "a.py"}},
        {"type": "tool_output", "text": "     1\tprint('hi')"},
        {"type": "text", "text": "It prints hi."}]
