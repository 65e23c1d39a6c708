"""Synthetic tool-use trajectories, with tool outputs from really running the tools.

Every trajectory starts from a small set of files: functions taken from the local code corpus
(`nanocode.dataset.iter_documents`) or small programs from templates. The generator writes them into
a scratch directory and acts like the agent: each tool call goes through `nanocode.tools.run_tool`
there, its real output is recorded, and what the assistant says next is chosen from what the output
actually says. Nothing a tool "printed" is written by hand. The assistant's text follows SOUL.md: it
reads before editing, verifies, states what the tool output showed, and skips praise and filler.

The kinds are data: nanocode/data/synth_kinds.json describes each kind once, with its sampling
weight, whether training sees it ("seen": false kinds appear only among the held-out validity
prompts), its scene (the starting files and what is known about them: a scene_NAME function here,
or draws and file templates in the JSON's "scenes"), the user's phrasings ("ask") and the steps:
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

The corpus's functions and files come from synth_corpus.py; DPO pairs are made in synth_pairs.py.
"""

import ast
import json
import random
import re
from pathlib import Path

from nanocode.synth_session import Session, read_tree

_DATA = Path(__file__).parent / "data"
_SPEC = json.loads((_DATA / "synth_kinds.json").read_text())
KINDS, ROUTINES, FOLLOWUPS = _SPEC["kinds"], _SPEC["routines"], _SPEC["followups"]
DATA_SCENES = _SPEC["scenes"]  # scenes that are only draws and file templates
BANK = json.loads((_DATA / "synth_phrases.json").read_text())
FOLLOWUP_RATE = 0.33  # share of sessions (of the kinds that allow it) that get 1-2 follow-up turns
TASKS = [k for k, v in KINDS.items() if v["seen"]]  # the kinds training data is drawn from
UNSEEN = [k for k, v in KINDS.items() if not v["seen"]]
CALLING = [k for k in TASKS if k != "no_tool"]  # validity prompts ask for a tool call
QUOTES = '"' * 3  # a docstring's quotes (so written, they open no string here)
RANDOM = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}|\{([^{}]*\|[^{}]*)\}")


def pick(rng, *options):
    return options[rng.randrange(len(options))]


def phrases(items: list) -> list:
    """The phrasings, each "@name" replaced by the bank of that name."""
    return [p for x in items for p in (BANK[x[1:]] if x.startswith("@") else [x])]


def expand(rng, template):
    """A template's random parts filled in, inner ones first: "{3..9}" a number, "{a|b}" an option.
    A list or "@bank" gives one of its items; a template that is only "{3..9}" gives an int."""
    if isinstance(template, str) and template.startswith("@"):
        template = BANK[template[1:]]
    if isinstance(template, list):
        template = pick(rng, *template)
    if not isinstance(template, str):
        return template
    if m := re.fullmatch(r"\{(-?\d+)\.\.(-?\d+)\}", template):
        return rng.randint(int(m[1]), int(m[2]))

    def one(m):
        return str(rng.randint(int(m[1]), int(m[2]))) if m[1] else pick(rng, *m[3].split("|"))

    while RANDOM.search(template):
        template = RANDOM.sub(one, template)
    return template


def lines(code: list) -> str:
    return "\n".join(code) + "\n"


# -----------------------------------------------------------------------------
# what the assistant can say about code and tool outputs


def _list(items: list, limit: int = 3, last: str = "and", quote: str = "`") -> str:
    items = [f"{quote}{x}{quote}" for x in items[:limit]]
    return "".join(items) if len(items) < 2 else ", ".join(items[:-1]) + f" {last} " + items[-1]


def _returns(fa: dict) -> str:
    if fa["returns"] not in ([], ["None"]):
        return f"returns {_list(fa['returns'], last='or')}"
    if fa["long_return"]:
        return "returns a value it computes over several lines"
    return "returns nothing useful (None); it works by side effect"


