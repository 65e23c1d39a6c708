"""Inference: a KV cache, batched sampling, streaming generation, and the agent's tool loop.

    engine = Engine(model, tokenizer)
    for step in engine.generate(prompt_ids, num_samples=4, temperature=0.8):   # one token per row per step
        ...
    completions = engine.generate_batch(prompt_ids, num_samples=4)             # lists of ids, stop token cut
    for event in engine.chat(conversation, approve=ask_user, workdir=path):    # the agent
        ...   # {"type": "text"|"tool_call"|"tool_output"|"notice"|"done", ...}

Generation prefills the prompt once (batch 1), copies its keys/values to every sample's row, then
feeds one token per step. Row i samples with its own torch.Generator seeded `seed + i`, so a batch of
samples equals the same samples drawn one by one.

The tool loop: when the model closes a call with <|tool_end|>, the JSON between <|tool_start|> and
<|tool_end|> is parsed and validated, the approval callback is asked, the tool runs (nanocode.tools),
and <|output_start|> output <|output_end|> is force-fed to the model, which then continues the same
assistant turn. Any failure (bad JSON, unknown tool, denial, tool error) becomes the output text.
When the context would overflow, the oldest turns are dropped and a notice is put in their place.
"""
import itertools
import json
import re
import time
from types import SimpleNamespace

import torch

from nanocode.common import autocast
from nanocode.tools import parse_tool_call, run_tool

DENIED = "denied by the user"
CONTEXT_NOTICE = "[earlier conversation was dropped to fit the context window]"


class KVCache:
    """Keys and values of every layer for B rows and up to `max_len` positions, preallocated on first
    use (the model tells us Hk, D and the dtype through its first update). Protocol used by GPT.forward:
    `pos` is the number of cached positions, update() writes the new k, v at [pos, pos+T) and returns
    everything cached so far, and the model calls advance(T) after its last layer."""

    def __init__(self, batch_size: int, num_layers: int, max_len: int):
        self.batch_size, self.max_len = batch_size, max_len
        self.k = [None] * num_layers
        self.v = [None] * num_layers
        self.pos = 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        B, T, Hk, D = k.shape
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache overflow: {self.pos} cached + {T} new > {self.max_len} positions")
        if self.k[layer_idx] is None:
            self.k[layer_idx] = k.new_zeros(self.batch_size, self.max_len, Hk, D)
            self.v[layer_idx] = v.new_zeros(self.batch_size, self.max_len, Hk, D)
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        kc[:, self.pos:self.pos + T] = k
        vc[:, self.pos:self.pos + T] = v
        return kc[:, :self.pos + T], vc[:, :self.pos + T]

    def advance(self, T: int):
        self.pos += T

    def expand(self, batch_size: int):
        """After a batch-1 prefill: copy row 0 to `batch_size` rows (every sample shares the prompt)."""
        assert self.batch_size == 1
        self.k = [None if t is None else t.expand(batch_size, -1, -1, -1).contiguous() for t in self.k]
        self.v = [None if t is None else t.expand(batch_size, -1, -1, -1).contiguous() for t in self.v]
        self.batch_size = batch_size


