"""Conversation data for SFT and DPO: the format and its validation, JSONL loading, the task
mixture, and the sources.

A conversation (one JSON object per line):
    {"messages": [{"role": "system"|"user"|"assistant", "content": str | [part, ...]}, ...]}
    part: {"type": "text", "text": str}
        | {"type": "tool_call", "name": str, "arguments": {...}}
        | {"type": "tool_output", "text": str}
An optional system message comes first; then user and assistant alternate, starting with the user.
Tool calls and tool outputs appear only inside assistant messages (the agent calls, the harness
answers inside the same turn). Extra keys on the conversation (e.g. the synthetic "files") are kept
and ignored. nanocode.tokenizer renders conversations checked here.

A preference pair (DPO, one JSON object per line), documented in scripts/code_dpo.py:
    {"prompt": {"messages": [... ending with a user message]}, "chosen": <assistant message>,
     "rejected": <assistant message>}

Sources: "synth" (always available: $NANOCODE_BASE_DIR/sft/synth_<split>.jsonl from
scripts/gen_synth.py), a path to any .jsonl file of conversations, and hub datasets downloaded on
first use when online (via nanocode.hub.hub_file): the code-instruct sets of nanocode/instruct.py,
converted to tool use ("code_alpaca", "evol_codealpaca", "magicoder", "self_oss_instruct",
"code_feedback"), and "gsm8k". The mixture repeats or subsamples each source by its weight and
shuffles with a fixed seed."""

import json
import random
import re
from pathlib import Path

import torch

from nanocode.common import NanocodeError, get_base_dir, read_jsonl

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "tool_call", "tool_output")


# -----------------------------------------------------------------------------
# validation


