"""Helpers shared by the tests (import them from here; tests never import other test modules):
a byte-level stand-in tokenizer, tiny trained tokenizers, tiny random models and checkpoints,
synthetic corpora, a local stand-in for the Hugging Face hub, and the command line and environment
that run a script in a subprocess."""

import contextlib
import hashlib
import http.server
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nanocode import fim
from nanocode.tokenizer import SPECIAL_TOKENS, Tokenizer

REPO = Path(__file__).resolve().parents[1]


class ByteTokenizer:
    """The Tokenizer interface without training: the special tokens (ids 0-11, the library's own
    list), then one token per byte, so ids are predictable (`"a"` is 12 + 97) and nothing needs a
    corpus."""

    vocab_size = len(SPECIAL_TOKENS) + 256
    bos_id = 0

    def special_id(self, name):
        return SPECIAL_TOKENS.index(name)

    def encode(self, text):
        return [len(SPECIAL_TOKENS) + b for b in text.encode("utf-8")]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        """Bytes decoded as UTF-8 (invalid sequences replaced, as tiktoken does); specials as their
        text."""
        out, buf = [], bytearray()
        for i in ids:
            if i < len(SPECIAL_TOKENS):
                out.append(buf.decode("utf-8", errors="replace") + SPECIAL_TOKENS[i])
                buf = bytearray()
            else:
                buf.append(i - len(SPECIAL_TOKENS))
        return "".join(out) + buf.decode("utf-8", errors="replace")

    def render_for_completion(self, conversation):
        """The chat layout of nanocode.tokenizer (a system message folded into the first user turn;
        tool calls and outputs inside the assistant turn), ending with <|assistant_start|> for the
        reply."""
        sid = self.special_id
        msgs = list(conversation["messages"])
        if msgs and msgs[0]["role"] == "system":
            msgs = [
                {"role": "user", "content": msgs[0]["content"] + "\n\n" + msgs[1]["content"]}
            ] + msgs[2:]
        ids = [self.bos_id]
        for m in msgs:
            content = (
                m["content"]
                if isinstance(m["content"], list)
                else [{"type": "text", "text": m["content"]}]
            )
            if m["role"] == "user":
                ids += (
                    [sid("<|user_start|>")]
                    + self.encode(content[0]["text"])
                    + [sid("<|user_end|>")]
                )
                continue
            ids.append(sid("<|assistant_start|>"))
            for p in content:
                if p["type"] == "text":
                    ids += self.encode(p["text"])
                elif p["type"] == "tool_call":
                    call = json.dumps({"name": p["name"], "arguments": p["arguments"]})
                    ids += [sid("<|tool_start|>")] + self.encode(call) + [sid("<|tool_end|>")]
                else:
                    ids += (
                        [sid("<|output_start|>")] + self.encode(p["text"]) + [sid("<|output_end|>")]
                    )
            ids.append(sid("<|assistant_end|>"))
        return ids + [sid("<|assistant_start|>")]


def trained_tokenizer(texts, vocab_size=300):
    """The real tokenizer (rustbpe), trained in well under a second on a few texts."""
    return Tokenizer.train(list(texts), vocab_size=vocab_size)


def corpus_text(name: str) -> str:
    """A fixed text to train a test tokenizer on (tests/fixtures/tokenizer_corpus says why)."""
    return (REPO / "tests" / "fixtures" / "tokenizer_corpus" / f"{name}.py.txt").read_text()


def real_tokenizer():
    """A tiny trained tokenizer saved where get_tokenizer() (and so every script) finds it: the base
    dir."""
    from nanocode.common import get_base_dir
    from nanocode.tokenizer import get_tokenizer

    if not (get_base_dir() / "tokenizer").exists():
        texts = [corpus_text("engine"), corpus_text("tools")]
        trained_tokenizer(texts, vocab_size=512).save(get_base_dir() / "tokenizer")
    return get_tokenizer()


def script_argv(module: str, *args: str) -> list[str]:
    """`python -m module args`, with real_tokenizer() saved first (the scripts load it from the base
    dir)."""
    real_tokenizer()
    return [sys.executable, "-m", module, *args]


