"""DPO preference pairs from synthetic trajectories (nanocode/synth.py), for scripts/code_dpo.py.

A preference pair (for scripts/code_dpo.py) keeps the conversation up to the last user turn as the
prompt, the last assistant message as "chosen", and a "rejected" message with one flaw (PAIR_KINDS):
    malformed_call   a tool call naming a tool that does not exist or passing the wrong arguments
    not_unique       an edit_file whose old_string occurs more than once, then a claim it worked
    unbacked_claim   the verification (or the reading) is skipped but the answer claims its result
    style            the same work wrapped in praise, filler and hedging (breaks SOUL.md)
The rejected side's tool calls are also really executed, from the same files ("files": the state
before the last turn).
"""

import random
import re

from nanocode.synth_scenes import BANK, pick
from nanocode.synth_session import assistant_turns, execute_after, execute_turns


def flaw_malformed_call(rng, parts, files):
    """The first call to a tool that does not exist, or with a wrong argument name; then a claim."""
    i = next((i for i, p in enumerate(parts) if p["type"] == "tool_call"), None)
    if i is None:
        return None
    name, args = parts[i]["name"], dict(parts[i]["arguments"])
    if rng.random() < 0.5:
        name, key, old, default = pick(rng, *BANK["bad_calls"])
        args = {key: args.get(old, default)} if key else args
    else:
        key = next(iter(args))
        args[BANK["wrong_keys"].get(key, key + "_")] = args.pop(key)
    bad = {"type": "tool_call", "name": name, "arguments": args}
    # executed, the bad call gets an "error: ..." output back; the claim that follows ignores it.
    # Rejected: a call off the schema, and a claim of success over an error.
    return parts[:i] + [bad, {"type": "text", "text": pick(rng, *BANK["claims"])}]


def flaw_not_unique(rng, parts, files):
    """The first successful edit with its old_string cut to a piece that occurs 2+ times in the file
    (a whole line if one repeats, else a word), then a claim of success anyway."""
    edits = [i for i, p in enumerate(parts) if p.get("name") == "edit_file"]
    for i in [i for i in edits if parts[i + 1]["text"].startswith("edited")][:1]:
        args = parts[i]["arguments"]
        # the file as it is just before this edit: the turn's earlier calls replayed
        text = execute_turns(files, [parts[:i]])[1].get(args["path"], "")
        old = args["old_string"]
        rows = sorted(set(old.split("\n")), key=lambda w: (-len(w), w))
        words = sorted(set(re.findall(r"[A-Za-z_]\w+", old)), key=lambda w: (-len(w), w))
        if piece := next((w for w in rows + words if w.strip() and text.count(w) >= 2), None):
            # the edit fails ("occurs N times") and the claim says it worked: rejected for not
            # reading the tool's answer
            call = {"type": "tool_call", "name": "edit_file"}
            call["arguments"] = {**args, "old_string": piece}
            return parts[:i] + [call, {"type": "text", "text": pick(rng, *BANK["edit_claims"])}]
    return None


def flaw_unbacked_claim(rng, parts, files):
    """Drop the final check (a bash or read_file after other calls) and keep the claim; or, with
    one call, answer without looking at anything."""
    calls = [i for i, p in enumerate(parts) if p["type"] == "tool_call"]
    if not calls:
        return None
    # Rejected: a claim no output in the turn backs. The final check goes with its output (+2);
    # otherwise the answer is the last text alone, with no call at all.
    if parts[calls[-1]]["name"] in ("bash", "read_file") and len(calls) > 1:
        return parts[: calls[-1]] + parts[calls[-1] + 2 :]
    return [p for p in parts if p["type"] == "text"][-1:] or None


def flaw_style(rng, parts, files):
    """The same turn, opened with praise and closed with filler and hedging."""
    if not any(p["type"] == "text" for p in parts):
        return None
    opener, closer = pick(rng, *BANK["flattery_open"]), pick(rng, *BANK["flattery_close"])
    out = []
    for p in [{"type": "text", "text": opener}, *parts, {"type": "text", "text": closer}]:
        if out and p["type"] == out[-1]["type"] == "text":  # one text part, as the agent writes
            p = {"type": "text", "text": out.pop()["text"] + "\n\n" + p["text"]}
        out.append(p)
    return out


# every flaw_NAME above, as "NAME", in the order they are defined
FLAWS = {name[5:]: f for name, f in list(globals().items()) if name.startswith("flaw_")}
PAIR_KINDS = list(FLAWS)


def make_pair(record: dict, rng, kind: str | None = None) -> dict | None:
    """A preference pair from a trajectory's last assistant turn: chosen = that message, rejected =
    a flawed version whose tool calls are really executed from the same files (the state after the
    earlier turns). None if `kind` (or, without one, every flaw) does not apply."""
    turns = assistant_turns(record)
    if not turns or record.get("setup"):  # a pair's side is replayed from plain files: no setup
        return None
    parts = list(turns[-1])
    files = record["last_turn_files"] if len(turns) > 1 else record["files"]
    for k in [kind] if kind else rng.sample(PAIR_KINDS, len(PAIR_KINDS)):
        plan = FLAWS[k](rng, parts, files)
        # a flaw that leaves the turn as it was makes no pair: chosen and rejected would be equal
        if plan is None or (rejected := execute_after(files, parts, plan)) == parts:
            continue
        pair = {"prompt": {"messages": record["messages"][:-1]}, "kind": k, "task": record["kind"]}
        sides = {"chosen": parts, "rejected": rejected}
        pair.update({side: {"role": "assistant", "content": c} for side, c in sides.items()})
        return {**pair, "files": files}
    return None


def pair(i: int, record: dict, seed: int) -> dict | None:
    # one rng per record, from (seed, i): a pair does not depend on the records made before it
    return make_pair(record, random.Random(seed * 1_000_003 + i))
