"""Synthetic tool-use trajectories, with tool outputs from really running the tools.

Every trajectory starts from a small set of files: functions taken from the local code corpus
(`nanocode.dataset.iter_documents`) or small programs from templates. The generator writes them into
a scratch directory and acts like the agent: each tool call goes through `nanocode.tools.run_tool`
there, its real output is recorded, and what the assistant says next is chosen from what the output
actually says. Nothing a tool "printed" is written by hand. The assistant's text follows SOUL.md: it
reads before editing, verifies, states what the tool output showed, and skips praise and filler.

The kinds are data: nanocode/data/synth_kinds.json describes each kind once, with its sampling
weight, whether training sees it ("seen": false kinds appear only among the held-out validity
prompts), its scene (the starting files and what is known about them: a scene_NAME function of
synth_scenes.py, or draws and file templates in the JSON's "scenes"), the user's phrasings ("ask")
and the steps:
    [tool, {arguments}, name?]   a real tool call ("{x}" is ctx["x"]); `views` of its output go
                                 into ctx (and the stripped output into ctx[name])
    ["say", phrase, ...]         the assistant says one of the phrases (formatted with ctx)
    ["user", phrase, ...]        a new user turn
    ["if", key, [then], [else]]  says a phrase of `then` if ctx[key] (e.g. "failed": the last call
                                 failed), else of `else`
    ["deny", tool, {arguments}]  a call the user refused at the approval prompt (it never runs)
    ["maybe", p, step...]        the steps with probability p; ["either", [steps], [steps]...] one
    ["expect", text]             the generator's own check that the last output says text
    "name"                       a routine of the JSON, or the move move_NAME (Python, below)
A kind with "variants" draws one (by "weight") whose fields replace the kind's. A phrase "@name" is
the bank of that name in synth_phrases.json; in draws and templates "{3..9}" and "{a|b}" are a
random number and option. A share of sessions (FOLLOWUP_RATE) gets the JSON's "followups" turns.
The same seed gives the same records. A record is a conversation with extra keys, so that
nanocode/synth_session.py can replay and check it:
    {"messages": [user, assistant, (user, assistant)...], "kind": str, "files": {path: text} before,
     "final_files": {path: text} after, "setup": shell command run first (only some kinds)}

The corpus's functions and files come from synth_corpus.py, the scenes from synth_scenes.py; DPO
pairs are made in synth_pairs.py.
"""

import json
import random
import re
from pathlib import Path

from nanocode.synth_scenes import (
    BANK,
    SCENES,
    expand,
    phrases,
    pick,
    quoted,
    returns_phrase,
    unique_context,
)
from nanocode.synth_session import Session, read_tree

_DATA = Path(__file__).parent / "data"
_SPEC = json.loads((_DATA / "synth_kinds.json").read_text())
KINDS, ROUTINES, FOLLOWUPS = _SPEC["kinds"], _SPEC["routines"], _SPEC["followups"]
DATA_SCENES = _SPEC["scenes"]  # scenes that are only draws and file templates
FOLLOWUP_RATE = 0.33  # share of sessions (of the kinds that allow it) that get 1-2 follow-up turns
TASKS = [k for k, v in KINDS.items() if v["seen"]]  # the kinds training data is drawn from
# held out of training: the validity prompts of these tell generalization from recall
UNSEEN = [k for k, v in KINDS.items() if not v["seen"]]
CALLING = [k for k in TASKS if k != "no_tool"]  # validity prompts ask for a tool call


# -----------------------------------------------------------------------------
# what the assistant can say about code and tool outputs


def show_output(out: str, max_lines: int = 6) -> str:
    """A tool output as a code block; a long one shows its first lines and its last."""
    rows = out.rstrip("\n").split("\n")
    if len(rows) <= max_lines:
        return "```\n" + "\n".join(rows) + "\n```"
    rows = rows[: max_lines - 2] + ["..."] + rows[-1:]
    return "```\n" + "\n".join(rows) + f"\n```\n({len(out.rstrip().splitlines())} lines in all.)"


def failed(out: str) -> bool:
    # tools.bash's note on a nonzero exit, run_tool's error prefix, or a traceback anywhere
    return "[exit code" in out or "Traceback" in out or out.startswith("error:")


def error_line(out: str) -> str:
    rows = [x for x in out.strip().split("\n") if x and not x.startswith("[exit code")]
    return rows[-1] if rows else out.strip()


def run_summary(out: str) -> str:
    """The result of a test run: our scripts' "N passed, M failed", pytest's count of FAILED tests
    or "N passed", "all green" for pytest's dots, else the error line."""
    if m := re.search(r"\d+ passed, \d+ failed", out):
        return m[0]
    if fails := [x for x in out.split("\n") if x.startswith("FAILED ") and "::" in x]:
        return f"{len(fails)} failing test(s)"
    if m := re.search(r"\d+ passed", out):
        return m[0]
    return "all green" if "[100%]" in out and not failed(out) else error_line(out)