def explanation(rng, ctx: dict) -> str:
    """A short explanation built only from facts visible in the code the assistant just read."""
    fa = ctx["facts"]
    s = [pick(rng, *BANK["explain_open"]).format(**ctx)]
    if fa["doc"]:
        s.append(pick(rng, *BANK["explain_doc"]).format(doc=fa["doc"]))
    args = [a for a in fa["args"] if a not in ("self", "cls")]
    s.append(f"It takes {_list(args, 4)}." if args else "It takes no arguments.")
    body = [f"loops `{x}`" if x.startswith("while") else f"loops over `{x}`" for x in fa["loops"]]
    body = body[:1] + [f"branches on `{x}`" for x in fa["ifs"][:1]]
    body += [f"catches `{x}`" for x in fa["catches"][:1]]
    body += [f"raises {_list(fa['raises'], 2)}"] if fa["raises"] else []
    s += [f"It {_list(body, 9, quote='')}."] if body else []
    if calls := [c for c in fa["calls"] if c not in fa["raises"]]:
        s.append(pick(rng, *BANK["explain_calls"]).format(calls=_list(calls)))
    generator = "It is a generator: it yields its results instead of returning them."
    return " ".join(s + [generator if fa["yields"] else f"It {_returns(fa)}."])


def show_output(out: str, max_lines: int = 6) -> str:
    """A tool output as a code block; a long one shows its first lines and its last."""
    rows = out.rstrip("\n").split("\n")
    if len(rows) <= max_lines:
        return "```\n" + "\n".join(rows) + "\n```"
    rows = rows[: max_lines - 2] + ["..."] + rows[-1:]
    return "```\n" + "\n".join(rows) + f"\n```\n({len(out.rstrip().splitlines())} lines in all.)"


def failed(out: str) -> bool:
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


def unique_context(text: str, line_no: int) -> str:
    """The shortest run of whole lines around line `line_no` (1-based) that occurs once in text."""
    rows = text.split("\n")
    lo = hi = line_no - 1
    while True:
        s = "\n".join(rows[lo : hi + 1])
        if text.count(s) == 1 or (lo == 0 and hi == len(rows) - 1):
            return s
        if lo > 0:
            lo -= 1
        if text.count("\n".join(rows[lo : hi + 1])) != 1 and hi < len(rows) - 1:
            hi += 1


def _misquote(line: str, text: str) -> str:
    """How a person might quote a line from memory (spacing changed), so that it is not in text."""
    q = line.strip()
    for cand in (re.sub(r" ([+\-*/%<>=]+) ", r"\1", q), q.replace(" ", "  ", 1), q + " "):
        if cand != q and cand not in text:
            return cand
    raise ValueError(f"cannot misquote {line!r}")


# -----------------------------------------------------------------------------
# scenes: the files a trajectory starts from, and what is known about them (ctx)


def program_request(rng) -> tuple:
    """(user request, file name, source, argv string) for a small deterministic program."""
    spec = pick(rng, *BANK["programs"])
    d = {k: expand(rng, v) for k, v in spec["draw"].items()}
    code = lines(spec["code"]).format(**d)
    return spec["ask"].format(**d), d["path"], code, spec["argv"].format(**d)


def small_script(rng) -> tuple:
    """(file name, source) of a short program that prints something, like a user's main.py."""
    op, sym = pick(rng, *BANK["ops"])
    name = expand(rng, BANK["script_names"])
    # now and then one of the write-and-run programs (when it takes no arguments)
    if rng.random() < 1 / 9 and not (program := program_request(rng))[3]:
        return name, program[2]
    template = expand(rng, lines(pick(rng, *BANK["scripts"])))
    return name, template.format(op=op, sym=sym, a=rng.randint(1, 20), b=rng.randint(1, 20))


def other_program(rng, bank: str = "js_c_programs") -> tuple:
    """(file name, source) of a JS, C or shell template, filled in."""
    name, code = pick(rng, *BANK[bank])
    fill = {"a": rng.randint(3, 9), "b": rng.randint(2, 12), "c": rng.randint(1, 30)}
    return name, lines(code).format(w=expand(rng, "{demo|tool|app}"), **fill)


