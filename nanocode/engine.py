"""Inference: a KV cache, batched sampling, streaming generation, and the agent's tool loop.

    engine = Engine(model, tokenizer)
    for step in engine.generate(prompt_ids, num_samples=4, temperature=0.8):   # one token per row per step
        ...
    completions = engine.generate_batch(prompt_ids, num_samples=4)             # lists of ids, stop token cut
    for event in engine.chat(conversation, approve=ask_user, workdir=path):    # the agent
        ...   # {"type": "text"|"tool_call"|"tool_output"|"notice"|"done", ...}
    results = engine.chat_batch(conversations, approve=..., workdirs=dirs)     # many agents at once (eval, RL)

Generation prefills the prompt once (batch 1), copies its keys/values to every sample's row, then
feeds one token per step. Row i samples with its own torch.Generator seeded `seed + i`, so a batch of
samples equals the same samples drawn one by one.

The tool loop: when the model closes a call with <|tool_end|>, the JSON between <|tool_start|> and
<|tool_end|> is parsed and validated, the approval callback is asked, the tool runs (nanocode.tools),
and <|output_start|> output <|output_end|> is force-fed to the model, which then continues the same
assistant turn. Any failure (bad JSON, unknown tool, denial, tool error) becomes the output text.
When the context would overflow, the oldest turns are dropped and a notice is put in their place.

chat_batch runs that loop for many conversations at once, and chat is its batch of one. Every row
keeps its own length in one RowCache (GPT takes per-row rotary positions and an attention mask from
it): rows with one new token decode in one batched forward, a row taking in a tool's output (or its
prompt) gets a forward of its own, and tool calls run in threads, so a row waiting on a command
stalls no other. Row i samples with seed + i, so a batch gives the replies one-by-one runs give.
Reply is the per-reply token state machine (text deltas, call parsing, message parts), alone.
"""

import itertools
import json
import re
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
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
            raise ValueError(
                f"KV cache overflow: {self.pos} cached + {T} new > {self.max_len} positions"
            )
        if self.k[layer_idx] is None:
            self.k[layer_idx] = k.new_zeros(self.batch_size, self.max_len, Hk, D)
            self.v[layer_idx] = v.new_zeros(self.batch_size, self.max_len, Hk, D)
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        kc[:, self.pos : self.pos + T] = k
        vc[:, self.pos : self.pos + T] = v
        return kc[:, : self.pos + T], vc[:, : self.pos + T]

    def advance(self, T: int):
        self.pos += T

    def expand(self, batch_size: int):
        """After a batch-1 prefill: copy row 0 to `batch_size` rows (every sample shares the prompt)."""
        assert self.batch_size == 1
        self.k = [
            None if t is None else t.expand(batch_size, -1, -1, -1).contiguous() for t in self.k
        ]
        self.v = [
            None if t is None else t.expand(batch_size, -1, -1, -1).contiguous() for t in self.v
        ]
        self.batch_size = batch_size