def views(tool: str, out: str) -> dict:
    """What a phrase may quote from a tool's output: {out} (stripped), its {first} and {last} line
    (without read_file's line numbers), {word} (the first word), {count} (non-empty lines), {error}
    (the error line), {shown} (a code block), {said} (inline when one short line, else a block),
    {summary} (a test run's result) and {fail} (its first failing test); "failed" for "check"."""
    text = out.strip()
    rows = [x.split("\t", 1)[-1] if tool == "read_file" else x for x in text.split("\n")]
    fails = [x[5:] for x in rows if x.startswith("FAIL ")]
    said = f"`{text}`." if "\n" not in text and len(text) <= 60 else "\n" + show_output(out)
    return {
        **{"out": text, "first": rows[0].strip() or "(blank)", "last": rows[-1].strip()},
        **{"word": (text.split() or [""])[0], "count": sum(bool(x.strip()) for x in rows)},
        **{"error": error_line(out), "shown": show_output(out), "said": said},
        **{"summary": run_summary(out), "fail": fails[0] if fails else "", "failed": failed(out)},
    }


def grep_hits(out: str) -> list:
    """ "path:line" of each match in grep output."""
    return ["{}:{}".format(*x.split(":")[:2]) for x in out.split("\n") if ":" in x]


# -----------------------------------------------------------------------------
# moves: the steps that need Python (they read outputs too closely for a phrase)


def move_explain(s, rng, ctx):
    """A short explanation built only from facts visible in the code the assistant just read."""
    fa = ctx["facts"]
    text = [pick(rng, *BANK["explain_open"]).format(**ctx)]
    if fa["doc"]:
        text.append(pick(rng, *BANK["explain_doc"]).format(doc=fa["doc"]))
    args = [a for a in fa["args"] if a not in ("self", "cls")]
    text.append(f"It takes {quoted(args, 4)}." if args else "It takes no arguments.")
    body = [f"loops `{x}`" if x.startswith("while") else f"loops over `{x}`" for x in fa["loops"]]
    body = body[:1] + [f"branches on `{x}`" for x in fa["ifs"][:1]]
    body += [f"catches `{x}`" for x in fa["catches"][:1]]
    body += [f"raises {quoted(fa['raises'], 2)}"] if fa["raises"] else []
    text += [f"It {quoted(body, 9, quote='')}."] if body else []
    if calls := [c for c in fa["calls"] if c not in fa["raises"]]:
        text.append(pick(rng, *BANK["explain_calls"]).format(calls=quoted(calls)))
    generator = "It is a generator: it yields its results instead of returning them."
    s.say(" ".join(text + [generator if fa["yields"] else f"It {returns_phrase(fa)}."]))


def move_hit(s, rng, ctx):
    """The file and line of the first grep match, and the line to start reading from around it."""
    path, line = ctx["out"].split("\n")[0].split(":")[:2]
    ctx.update(hit_path=path, hit_line=int(line), offset=max(1, int(line) - ctx["before"]))


def move_python_fallback(s, rng, ctx):
    if "command not found" in ctx["out"] and ctx["py"] == "python":
        s.say("`python` isn't on the PATH here; using `python3`.")
        ctx.update(views("bash", s.call("bash", command=f"python3 {ctx['path']}")))


def move_pytest_fallback(s, rng, ctx):
    if "No module named pytest" in ctx["out"]:
        s.say("pytest isn't installed here; the test file runs on its own, so I'll use that.")
        ctx["cmd"] = f"python3 {ctx['test']}"
        ctx.update(views("bash", s.call("bash", command=ctx["cmd"])))


def move_overview(s, rng, ctx):
    """The project in one paragraph: file count, the Python files, and, when the kind ran them,
    the total of `wc -l` ({wc}) and the first top-level functions grep found ({defs})."""
    files = ctx["files"]
    pys = sorted(p for p in files if p.endswith(".py"))
    text = f"{len(files)} files; the Python code is in {quoted(pys, 4)}"
    # chr(10) is "\n": before Python 3.12 an f-string expression may not hold a backslash
    text += f" ({ctx['wc'].split(chr(10))[-1].split()[0]} lines in all)." if "wc" in ctx else "."
    if defs := re.findall(r"^([^:\n]+):(\d+):\s*def (\w+)\(", ctx.get("defs", ""), re.M):
        text += " Top-level functions: " + ", ".join(f"`{n}` ({p}:{i})" for p, i, n in defs[:5])
        text += "."
    if any(p.startswith("tests/") for p in files):
        text += " There's a test file under `tests/`."
    s.say(text)