def scene_module(rng, corpus) -> dict:
    """A module made of 1-3 corpus functions, one of them the subject: its facts, its lines, a range
    of lines a..b in the module, a line past its end (want) and a file name it does not have."""
    chosen = rng.sample(corpus, rng.randint(1, 3))
    while len({f["facts"]["name"] for f in chosen}) != len(chosen):  # one "the function" only
        chosen.pop()
    target = rng.randrange(len(chosen))
    path = expand(rng, "@module_dirs") + expand(rng, "@module_names") + ".py"
    text = "\n\n\n".join(f["src"] for f in chosen) + "\n"
    f, n = chosen[target], text.count("\n")
    start = 1 + sum(g["src"].count("\n") + 3 for g in chosen[:target])
    end = start + f["src"].count("\n")
    a = rng.randint(1, max(1, n - 5))
    b = min(n, a + rng.randint(3, 12))
    ctx = {"files": {path: text}, "path": path, "text": text, "src": f["src"], "facts": f["facts"]}
    ctx.update(name=f["facts"]["name"], start=start, end=end, span=end - start + 3)
    ctx.update(a=a, b=b, size=b - a + 1, want=n + rng.randint(20, 200))
    names = [m + ".py" for m in BANK["module_names"] if m + ".py" != Path(path).name]
    fa, at = f["facts"], f"(`{path}`, lines {start}-{end})"
    args = [x for x in fa["args"] if x not in ("self", "cls")]
    catch = f"; it does catch `{fa['catches'][0]}`." if fa["catches"] else "."
    ctx.update(raises=_list(fa["raises"]), calls=_list(fa["calls"], 5), args=_list(args, 6))
    ctx.update(at=at, catch=catch, n_args=len(args), returns=_returns(fa), yields=fa["yields"])
    return {**ctx, "wrong": pick(rng, *names)}


def scene_module2(rng, corpus) -> dict:
    """A module, and another one beside it (unless it defines the same name)."""
    ctx, other = scene_module(rng, corpus), scene_module(rng, corpus)
    if other["path"] != ctx["path"] and not re.search(rf"def {ctx['name']}\(", other["text"]):
        ctx["files"][other["path"]] = other["text"]
    return ctx


def scene_string(rng, corpus) -> dict:
    """A module with a string literal that occurs once in it (else the subject's `def` line)."""
    for _ in range(20):
        ctx = scene_module(rng, corpus)
        found = re.findall(r"\"([A-Za-z][A-Za-z ,']{8,40})\"", ctx["src"])
        if found := [s for s in found if ctx["text"].count(s) == 1]:
            break
    needle = pick(rng, *found) if found else f"def {ctx['name']}("
    return {**ctx, "needle": needle, "needle_re": re.escape(needle), "before": 3}


def _edit(rng, ctx: dict) -> tuple | None:
    """One targeted change to the subject function: (kind, old string, new string, fields)."""
    fa, text = ctx["facts"], ctx["text"]
    rows = text.split("\n")
    first = fa["args"][0] if fa["args"] else "self"
    options = ["guard"] if first not in ("self", "cls") and not first.startswith("*") else []
    options += ["doc"] * (not fa["has_doc"]) + ["default"] * bool(fa["defaults"])
    kind = pick(rng, *options) if options else None
    if kind == "doc":
        line = ctx["start"] + [x.rstrip()[-1:] == ":" for x in ctx["src"].split("\n")].index(True)
        doc = ctx["name"].strip("_").replace("_", " ").capitalize()
        old = unique_context(text, line)
        indent = re.match(r"\s*", rows[line])[0] or "    "
        return "doc", old, old + f"\n{indent}{QUOTES}{doc}.{QUOTES}", {"doc": doc}
    if kind == "default":
        arg, val = fa["defaults"][0]
        new = (not val) if isinstance(val, bool) else (val * 2 if val else 1)
        pattern = rf"\b({arg}\s*=\s*){val!r}(?![\w.])"
        hits = [i for i in range(ctx["start"], ctx["end"] + 1) if re.search(pattern, rows[i - 1])]
        if hits:
            old = unique_context(text, hits[0])
            new_old = re.sub(pattern, rf"\g<1>{new!r}", old, count=1)
            return "default", old, new_old, {"arg": arg, "val": val, "new": new}
    if options and options[0] == "guard":  # chosen, or the fallback when no default matched
        line = ctx["start"] + fa["body_line"] - 1
        indent = re.match(r"\s*", rows[line - 1])[0]
        old = unique_context(text, line)
        guard = f"{indent}if {first} is None:\n{indent}    raise ValueError"
        return "guard", old, f'{guard}("{first} must not be None")\n{old}', {"arg": first}
    return None