def validate_message(msg, where: str, role: str | None = None):
    """Raise NanocodeError naming `where` unless msg is a message (of `role`, if given)."""
    if not isinstance(msg, dict) or msg.get("role") not in ROLES or "content" not in msg:
        raise NanocodeError(
            f"{where}: expected {{'role': one of {ROLES}, 'content': ...}}, got {str(msg)[:80]!r}"
        )
    if role is not None and msg["role"] != role:
        raise NanocodeError(f"{where}: expected a {role} message, got {msg['role']}")
    content = msg["content"]
    if not isinstance(content, (str, list)):
        raise NanocodeError(
            f"{where}: content must be a string or a list of parts, got {type(content).__name__}"
        )
    for j, part in enumerate([] if isinstance(content, str) else content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in PART_TYPES:
            raise NanocodeError(
                f"{where} part {j}: expected an object with type one of {PART_TYPES}, got "
                f"{str(part)[:80]!r}"
            )
        if kind != "text" and msg["role"] != "assistant":
            raise NanocodeError(
                f"{where} part {j}: a {kind} part may only appear in an assistant message, not in "
                f"a {msg['role']} message"
            )
        if kind != "tool_call" and not isinstance(part.get("text"), str):
            raise NanocodeError(f"{where} part {j}: a {kind} part needs a string 'text'")
        args_ok = isinstance(part.get("name"), str) and isinstance(part.get("arguments"), dict)
        if kind == "tool_call" and not args_ok:
            raise NanocodeError(
                f"{where} part {j}: a tool_call part needs a string 'name' and an object "
                "'arguments'"
            )


def validate_conversation(conv, where: str = "conversation", last_role: str | None = "assistant"):
    """Raise NanocodeError naming `where` and the message if `conv` is not a well-formed
    conversation. last_role: the role it must end with ("assistant" for SFT, "user" for a DPO
    prompt, None: any). Returns conv."""
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
    """Check a DPO pair {"prompt": a conversation ending with a user message, "chosen" and
    "rejected": one assistant message each}; returns it, or raises NanocodeError naming `where`."""
    if not isinstance(pair, dict) or not all(k in pair for k in ("prompt", "chosen", "rejected")):
        raise NanocodeError(f"{where}: expected an object with 'prompt', 'chosen' and 'rejected'")
    validate_conversation(pair["prompt"], f"{where} prompt", last_role="user")
    validate_message(pair["chosen"], f"{where} chosen", "assistant")
    validate_message(pair["rejected"], f"{where} rejected", "assistant")
    return pair


def load_jsonl(path, kind: str = "conversation") -> list[dict]:
    """Read a JSONL file of conversations (kind="conversation"), prompts (kind="prompt": a
    conversation waiting for the assistant, its last message is the user's) or preference pairs
    (kind="preference"). Any bad line raises NanocodeError with the file and line number."""
    checks = {
        "conversation": validate_conversation,
        "prompt": lambda obj, where: validate_conversation(obj, where, last_role="user"),
        "preference": validate_preference,
    }
    if kind not in checks:
        raise ValueError(f"kind must be 'conversation', 'prompt' or 'preference', got {kind!r}")
    out = [checks[kind](obj, where) for where, obj in read_jsonl(path)]
    if not out:
        raise NanocodeError(f"{path} holds no records")
    return out


def write_jsonl(path, records):
    """Write records one JSON object a line (UTF-8, not escaped), creating parent directories;
    through a .tmp file, so a reader never sees half a file. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    tmp.replace(path)
    return path


def pad_batch(rows, pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, T) and targets (B, T) from rendered rows [(ids, mask), ...]: the target is the
    next token where its mask is 1 (an assistant token) and -1 (ignored by the loss) elsewhere. One
    conversation per row, padded at the end with pad_id (targets -1), so with causal attention no
    conversation ever sees another and padding changes nothing before it."""
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        ids, mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)
        x[i, : len(ids) - 1] = ids[:-1]
        # the mask of the token to predict (position t + 1) decides, not that of the input at t
        y[i, : len(ids) - 1] = torch.where(mask[1:], ids[1:], -1)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# the mixture


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """ "synth=1,gsm8k=0.5,/path/extra.jsonl=2" -> [("synth", 1.0), ("gsm8k", 0.5),
    ("/path/extra.jsonl", 2.0)]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        # split at the last "=": a path may hold one
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
    """Weight w means each example of the source is used floor(w) times plus a random share
    w - floor(w) (so 2.0 = two epochs of it, 0.25 = a quarter of it). Deterministic for a seed,
    then shuffled."""
    rng, out = random.Random(seed), []
    for _, items, weight in sources:
        out += items * int(weight) + rng.sample(items, round((weight - int(weight)) * len(items)))
    rng.shuffle(out)
    return out


# -----------------------------------------------------------------------------
# sources

HELD_OUT = 500  # sources with one split keep their last 500 examples for "val"
INSTRUCT_ROWS = 20000  # rows converted per instruct source (each one runs code; cached afterwards)


def load_instruct(name: str, split: str) -> list[dict]:
    """A public code-instruct dataset converted to tool use (nanocode.instruct), converted once and
    cached as $BASE/sft/instruct_<name>.jsonl; the drop counts are printed when converting."""
    from nanocode import instruct

    path = get_base_dir() / "sft" / f"instruct_{name}.jsonl"
    if not path.exists():
        rows = instruct.read_rows(instruct.fetch(name))[:INSTRUCT_ROWS]
        convs, stats = instruct.convert(rows, instruct.SOURCES[name][2])
        print(f"{name}: {len(rows)} rows -> {len(convs)} conversations; {dict(stats)}")
        if not convs:
            raise NanocodeError(f"{name}: none of {len(rows)} rows converted ({dict(stats)})")
        write_jsonl(path, convs)
    convs = load_jsonl(path)
    return convs[:-HELD_OUT] if split == "train" else convs[-HELD_OUT:]


def load_gsm8k(split: str) -> list[dict]:
    """The answer's calculator annotations <<a*b=c>> are dropped; "#### 42" becomes a last
    sentence."""
    import pyarrow.parquet as pq

    from nanocode.hub import hub_file

    file = f"main/{'train' if split == 'train' else 'test'}-00000-of-00001.parquet"
    path = hub_file("openai/gsm8k", file, hint="leave gsm8k out of --mix (synth works offline)")
    convs = []
    for row in pq.read_table(path).to_pylist():
        steps, _, final = row["answer"].partition("####")
        answer = f"{re.sub(r'<<[^>]*>>', '', steps).strip()}\nThe answer is {final.strip()}."
        user = {"role": "user", "content": row["question"]}
        convs.append({"messages": [user, {"role": "assistant", "content": answer}]})
    return convs


def cached_sources() -> list[str]:
    """The instruct sources usable without a download: converted already, or their hub file
    cached."""
    from huggingface_hub import try_to_load_from_cache

    from nanocode import instruct
    from nanocode.hub import hub_cache_dir

    out = []
    for name, (repo, filename, _) in instruct.SOURCES.items():
        # a path (str) when cached; None, or a sentinel object for a file known to be missing
        hit = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir(), repo_type="dataset")
        if (get_base_dir() / "sft" / f"instruct_{name}.jsonl").exists() or isinstance(hit, str):
            out.append(name)
    return out


def load_source(name: str, split: str = "train") -> list[dict]:
    """The conversations of one SFT source: "synth" (written by scripts.gen_synth), an instruct
    source, "gsm8k", or a path to a .jsonl file (which has no splits: `split` is ignored)."""
    from nanocode import instruct

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name == "synth":
        path = get_base_dir() / "sft" / f"synth_{split}.jsonl"
        if not path.exists():
            raise NanocodeError(f"{path} not found: run `python -m scripts.gen_synth` first")
        return load_jsonl(path)
    if name in instruct.SOURCES:
        return load_instruct(name, split)
    if name == "gsm8k":
        return load_gsm8k(split)
    if name.endswith(".jsonl"):
        return load_jsonl(name)
    raise NanocodeError(
        f"unknown source {name!r}: use synth, {', '.join(instruct.SOURCES)}, gsm8k or a path to a "
        ".jsonl file"
    )


def load_mixture(spec: str, split: str = "train", seed: int = 0) -> list[dict]:
    """The SFT task mixture for a --mix spec. Validation data uses each source once (weights
    ignored) so the held-out numbers do not depend on the training mix."""
    parsed = parse_mix(spec)
    if split == "val":
        # a .jsonl file has no splits (its val would be its train rows): left out of val
        parsed = [(n, 1.0) for n, w in parsed if w > 0 and not n.endswith(".jsonl")]
    return mixture([(n, load_source(n, split), w) for n, w in parsed], seed)
