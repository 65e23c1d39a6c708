"""Conversation data for SFT and DPO: JSONL loading with validation, the task mixture, and the sources.

A conversation (one JSON object per line):
    {"messages": [{"role": "system"|"user"|"assistant", "content": str | [part, ...]}, ...]}
    part: {"type": "text", "text": str}
        | {"type": "tool_call", "name": str, "arguments": {...}}
        | {"type": "tool_output", "text": str}
An optional system message comes first; then user and assistant alternate, starting with the user.
Tool calls and tool outputs appear only inside assistant messages (the agent calls, the harness answers
inside the same turn). Extra keys on the conversation (e.g. the synthetic "files") are kept and ignored.

A preference pair (DPO, one JSON object per line), documented in scripts/code_dpo.py:
    {"prompt": {"messages": [... ending with a user message]}, "chosen": <assistant message>, "rejected": <assistant message>}

Sources: "synth" (always available: $NANOCODE_BASE_DIR/sft/synth_<split>.jsonl from scripts/gen_synth.py),
a path to any .jsonl file of conversations, and hub datasets downloaded on first use when online (via
nanocode.hub.hub_file): the code-instruct sets of nanocode/instruct.py, converted to tool use
("code_alpaca", "evol_codealpaca", "magicoder", "self_oss_instruct", "code_feedback"), and "gsm8k".
The mixture repeats or subsamples each source by its weight and shuffles with a fixed seed."""

import json
import random
import re
from pathlib import Path

import torch

from nanocode import instruct
from nanocode.common import NanocodeError, get_base_dir, read_jsonl

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "tool_call", "tool_output")


# -----------------------------------------------------------------------------
# validation


def _check_parts(content, where: str, role: str):
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise NanocodeError(
            f"{where}: content must be a string or a list of parts, got {type(content).__name__}"
        )
    for j, part in enumerate(content):
        w = f"{where} part {j}"
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
            raise NanocodeError(
                f"{w}: expected an object with type one of {PART_TYPES}, got {str(part)[:80]!r}"
            )
        kind = part["type"]
        if kind != "text" and role != "assistant":
            raise NanocodeError(
                f"{w}: a {kind} part may only appear in an assistant message, not in a {role} message"
            )
        if kind in ("text", "tool_output") and not isinstance(part.get("text"), str):
            raise NanocodeError(f"{w}: a {kind} part needs a string 'text'")
        if kind == "tool_call":
            if not isinstance(part.get("name"), str) or not isinstance(part.get("arguments"), dict):
                raise NanocodeError(
                    f"{w}: a tool_call part needs a string 'name' and an object 'arguments'"
                )


def validate_message(msg, where: str, role: str | None = None):
    if not isinstance(msg, dict) or msg.get("role") not in ROLES or "content" not in msg:
        raise NanocodeError(
            f"{where}: expected {{'role': one of {ROLES}, 'content': ...}}, got {str(msg)[:80]!r}"
        )
    if role is not None and msg["role"] != role:
        raise NanocodeError(f"{where}: expected a {role} message, got {msg['role']}")
    _check_parts(msg["content"], where, msg["role"])


def validate_conversation(conv, where: str = "conversation", last_role: str | None = "assistant"):
    """Raise NanocodeError naming `where` and the message if `conv` is not a well-formed conversation.
    last_role: the role the conversation must end with ("assistant" for SFT, "user" for a DPO prompt, None: any)."""
    if not isinstance(conv, dict) or not isinstance(conv.get("messages"), list):
        raise NanocodeError(f"{where}: expected an object with a 'messages' list")
    msgs = conv["messages"]
    if not msgs:
        raise NanocodeError(f"{where}: 'messages' is empty")
    start = 1 if isinstance(msgs[0], dict) and msgs[0].get("role") == "system" else 0
    if start == len(msgs):
        raise NanocodeError(f"{where}: only a system message, no user message")
    for i, msg in enumerate(msgs):
        expected = "system" if i < start else ("user" if (i - start) % 2 == 0 else "assistant")
        validate_message(msg, f"{where} message {i}", expected)
    if last_role is not None and msgs[-1]["role"] != last_role:
        raise NanocodeError(
            f"{where}: must end with a {last_role} message, ends with {msgs[-1]['role']}"
        )
    return conv


def validate_preference(pair, where: str = "pair"):
    if not isinstance(pair, dict) or not all(k in pair for k in ("prompt", "chosen", "rejected")):
        raise NanocodeError(f"{where}: expected an object with 'prompt', 'chosen' and 'rejected'")
    validate_conversation(pair["prompt"], f"{where} prompt", last_role="user")
    validate_message(pair["chosen"], f"{where} chosen", "assistant")
    validate_message(pair["rejected"], f"{where} rejected", "assistant")
    return pair


def load_jsonl(path, kind: str = "conversation") -> list[dict]:
    """Read a JSONL file of conversations (kind="conversation"), prompts (kind="prompt": ending with the
    user's turn) or preference pairs (kind="preference").
    Any bad line raises NanocodeError with the file and line number. Blank lines are skipped."""
    if kind not in ("conversation", "prompt", "preference"):
        raise ValueError(f"kind must be 'conversation', 'prompt' or 'preference', got {kind!r}")
    out = []
    for where, obj in read_jsonl(path):
        if kind == "conversation":
            validate_conversation(obj, where)
        elif (
            kind == "prompt"
        ):  # a conversation waiting for the assistant: its last message is the user's
            validate_conversation(obj, where, last_role="user")
        else:
            validate_preference(obj, where)
        out.append(obj)
    if not out:
        raise NanocodeError(f"{path} holds no records")
    return out


