"""Functions and files of the local code corpus that the synthetic trajectories start from
(nanocode/synth.py), with the facts about each function an honest explanation may state; RL's
corpus tasks (nanocode/rl_tasks.py) take their functions from here too."""

import ast
import re

QUOTES = '"' * 3  # a docstring's quotes (so written, they open no string here)
EXTENSIONS = ("c", "cpp", "javascript", "rust")  # the non-Python languages the kinds show


def describe_function(src: str) -> dict:
    """Facts about a top-level function, read off its AST: what an honest explanation may say."""
    fn = ast.parse(src).body[0]
    a = fn.args
    args = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    args += [star + x.arg for star, x in (("*", a.vararg), ("**", a.kwarg)) if x]
    facts = {"name": fn.name, "args": args, "doc": None, "yields": False}
    facts.update({k: [] for k in ("loops", "ifs", "calls", "returns", "raises", "catches")})
    if doc := ast.get_docstring(fn):
        # the first sentence of the first paragraph, quoted only when short
        first = re.split(r"(?<=\.)\s", doc.strip().split("\n\n")[0].replace("\n", " "))[0]
        facts["doc"] = first if len(first) <= 120 else None
    pos = a.posonlyargs + a.args
    # the defaults belong to the last len(a.defaults) positional parameters
    consts = [(x.arg, d) for x, d in zip(pos[len(pos) - len(a.defaults) :], a.defaults)]
    consts = [(arg, d.value) for arg, d in consts if isinstance(d, ast.Constant)]
    facts["defaults"] = [(arg, v) for arg, v in consts if type(v) in (int, bool)]

    def seg(node, limit: int = 48) -> str | None:
        """The node's source if it is one short line (to quote), else None."""
        s = ast.get_source_segment(src, node)
        return s if s and "\n" not in s and len(s) <= limit else None

    for node in ast.walk(fn):
        if isinstance(node, ast.For) and (t := seg(node.target)) and (it := seg(node.iter)):
            facts["loops"].append(f"{t} in {it}")
        elif isinstance(node, ast.While) and (t := seg(node.test)):
            facts["loops"].append(f"while {t}")
        elif isinstance(node, ast.If) and (t := seg(node.test, 40)):
            facts["ifs"].append(t)
        elif isinstance(node, ast.Call):
            facts["calls"].append(seg(node.func, 30))
        elif isinstance(node, ast.Return):
            facts["returns"].append(seg(node.value, 40) if node.value is not None else "None")
        elif isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            facts["raises"].append(seg(exc, 30))
        elif isinstance(node, ast.ExceptHandler) and node.type and (e := seg(node.type, 30)):
            facts["catches"].append(e)
        elif isinstance(node, (ast.Yield, ast.YieldFrom)):
            facts["yields"] = True
    facts["long_return"] = None in facts["returns"]  # a return too long to quote
    for key in ("calls", "returns", "raises"):  # each once, in order of appearance
        facts[key] = [x for i, x in enumerate(facts[key]) if x and x not in facts[key][:i]]
    facts["has_doc"] = doc is not None
    facts["body_line"] = fn.body[1].lineno if doc and len(fn.body) > 1 else fn.body[0].lineno
    return facts


def corpus_functions(docs, limit: int = 2000, min_lines: int = 4, max_lines: int = 22) -> list:
    """Short, plain top-level Python functions from corpus documents, as {"src", "facts"}."""
    out = []
    for doc in (d for d in docs if d.get("lang") == "python"):
        try:
            tree = ast.parse(doc["text"])
        except (SyntaxError, ValueError, RecursionError):
            continue
        rows = doc["text"].splitlines()
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.decorator_list:
                continue
            src = "\n".join(rows[node.lineno - 1 : node.end_lineno])
            ok = min_lines <= src.count("\n") + 1 <= max_lines and src.isascii()
            ok = ok and "\t" not in src and "\r" not in src and QUOTES not in src.split("\n")[0]
            # the kinds grep for `def NAME\(`: "def f (x):" would not be found
            if ok and src.startswith(f"def {node.name}(") and max(map(len, src.split("\n"))) <= 100:
                try:
                    out.append({"src": src, "facts": describe_function(src)})
                except (SyntaxError, ValueError, IndexError):
                    continue
            if len(out) >= limit:
                return out
    return out


def corpus_files(docs, limit: int = 500, max_lines: int = 80) -> list:
    """Short non-Python files (C, C++, JS, Rust) from corpus documents, as {"lang", "text"}."""
    out = []
    for doc in docs:
        lang, text = doc.get("lang"), doc.get("text", "")
        if lang in EXTENSIONS and text.isascii() and "\r" not in text:
            if 5 <= text.count("\n") <= max_lines and max(map(len, text.split("\n"))) <= 120:
                out.append({"lang": lang, "text": text.rstrip("\n") + "\n"})
    return out[:limit]


class Corpus(list):
    """The corpus functions (a list) plus the non-Python files, for the kinds that use them."""

    def __init__(self, functions, others=()):
        super().__init__(functions)
        self.others = list(others)
