"""Inference: the KV cache, sampling, one decode loop, and the agent's tool loop on top of it.

    engine = Engine(model, tokenizer)
    for step in engine.generate(prompt_ids, num_samples=4):    # one token per sample per step
        ...
    completions = engine.generate_batch(prompt_ids, num_samples=4)     # lists of ids, stop cut
    for event in engine.chat(conversation, approve=ask_user, workdir=path):   # the agent
        ...   # {"type": "text"|"tool_call"|"tool_output"|"notice"|"done", ...}
    results = engine.chat_batch(conversations, approve=..., workdirs=dirs)   # many (eval, RL)

Every generation goes through one loop, Engine._decode, over rows (generate's samples, chat_batch's
conversations), each at its own length in one KVCache. A step feeds every live row what the cache
does not hold yet (its prompt, its last token, or a tool's output) and samples one token per row:
rows with one new token share one batched forward, a longer feed gets a forward of its own, and
generate's samples feed their one prompt once (its keys and values copied to every row). Tokens are
drawn in one place, Engine._sample: row i with its own torch.Generator (seed + i), so a batch gives
what one-by-one runs give; a row's `constraint` gives a bitmask of the tokens it allows right before
the draw (all rows' masks are applied at once) and is told each token drawn. chat's grammar=...
(nanocode.grammar) is that constraint: a Matcher per row, told the row's tool outputs too (forced
tokens are part of the grammar), and a row whose grammar is complete ends there. On a GPU the
matcher computes the next mask on a thread while the model computes the logits it will mask; on a
CPU that handoff costs more than it saves.

The tool loop (chat_batch; chat is its batch of one, streamed): when a row's model closes a call
with <|tool_end|>, the JSON between <|tool_start|> and <|tool_end|> is parsed and validated, the
approval callback is asked, the tool runs (nanocode.tools; in a thread, so a slow command stalls no
other row), and <|output_start|> output <|output_end|> is forced into that row, which continues the
same assistant turn. Any failure (bad JSON, unknown tool, denial, tool error) becomes the output
text. When a row's context would overflow, its oldest turns are dropped and a notice is put in their
place. Reply is the per-reply token state machine (text deltas, call parsing, message parts).
"""

import itertools
import math
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from types import SimpleNamespace

import torch

from nanocode.common import autocast
from nanocode.grammar import Matcher, apply_bitmask
from nanocode.tools import parse_tool_call, run_tool

DENIED = "denied by the user"
CONTEXT_NOTICE = "[earlier conversation was dropped to fit the context window]"