def move_list_todos(s, rng, ctx):
    hits = [x for x in ctx["out"].split("\n") if "TODO" in x or "FIXME" in x]
    items = [f"- `{':'.join(x.split(':')[:2])}`: {x.split('#', 1)[-1].strip()}" for x in hits]
    s.say(f"{len(hits)} of them:\n" + "\n".join(items))


def move_say_longest(s, rng, ctx):
    rows = [x.split() for x in ctx["out"].split("\n") if x.strip() and not x.endswith(" total")]
    s.say(f"`{rows[-1][1].removeprefix('./')}`, with {rows[-1][0]} lines.")


def move_say_hits(s, rng, ctx):
    hits = grep_hits(ctx["out"])
    s.say(f"{len(hits)} match(es): " + ", ".join(f"`{h}`" for h in hits[:6]) + ".")


def move_say_usages(s, rng, ctx):
    rows = ctx["out"].split("\n")
    defs = grep_hits("\n".join(x for x in rows if re.search(rf"def {ctx['fname']}\(", x)))
    calls = [h for h in grep_hits(ctx["out"]) if h not in defs]
    text = f"`{ctx['fname']}` is defined at `{defs[0]}`. " if defs else ""
    s.say(text + (f"It's called from {quoted(calls, 9)}." if calls else "Nothing calls it."))


def move_rename(s, rng, ctx):
    """Edit every line naming the function, file by file, each edit with a unique old_string."""
    old, new = ctx["fname"], ctx["new_name"]
    paths = sorted({h.split(":")[0] for h in grep_hits(ctx["out"])})
    s.say(f"`{old}` appears in {len(paths)} files: {quoted(paths, 5)}.")
    for path in paths:
        if rng.random() < 0.5:
            s.call("read_file", path=path)
        # until no whole word is left; each edit renames every occurrence in its context
        while m := re.search(rf"\b{old}\b", text := s.read(path)):
            near = unique_context(text, text[: m.start()].count("\n") + 1)
            renamed = re.sub(rf"\b{old}\b", new, near)
            s.call("edit_file", path=path, old_string=near, new_string=renamed)
    ctx["n_files"] = len(paths)


def move_list_functions(s, rng, ctx):
    """Name the functions a grep for ctx["def_pattern"] found in a non-Python file, without the
    keywords a C-style pattern also catches; if there are none, read the file's head and say so."""
    names = []
    for row in ctx["out"].split("\n"):
        m = re.search(ctx["def_pattern"], row.split(":", 2)[-1]) if ":" in row else None
        if m and m[1] not in names and m[1] not in ("if", "for", "while", "switch", "return"):
            names.append(m[1])
    if names:
        more = " (and more)." if len(names) > 6 else "."
        return s.say(f"`{ctx['path']}` defines {quoted(names, 6)}{more}")
    s.call("read_file", path=ctx["path"], limit=20)
    s.say(f"No function definitions matched in `{ctx['path']}`; the first lines are above.")


# each move_NAME is the step "NAME" of synth_kinds.json
MOVES = {name[5:]: f for name, f in list(globals().items()) if name.startswith("move_")}


# -----------------------------------------------------------------------------
# running a kind's steps


def fill(args: dict, ctx: dict) -> dict:
    """Tool arguments from their templates; "{x}" alone is ctx["x"] itself (an int stays an int)."""
    out = {}
    for key, value in args.items():
        if isinstance(value, str):
            whole = re.fullmatch(r"\{(\w+)\}", value)
            value = ctx[whole[1]] if whole else value.format(**ctx)
        out[key] = value
    return out


def run_steps(s, rng, ctx: dict, steps: list):
    """Play a kind's steps (the little language of the module docstring) on Session `s`, updating
    ctx; routines, "maybe" and "either" recurse. A failed "expect" raises RuntimeError: the kind
    assumed an output the tool did not give."""

    def say(options):
        return pick(rng, *phrases(options)).format(**ctx)

    for step in steps:
        if isinstance(step, str):
            run_steps(s, rng, ctx, ROUTINES[step]) if step in ROUTINES else MOVES[step](s, rng, ctx)
            continue
        head, *rest = step
        if head == "say":
            s.say(say(rest))
        elif head == "user":
            s.user(say(rest))
        elif head == "if":
            s.say(say(rest[1] if ctx[rest[0]] else rest[2]))
        elif head == "deny":
            s.deny(rest[0], **fill(rest[1], ctx))
        elif head == "maybe":
            if rng.random() < rest[0]:
                run_steps(s, rng, ctx, rest[1:])
        elif head == "either":
            run_steps(s, rng, ctx, pick(rng, *rest))
        elif head == "expect":
            if rest[0].format(**ctx) not in ctx["out"]:
                raise RuntimeError(f"expected {rest[0].format(**ctx)!r} in output {ctx['out']!r}")
        else:
            ctx.update(views(head, s.call(head, **fill(rest[0], ctx))))
            if len(rest) > 1:
                ctx[rest[1]] = ctx["out"]