class RowCache:
    """KV cache for B rows that each sit at their own length: the batched tool loop, where one row takes
    in a tool's output while the others sample. Before each forward, select(rows, T) names the rows fed
    (any subset, in order) and T, the tokens each gets; the model then reads `pos` (their positions, a
    tensor: GPT takes per-row rotary positions from it), update() writes the new keys/values at each
    row's own slots and returns the fed rows' keys up to the longest, and `mask` lets each query see its
    row's cached keys and, causally, the new ones (slots past a row's length hold stale values)."""

    def __init__(self, batch_size: int, num_layers: int, max_len: int, device="cpu"):
        self.max_len, self.device = max_len, device
        self.lengths = [0] * batch_size
        self.k = [None] * num_layers
        self.v = [None] * num_layers
        self.rows, self.pos, self.mask, self.end = None, None, None, 0

    def select(self, rows: list[int], T: int):
        self.rows = rows
        self.end = max(self.lengths[r] for r in rows) + T
        if self.end > self.max_len:
            raise ValueError(f"KV cache overflow: {self.end} positions > {self.max_len}")
        dev = self.device
        self.pos = torch.tensor([self.lengths[r] for r in rows], device=dev)
        self.slots = self.pos[:, None] + torch.arange(T, device=dev)  # (B, T)
        self.mask = (torch.arange(self.end, device=dev)[None, None, :] <= self.slots[:, :, None])[
            :, None
        ]  # (B, 1, T, end)
        self.row_ids = torch.tensor(rows, device=dev)[:, None]
        self.all_rows = rows == list(range(len(self.lengths)))

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        B, T, Hk, D = k.shape
        if self.k[layer_idx] is None:
            self.k[layer_idx] = k.new_zeros(len(self.lengths), self.max_len, Hk, D)
            self.v[layer_idx] = v.new_zeros(len(self.lengths), self.max_len, Hk, D)
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        kc[self.row_ids, self.slots] = k
        vc[self.row_ids, self.slots] = v
        if self.all_rows:  # every row, in order: a view, no copy
            return kc[:, : self.end], vc[:, : self.end]
        rows = self.row_ids[:, 0]
        return kc[rows, : self.end], vc[rows, : self.end]

    def advance(self, T: int):
        for r in self.rows:
            self.lengths[r] += T