class KVCache:
    """Keys and values of every layer for `batch_size` rows of up to `max_len` positions, each row
    at its own length, allocated on first use (the first update gives Hk, D and the dtype). Before
    each forward, feed(rows, starts, T) names the rows fed (any subset, in order) and the position
    of each one's first new token; GPT.forward reads `pos` (B, T), the queries' positions, and
    `end`; each layer's update() writes its new keys and values at those positions and returns the
    fed rows' keys (up to the longest row; slots past a row's own end hold stale values) with the
    mask of the ones each query sees: its row's keys up to its own position, within `window`."""

    def __init__(self, batch_size: int, num_layers: int, max_len: int, device="cpu"):
        self.batch_size, self.max_len, self.device = batch_size, max_len, device
        self.k, self.v = [None] * num_layers, [None] * num_layers

    def feed(self, rows: list[int], starts: list[int], T: int):
        """Set up the next forward: cache rows `rows` (in the batch's order) get T new tokens
        each, row j's first at position starts[j]. Raises ValueError when a row would pass
        max_len. Works out once, for every layer's update(): the positions, how to read and write
        the rows (slices where possible, index tensors otherwise) and whether a mask is needed."""
        self.rows, self.first, self.end = rows, min(starts), max(starts) + T
        if self.end > self.max_len:
            raise ValueError(f"KV cache overflow: {self.end} positions > {self.max_len}")
        self.pos = torch.tensor([list(range(s, s + T)) for s in starts], device=self.device)
        # One query per row, all at one position: every key left (after the window's cut) is seen.
        self.unmasked = T == 1 and self.first == self.end - 1
        # Consecutive rows are read as a view of the cache (others gathered: a copy), and written
        # as one slice when they also share their positions.
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        self.read = slice(rows[0], rows[0] + len(rows))
        if not consecutive:
            self.read = torch.tensor(rows, device=self.device)
        if consecutive and self.first == self.end - T:
            self.write = (self.read, slice(self.first, self.end))
        else:  # rows (B, 1) broadcast against pos (B, T): k[b, t] goes to (rows[b], pos[b, t])
            self.write = (torch.tensor(rows, device=self.device)[:, None], self.pos)
        self.masks = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, window: int | None = None):
        """Store `layer`'s new k, v (B, T, Hk, D) at the fed positions; return the fed rows' keys
        and values from position lo to end, (B, end - lo, Hk, D), where lo is the first key any
        query's `window` reaches, and their mask (B, 1, T, end - lo), or None where every key is
        seen. The mask is built once per forward and window, shared by the layers."""
        if self.k[layer] is None:
            shape = (self.batch_size, self.max_len, *k.shape[2:])
            self.k[layer], self.v[layer] = k.new_zeros(shape), v.new_zeros(shape)
        kc, vc = self.k[layer], self.v[layer]
        kc[self.write] = k
        vc[self.write] = v
        lo = 0 if window is None else max(0, self.first - window)  # no query sees a key before lo
        if window not in self.masks:
            self.masks[window] = None if self.unmasked else self.mask(lo, window)
        return kc[self.read, lo : self.end], vc[self.read, lo : self.end], self.masks[window]

    def mask(self, lo: int, window: int | None) -> torch.Tensor:
        """(B, 1, T, end - lo): True where a query sees a key."""
        keys = torch.arange(lo, self.end, device=self.device)
        query = self.pos[:, None, :, None]
        seen = keys <= query
        return seen if window is None else seen & (keys >= query - window)

    def copy(self, src: int, dst: list[int], length: int):
        """Rows `dst` get row src's first `length` positions (the same prompt, fed once)."""
        for t in self.k + self.v:
            if t is not None:
                t[dst, :length] = t[src, :length]


def sample_next(logits, generators, temperature: float, top_k: int | None, top_p: float | None):
    """logits (B, V) -> next ids (B,). temperature 0 is greedy; top-k then top-p (nucleus)
    filtering. Row i draws from generators[i] alone (so a row samples the same in any batch): the
    Gumbel-max trick in its exponential form, argmax(p / q) with q ~ Exp(1) (what torch.multinomial
    does for one sample), drawing q only for the top-k candidates: a per-row draw over 4096 logits
    cost ~80 us, as much as the rest of a batch-8 decode step's sampling."""
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
        # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs > top_p, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    q = torch.stack(
        [torch.empty_like(p).exponential_(1, generator=g) for p, g in zip(probs, generators)]
    )
    choice = (probs / q).argmax(dim=-1)
    return choice if idx is None else idx.gather(-1, choice[:, None]).squeeze(-1)


# Sampling settings that are integers, and the lowest value of those that may be below 1 (top_p
# above it); the OpenAI names too (n, max_completion_tokens, seed): the server checks requests here.
INTEGERS = {"top_k", "max_tokens", "max_completion_tokens", "num_samples", "n", "seed"}
LOWEST = {"temperature": 0, "top_p": 0, "seed": 0}


def check_sampling(limits=None, **settings):
    """Raise ValueError naming the first bad setting (e.g. temperature=-1): each must be of its
    kind, within its range and at most limits[name] (a server's own caps); None leaves top_k, top_p
    and seed unset."""
    highest = dict({"top_p": 1}, **(limits or {}))
    for name, value in settings.items():
        if value is None and name in ("top_k", "top_p", "seed"):
            continue
        whole, lo, hi = name in INTEGERS, LOWEST.get(name, 1), highest.get(name, math.inf)
        typed = isinstance(value, int if whole else (int, float)) and not isinstance(value, bool)
        if not typed or not lo <= value <= hi or (name == "top_p" and value == 0):
            kind = "an integer" if whole else "a number"
            span = f"{'(' if name == 'top_p' else '['}{lo}, {hi}]"
            raise ValueError(f"'{name}' must be {kind} in {span}, got {value!r}")