def scene_edit(rng, corpus) -> dict:
    """A module, and a change to its subject function that the user asks for."""
    for _ in range(20):
        ctx = scene_module(rng, corpus)
        if edit := _edit(rng, ctx):
            break
    else:
        raise ValueError("no corpus function in 20 draws takes one of the edits")
    kind, old, new, fields = edit
    request = pick(rng, *BANK["edit_asks"][kind]).format(name=ctx["name"], **fields)
    change = BANK["edit_changes"][kind].format(name=ctx["name"], **fields)
    ctx.update(old=old, new=new, request=request, request_lc=request[0].lower() + request[1:])
    ctx.update(change=change, Change=change[0].upper() + change[1:])
    return {**ctx, "span_after": ctx["span"] + new.count("\n") - old.count("\n")}


def scene_buggy(rng, corpus=None, broken: float = 1.0, style: str = "script") -> dict:
    """A module with a function (with a bug, with probability `broken`) and its tests (`style`:
    "script", which also runs under pytest, or "unittest"). The inputs are drawn until the tests
    catch the bug (checked by running both versions)."""
    spec = pick(rng, *BANK["buggy"])
    fname, src = spec["name"], lines(spec["src"])
    good, bad = pick(rng, *spec["bugs"])
    ns_good, ns_bad = {}, {}
    exec(src, ns_good)
    exec(src.replace(good, bad), ns_bad)
    for _ in range(20):
        cases = [ast.literal_eval(f"({expand(rng, c)},)") for c in spec["cases"]]
        wants = [ns_good[fname](*c) for c in cases]
        try:
            if [repr(ns_bad[fname](*c)) for c in cases] != [repr(w) for w in wants]:
                break
        except Exception:  # a crashing bug is caught too
            break
    mod, template = expand(rng, "@test_modules"), BANK["test_files"][style]
    calls = [f"{fname}({', '.join(map(repr, c))})" for c in cases]
    ctx = {"mod": mod, "fname": fname, "Fname": fname.title().replace("_", ""), "call": calls[0]}
    test = [x.format(**ctx) for x in template["head"]]
    for i, (call, want) in enumerate(zip(calls, wants), 1):
        said = call.replace("{", "{{").replace("}", "}}")  # inside the test's f-string
        fields = {**ctx, "i": i, "call": call, "want": repr(want), "said": said}
        test += [x.format(**fields) for x in template["case"]]
    test += [x.format(**ctx) for x in template["tail"]]
    code = src.replace(good, bad) if rng.random() < broken else src
    ctx.update(mod=f"{mod}.py", test=f"test_{mod}.py", stem=f"test_{mod}")
    ctx.update(
        files={f"{mod}.py": code, f"test_{mod}.py": lines(test)}, cmd=f"python3 test_{mod}.py"
    )
    if code != src:
        line = code[: code.index(bad)].count("\n") + 1
        old = unique_context(code, line)
        ctx.update(line=line, old=old, new=old.replace(bad, good), quoted=_misquote(bad, code))
    return {**ctx, "bad_s": bad.strip(), "good_s": good.strip()}


def scene_multi(rng, corpus) -> dict:
    """A module with a working function, its tests, and a script that calls it."""
    ctx = scene_buggy(rng, broken=0)
    f = ctx["fname"]
    main = f'from {ctx["mod"][:-3]} import {f}\n\n\nif __name__ == "__main__":\n'
    ctx["files"][expand(rng, "{main|report|cli}.py")] = main + f"    print({ctx['call']})\n"
    return {**ctx, "new_name": pick(rng, f"compute_{f}", f"{f}_of", f"get_{f}", f"calc_{f}")}


def scene_program(rng, corpus) -> dict:
    """A program the user asks for: it is not written yet."""
    request, path, code, argv = program_request(rng)
    return {"files": {}, "request": request, "path": path, "code": code, "argv": argv}