def sample_next(
    logits: torch.Tensor, generators, temperature: float, top_k: int | None, top_p: float | None
):
    """logits (B, V) -> next ids (B,). temperature 0 is greedy; top-k then top-p (nucleus) filtering.
    Row i draws from generators[i] alone (so a row samples the same in any batch): the Gumbel-max
    trick in its exponential form, argmax(p / q) with q ~ Exp(1) (what torch.multinomial does for one
    sample), drawing q only for the top-k candidates: a per-row draw over 4096 logits cost ~80 us,
    as much as the rest of a batch-8 decode step's sampling."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    idx = None
    if top_k is not None and top_k < logits.size(-1):
        logits, idx = torch.topk(logits, top_k, dim=-1)  # sorted, descending
    if top_p is not None and top_p < 1.0:
        if idx is None:
            logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(logits, dim=-1)
        drop = (
            probs.cumsum(dim=-1) - probs > top_p
        )  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    q = torch.stack(
        [torch.empty_like(probs[i]).exponential_(1, generator=g) for i, g in enumerate(generators)]
    )
    choice = (probs / q).argmax(dim=-1)
    return choice if idx is None else idx.gather(-1, choice[:, None]).squeeze(-1)


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

    def generate(
        self, ids, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, top_p=None, seed=42
    ):
        """Yield one list of `num_samples` token ids per step. A row's tokens after its first stop token
        (<|assistant_end|> or <|bos|>) mean nothing; generation ends once every row has stopped, after
        max_tokens steps, or when the context (model.config.sequence_len) is full."""
        check_sampling(temperature, top_k, top_p, max_tokens, num_samples)
        if not ids:
            raise ValueError("the prompt is empty: it needs at least one token (e.g. <|bos|>)")
        if len(ids) >= self.max_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens leaves no room in the {self.max_len}-token context"
            )
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

    def generate_batch(
        self, ids, num_samples=1, max_tokens=256, temperature=0.0, top_k=None, top_p=None, seed=42
    ):
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
        return [self.bos] + notice + ids[len(ids) - max(1, self.max_len // 2 - 1 - len(notice)) :]

    @staticmethod
    def _refusal(part, approve, workdir, calls_left: int) -> str | None:
        """Why a valid call is not run (the text fed back instead), or None to run it."""
        if calls_left <= 0:
            return "error: tool-call limit reached for this reply; answer without tools"
        if workdir is None:
            return "error: tools are disabled here"
        if approve is None or not approve(part["name"], part["arguments"]):
            return DENIED
        return None

    def chat(
        self,
        conversation,
        approve=None,
        workdir=None,
        max_tokens=1024,
        temperature=0.6,
        top_k=50,
        top_p=None,
        seed=42,
        max_tool_calls=8,
        tool_runner=None,
        **call_options,
    ):
        """Generate the next assistant message of `conversation` ({"messages": [...]}, last one from the
        user), running tool calls along the way. Yields events (dicts):
            {"type": "text", "text": delta}                      assistant text as it streams
            {"type": "tool_call", "name", "arguments"}           a valid call, before approval
            {"type": "tool_output", "text"}                      what was fed back (output, error, denial)
            {"type": "notice", "text"}                           e.g. old turns dropped from the context
            {"type": "done", "finish_reason": "stop"|"length"|"tool_calls", "message": {"role": "assistant",
             "content": parts}, "usage": {"prompt_tokens", "completion_tokens"}}
        approve(name, arguments) -> bool is asked before every call (None denies all); workdir None
        disables tools. max_tokens counts sampled tokens (forced tool outputs are free).
        call_options (for the OpenAI server's client-side tools): tools={name: schema} the model may call
        (default: ours); forced_call=name: the reply starts with a call of that tool (its opening is
        prefilled, free like tool outputs); stop_at_tool_call=True: a valid call ends the reply unrun, with
        finish_reason "tool_calls" (the caller runs it).
        This is chat_batch for a batch of one, streamed."""
        for _, event in self._chat_rows(
            [conversation],
            [approve],
            [workdir],
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            max_tool_calls,
            tool_runner,
            results=[None],
            **call_options,
        ):
            yield event

    def chat_batch(
        self,
        conversations,
        approve=None,
        workdirs=None,
        max_tokens=1024,
        temperature=0.6,
        top_k=50,
        top_p=None,
        seed=42,
        max_tool_calls=8,
        tool_runner=None,
        on_event=None,
        **call_options,
    ):
        """chat() for many conversations decoded together; rows finish independently, and when one row
        closes a tool call, its call runs and the output is fed into that row while the others go on
        sampling. Row i samples with seed + i, so row i equals chat(conversations[i], seed=seed + i).
        approve: None, one callable for every row, or a list (one per row); workdirs: None or a list
        (a None entry disables tools for that row); tool_runner(name, arguments, workdir) -> str
        (default nanocode.tools.run_tool); on_event(row, event) gets chat()'s events as they happen;
        call_options as in chat().
        Returns one dict per conversation: {"message", "finish_reason", "usage"} as in chat()'s "done"
        event, plus "prompt_ids" (the rendered prompt), "ids" (every token after the prompt: sampled,
        the stop token included, and forced tool outputs) and "mask" (1 where sampled, 0 where forced),
        the sequence RL trains on."""
        n = len(conversations)
        approves = list(approve) if isinstance(approve, (list, tuple)) else [approve] * n
        workdirs = [None] * n if workdirs is None else list(workdirs)
        if len(approves) != n or len(workdirs) != n:
            raise ValueError(
                f"{n} conversations need {n} approve callables and workdirs, got "
                f"{len(approves)} and {len(workdirs)}"
            )
        results = [None] * n
        for i, event in self._chat_rows(
            conversations,
            approves,
            workdirs,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            max_tool_calls,
            tool_runner,
            results,
            **call_options,
        ):
            if on_event is not None:
                on_event(i, event)
        return results

    def _chat_rows(
        self,
        conversations,
        approves,
        workdirs,
        max_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        max_tool_calls,
        tool_runner,
        results,
        tools=None,
        forced_call=None,
        stop_at_tool_call=False,
    ):
        """The batched tool loop: yields (row, event); fills `results` as rows finish. Each step feeds every
        live row what it has not fed yet (one sampled token, or a token and a tool's output, or a whole
        re-fitted context), samples one token per row, and hands each token to that row's Reply."""
        check_sampling(temperature, top_k, top_p, max_tokens)
        tool_runner = run_tool if tool_runner is None else tool_runner
        tok, n = self.tokenizer, len(conversations)
        # A forced call's opening '<|tool_start|>{"name": "bash", "arguments":' is taken as if sampled, one
        # token per step, so Reply parses the call as usual. (It ends before the space: the tokenizer splits
        # there, so the model sees the tokens it would have written itself.)
        prefill = (
            []
            if forced_call is None
            else [self.tool_start]
            + tok.encode(json.dumps({"name": forced_call, "arguments": {}})[:-4])
        )
        rows = []
        for i, conv in enumerate(conversations):
            ids = list(tok.render_for_completion(conv))
            rows.append(
                SimpleNamespace(
                    ids=ids,
                    prompt_ids=list(ids),
                    out=[],
                    mask=[],
                    sampled=0,
                    finish="length",
                    calls_left=max_tool_calls,
                    prefill=list(prefill),
                    reply=Reply(tok, self.tool_start, self.tool_end, tools),
                    gen=self._generators(seed + i, 1)[0],
                )
            )
        cache = RowCache(n, self.model.config.n_layer, self.max_len, self.device)

        def take_output(i, text):  # the tool's output (or error, or denial) goes into row i
            row = rows[i]
            yield i, row.reply.tool_output(text)
            forced = [self.output_start] + tok.encode(text) + [self.output_end]
            row.ids.extend(forced)
            row.out.extend(forced)
            row.mask.extend([0] * len(forced))
            if row.sampled < max_tokens:
                live.append(i)
            else:
                yield from finish(i)

        def finish(i):
            row = rows[i]
            for event in row.reply.finish():
                yield i, event
            message = {"role": "assistant", "content": row.reply.parts}
            usage = {"prompt_tokens": len(row.prompt_ids), "completion_tokens": row.sampled}
            yield (
                i,
                {"type": "done", "finish_reason": row.finish, "message": message, "usage": usage},
            )
            results[i] = {
                "message": message,
                "finish_reason": row.finish,
                "usage": usage,
                "prompt_ids": row.prompt_ids,
                "ids": row.out,
                "mask": row.mask,
            }

        # Tools of a batch run in threads, so a slow command stalls only its own row; a row's tokens do
        # not depend on when its output arrives, only on the output. A batch of one runs them inline.
        pool = ThreadPoolExecutor(max_workers=min(n, 8)) if n > 1 else None
        live, running = list(range(n)), {}  # running: row -> Future of its tool's output
        try:
            while live or running:
                if running:
                    if not live:
                        wait(list(running.values()), return_when=FIRST_COMPLETED)
                    for i in sorted(i for i, f in running.items() if f.done()):
                        yield from take_output(i, running.pop(i).result())
                    if not live:
                        continue
                live.sort()
                for i in live:
                    if len(rows[i].ids) > self.max_len:
                        rows[i].ids = self._fit_context(rows[i].ids)
                        cache.lengths[i] = 0
                        yield i, {"type": "notice", "text": CONTEXT_NOTICE}
                logits = self._forward_rows(
                    cache, {i: rows[i].ids[cache.lengths[i] :] for i in live}
                )
                tokens = sample_next(
                    torch.stack([logits[i] for i in live]),
                    [rows[i].gen for i in live],
                    temperature,
                    top_k,
                    top_p,
                ).tolist()
                stepped, live = live, []
                for i, t in zip(stepped, tokens):
                    row = rows[i]
                    sampled = (
                        not row.prefill
                    )  # a forced call's opening is taken instead of the sample
                    if sampled:
                        row.sampled += 1
                    else:
                        t = row.prefill.pop(0)
                    row.out.append(t)
                    row.mask.append(int(sampled))
                    if t in self.stop_ids:
                        row.finish = "stop"
                        yield from finish(i)
                        continue
                    row.ids.append(t)
                    for event in row.reply.feed(t):
                        yield i, event
                    if row.reply.closed is None:
                        if row.sampled < max_tokens:
                            live.append(i)
                        else:
                            yield from finish(i)
                        continue
                    part, text = row.reply.closed
                    if (
                        part is not None
                    ):  # a valid call (a malformed one is answered with its error)
                        yield (
                            i,
                            {
                                "type": "tool_call",
                                "name": part["name"],
                                "arguments": part["arguments"],
                            },
                        )
                        if (
                            stop_at_tool_call
                        ):  # the reply ends here, unrun: the caller runs the call
                            row.reply.stop_at_call()
                            row.finish = "tool_calls"
                            yield from finish(i)
                            continue
                        text = self._refusal(part, approves[i], workdirs[i], row.calls_left)
                        row.calls_left -= 1
                        if text is None and pool is not None:
                            running[i] = pool.submit(
                                tool_runner, part["name"], part["arguments"], workdirs[i]
                            )
                            continue
                        if text is None:
                            text = tool_runner(part["name"], part["arguments"], workdirs[i])
                    yield from take_output(i, text)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    @torch.inference_mode()
    def _forward_rows(self, cache, feeds: dict) -> dict:
        """Feed each row its new tokens ({row: ids}) at its own position; {row: logits of its last token}.
        Rows with one new token go through one batched forward; longer feeds (a prompt, a tool's output)
        one forward each."""
        logits = {}
        singles = [i for i, ids in feeds.items() if len(ids) == 1]
        groups = ([singles] if singles else []) + [[i] for i, ids in feeds.items() if len(ids) > 1]
        for group in groups:
            cache.select(group, len(feeds[group[0]]))
            x = torch.tensor([feeds[i] for i in group], dtype=torch.long, device=self.device)
            with autocast(self.device):
                out = self.model(x, kv_cache=cache)[:, -1, :].float()
            logits.update(zip(group, out))
        return logits


class Reply:
    """One assistant reply as its sampled tokens arrive: text streamed as deltas (a partial UTF-8
    character held back), tool calls collected between <|tool_start|> and <|tool_end|>, and the
    message parts. No model and no tools here: feed(token) returns the events that token completes;
    after <|tool_end|>, `closed` holds (call part, None) or (None, error) for a malformed call, and the
    caller answers it with tool_output(text), which records the parts and returns the event."""

    def __init__(self, tokenizer, tool_start: int, tool_end: int, tools=None):
        self.tok, self.tool_start, self.tool_end, self.tools = (
            tokenizer,
            tool_start,
            tool_end,
            tools,
        )
        self.parts, self.text, self.held, self.call_ids, self.closed = [], "", [], None, None
        self._raw = None

    def feed(self, t: int) -> list[dict]:
        self.closed = None
        if self.call_ids is not None:  # inside a tool call: collect until <|tool_end|>
            if t != self.tool_end:
                self.call_ids.append(t)
                return []
            self._raw, self.call_ids = self.tok.decode(self.call_ids), None
            call, err = parse_tool_call(self._raw, self.tools)
            self.closed = (
                (None, f"error: {err}")
                if err
                else (
                    {"type": "tool_call", "name": call["name"], "arguments": call["arguments"]},
                    None,
                )
            )
            return []
        if t == self.tool_start:
            self.call_ids = []
            return self._flush()
        # decode only the tokens not yet shown (byte-level BPE: pieces that end on a character boundary
        # concatenate), holding back a partial UTF-8 character (a few tokens at most)
        self.held.append(t)
        piece = self.tok.decode(self.held)
        if piece.endswith("\ufffd") and len(self.held) < 4:
            return []
        self.text, self.held = self.text + piece, []
        return [{"type": "text", "text": piece}] if piece else []

    def tool_output(self, text: str) -> dict:
        part = self.closed[0] or {
            "type": "text",
            "text": self._raw,
        }  # a malformed call stays as its raw text
        self.parts.extend([part, {"type": "tool_output", "text": text}])
        self.closed = None
        return {"type": "tool_output", "text": text}

    def stop_at_call(self):
        """The reply ends with the valid call just closed, unanswered (the caller will run it)."""
        self.parts.append(self.closed[0])
        self.closed = None

    def finish(self) -> list[dict]:
        if (
            self.call_ids is not None
        ):  # ran out of tokens inside a call: keep what was written, as text
            self.held, self.call_ids = self.held + self.call_ids, None
        return self._flush()

    def _flush(self) -> list[dict]:
        rest = self.tok.decode(self.held) if self.held else ""
        text = self.text + rest
        if text:
            self.parts.append({"type": "text", "text": text})
        self.text, self.held = "", []
        return [{"type": "text", "text": rest}] if rest else []


def message_text(message) -> str:
    """The plain text of a message (its text parts joined)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p["type"] == "text")
