"""ScriptedModel: a stand-in for GPT in tests (and the scripts' test-only --fake-script flag).

It ignores what it reads and puts all probability on the next token of a script. A feed that ends in
<|assistant_start|> starts a turn in that cache row, and so does a row's first feed that ends in
`resume` (<|output_end|> from from_file: a prompt that goes on with an assistant turn after a tool's
output). Its script is pick(the tokens fed) when `pick` is given (a batch of different
conversations), else the next of `turns` in order (a multi-turn chat). Each later forward of the row
emits the script's next token (the engine feeds a row exactly once per sampled token, whatever it
feeds with it); past the script's end it emits <|assistant_end|>. `delay` seconds are slept per
forward, so a test can interrupt a generation half way.
"""

import json
import re
import time
from types import SimpleNamespace

import torch


def encode_with_specials(tokenizer, text: str) -> list[int]:
    """Encode text in which special tokens are written out ("<|tool_start|>"): those become their
    ids. (tokenizer.encode treats special-token text as ordinary text, on purpose.)"""
    ids = []
    for piece in re.split(r"(<\|[a-z_]+\|>)", text):
        if re.fullmatch(r"<\|[a-z_]+\|>", piece):
            ids.append(tokenizer.special_id(piece))
        elif piece:
            ids.extend(tokenizer.encode(piece))
    return ids


class ScriptedModel(torch.nn.Module):
    def __init__(
        self,
        turns,
        vocab_size: int,
        assistant_start: int,
        assistant_end: int,
        sequence_len=4096,
        delay=0.0,
        pick=None,
        resume=None,
    ):
        super().__init__()
        self.turns, self.delay, self.pick, self.resume = (
            [list(t) for t in turns],
            delay,
            pick,
            resume,
        )
        self.assistant_start, self.assistant_end = assistant_start, assistant_end
        self.config = SimpleNamespace(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=1)
        self.register_buffer("dummy", torch.zeros(1))
        self.turn = -1

    def _next_script(self, tokens):
        if self.pick is not None:
            return list(self.pick(tokens))
        self.turn += 1
        return self.turns[self.turn] if self.turn < len(self.turns) else []

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.shape
        if self.delay:
            time.sleep(self.delay)
        states = {} if kv_cache is None else self._states(kv_cache)
        rows = list(range(B)) if kv_cache is None else kv_cache.rows
        logits = torch.full((B, T, self.config.vocab_size), -30.0, device=idx.device)
        for b, r in enumerate(rows):
            last = idx[b, -1].item()
            if last == self.assistant_start or (r not in states and last == self.resume):
                states[r] = {"script": self._next_script(idx[b].tolist()), "i": 0}
            state = states.setdefault(r, {"script": [], "i": 0})
            script, i = state["script"], state["i"]
            logits[b, :, script[i] if i < len(script) else self.assistant_end] = 30.0
            state["i"] += 1
        return logits

    @staticmethod
    def _states(cache) -> dict:
        """Per cache row, its script and place in it; rows that get a copy of another's prompt
        (KVCache.copy: the same prompt fed once) continue that row's turn."""
        if not hasattr(cache, "scripted_rows"):
            cache.scripted_rows, copy = {}, cache.copy

            def copy_with_script(src, dst, length):
                copy(src, dst, length)
                cache.scripted_rows.update({r: dict(cache.scripted_rows[src]) for r in dst})

            cache.copy = copy_with_script
        return cache.scripted_rows

    @classmethod
    def from_file(cls, path, tokenizer):
        """A JSON script: {"turns": ["text with <|tool_start|>...<|tool_end|> written out", ...],
        "delay": seconds per token (optional), "sequence_len": int (optional)}."""
        with open(path) as f:
            spec = json.load(f)
        turns = [encode_with_specials(tokenizer, t) for t in spec["turns"]]
        return cls(
            turns,
            tokenizer.vocab_size,
            tokenizer.special_id("<|assistant_start|>"),
            tokenizer.special_id("<|assistant_end|>"),
            spec.get("sequence_len", 4096),
            spec.get("delay", 0.0),
            resume=tokenizer.special_id("<|output_end|>"),
        )