def write_jsonl(path, records):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def pad_batch(rows, pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, T) and targets (B, T) from rendered rows [(ids, mask), ...]: the target is the next
    token where its mask is 1 (an assistant token) and -1 (ignored by the loss) elsewhere. One
    conversation per row, padded at the end with pad_id (targets -1), so with causal attention no
    conversation ever sees another and padding changes nothing before it."""
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)
        n = len(ids) - 1
        x[i, :n] = ids_t[:-1]
        y[i, :n] = torch.where(mask_t[1:], ids_t[1:], -1)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# the mixture


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """ "synth=1,gsm8k=0.5,/path/extra.jsonl=2" -> [("synth", 1.0), ("gsm8k", 0.5), ("/path/extra.jsonl", 2.0)]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, w = item.rpartition("=") if "=" in item else (item, "", "1")
        try:
            weight = float(w)
        except ValueError:
            raise NanocodeError(
                f"bad weight {w!r} for source {name!r} in --mix {spec!r} (want name=weight)"
            ) from None
        if weight < 0:
            raise NanocodeError(f"weight for source {name!r} must be >= 0, got {weight}")
        out.append((name, weight))
    if not out:
        raise NanocodeError(f"--mix {spec!r} names no source")
    return out


def mixture(sources: list[tuple[str, list, float]], seed: int = 0) -> list:
    """Weight w means each example of the source is used floor(w) times plus a random share w - floor(w)
    (so 2.0 = two epochs of it, 0.25 = a quarter of it). Deterministic for a seed, then shuffled."""
    rng = random.Random(seed)
    out = []
    for name, items, weight in sources:
        whole, frac = int(weight), weight - int(weight)
        out.extend(items * whole)
        out.extend(rng.sample(items, round(frac * len(items))))
    rng.shuffle(out)
    return out


# -----------------------------------------------------------------------------
# sources

HELD_OUT = 500  # sources with one split keep their last 500 examples for "val"
INSTRUCT_ROWS = (
    20000  # dataset rows converted per instruct source (each one runs code; cached afterwards)
)


def _chat(user: str, assistant: str) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    }


def _split(items: list, split: str) -> list:
    return items[:-HELD_OUT] if split == "train" else items[-HELD_OUT:]


def load_instruct(name: str, split: str) -> list[dict]:
    """A public code-instruct dataset converted to tool use (nanocode.instruct), converted once and
    cached as $BASE/sft/instruct_<name>.jsonl; the drop counts are printed when converting."""
    path = get_base_dir() / "sft" / f"instruct_{name}.jsonl"
    if not path.exists():
        _, _, schema = instruct.SOURCES[name]
        rows = instruct.read_rows(instruct.fetch(name))[:INSTRUCT_ROWS]
        convs, stats = instruct.convert(rows, schema)
        print(f"{name}: {len(rows)} rows -> {len(convs)} conversations; {dict(stats)}")
        if not convs:
            raise NanocodeError(f"{name}: none of {len(rows)} rows converted ({dict(stats)})")
        write_jsonl(path, convs)
    return _split(load_jsonl(path), split)


def load_gsm8k(split: str) -> list[dict]:
    """The answer's calculator annotations <<a*b=c>> are dropped; "#### 42" becomes a last sentence."""
    import pyarrow.parquet as pq

    from nanocode.hub import hub_file

    path = hub_file(
        "openai/gsm8k",
        f"main/{'train' if split == 'train' else 'test'}-00000-of-00001.parquet",
        hint="leave gsm8k out of --mix (synth works offline)",
    )
    convs = []
    for r in pq.read_table(path).to_pylist():
        steps, _, final = r["answer"].partition("####")
        steps = re.sub(r"<<[^>]*>>", "", steps).strip()
        convs.append(_chat(r["question"], f"{steps}\nThe answer is {final.strip()}."))
    return convs


INSTRUCT_SOURCES = (
    "code_alpaca",
    "evol_codealpaca",
    "magicoder",
    "self_oss_instruct",
    "code_feedback",
)


def cached_sources() -> list[str]:
    """The instruct sources usable without a download: converted already, or their hub file cached."""
    from huggingface_hub import try_to_load_from_cache

    from nanocode.hub import hub_cache_dir

    out = []
    for name in INSTRUCT_SOURCES:
        repo, filename, _ = instruct.SOURCES[name]
        hit = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir(), repo_type="dataset")
        if (get_base_dir() / "sft" / f"instruct_{name}.jsonl").exists() or isinstance(hit, str):
            out.append(name)
    return out


def load_source(name: str, split: str = "train") -> list[dict]:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name == "synth":
        path = get_base_dir() / "sft" / f"synth_{split}.jsonl"
        if not path.exists():
            raise NanocodeError(f"{path} not found: run `python -m scripts.gen_synth` first")
        return load_jsonl(path)
    if name in INSTRUCT_SOURCES:
        return load_instruct(name, split)
    if name == "gsm8k":
        return load_gsm8k(split)
    if name.endswith(".jsonl"):
        return load_jsonl(name)
    raise NanocodeError(
        f"unknown source {name!r}: use synth, {', '.join(INSTRUCT_SOURCES)}, gsm8k or a path to a .jsonl file"
    )


def load_mixture(spec: str, split: str = "train", seed: int = 0) -> list[dict]:
    """The SFT task mixture for a --mix spec. Validation data uses each source once (weights ignored)
    so the held-out numbers do not depend on the training mix."""
    parsed = parse_mix(spec)
    if split == "val":
        parsed = [(n, 1.0) for n, w in parsed if w > 0 and not n.endswith(".jsonl")]
    return mixture([(n, load_source(n, split), w) for n, w in parsed], seed)