def script_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(flags, log):
    """Start scripts.code_web with `flags` on a free port, its output in the file `log`, and wait
    for /health; try another port if this one was taken meanwhile (other test runs share the
    machine). Returns (process, url)."""
    import httpx

    for _ in range(3):
        port = free_port()
        with open(log, "w") as f:
            proc = subprocess.Popen(
                script_argv("scripts.code_web", "--port", str(port), *flags),
                cwd=REPO,
                env=script_env(),
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120  # only guards against a hang
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).json().get("pid") == proc.pid:
                    return proc, url
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.2)
        stop_server(proc)
        if "address already in use" not in log.read_text():
            break
    raise AssertionError(f"the server did not come up:\n{log.read_text()}")


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def torchrun(script_or_args, tmp_path, nproc=2):
    """Run a script (str: its source) or a module (list: args) under 2 gloo processes; returns
    stdout."""
    if isinstance(script_or_args, str):
        path = tmp_path / "script.py"
        path.write_text(script_or_args)
        args = [str(path), str(tmp_path)]
    else:
        args = script_or_args
    # Pinned to the loopback interface: no dependence on how this machine's hostname resolves.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--local-addr=127.0.0.1",
            f"--nproc_per_node={nproc}",
            *args,
        ],
        env=env,
        cwd=REPO,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, (
        f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    )
    return p.stdout


def tiny_model(vocab_size, sequence_len=96, seed=0):
    """A random 2-layer GPT with weights large enough that attention matters (the default init
    starts every block as the identity, which would make e.g. cached and uncached generation
    trivially equal)."""
    from nanocode.gpt import GPTConfig, build_model

    torch.manual_seed(seed)
    model = build_model(
        GPTConfig(
            sequence_len=sequence_len,
            vocab_size=vocab_size,
            n_layer=2,
            n_head=4,
            n_kv_head=2,
            n_embd=64,
        ),
        "cpu",
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5 if p.dim() == 2 and p.size(0) == vocab_size else 0.2)
    return model.eval()


def naive_generate(model, ids, max_tokens):
    """Greedy generation the plain way: the whole sequence through the model for every token (no KV
    cache). Slow; the reference the engine's cached generation is tested against. Yields ids."""
    ids = list(ids)
    device = next(model.parameters()).device
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=device))[0, -1]
        ids.append(int(logits.argmax()))
        yield ids[-1]


def nudged_model(depth: int, vocab_size: int, sequence_len: int, seed: int = 0):
    """GPTConfig.from_depth's model with every weight nudged by 0.02 * N(0, 1): the init zeroes the
    output projections, and a test model needs every layer to do something."""
    from nanocode.gpt import GPTConfig, build_model

    torch.manual_seed(seed)
    model = build_model(GPTConfig.from_depth(depth, vocab_size, sequence_len), "cpu")
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    return model