class Engine:
    def __init__(self, model, tokenizer):
        """model: a GPT, on the device generation runs on (that of its first parameter or
        buffer); its config.sequence_len is the context (max_len). tokenizer: a Tokenizer, for
        rendering, encoding and the special ids (stop ids: <|bos|> and <|assistant_end|>)."""
        self.model, self.tokenizer = model, tokenizer
        self.device = next(itertools.chain(model.parameters(), model.buffers())).device
        self.max_len = model.config.sequence_len
        sid = tokenizer.special_id
        self.bos, self.assistant_end = tokenizer.bos_id, sid("<|assistant_end|>")
        self.user_start, self.user_end = sid("<|user_start|>"), sid("<|user_end|>")
        self.tool_start, self.tool_end = sid("<|tool_start|>"), sid("<|tool_end|>")
        self.output_start, self.output_end = sid("<|output_start|>"), sid("<|output_end|>")
        # <|bos|> too: it opens every pretraining document, so a base model ends a document with it
        self.stop_ids = {self.bos, self.assistant_end}

    # ---------------------------------------------------------------------------------------------
    # the decode loop

    def _row(self, ids, seed: int, **state) -> SimpleNamespace:
        """A row of the decode loop: its tokens (`ids`: the prompt, then every token it took), how
        many of them the cache holds (`fed`), `live` (fed and sampled each step) or not, `waiting`
        (a Future: not fed until the caller clears it), its generator and its `constraint`
        (_sample)."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return SimpleNamespace(
            ids=list(ids), fed=0, live=True, waiting=None, gen=gen, constraint=None, **state
        )

    @torch.inference_mode()  # (entered on each step of the generator, left at each yield)
    def _decode(self, rows, temperature, top_k, top_p, one_prompt=False):
        """The decode loop. Yields per step [(row index, token)] for the rows sampled; the caller
        takes each token (appends it, or other tokens, to row.ids), ends rows (live = False) or
        parks one on a Future (row.waiting). A step that finds no row ready waits for a Future, then
        yields [] so that the caller can take what arrived. one_prompt: the rows start from one
        prompt, fed once."""
        check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
        cache = KVCache(len(rows), self.model.config.n_layer, self.max_len, self.device)
        while True:
            ready = [i for i, r in enumerate(rows) if r.live and r.waiting is None]
            waiting = [r.waiting for r in rows if r.live and r.waiting is not None]
            if ready:
                logits = self._feed(cache, rows, ready, one_prompt)
                tokens = self._sample(logits, [rows[i] for i in ready], temperature, top_k, top_p)
                yield list(zip(ready, tokens))
            elif waiting:
                wait(waiting, return_when=FIRST_COMPLETED)
                yield []
            else:
                return

    def _feed(self, cache, rows, ready, one_prompt) -> torch.Tensor:
        """Feed each ready row the tokens of row.ids the cache lacks; the logits of each one's last
        token (len(ready), V). Rows with one new token share one forward, a longer feed gets its
        own, except a prompt that all rows start from (one_prompt): fed once, then copied."""
        groups = {}
        for i in ready:
            r = rows[i]
            key = 0 if len(r.ids) - r.fed == 1 else "prompt" if one_prompt and not r.fed else -1 - i
            groups.setdefault(key, []).append(i)
        logits = {}
        for key, group in groups.items():
            fed = group if key == 0 else group[:1]
            x = [rows[i].ids[rows[i].fed :] for i in fed]
            cache.feed(fed, [rows[i].fed for i in fed], len(x[0]))
            x = torch.tensor(x, dtype=torch.long, device=self.device)
            with autocast(self.device):
                out = self.model(x, kv_cache=cache)[:, -1, :].float()
            if len(fed) < len(group):  # one prompt, fed once: its keys and values copied
                cache.copy(group[0], group[1:], x.size(1))
                out = out.expand(len(group), -1)
            for i in group:
                rows[i].fed = len(rows[i].ids)
            if group == ready:  # one forward fed them all (a decode step)
                # memory per row: expanded rows share one, and a constraint masks its row in place
                return out.contiguous()
            logits.update(zip(group, out))
        return torch.stack([logits[i] for i in ready])

    @staticmethod
    def _sample(logits, rows, temperature, top_k, top_p) -> list[int]:
        """The one place tokens are drawn: one per row, from the row's own generator. A row's
        constraint's bitmask masks its logits right before the draw and is told the token drawn."""
        masked = [b for b, row in enumerate(rows) if row.constraint is not None]
        if masked:  # one unpack and one masked_fill for all, not a few small ops per row
            bits = torch.stack([rows[b].constraint.bitmask() for b in masked])
            if len(masked) == len(rows):  # chat_batch's grammar constrains every row
                apply_bitmask(logits, bits)
            else:
                logits[masked] = apply_bitmask(logits[masked], bits)
        tokens = sample_next(logits, [r.gen for r in rows], temperature, top_k, top_p).tolist()
        for row, t in zip(rows, tokens):
            if row.constraint is not None:
                row.constraint.accept(t)
        return tokens

    # ---------------------------------------------------------------------------------------------
    # plain generation

    def generate(
        self, ids, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, top_p=None, seed=42
    ):
        """Yield one list of `num_samples` token ids per step. A row's tokens after its first stop
        token (<|assistant_end|> or <|bos|>) mean nothing; generation ends once every row has
        stopped, after max_tokens steps, or when the context (model.config.sequence_len) is full."""
        check_sampling(max_tokens=max_tokens, num_samples=num_samples)
        if not ids:
            raise ValueError("the prompt is empty: it needs at least one token (e.g. <|bos|>)")
        if len(ids) >= self.max_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens leaves no room in the {self.max_len}-token context"
            )
        end = min(len(ids) + max_tokens, self.max_len + 1)  # the last token needs no cache slot
        rows = [self._row(ids, seed + i) for i in range(num_samples)]
        tokens = [None] * num_samples
        for step in self._decode(rows, temperature, top_k, top_p, one_prompt=True):
            for i, t in step:
                rows[i].ids.append(t)
                rows[i].live = t not in self.stop_ids and len(rows[i].ids) < end
                tokens[i] = t
            yield list(tokens)

    def generate_batch(
        self, ids, num_samples=1, max_tokens=256, temperature=0.0, top_k=None, top_p=None, seed=42
    ):
        """Completions (prompt and stop token excluded), one list of ids per sample."""
        steps = list(self.generate(ids, num_samples, max_tokens, temperature, top_k, top_p, seed))
        stops = self.stop_ids
        return [list(itertools.takewhile(lambda t: t not in stops, row)) for row in zip(*steps)]

    # ---------------------------------------------------------------------------------------------
    # the agent

    def _fit_context(self, ids: list[int]) -> list[int]:
        """Drop the oldest turns so that `ids` fits in 3/4 of the context: <|bos|>, a notice, then
        the suffix starting at the earliest user turn that fits (or, if no turn boundary fits, the
        last half of the context, cut mid-turn)."""
        notice = [self.user_start] + self.tokenizer.encode(CONTEXT_NOTICE) + [self.user_end]
        if len(notice) > self.max_len // 8:  # a tiny context has no room for words
            notice = []
        # 3/4, not all of it: each refit feeds the row again from position 0, so leave room for a
        # quarter of the context of new tokens before the next one
        budget = self.max_len * 3 // 4 - 1 - len(notice)
        for i in range(1, len(ids)):
            if ids[i] == self.user_start and len(ids) - i <= budget:
                return [self.bos] + notice + ids[i:]
        return [self.bos] + notice + ids[len(ids) - max(1, self.max_len // 2 - 1 - len(notice)) :]

    def chat(self, conversation, approve=None, workdir=None, **options):
        """Generate the next assistant message of `conversation` ({"messages": [...]}, last one from
        the user), running tool calls along the way. Yields events (dicts):
            {"type": "text", "text": delta}               assistant text as it streams
            {"type": "tool_call", "name", "arguments"}    a valid call, before approval
            {"type": "tool_output", "text"}               what was fed back (output, error, denial)
            {"type": "notice", "text"}                    e.g. old turns dropped from the context
            {"type": "done", "finish_reason": "stop"|"length"|"tool_calls",
             "message": {"role": "assistant", "content": parts},
             "usage": {"prompt_tokens", "completion_tokens"}}
        approve(name, arguments) -> bool is asked before every call (None denies all); workdir None
        disables tools. options: max_tokens (sampled tokens; forced tool outputs are free),
        temperature, top_k, top_p, seed, max_tool_calls, tool_runner(name, arguments, workdir)
        -> str (default nanocode.tools.run_tool), and for the OpenAI server's client-side tools:
        tools={name: schema} the model may call (default: ours);
        grammar=nanocode.grammar.compile_grammar(...): every row's reply follows it (e.g.
        tool_choice "required": it opens with a call that matches its schema);
        stop_at_tool_call=True: a valid call ends the reply unrun, with finish_reason "tool_calls"
        (the caller runs it); stop=[strings]: the reply ends before the first of them that its text
        holds (finish_reason "stop"). This is chat_batch for a batch of one, streamed."""
        for _, event in self._chat([conversation], [approve], [workdir], [None], **options):
            yield event

    def chat_batch(self, conversations, approve=None, workdirs=None, on_event=None, **options):
        """chat() for many conversations decoded together; rows finish independently, and when one
        row closes a tool call, its call runs and the output is fed into that row while the others
        go on sampling. Row i samples with seed + i, so row i equals chat(conversations[i],
        seed=seed + i). approve: None, one callable for every row, or a list (one per row);
        workdirs: None or a list (a None entry disables tools for that row); on_event(row, event)
        gets chat()'s events as they happen; options as in chat().
        Returns one dict per conversation: {"message", "finish_reason", "usage"} as in chat()'s
        "done" event, plus "prompt_ids" (the rendered prompt), "ids" (every token after the prompt:
        sampled, the stop token included, and forced tool outputs) and "mask" (1 where sampled, 0
        where forced), the sequence RL trains on."""
        n = len(conversations)
        approves = list(approve) if isinstance(approve, (list, tuple)) else [approve] * n
        workdirs = [None] * n if workdirs is None else list(workdirs)
        if len(approves) != n or len(workdirs) != n:
            raise ValueError(
                f"{n} conversations need {n} approve callables and workdirs, got "
                f"{len(approves)} and {len(workdirs)}"
            )
        results = [None] * n
        for i, event in self._chat(conversations, approves, workdirs, results, **options):
            if on_event is not None:
                on_event(i, event)
        return results

    def _chat(
        self,
        conversations,
        approves,
        workdirs,
        results,
        max_tokens=1024,
        temperature=0.6,
        top_k=50,
        top_p=None,
        seed=42,
        max_tool_calls=8,
        tool_runner=None,
        tools=None,
        grammar=None,
        stop_at_tool_call=False,
        stop=(),
    ):
        """The tool loop over the decode loop: yields (row, event), and fills `results`
        (chat_batch's) as rows finish."""
        check_sampling(max_tokens=max_tokens)
        tool_runner = run_tool if tool_runner is None else tool_runner
        tok, n = self.tokenizer, len(conversations)
        overlap = self.device.type == "cuda"  # (see the module docstring)
        rows = []
        for i, conv in enumerate(conversations):
            prompt = list(tok.render_for_completion(conv))
            row = self._row(prompt, seed + i, prompt=prompt, out=[], mask=[], sampled=0)
            row.calls_left = max_tool_calls
            row.reply = Reply(tok, self.tool_start, self.tool_end, tools, stop)
            row.constraint = grammar and Matcher(grammar, overlap)
            rows.append(row)

        def take_token(i, t):
            """Row i's sampled token t: recorded (mask 1) and streamed through its Reply; then
            the row ends (a stop token or string, or a complete grammar), answers a call just
            closed, or goes on. A stop token is not appended to row.ids: it is never fed."""
            row = rows[i]
            row.sampled += 1
            row.out.append(t)
            row.mask.append(1)
            if t not in self.stop_ids:
                row.ids.append(t)
                yield from ((i, event) for event in row.reply.feed(t))
            if t in self.stop_ids or row.reply.stopped or (grammar and row.constraint.done):
                yield from finish(i, "stop")
            elif row.reply.closed is None:
                yield from go_on(i)
            else:
                yield from answer(i, *row.reply.closed)

        def answer(i, call, text):
            """A closed call: a malformed one (call None) is answered with its error `text`; a
            valid one ends the reply unrun (stop_at_tool_call) or runs, on a pool thread (row i
            waits on the Future; the loop below takes the output) or inline for a batch of one.
            Past the call budget, with tools disabled or unapproved, the answer says why not."""
            row, workdir, approve = rows[i], workdirs[i], approves[i]
            if call is not None:  # (a malformed one is answered with its error)
                yield i, dict(call)
                if stop_at_tool_call:  # the reply ends here, unrun: the caller runs the call
                    row.reply.stop_at_call()
                    yield from finish(i, "tool_calls")
                    return
                row.calls_left -= 1
                name, arguments = call["name"], call["arguments"]
                if row.calls_left < 0:
                    text = "error: tool-call limit reached for this reply; answer without tools"
                elif workdir is None:
                    text = "error: tools are disabled here"
                elif approve is None or not approve(name, arguments):
                    text = DENIED
                elif pool is not None:  # the output is taken when it arrives
                    row.waiting = pool.submit(tool_runner, name, arguments, workdir)
                    return
                else:
                    text = tool_runner(name, arguments, workdir)
            yield from take_output(i, text)

        def take_output(i, text):
            """The tool's output (or error, or denial) goes into row i as forced tokens
            <|output_start|> text <|output_end|> (mask 0; the grammar is told them too)."""
            row = rows[i]
            row.waiting = None
            yield i, row.reply.tool_output(text)
            forced = [self.output_start] + tok.encode(text) + [self.output_end]
            if grammar:  # the grammar reads the whole reply, outputs included
                row.constraint.accept(*forced)
            row.ids += forced
            row.out += forced
            row.mask += [0] * len(forced)
            yield from go_on(i)

        def go_on(i):
            """Nothing while the row has budget and room: it samples on. Once it has sampled
            max_tokens it ends ("length"); when its ids outgrow the context, its oldest turns are
            dropped (a "notice" event) and the cache is fed its ids again from position 0."""
            row = rows[i]
            if row.sampled >= max_tokens:
                yield from finish(i, "length")
            elif len(row.ids) > self.max_len:
                row.ids, row.fed = self._fit_context(row.ids), 0
                yield i, {"type": "notice", "text": CONTEXT_NOTICE}

        def finish(i, reason):
            """End row i: flush its Reply's held text, fill results[i], yield the "done" event."""
            row = rows[i]
            row.live = False
            yield from ((i, event) for event in row.reply.finish())
            message = {"role": "assistant", "content": row.reply.parts}
            usage = {"prompt_tokens": len(row.prompt), "completion_tokens": row.sampled}
            done = dict(message=message, finish_reason=reason, usage=usage)
            results[i] = dict(done, prompt_ids=row.prompt, ids=row.out, mask=row.mask)
            yield i, dict(type="done", **done)

        # Tools of a batch run in threads, so a slow command stalls only its own row; a row's tokens
        # do not depend on when its output arrives, only on the output. A batch of one runs inline.
        pool = ThreadPoolExecutor(max_workers=min(n, 8)) if n > 1 else None
        try:
            for i in range(n):
                yield from go_on(i)
            for step in self._decode(rows, temperature, top_k, top_p):
                for i, row in enumerate(rows):
                    if row.waiting is not None and row.waiting.done():
                        yield from take_output(i, row.waiting.result())
                for i, t in step:
                    yield from take_token(i, t)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


class Reply:
    """One assistant reply as its sampled tokens arrive: text streamed as deltas (a partial UTF-8
    character held back, and a tail that may start a `stop` string), tool calls collected between
    <|tool_start|> and <|tool_end|>, and the message parts. No model and no tools here: feed(token)
    returns the events that token completes; a stop string sets `stopped` (the reply ends before
    it); after <|tool_end|>, `closed` holds (call part, None) or (None, error) for a malformed call,
    and the caller answers it with tool_output(text), which records the parts and returns the
    event."""

    def __init__(self, tokenizer, tool_start: int, tool_end: int, tools=None, stop=()):
        self.tok, self.tool_start, self.tool_end = tokenizer, tool_start, tool_end
        self.tools, self.stop, self.stopped = tools, list(stop), False
        self.parts, self.text, self.pending, self.held = [], "", "", []
        self.call_ids = self.closed = self.raw = None

    def feed(self, t: int) -> list[dict]:
        """Take one sampled token; return the text events it completes. <|tool_start|> ends the
        text part and starts collecting a call; <|tool_end|> parses it into `closed`. Text is
        decoded from the tokens not yet shown, a partial character or a possible start of a
        stop string held back."""
        self.closed = None
        if self.call_ids is not None:  # inside a tool call: collect until <|tool_end|>
            if t != self.tool_end:
                self.call_ids.append(t)
                return []
            self.raw, self.call_ids = self.tok.decode(self.call_ids), None
            call, err = parse_tool_call(self.raw, self.tools)
            # a valid call has exactly a name and arguments
            self.closed = (None, f"error: {err}") if err else ({"type": "tool_call", **call}, None)
            return []
        if t == self.tool_start:
            self.call_ids = []
            return self._flush()
        # decode only the tokens not yet shown (byte-level BPE: pieces that end on a character
        # boundary concatenate), holding back a partial UTF-8 character (a few tokens at most)
        self.held.append(t)
        piece = self.tok.decode(self.held)
        # a UTF-8 character has at most 4 bytes, a token at least 1: past 4 tokens it is bad bytes
        if piece.endswith("\ufffd") and len(self.held) < 4:
            return []
        text, self.held = self.pending + piece, []
        cuts = [i for i in map(text.find, self.stop) if i >= 0]
        if cuts:  # a stop string: the reply ends before it
            self.stopped, text = True, text[: min(cuts)]
        tails = [k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])]
        keep = 0 if cuts else max(tails, default=0)  # a tail that may start a stop string waits
        self.pending = text[len(text) - keep :]
        return self._show(text[: len(text) - keep])

    def tool_output(self, text: str) -> dict:
        part = self.closed[0] or {"type": "text", "text": self.raw}  # a malformed call, as text
        self.parts += [part, {"type": "tool_output", "text": text}]
        self.closed = None
        return {"type": "tool_output", "text": text}

    def stop_at_call(self):
        """The reply ends with the valid call just closed, unanswered (the caller will run it)."""
        self.parts.append(self.closed[0])
        self.closed = None

    def finish(self) -> list[dict]:
        if self.call_ids is not None:  # ran out of tokens inside a call: keep it, as text
            self.held, self.call_ids = self.held + self.call_ids, None
        return self._flush()

    def _show(self, text: str) -> list[dict]:
        self.text += text
        return [{"type": "text", "text": text}] if text else []

    def _flush(self) -> list[dict]:
        """The text part ends (a call starts, or the reply ends): what was held back is shown."""
        events = self._show(self.pending + self.tok.decode(self.held))
        if self.text:
            self.parts.append({"type": "text", "text": self.text})
        self.text, self.pending, self.held = "", "", []
        return events


def message_text(message) -> str:
    """The plain text of a message (its text parts joined)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p["type"] == "text")