def sample_next(logits: torch.Tensor, generators, temperature: float, top_k: int | None, top_p: float | None):
    """logits (B, V) -> next ids (B,). temperature 0 is greedy; top-k then top-p (nucleus) filtering."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def check_sampling(temperature, top_k, top_p, max_tokens, num_samples=1):
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not (isinstance(max_tokens, int) and max_tokens >= 1):
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")


def encode_with_specials(tokenizer, text: str) -> list[int]:
    """Encode text in which special tokens are written out ("<|tool_start|>"): those become their ids.
    (tokenizer.encode treats special-token text as ordinary text, on purpose.)"""
    ids = []
    for piece in re.split(r"(<\|[a-z_]+\|>)", text):
        if re.fullmatch(r"<\|[a-z_]+\|>", piece):
            ids.append(tokenizer.special_id(piece))
        elif piece:
            ids.extend(tokenizer.encode(piece))
    return ids


class Engine:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(itertools.chain(model.parameters(), model.buffers())).device
        self.max_len = model.config.sequence_len
        sid = tokenizer.special_id
        self.bos, self.assistant_end = tokenizer.bos_id, sid("<|assistant_end|>")
        self.user_start, self.user_end = sid("<|user_start|>"), sid("<|user_end|>")
        self.tool_start, self.tool_end = sid("<|tool_start|>"), sid("<|tool_end|>")
        self.output_start, self.output_end = sid("<|output_start|>"), sid("<|output_end|>")
        self.stop_ids = {self.bos, self.assistant_end}

    @torch.inference_mode()
    def _forward(self, cache: KVCache, ids) -> torch.Tensor:
        """Feed `ids` (B, T) through the model at the cache's position; logits of the last position (B, V)."""
        x = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        with autocast(self.device):
            return self.model(x, kv_cache=cache)[:, -1, :].float()

    def _generators(self, seed: int, n: int):
        return [torch.Generator(device=self.device).manual_seed(seed + i) for i in range(n)]

    def generate(self, ids, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, top_p=None, seed=42):
        """Yield one list of `num_samples` token ids per step. A row's tokens after its first stop token
        (<|assistant_end|> or <|bos|>) mean nothing; generation ends once every row has stopped, after
        max_tokens steps, or when the context (model.config.sequence_len) is full."""
        check_sampling(temperature, top_k, top_p, max_tokens, num_samples)
        if not ids:
            raise ValueError("the prompt is empty: it needs at least one token (e.g. <|bos|>)")
        if len(ids) >= self.max_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the {self.max_len}-token context")
        cache = KVCache(1, self.model.config.n_layer, min(self.max_len, len(ids) + max_tokens))
        logits = self._forward(cache, [ids])
        if num_samples > 1:
            cache.expand(num_samples)
            logits = logits.expand(num_samples, -1)
        generators = self._generators(seed, num_samples)
        done = [False] * num_samples
        for step in range(max_tokens):
            next_ids = sample_next(logits, generators, temperature, top_k, top_p)
            tokens = next_ids.tolist()
            yield tokens
            done = [d or t in self.stop_ids for d, t in zip(done, tokens)]
            if all(done) or step == max_tokens - 1 or cache.pos >= cache.max_len:
                return
            logits = self._forward(cache, next_ids[:, None])

    def generate_batch(self, ids, num_samples=1, max_tokens=256, temperature=0.0, top_k=None, top_p=None, seed=42):
        """Completions (prompt and stop token excluded), one list of ids per sample."""
        out = [[] for _ in range(num_samples)]
        done = [False] * num_samples
        for tokens in self.generate(ids, num_samples, max_tokens, temperature, top_k, top_p, seed):
            for i, t in enumerate(tokens):
                if not done[i]:
                    if t in self.stop_ids:
                        done[i] = True
                    else:
                        out[i].append(t)
        return out

    # ------------------------------------------------------------------------------------------------
    # the agent

    def _fit_context(self, ids: list[int]) -> list[int]:
        """Drop the oldest turns so that `ids` fits in 3/4 of the context: <|bos|>, a notice, then the
        suffix starting at the earliest user turn that fits (or, if no turn boundary fits, the last
        half of the context, cut mid-turn)."""
        notice = [self.user_start] + self.tokenizer.encode(CONTEXT_NOTICE) + [self.user_end]
        if len(notice) > self.max_len // 8:  # a tiny context has no room for words
            notice = []
        budget = self.max_len * 3 // 4 - 1 - len(notice)
        for i in range(1, len(ids)):
            if ids[i] == self.user_start and len(ids) - i <= budget:
                return [self.bos] + notice + ids[i:]
        return [self.bos] + notice + ids[len(ids) - max(1, self.max_len // 2 - 1 - len(notice)):]

    @staticmethod
    def _parse_call(raw: str, tools=None):
        """(tool_call part or None, error) for the text the model wrote between <|tool_start|> and <|tool_end|>."""
        call, err = parse_tool_call(raw, tools)
        if err:
            return None, f"error: {err}"
        return {"type": "tool_call", "name": call["name"], "arguments": call["arguments"]}, None

    @staticmethod
    def _run_call(name, args, approve, workdir, calls_left: int, **tool_kwargs) -> str:
        if calls_left <= 0:
            return "error: tool-call limit reached for this reply; answer without tools"
        if workdir is None:
            return "error: tools are disabled here"
        if approve is None or not approve(name, args):
            return DENIED
        return run_tool(name, args, workdir, **tool_kwargs)

    def chat(self, conversation, approve=None, workdir=None, max_tokens=1024, temperature=0.6, top_k=50,
             top_p=None, seed=42, max_tool_calls=8, tools=None, forced_call=None, stop_at_tool_call=False,
             sandbox="workspace-write", network=False):
        """Generate the next assistant message of `conversation` ({"messages": [...]}, last one from the
        user), running tool calls along the way. Yields events (dicts):
            {"type": "text", "text": delta}                      assistant text as it streams
            {"type": "tool_call", "name", "arguments"}           a valid call, before approval
            {"type": "tool_output", "text"}                      what was fed back (output, error, denial)
            {"type": "notice", "text"}                           e.g. old turns dropped from the context
            {"type": "done", "finish_reason": "stop"|"length"|"tool_calls", "message": {"role": "assistant", "content": parts},
             "usage": {"prompt_tokens", "completion_tokens"}}
        approve(name, arguments) -> bool is asked before every call (None denies all); workdir None
        disables tools. max_tokens counts sampled tokens (forced tool outputs are free).
        tools: {name: schema} the model may call (default: ours); forced_call: the name of a tool the reply
        starts by calling (the call's opening is prefilled); stop_at_tool_call: a valid call ends the reply
        unrun (finish_reason "tool_calls": the caller runs it, as OpenAI API clients do); sandbox, network:
        how tools run (tools.run_tool)."""
        check_sampling(temperature, top_k, top_p, max_tokens)
        tok = self.tokenizer
        ids = list(tok.render_for_completion(conversation))
        prompt_tokens = len(ids)
        gen = self._generators(seed, 1)
        cache, fed = None, 0
        parts, text_ids, text_sent, call_ids = [], [], "", None
        # A forced call's opening '<|tool_start|>{"name": "bash", "arguments":' is taken as if sampled, one
        # token per step, so the same code below parses the call. (It ends before the space: the tokenizer
        # splits there, so the model sees the tokens it would have written itself.)
        forced = [] if forced_call is None else \
            [self.tool_start] + tok.encode(json.dumps({"name": forced_call, "arguments": {}})[:-4])
        calls_left, finish, sampled = max_tool_calls, "length", 0

        def flush_text():
            nonlocal text_ids, text_sent
            text = tok.decode(text_ids)
            if text:
                parts.append({"type": "text", "text": text})
            delta = text[len(text_sent):]
            text_ids, text_sent = [], ""
            return delta

        for _ in range(max_tokens + len(forced)):  # forced tokens are free, like tool outputs
            if len(ids) > self.max_len:
                ids, cache = self._fit_context(ids), None
                yield {"type": "notice", "text": CONTEXT_NOTICE}
            if cache is None:
                cache, fed = KVCache(1, self.model.config.n_layer, self.max_len), 0
            logits = self._forward(cache, [ids[fed:]])
            fed = len(ids)
            if forced:
                t = forced.pop(0)
            else:
                t = sample_next(logits, gen, temperature, top_k, top_p).item()
                sampled += 1
            if t in self.stop_ids:
                finish = "stop"
                break
            ids.append(t)
            if call_ids is not None:  # inside a tool call: collect until <|tool_end|>
                if t != self.tool_end:
                    call_ids.append(t)
                    continue
                raw, call_ids = tok.decode(call_ids), None
                part, output = self._parse_call(raw, tools)
                if part is None:  # malformed: keep the raw text, feed back the error
                    part = {"type": "text", "text": raw}
                else:
                    yield {"type": "tool_call", "name": part["name"], "arguments": part["arguments"]}
                    if stop_at_tool_call:
                        parts.append(part)
                        finish = "tool_calls"
                        break
                    output = self._run_call(part["name"], part["arguments"], approve, workdir, calls_left,
                                            sandbox=sandbox, network=network)
                    calls_left -= 1
                parts.extend([part, {"type": "tool_output", "text": output}])
                yield {"type": "tool_output", "text": output}
                ids.extend([self.output_start] + tok.encode(output) + [self.output_end])
            elif t == self.tool_start:
                delta = flush_text()
                if delta:
                    yield {"type": "text", "text": delta}
                call_ids = []
            else:
                text_ids.append(t)
                text = tok.decode(text_ids)
                if not text.endswith("\ufffd"):  # hold back a partial UTF-8 character
                    delta, text_sent = text[len(text_sent):], text
                    if delta:
                        yield {"type": "text", "text": delta}
        if call_ids is not None:  # ran out of tokens inside a call: keep what was written, as text
            text_ids = call_ids
        delta = flush_text()
        if delta:
            yield {"type": "text", "text": delta}
        yield {"type": "done", "finish_reason": finish, "message": {"role": "assistant", "content": parts},
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sampled}}


def message_text(message) -> str:
    """The plain text of a message (its text parts joined)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p["type"] == "text")


class ScriptedModel(torch.nn.Module):
    """A stand-in for GPT in tests and demos (scripts' --fake-script): it ignores what it reads and puts
    all probability on the next token of a script. `turns` are token lists, one per assistant reply; a
    prefill that ends in <|assistant_start|> starts the next turn; past a turn's end it emits <|assistant_end|>.
    `delay` seconds are slept per forward, so a test can interrupt a generation half way."""

    def __init__(self, turns, vocab_size: int, assistant_start: int, assistant_end: int, sequence_len=4096, delay=0.0):
        super().__init__()
        self.turns, self.delay = [list(t) for t in turns], delay
        self.assistant_start, self.assistant_end = assistant_start, assistant_end
        self.config = SimpleNamespace(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=1)
        self.register_buffer("dummy", torch.zeros(1))
        self.turn, self.i = -1, 0

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.shape
        if self.delay:
            time.sleep(self.delay)
        if idx[0, -1].item() == self.assistant_start:
            self.turn, self.i = self.turn + 1, 0
        script = self.turns[self.turn] if 0 <= self.turn < len(self.turns) else []
        nxt = script[self.i] if self.i < len(script) else self.assistant_end
        self.i += 1
        if kv_cache is not None:
            kv_cache.advance(T)
        logits = torch.full((B, T, self.config.vocab_size), -30.0, device=idx.device)
        logits[:, :, nxt] = 30.0
        return logits

    @classmethod
    def from_file(cls, path, tokenizer):
        """A JSON script: {"turns": ["text with <|tool_start|>...<|tool_end|> written out", ...],
        "delay": seconds per token (optional), "sequence_len": int (optional)}."""
        with open(path) as f:
            spec = json.load(f)
        turns = [encode_with_specials(tokenizer, t) for t in spec["turns"]]
        return cls(turns, tokenizer.vocab_size, tokenizer.special_id("<|assistant_start|>"),
                   tokenizer.special_id("<|assistant_end|>"), spec.get("sequence_len", 4096), spec.get("delay", 0.0))