def reference_step(model, optimizers, step: int, steps: int):
    """One optimizer step of a test's plain reference loop, as the fine-tuning loop schedules it:
    learning rates at initial_lr * (1 - step / steps), then step and zero the gradients."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * (1.0 - step / steps)
        opt.step()
    model.zero_grad(set_to_none=True)


def save_tiny_checkpoint(tag: str, vocab_size: int, phase: str = "sft"):
    """A tiny random GPT saved where load_model(phase, tag=tag) finds it."""
    from nanocode.checkpoint import checkpoint_dir, save_checkpoint

    model = tiny_model(vocab_size, sequence_len=256)
    save_checkpoint(
        checkpoint_dir(phase, tag),
        1,
        model.state_dict(),
        None,
        {"model_config": model.config.to_dict()},
    )


CITIES = "Paris Oslo Lima Rome Cairo Tokyo Quito Bern Kyiv Riga".split()
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "the weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def tool_use_conversation(rng) -> list[dict]:
    """A short conversation of the kinds a client of the server has: a client's tool called (then
    a word on its output), one of our tools called, a JSON answer, a greeting."""
    from nanocode.tools import tools_prompt

    city, path, kind = rng.choice(CITIES), rng.choice(["app.py", "main.py"]), rng.randrange(4)
    messages = []
    if kind == 0:  # a client's tool, listed in the system prompt as the server lists it
        messages.append({"role": "system", "content": tools_prompt([WEATHER_TOOL])})
        request, calls, answer = f"Weather in {city}?", [("get_weather", {"city": city})], "Sunny."
    elif kind == 1:  # one of ours
        ours = [("bash", {"command": f"cat {path}"}), ("read_file", {"path": path})]
        request, calls, answer = f"Look at {path}.", [rng.choice(ours)], "Done."
    elif kind == 2:
        answer = json.dumps({"city": city, "degrees": rng.randrange(30)})
        request, calls = f"As JSON: the weather in {city}?", []
    else:
        request, calls, answer = f"Hello from {city}.", [], f"Hello, {city}!"
    output = {"type": "tool_output", "text": f"sunny, {rng.randrange(30)} C"}
    parts = [{"type": "tool_call", "name": name, "arguments": args} for name, args in calls]
    parts = [p for call in parts for p in (call, output)] + [{"type": "text", "text": answer}]
    return messages + [
        {"role": "user", "content": request},
        {"role": "assistant", "content": parts},
    ]


def tool_calling_checkpoint(tag: str = "tool-caller", steps: int = 150) -> str:
    """A tiny GPT trained for `steps` AdamW steps (~15 s on a core) on tool_use_conversation, saved
    where load_model("sft", tag=tag) finds it (once per base dir): unlike a random model it closes
    strings, so its tool calls and JSON answers end within a few dozen tokens."""
    from nanocode.checkpoint import checkpoint_dir, save_checkpoint
    from nanocode.gpt import GPTConfig, build_model

    tok, ckpt = real_tokenizer(), checkpoint_dir("sft", tag)
    if ckpt.exists():
        return tag
    rng, _ = random.Random(0), torch.manual_seed(0)
    config = GPTConfig(
        1024, tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, window_pattern="L"
    )
    model = build_model(config, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        rows = [
            tok.render_conversation({"messages": tool_use_conversation(rng)}) for _ in range(16)
        ]
        x = torch.zeros(len(rows), max(len(ids) for ids, _ in rows), dtype=torch.long)
        y = torch.full_like(x, -1)  # -1: not learned (the prompt, tool outputs, padding)
        for b, (ids, mask) in enumerate(rows):
            x[b, : len(ids)] = torch.tensor(ids)
            y[b, : len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
        model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    meta = {"model_config": model.config.to_dict()}
    save_checkpoint(ckpt, steps, model.state_dict(), None, meta)
    return tag


ANSWER = "q"  # the rewarded answer: a reply whose text contains it passes


def install_fixed_answer_reward():
    """Replace the code verifier with "the reply's text contains ANSWER" (a reward that prefers one
    fixed answer)."""
    from nanocode import rl_tasks

    rl_tasks.written_code = lambda message: "".join(
        p["text"] for p in message["content"] if p["type"] == "text"
    )
    rl_tasks.verify_many = lambda tasks, codes, **kw: [
        (ANSWER in c, "passed" if ANSWER in c else "failed") for c in codes
    ]


WORDS = [
    "def",
    "return",
    "self",
    "import",
    "for",
    "in",
    "if",
    "else",
    "x",
    "y",
    "value",
    "print",
    "(",
    ")",
    ":",
    "=",
    "+",
    "[",
    "]",
    "λ",
    "é",
    "数据",
    "🙂",
]


def make_docs(n, seed=0, min_lines=2, max_lines=60):
    """n distinct pseudo-code documents of varied length, with some non-ASCII characters."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [f"# doc {i}"]
        for _ in range(rng.randint(min_lines, max_lines)):
            lines.append(
                "    " * rng.randint(0, 2)
                + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
            )
        docs.append("\n".join(lines) + "\n")
    return docs


def write_corpus(directory, docs, per_shard):
    """Write docs into shard_00000.parquet ... with per_shard documents each; the last shard is
    val."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(0, len(docs), per_shard):
        chunk = docs[k : k + per_shard]
        path = directory / f"shard_{k // per_shard:05d}.parquet"
        pq.write_table(pa.table({"text": chunk, "lang": ["python"] * len(chunk)}), path)
        paths.append(path)
    return paths


def alive(token: str) -> list[int]:
    """Pids of live processes whose command line contains `token`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
                with open(f"/proc/{entry}/stat", "rb") as f:
                    zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
            except OSError:
                continue
            if token.encode() in cmdline and not zombie:
                pids.append(int(entry))
    return pids


class FakeHub(http.server.ThreadingHTTPServer):
    """A local stand-in for the Hugging Face hub's file endpoint, enough for huggingface_hub's
    downloads: HEAD and GET of /<type>s/<repo>/resolve/<revision>/<file>, with Range requests.
    `files` maps "<repo>/<file>" to bytes; the first GET of each path in `fail_once` sends half of
    the file and hangs up (a dropped connection); `ranges=False` ignores Range headers, as some
    servers do. Point the code at it with HF_ENDPOINT=hub.url; `requests` records (method,
    "<repo>/<file>", Range)."""

    def __init__(self, files: dict, fail_once=(), ranges=True):
        self.files, self.fail_once, self.ranges, self.requests = files, set(fail_once), ranges, []
        super().__init__(("127.0.0.1", 0), _FakeHubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self):
        self.shutdown()
        self.server_close()


