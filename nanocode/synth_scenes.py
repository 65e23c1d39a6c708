"""The scenes of the synthetic trajectories (nanocode/synth.py): the files a trajectory starts
from and what is known about them (ctx), each scene_NAME the scene "NAME" of synth_kinds.json; the
small programs users ask for; and the phrase banks (synth_phrases.json) with the helpers that fill
their templates."""

import ast
import json
import re
from pathlib import Path

BANK = json.loads((Path(__file__).parent / "data" / "synth_phrases.json").read_text())
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


def quoted(items: list, limit: int = 3, last: str = "and", quote: str = "`") -> str:
    items = [f"{quote}{x}{quote}" for x in items[:limit]]
    return "".join(items) if len(items) < 2 else ", ".join(items[:-1]) + f" {last} " + items[-1]


def returns_phrase(fa: dict) -> str:
    if fa["returns"] not in ([], ["None"]):
        return f"returns {quoted(fa['returns'], last='or')}"
    if fa["long_return"]:
        return "returns a value it computes over several lines"
    return "returns nothing useful (None); it works by side effect"


def unique_context(text: str, line_no: int) -> str:
    """The shortest run of whole lines around line `line_no` (1-based) that occurs once in text."""
    rows = text.split("\n")
    lo = hi = line_no - 1
    while True:
        s = "\n".join(rows[lo : hi + 1])
        # str.count, as tools.edit_file counts: unique here is unique to the tool
        if text.count(s) == 1 or (lo == 0 and hi == len(rows) - 1):
            return s
        lo = max(0, lo - 1)
        if text.count("\n".join(rows[lo : hi + 1])) != 1 and hi < len(rows) - 1:
            hi += 1


def _misquote(line: str, text: str) -> str:
    """How a person might quote a line from memory (spacing changed), so that it is not in text."""
    q = line.strip()
    for cand in (re.sub(r" ([+\-*/%<>=]+) ", r"\1", q), q.replace(" ", "  ", 1), q + " "):
        if cand != q and cand not in text:
            return cand
    raise ValueError(f"cannot misquote {line!r}")


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
    # each function before the target: its lines, then the two blank lines of the "\n\n\n" join
    start = 1 + sum(g["src"].count("\n") + 3 for g in chosen[:target])
    end = start + f["src"].count("\n")
    a = rng.randint(1, max(1, n - 5))
    b = min(n, a + rng.randint(3, 12))
    ctx = {"files": {path: text}, "path": path, "text": text, "src": f["src"], "facts": f["facts"]}
    ctx.update(name=f["facts"]["name"], start=start, end=end, span=end - start + 3)
    ctx.update(a=a, b=b, size=b - a + 1, want=n + rng.randint(20, 200))
    names = [m + ".py" for m in BANK["module_names"] if m + ".py" != Path(path).name]
    fa = f["facts"]
    args = [x for x in fa["args"] if x not in ("self", "cls")]
    catch = f"; it does catch `{fa['catches'][0]}`." if fa["catches"] else "."
    ctx.update(raises=quoted(fa["raises"]), calls=quoted(fa["calls"], 5), args=quoted(args, 6))
    ctx.update(at=f"(`{path}`, lines {start}-{end})", catch=catch, n_args=len(args))
    ctx.update(returns=returns_phrase(fa), yields=fa["yields"])
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
        # the line that ends the signature (a def may span lines); rows is 0-based, so rows[line]
        # is the line after it: the body, whose indent the docstring takes
        line = ctx["start"] + [x.rstrip()[-1:] == ":" for x in ctx["src"].split("\n")].index(True)
        doc = ctx["name"].strip("_").replace("_", " ").capitalize()
        old = unique_context(text, line)
        indent = re.match(r"\s*", rows[line])[0] or "    "
        return "doc", old, old + f"\n{indent}{QUOTES}{doc}.{QUOTES}", {"doc": doc}
    if kind == "default":
        arg, val = fa["defaults"][0]
        new = (not val) if isinstance(val, bool) else (val * 2 if val else 1)
        # (?![\w.]): a default of 1 does not match the start of 10 or 1.5
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
    catch the bug (checked by running both versions and comparing with ==, as the tests do); a bug
    that 20 draws cannot catch is an error in the bank."""
    spec = pick(rng, *BANK["buggy"])
    fname, src = spec["name"], lines(spec["src"])
    good, bad = pick(rng, *spec["bugs"])
    ns_good, ns_bad = {}, {}
    exec(src, ns_good)  # the bank's own code (trusted data), run here to know the right answers
    exec(src.replace(good, bad), ns_bad)
    for _ in range(20):
        cases = [ast.literal_eval(f"({expand(rng, c)},)") for c in spec["cases"]]
        wants = [ns_good[fname](*c) for c in cases]
        try:
            if [ns_bad[fname](*c) for c in cases] != wants:
                break
        except Exception:  # a crashing bug is caught too
            break
    else:
        raise ValueError(f"synth bank: no inputs of {fname} catch the bug {bad.strip()!r}")
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
    ctx["files"] = {f"{mod}.py": code, f"test_{mod}.py": lines(test)}
    ctx.update(mod=f"{mod}.py", test=f"test_{mod}.py", stem=f"test_{mod}")
    ctx["cmd"] = f"python3 test_{mod}.py"
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
    # an identity on the command line: git may refuse to commit where none is configured
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