def scene_script(rng, corpus, broken: bool = False) -> dict:
    """A user's short script; `broken`: with the colon missing at the end of one line."""
    while True:
        path, code = small_script(rng)
        rows = code.split("\n")
        colons = [i for i, x in enumerate(rows) if x.rstrip().endswith(":")]
        if colons or not broken:
            break
    ctx = {"files": {path: code}, "path": path, "code": code, "lines": code.count("\n")}
    if broken:
        i = colons[0]
        bad = "\n".join(rows[:i] + [rows[i].rstrip()[:-1]] + rows[i + 1 :])
        new, old = unique_context(code, i + 1), unique_context(bad, i + 1)
        ctx.update(files={path: bad}, line=i + 1, old=old, new=new)
    return ctx


def scene_project(rng, corpus, tests: bool = True, others: bool = False) -> dict:
    """A small repository: 2-3 corpus modules in a package, a README, maybe a module with tests,
    and with `others` 0-2 files in other languages; `target` (and `path`) one of its files."""
    pkg = expand(rng, "@packages")
    files, mods = {"README.md": f"# {pkg}\n\n{expand(rng, '@readme_lines')}\n"}, []
    for _ in range(rng.randint(2, 3)):
        m = scene_module(rng, corpus)
        path = f"{pkg}/{expand(rng, '@module_names')}.py"
        if path not in files:
            files[path] = m["text"]
            mods.append({**m, "path": path})
    if tests and rng.random() < 0.6:
        b = scene_buggy(rng, broken=0)
        files.update({f"tests/{b['test']}": b["files"][b["test"]], b["mod"]: b["files"][b["mod"]]})
    if others and getattr(corpus, "others", None) and rng.random() < 0.7:
        for doc in rng.sample(corpus.others, min(2, len(corpus.others))):
            path = expand(rng, "{src/||lib/}{util|main|io|parse}") + BANK["extensions"][doc["lang"]]
            files.setdefault(path, doc["text"])
    elif others:
        files.setdefault(*other_program(rng))
    target = pick(rng, *sorted(files))
    return {"files": files, "mods": mods, "target": target, "path": target}


def scene_todos(rng, corpus) -> dict:
    """A project with TODO and FIXME comments in the functions of some of its modules."""
    ctx = scene_project(rng, corpus, tests=False)
    for m in ctx["mods"][: rng.randint(1, len(ctx["mods"]))]:
        rows = ctx["files"][m["path"]].split("\n")
        at = rng.randint(m["start"], m["end"] - 1)
        note = expand(rng, "{TODO|FIXME|TODO}: ") + expand(rng, "@todo_notes")
        rows.insert(at, re.match(r"\s*", rows[at])[0] + "# " + note)
        ctx["files"][m["path"]] = "\n".join(rows)
    return ctx


def scene_git(rng, corpus) -> dict:
    """A committed project with one modified file and one untracked file."""
    ctx = scene_project(rng, corpus, tests=False)
    path, new = ctx["mods"][0]["path"], expand(rng, "{notes.txt|scratch.py|TODO.md}")
    commit = "git -c user.email=dev@example.com -c user.name=dev commit -qm init"
    change = f"printf '%s\\n' '# local change' >> {path} && echo 'check this' > {new}"
    setup = f"git init -q && git add -A && {commit} && {change}"
    return {**ctx, "path": path, "untracked": new, "setup": setup}


def scene_other_file(rng, corpus) -> dict:
    """A C, C++, JS or Rust file (from the corpus, or a template) and its definition pattern."""
    if others := getattr(corpus, "others", None):
        lang, text = (doc := pick(rng, *others))["lang"], doc["text"]
    else:
        name, text = other_program(rng)
        lang = "javascript" if name.endswith(".js") else "c"
    path = expand(rng, "{src/|}{util|main|core|io}") + BANK["extensions"][lang]
    return {"files": {path: text}, "path": path, "def_pattern": BANK["def_patterns"][lang]}


def scene_other_program(rng, corpus, bank: str = "js_c_programs") -> dict:
    """A JS or C program the user asks for, with the command that runs it; or (bank "sh_scripts")
    a shell script, already there beside two text files."""
    name, code = other_program(rng, bank)
    cmd = {".js": "node {}", ".c": "gcc -o prog {} && ./prog", ".sh": "bash {}"}[Path(name).suffix]
    files = {name: code, "a.txt": "one\ntwo\n", "b.txt": "x\n" * rng.randint(3, 9)}
    ctx = {"files": files if name.endswith(".sh") else {}, "path": name, "code": code}
    return {**ctx, "cmd": cmd.format(name)}