class _FakeHubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _lookup(self, method):
        parts = self.path.split("?")[0].split(
            "/"
        )  # "", "datasets", owner, name, "resolve", revision, file...
        if len(parts) < 7 or parts[4] != "resolve":
            key = None
        else:
            key = f"{parts[2]}/{parts[3]}/{unquote('/'.join(parts[6:]))}"
        self.server.requests.append((method, key, self.headers.get("Range"), self.path))
        data = self.server.files.get(key)
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None, None
        return key, data

    def _headers(self, data, status=200, start=0):
        self.send_response(status)
        digest = hashlib.sha1(data).hexdigest()
        self.send_header("X-Repo-Commit", hashlib.sha1(b"commit").hexdigest())
        self.send_header("ETag", f'"{digest}"')
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()

    def do_HEAD(self):
        key, data = self._lookup("HEAD")
        if data is not None:
            self._headers(data)

    def do_GET(self):
        key, data = self._lookup("GET")
        if data is None:
            return
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].split("-")[0]) if rng and self.server.ranges else 0
        self._headers(data, 206 if start else 200, start)
        if key in self.server.fail_once:  # promise everything, send half, hang up
            self.server.fail_once.discard(key)
            self.wfile.write(data[start : start + (len(data) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(data[start:])


# ---------------------------------------------------------------------------------------------
# the web server tests (test_web*.py): a scripted reply with one of our tool calls, two client
# tools, the server on a free port, and a work dir holding hello.txt

CALL = '<|tool_start|>{"name": "bash", "arguments": {"command": "cat hello.txt"}}<|tool_end|>'
TOOL_TURN = "Let me look." + CALL + "It says hi."
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
BASH = {
    "type": "function",
    "function": {
        "name": "bash",
        "description": "run a command",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}}},
    },
}


@contextlib.contextmanager
def serving(tmp_path, turns, *flags, sequence_len=4096):
    """The server on a free port: with a scripted fake model given `turns`, or with `flags` alone if
    None."""
    if turns is not None:
        script = tmp_path / "script.json"
        script.write_text(json.dumps({"turns": turns, "sequence_len": sequence_len}))
        flags = ("--fake-script", str(script), *flags)
    proc, url = start_server(flags, tmp_path / "server.log")
    try:
        yield url
    finally:
        stop_server(proc)


def hello_workdir(tmp_path):
    d = tmp_path / "work"
    d.mkdir()
    (d / "hello.txt").write_text("hi there\n")
    return d


def write_turns(tmp_path, turns, delay=0.0, name="script.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"turns": turns, "delay": delay}))
    return path


def trajectories(n: int, seed: int, corpus: list, kinds=None) -> list:
    """Trajectories 0..n-1 of a seed (scripts/gen_synth.py also drops repeats)."""
    from nanocode import synth

    return [synth.trajectory(i, seed, corpus, kinds) for i in range(n)]


def preference_pairs(records: list, seed: int) -> list:
    """The DPO pairs of records, as scripts/gen_synth.py makes them (a record may give none)."""
    from nanocode import synth_pairs

    return [p for i, r in enumerate(records) if (p := synth_pairs.pair(i, r, seed)) is not None]


def fim_mode(pieces) -> str:
    """'none', 'psm' or 'spm' for a list of pieces (or of token ids) made by apply_fim."""
    if not pieces or pieces[0] != fim.FIM_PREFIX:
        return "none"
    return "spm" if pieces[1] == fim.FIM_SUFFIX else "psm"


def undo_fim(ids, decode) -> str:
    """Give back the original document from the token ids of one (possibly FIM'd) document, without
    its BOS. `decode` turns ordinary token ids into text."""
    ids = list(ids)
    mode = fim_mode(ids)
    if mode == "none":
        return decode(ids)
    if mode == "psm":  # P prefix S suffix M middle
        s, m = ids.index(fim.FIM_SUFFIX), ids.index(fim.FIM_MIDDLE)
        prefix, suffix, middle = decode(ids[1:s]), decode(ids[s + 1 : m]), decode(ids[m + 1 :])
        return prefix + middle + suffix
    m = ids.index(fim.FIM_MIDDLE)  # SPM: P S suffix M prefix+middle
    return decode(ids[m + 1 :]) + decode(ids[2:m])