def make_trajectory(kind: str, rng, corpus: list, variant: int | None = None) -> dict:
    """A record of `kind`: of its variant number `variant`, or of one drawn by weight."""
    spec = KINDS[kind]
    if "variants" in spec:
        weights = [v.get("weight", 1) for v in spec["variants"]]
        variant = rng.choices(range(len(weights)), weights)[0] if variant is None else variant
        spec = {**spec, **spec["variants"][variant]}
    # A data scene gives defaults (files, draws) that the kind's own fields override, draw by
    # draw; it has no Python scene function, so the "none" scene (no files) runs for it.
    data = DATA_SCENES.get(spec.get("scene"), {})
    spec = {**data, **spec, "draw": {**data.get("draw", {}), **spec.get("draw", {})}}
    scene = SCENES["none" if data else spec.get("scene", "none")]
    scene = scene(rng, corpus, **spec.get("scene_args", {}))
    ctx = {"py": "python3", "before": 1, **scene}
    for key, template in spec["draw"].items():  # in order: a draw may use those before it
        value = expand(rng, template)
        ctx[key] = value.format(**ctx) if isinstance(value, str) else value
    if "files" in spec:
        ctx["files"] = {k.format(**ctx): v.format(**ctx) for k, v in spec["files"].items()}
    user = pick(rng, *phrases(spec["ask"])).format(**ctx)
    with Session(ctx["files"], ctx.get("setup")) as s:
        run_steps(s, rng, ctx, spec["steps"])
        # with probability FOLLOWUP_RATE, when the kind allows it, 1-2 follow-up turns
        if spec.get("followups", True) and rng.random() < FOLLOWUP_RATE:
            for _ in range(1 + (rng.random() < 0.3)):
                follow_up(s, rng)
        return {**s.record(user), "kind": kind}


def follow_up(s, rng):
    """A follow-up turn about the files as they are now; one that needs what is not there (a
    Python file, one that prints, a `def`) becomes the last one: thanks."""
    files = read_tree(s.dir)
    pys = [p for p in files if p.endswith(".py")]
    path = pick(rng, *(pys or sorted(files))) if files else ""
    text = files.get(path, "")
    names = re.findall(r"^def (\w+)\(", "\n".join(files[p] for p in pys), re.M)
    main = path.endswith(".py") and ("__main__" in text or "print(" in text)
    met = {"": True, "file": bool(path), "py": path.endswith(".py"), "main": main, "defs": names}
    spec = pick(rng, *FOLLOWUPS)
    spec = spec if met[spec["needs"]] else FOLLOWUPS[-1]
    ctx = {"py": "python3", "before": 1, "path": path, "def_name": pick(rng, *names or [""])}
    ctx["line"] = rng.randint(1, max(1, text.count("\n")))
    run_steps(s, rng, ctx, [["user", *spec["ask"]], *spec["steps"]])


# -----------------------------------------------------------------------------
# the draw: which kind, trajectories, held-out validity prompts


def draw_kind(rng, kinds: list | None = None, weights: dict | None = None) -> str:
    """A kind drawn with the table's weights, or those `weights` gives instead (from the seen
    kinds unless `kinds` names others)."""
    kinds = kinds or TASKS
    return rng.choices(kinds, [(weights or {}).get(k, KINDS[k]["weight"]) for k in kinds])[0]


def trajectory(i: int, seed: int, corpus: list, kinds=None, weights: dict | None = None) -> dict:
    """Trajectory number i of a seed: depends only on (seed, i), so any one can be made alone."""
    # while i < 1_000_003, distinct (seed, i) pairs never share an rng seed
    rng = random.Random(seed * 1_000_003 + i)
    return make_trajectory(draw_kind(rng, kinds, weights), rng, corpus)


def validity_prompt(i: int, seed: int, corpus: list) -> dict:
    """{"messages": [a user turn], "kind", "seen", "template"}: prompt i of a seed. A third are of
    an unseen kind, a sixth are seen kinds in a phrasing training never uses, the rest as in
    training."""
    rng = random.Random(seed * 1_000_003 + i)
    r = rng.random()
    kind = draw_kind(rng, UNSEEN if r < 1 / 3 else CALLING)
    msgs = make_trajectory(kind, rng, corpus)["messages"][:1]
    template = "unseen" if 1 / 3 <= r < 1 / 2 else "seen"
    if template == "unseen":
        text = pick(rng, *BANK["unseen_phrasings"]).format(u=msgs[0]["content"])
        msgs = [{"role": "user", "content": text}]
    return {"messages": msgs, "kind": kind, "seen": r >= 1 / 2, "template": template}