EVAL_BUILTINS = {f.__name__: f for f in (sorted, len, list, range, max, sum, bool, round, abs)}


def scene_expr(rng, corpus) -> dict:
    """A Python expression and its value, really evaluated here."""
    expr = expand(rng, "@exprs")
    value = eval(expr, {"__builtins__": {**EVAL_BUILTINS, "divmod": divmod}})
    return {"files": {}, "expr": expr, "value": repr(value)}


# each scene_NAME is the scene "NAME" of synth_kinds.json (and "none" has no files)
SCENES = {name[6:]: f for name, f in list(globals().items()) if name.startswith("scene_")}
SCENES["none"] = lambda rng, corpus: {"files": {}}


# -----------------------------------------------------------------------------
# moves: the steps that need Python (they read outputs too closely for a phrase)


def move_explain(s, rng, ctx):
    s.say(explanation(rng, ctx))


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
    files = ctx["files"]
    pys = sorted(p for p in files if p.endswith(".py"))
    text = f"{len(files)} files; the Python code is in {_list(pys, 4)}"
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
    s.say(text + (f"It's called from {_list(calls, 9)}." if calls else "Nothing calls it."))


def move_rename(s, rng, ctx):
    """Edit every line naming the function, file by file, each edit with a unique old_string."""
    old, new = ctx["fname"], ctx["new_name"]
    paths = sorted({h.split(":")[0] for h in grep_hits(ctx["out"])})
    s.say(f"`{old}` appears in {len(paths)} files: {_list(paths, 5)}.")
    for path in paths:
        if rng.random() < 0.5:
            s.call("read_file", path=path)
        while m := re.search(rf"\b{old}\b", text := s.read(path)):
            near = unique_context(text, text[: m.start()].count("\n") + 1)
            renamed = re.sub(rf"\b{old}\b", new, near)
            s.call("edit_file", path=path, old_string=near, new_string=renamed)
    ctx["n_files"] = len(paths)


def move_list_functions(s, rng, ctx):
    names = []
    for row in ctx["out"].split("\n"):
        m = re.search(ctx["def_pattern"], row.split(":", 2)[-1]) if ":" in row else None
        if m and m[1] not in names and m[1] not in ("if", "for", "while", "switch", "return"):
            names.append(m[1])
    if names:
        more = " (and more)." if len(names) > 6 else "."
        return s.say(f"`{ctx['path']}` defines {_list(names, 6)}{more}")
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
    data = DATA_SCENES.get(spec.get("scene"), {})
    spec = {**data, **spec, "draw": {**data.get("draw", {}), **spec.get("draw", {})}}
    scene = SCENES["none" if data else spec.get("scene", "none")]
    scene = scene(rng, corpus, **spec.get("scene_args", {}))
    ctx = {"py": "python3", "before": 1, **scene}
    for key, template in spec["draw"].items():
        value = expand(rng, template)
        ctx[key] = value.format(**ctx) if isinstance(value, str) else value
    if "files" in spec:
        ctx["files"] = {k.format(**ctx): v.format(**ctx) for k, v in spec["files"].items()}
    user = pick(rng, *phrases(spec["ask"])).format(**ctx)
    with Session(ctx["files"], ctx.get("setup")) as s:
        run_steps(s, rng, ctx, spec["steps"])
        return {**finish(s, rng, user, spec.get("followups", True)), "kind": kind}


def finish(s, rng, user: str, followups: bool = True) -> dict:
    """The record of session `s` (first user message `user`); with probability FOLLOWUP_RATE, when
    the kind allows it, 1-2 follow-up turns are added first."""
    if followups and rng.random() < FOLLOWUP_RATE:
        for _ in range(1 + (rng.random() < 0.3)):
            follow_up(s, rng)
    return s.record(user)


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
    rng = random.Random(seed * 1_000_003 + i)
    return make_trajectory(draw_kind(rng, kinds, weights), rng, corpus)


def generate_trajectories(n: int, seed: int, corpus: list, kinds: list | None = None) -> list:
    return [trajectory(i, seed, corpus, kinds) for i in range(n)]


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
