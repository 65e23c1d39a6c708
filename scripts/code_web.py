"""Serve the agent over HTTP in the OpenAI chat-completions protocol, with a one-page chat UI at /.

    python -m scripts.code_web                              # sft checkpoint on 127.0.0.1:8000
    python -m scripts.code_web --allow-tools ~/project      # our tools run here, per conversation in a copy
    python -m scripts.code_web --host 0.0.0.0 --api-key $KEY -i dpo

Endpoints: POST /v1/chat/completions (non-streaming, or "stream": true for server-sent events ending in
"data: [DONE]"), GET /v1/models, GET /health (replicas free, requests queued), GET / (the UI).

Client-side tools (the protocol's usual mode): a request with "tools" gets the model's call back as
message.tool_calls (id, type "function", function.name, function.arguments as a JSON string) with
finish_reason "tool_calls" (streamed as delta.tool_calls), and the server runs nothing; the client
sends the result as a role "tool" message (after the assistant message with content null and
tool_calls), and the model goes on. Our five tools (bash, read_file, ...) are the ones the model was
trained on; other functions are listed for it in the system prompt. tool_choice: "auto", "none", or
{"type": "function", "function": {"name": ...}} (forced by prefilling the call). parallel_tool_calls is
accepted, but a reply holds at most one call: the model makes one call per turn.

Server-side tools (--allow-tools [DIR], used by requests without "tools"): our tools run without asking
(a server has nobody to ask), inside nanocode.sandbox (--sandbox, --network), each conversation in its
own copy of DIR (or an empty dir): the first reply carries a "conversation_id", send it back (a request
field) to keep working in the same directory. Serving tools on a non-loopback address needs --api-key.

Also: "seed" (random per request when absent), "stop", "max_tokens" / "max_completion_tokens", "top_k",
"usage" and "system_fingerprint" in every reply; a conversation longer than the context is trimmed by
the engine (oldest turns first). "n" > 1 samples the choices as one batch (seeds seed, seed + 1, ...;
not with server-side tools, whose choices would share a directory). Beyond the protocol, a reply's message carries "parts"
(text, tool_call and tool_output: nanocode's conversation format), and server-side tool activity streams
as chunks whose delta is {"nanocode": {"type": "tool_call"|"tool_output"|"notice", ...}}; messages sent
back may use such parts as their content (the UI does). One model replica per GPU (one on CPU) serves
one request at a time; up to --max-queue more wait, beyond that 429.
"""

import argparse
import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import os
import queue
import secrets
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

from nanocode.checkpoint import PHASES
from nanocode.common import NanocodeError, autodetect_device_type, run_main
from nanocode.tokenizer import in_progress
from nanocode.tools import run_tool

parser = argparse.ArgumentParser(
    description="OpenAI-compatible server and web UI for the coding agent"
)
parser.add_argument("-i", "--source", default="sft", choices=PHASES, help="which checkpoint phase")
parser.add_argument("--tag", default=None, help="checkpoint tag (default: the most recent)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8000)
parser.add_argument(
    "--allow-tools",
    nargs="?",
    const="",
    default=None,
    metavar="DIR",
    help="run our tools server-side, each conversation in its own copy of DIR (no DIR: an empty dir)",
)
parser.add_argument(
    "--sandbox",
    default="workspace-write",
    choices=["read-only", "workspace-write", "off"],
    help="how server-side tool calls run (nanocode.sandbox)",
)
parser.add_argument(
    "--network", action="store_true", help="let server-side tool commands use the network"
)
parser.add_argument(
    "--max-conversations", type=int, default=64, help="working dirs kept (the oldest is deleted)"
)
parser.add_argument(
    "--api-key",
    default=os.environ.get("NANOCODE_API_KEY"),
    help="require 'Authorization: Bearer KEY' on /v1 (default: $NANOCODE_API_KEY)",
)
parser.add_argument(
    "--cors-origin",
    action="append",
    default=[],
    metavar="ORIGIN",
    help="allow browser pages from ORIGIN ('*': any) to call the API (off by default)",
)
parser.add_argument(
    "--max-queue", type=int, default=16, help="requests waiting for a replica; more get 429"
)
parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
parser.add_argument(
    "--num-gpus", type=int, default=None, help="replicas on cuda:0..N-1 (default: all visible GPUs)"
)
parser.add_argument(
    "--temperature", type=float, default=0.6, help="default when a request gives none"
)
parser.add_argument("--top-k", type=int, default=50, help="default when a request gives none")
parser.add_argument(
    "--max-tokens", type=int, default=1024, help="default and upper limit of a request's max_tokens"
)
parser.add_argument(
    "--max-tool-calls", type=int, default=8, help="server-side tool calls per reply"
)
parser.add_argument("--max-body-bytes", type=int, default=1_000_000, help="larger requests get 413")
parser.add_argument(
    "--max-messages", type=int, default=500, help="more messages in a request get 400"
)
parser.add_argument(
    "--max-n", type=int, default=8, help="choices per request at most ('n', sampled as one batch)"
)
parser.add_argument(
    "--fake-script", default=None, help=argparse.SUPPRESS
)  # tests: a ScriptedModel JSON file

UI_PATH = Path(__file__).with_name("ui.html")
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def load_engines(args) -> tuple[list, str]:
    """One Engine per GPU (or one on CPU/MPS), and the system_fingerprint naming the checkpoint."""
    import torch

    from nanocode.engine import Engine

    if args.fake_script:
        from nanocode.tokenizer import get_tokenizer
        from tests.scripted_model import (
            ScriptedModel,  # a test double: the tests run the scripts with it
        )

        tokenizer = get_tokenizer()
        return [Engine(ScriptedModel.from_file(args.fake_script, tokenizer), tokenizer)], "fp_fake"
    from nanocode.checkpoint import load_model

    device_type = args.device_type or autodetect_device_type()
    if device_type == "cuda":
        n = args.num_gpus or torch.cuda.device_count()
        if not 1 <= n <= torch.cuda.device_count():
            raise NanocodeError(f"--num-gpus {n}: {torch.cuda.device_count()} GPUs visible")
        devices = [f"cuda:{i}" for i in range(n)]
    else:
        devices = [device_type]
    engines, meta = [], {}
    for device in devices:
        model, tokenizer, meta = load_model(args.source, device, args.tag, args.step)
        engines.append(Engine(model, tokenizer))
    ident = json.dumps(
        [args.source, args.tag, args.step, meta.get("step"), meta.get("model_config")],
        sort_keys=True,
    )
    return engines, "fp_" + hashlib.sha256(ident.encode()).hexdigest()[:12]


def _text(content, where: str) -> str:
    """The text of a system/user/tool message's content: a string or a list of {"type": "text", "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise RequestError(
        400, f"{where}: content must be a string or a list of text parts, got {str(content)[:80]!r}"
    )


def to_conversation(msgs: list) -> list[dict]:
    """OpenAI messages -> nanocode messages. An assistant message's tool_calls become tool_call parts, each
    followed by the tool_output part of the role "tool" message that answers it (by tool_call_id), and
    what the assistant says after a tool's output continues the same assistant message (our format has
    one assistant turn per user turn). Content may also be nanocode parts (what the built-in UI sends)."""
    out, open_calls = (
        [],
        {},
    )  # open_calls: tool_call_id -> [call part, output part or None] of the last assistant

    def close_calls(i):
        if any(v[1] is None for v in open_calls.values()):
            missing = ", ".join(k for k, v in open_calls.items() if v[1] is None)
            raise RequestError(
                400,
                f"messages[{i}]: tool call(s) {missing} have no role 'tool' message with the result",
            )
        for call, output in open_calls.values():
            out[-1]["content"] += [call, output]
        open_calls.clear()

    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        where = f"messages[{i}]"
        if role == "tool":
            call_id = m.get("tool_call_id")
            if call_id not in open_calls:
                raise RequestError(
                    400,
                    f"{where}: a role 'tool' message must answer a tool call of the assistant "
                    f"message before it; tool_call_id {call_id!r} is not one",
                )
            open_calls[call_id][1] = {"type": "tool_output", "text": _text(m.get("content"), where)}
            continue
        close_calls(i)
        if role in ("system", "developer", "user"):
            out.append(
                {
                    "role": "user" if role == "user" else "system",
                    "content": _text(m.get("content"), where),
                }
            )
        elif role == "assistant":
            content = m.get("content")
            if content is None or content == "":
                parts = []
            elif isinstance(content, str):
                parts = [{"type": "text", "text": content}]
            elif isinstance(content, list):  # nanocode parts, or OpenAI text parts (the same shape)
                parts = [dict(p) for p in content]
            else:
                raise RequestError(
                    400, f"{where}: content must be a string, null or a list of parts"
                )
            for j, tc in enumerate(m.get("tool_calls") or []):
                fn = tc.get("function") if isinstance(tc, dict) else None
                try:
                    name, arguments = fn["name"], json.loads(fn["arguments"])
                except (TypeError, KeyError, ValueError):
                    name = arguments = None
                if not (
                    isinstance(name, str)
                    and isinstance(arguments, dict)
                    and isinstance(tc.get("id"), str)
                ):
                    raise RequestError(
                        400,
                        f"{where}.tool_calls[{j}]: expected {{id, type: 'function', function: "
                        "{name, arguments: a JSON object as a string}}",
                    )
                open_calls[tc["id"]] = [
                    {"type": "tool_call", "name": name, "arguments": arguments},
                    None,
                ]
            if out and out[-1]["role"] == "assistant" and in_progress(out[-1]):
                out[-1]["content"] += (
                    parts  # the answer after a tool's output: the same turn goes on
                )
            else:
                out.append({"role": "assistant", "content": parts})
            if not parts and not open_calls:
                raise RequestError(
                    400, f"{where}: an assistant message needs content or tool_calls"
                )
        else:
            raise RequestError(
                400, f"{where}: role must be system, user, assistant or tool, got {role!r}"
            )
    close_calls(len(msgs))
    return out


def parse_tools(req) -> tuple[dict | None, str | None]:
    """The request's `tools` as {name: schema} (None: the request has none) and the name `tool_choice` forces."""
    tools, choice = req.get("tools"), req.get("tool_choice")
    schemas = None
    if tools:
        if not isinstance(tools, list):
            raise RequestError(400, "'tools' must be a list")
        schemas = {}
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise RequestError(
                    400,
                    f"tools[{i}]: expected {{type: 'function', function: {{name, description, "
                    "parameters}}}}",
                )
            schemas[fn["name"]] = {
                "name": fn["name"],
                "description": fn.get("description", ""),
                "parameters": fn.get("parameters", {"type": "object", "properties": {}}),
            }
    if choice is None or choice in ("auto", "none"):
        if choice == "none":
            schemas = {} if schemas is not None else None
        return schemas, None
    if choice == "required":
        raise RequestError(
            400, "tool_choice 'required' is not supported: name the function to call, or use 'auto'"
        )
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise RequestError(
            400,
            f"'tool_choice' must be 'auto', 'none' or {{type: 'function', function: {{name}}}}, "
            f"got {choice!r}",
        )
    if not schemas or name not in schemas:
        raise RequestError(400, f"tool_choice names {name!r}, which is not in 'tools'")
    return schemas, name


def parse_request(body: bytes, args) -> dict:
    """Validate a chat-completions request; returns the engine's conversation, the settings and the tool mode."""
    from nanocode.conversations import validate_conversation
    from nanocode.tools import TOOLS, tools_prompt

    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON ({e})") from None
    if not isinstance(req, dict):
        raise RequestError(400, "request body must be a JSON object")
    msgs = req.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(
            400, "'messages' is required: a non-empty list of {role, content} objects"
        )
    if len(msgs) > args.max_messages:
        raise RequestError(400, f"too many messages: {len(msgs)} > {args.max_messages}")
    messages = to_conversation(msgs)
    tools, forced = parse_tools(req)
    extra = [s for name, s in (tools or {}).items() if name not in TOOLS]
    if extra:  # functions the model was not trained on: listed for it, in the system prompt
        listing = tools_prompt(extra)
        if messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": listing + "\n\n" + messages[0]["content"]}
        else:
            messages.insert(0, {"role": "system", "content": listing})
    conv = {"messages": messages}
    try:
        validate_conversation(conv, "messages", last_role=None)
    except NanocodeError as e:
        raise RequestError(400, str(e)) from None
    if messages[-1]["role"] != "user" and not in_progress(messages[-1]):
        raise RequestError(400, "messages: must end with a user message or with a tool result")

    def number(key, default, lo, hi, kind=float):
        value = req.get(key, default)
        if value is None:
            return default
        ok = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
        if not ok or not lo <= value <= hi:
            raise RequestError(
                400,
                f"'{key}' must be {'an integer' if kind is int else 'a number'} in [{lo}, {hi}], "
                f"got {value!r}",
            )
        return value

    max_tokens = number("max_completion_tokens", None, 1, args.max_tokens, int) or number(
        "max_tokens", args.max_tokens, 1, args.max_tokens, int
    )
    settings = dict(
        max_tokens=max_tokens,
        temperature=number("temperature", args.temperature, 0.0, 2.0),
        top_p=number("top_p", None, 0.0, 1.0),
        top_k=number("top_k", args.top_k, 1, 1 << 30, int),
        seed=number("seed", None, 0, 2**63 - 1, int),
    )
    if settings["seed"] is None:  # like the OpenAI API: a request without a seed samples afresh
        settings["seed"] = secrets.randbelow(2**63)
    if settings["top_p"] == 0:
        raise RequestError(400, "'top_p' must be in (0, 1], got 0")
    n = number("n", 1, 1, args.max_n, int)
    stream = req.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"'stream' must be true or false, got {stream!r}")
    stop = req.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(x, str) and x for x in stop)
    ):
        raise RequestError(
            400,
            f"'stop' must be a string or a list of at most 4 non-empty strings, got {req['stop']!r}",
        )
    if not isinstance(
        req.get("parallel_tool_calls", True), bool
    ):  # accepted; a reply holds one call at most
        raise RequestError(400, "'parallel_tool_calls' must be true or false")
    cid = req.get("conversation_id")
    if cid is not None and not isinstance(cid, str):
        raise RequestError(400, "'conversation_id' must be a string (as a previous reply gave it)")
    return dict(
        conversation=conv,
        stream=stream,
        settings=settings,
        tools=tools,
        forced=forced,
        stop=stop,
        conversation_id=cid,
        n=n,
    )


def usage_of(u):
    return dict(u, total_tokens=u["prompt_tokens"] + u["completion_tokens"])


class Abandoned(Exception):
    """Raised in the engine's thread when the client has gone: ends the generation."""


class StopText:
    """Cuts the reply's text at the first stop string, holding back a tail that may be the start of one."""

    def __init__(self, stops):
        self.stops, self.held, self.hit = stops, "", False

    def feed(self, text: str) -> str:
        """What of `text` (after what was held) can be sent now; sets .hit at a stop string."""
        buf = self.held + text
        cuts = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.held, self.hit = "", True
            return buf[: min(cuts)]
        keep = max(
            (k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0
        )
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class Workspaces:
    """The working directories of server-side tools: per conversation a copy of the --allow-tools DIR (or
    an empty dir), made on its first request and found again by the conversation_id its replies carry
    (random, so not guessable). Beyond `limit` conversations the oldest one's directory is deleted."""

    def __init__(self, source: Path | None, limit: int):
        self.source, self.limit = source, limit
        self.root = Path(tempfile.mkdtemp(prefix="nanocode-conversations-"))
        self.dirs, self.lock = OrderedDict(), threading.Lock()

    def get(self, cid: str | None) -> tuple[str, Path]:
        with self.lock:
            if cid is not None:
                if cid not in self.dirs:
                    raise RequestError(
                        400,
                        f"unknown conversation_id {cid!r} (expired, or from another server "
                        "run): start a new conversation without one",
                    )
                self.dirs.move_to_end(cid)
                return cid, self.dirs[cid]
            cid = "conv-" + secrets.token_hex(16)
            path = self.root / cid
            if self.source is not None:
                shutil.copytree(self.source, path, symlinks=True)
            else:
                path.mkdir()
            self.dirs[cid] = path
            while len(self.dirs) > self.limit:
                shutil.rmtree(self.dirs.popitem(last=False)[1], ignore_errors=True)
            return cid, path

    def close(self):
        shutil.rmtree(self.root, ignore_errors=True)


def create_app(engines, args, fingerprint: str = "fp_unknown"):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException

    workspaces = None
    if args.allow_tools is not None:
        workspaces = Workspaces(
            Path(args.allow_tools).resolve() if args.allow_tools else None, args.max_conversations
        )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if (
            workspaces is not None
        ):  # on shutdown (SIGTERM / Ctrl-C included): the conversations' directories go
            workspaces.close()

    app = FastAPI(title="nanocode", lifespan=lifespan)
    if args.cors_origin:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=args.cors_origin,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    free = queue.Queue()
    for e in engines:
        free.put(e)
    tokenizer = engines[0].tokenizer
    counts = {
        "admitted": 0
    }  # requests waiting for or holding a replica (changed on the event loop only)
    model_name = f"nanocode-{args.source}" if not args.fake_script else "nanocode-fake"

    def error(status, message):
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        return JSONResponse(
            {"error": {"message": message, "type": kind, "code": status}}, status_code=status
        )

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    def unauthorized(request: Request):
        """401 response unless the request carries the API key (or none is required)."""
        if not args.api_key:
            return None
        got = request.headers.get("authorization", "")
        if got.startswith("Bearer ") and hmac.compare_digest(
            got[7:].encode(), args.api_key.encode()
        ):
            return None
        return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > args.max_body_bytes:
            raise RequestError(
                413, f"request body of {length} bytes exceeds the limit of {args.max_body_bytes}"
            )
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > args.max_body_bytes:
                raise RequestError(
                    413, f"request body exceeds the limit of {args.max_body_bytes} bytes"
                )
        return body

    async def events(conversation, n, chat_kwargs):
        """Run the engine on a free replica in a thread (chat for one choice, chat_batch for n); yield its
        (choice, event) pairs here as they come. If the client goes away (this generator is closed), the
        worker stops at its next event (or before starting, if it was still waiting for a replica)."""
        loop = asyncio.get_running_loop()
        out, cancel = asyncio.Queue(), threading.Event()

        def put(item):
            loop.call_soon_threadsafe(out.put_nowait, item)

        def on_event(row, ev):
            if cancel.is_set():
                raise Abandoned
            put((row, ev))

        def work():
            engine = free.get()
            try:
                if cancel.is_set():
                    return
                if n == 1:
                    for ev in engine.chat(conversation, **chat_kwargs):
                        on_event(0, ev)
                else:
                    engine.chat_batch([conversation] * n, on_event=on_event, **chat_kwargs)
            except Abandoned:
                pass
            except Exception as e:  # noqa: BLE001 -- reported to the client, the server goes on
                put(
                    (0, {"type": "error", "message": f"generation failed: {type(e).__name__}: {e}"})
                )
            finally:
                free.put(engine)
                put(None)

        threading.Thread(target=work, daemon=True).start()
        try:
            while (item := await out.get()) is not None:
                yield item
        finally:
            cancel.set()

    async def reply(req):
        """The reply's choices as a stream of (choice, item) with item ("text", str) | ("tool_call", call) |
        ("nanocode", event) | ("done", finish, usage) | ("error", message): stop strings applied, client-side
        tool calls given ids. Choices of n > 1 sample with seeds seed, seed + 1, ..."""
        conv, n = req["conversation"], req["n"]
        kwargs = dict(req["settings"], max_tool_calls=args.max_tool_calls)
        if (
            req["tools"] is not None
        ):  # client-side tools: the reply ends at a call, the client runs it
            kwargs.update(tools=req["tools"], forced_call=req["forced"], stop_at_tool_call=True)
        elif (
            req.get("workdir") is not None
        ):  # our tools, run here in the conversation's own directory, sandboxed
            kwargs.update(
                approve=lambda name, arguments: True,
                workdir=req["workdir"],
                tool_runner=functools.partial(run_tool, sandbox=args.sandbox, network=args.network),
            )
        stops, emitted, done = (
            [StopText(req["stop"]) for _ in range(n)],
            [[] for _ in range(n)],
            set(),
        )
        async for row, ev in events(conv, n, kwargs):
            kind, stop = ev["type"], stops[row]
            if row in done:  # cut by a stop string; the batch goes on with the other choices
                continue
            if kind == "text":
                emitted[row].append(ev["text"])
                text = stop.feed(ev["text"])
                if text:
                    yield row, ("text", text)
                if (
                    stop.hit
                ):  # usage counted by re-encoding: the engine stopped before it could count
                    done.add(row)
                    usage = {
                        "prompt_tokens": len(tokenizer.render_for_completion(conv)),
                        "completion_tokens": len(tokenizer.encode("".join(emitted[row]))),
                    }
                    yield row, ("done", "stop", usage)
                    if len(done) == n:
                        return
                continue
            if stop.held:
                yield row, ("text", stop.flush())
            if kind == "tool_call" and req["tools"] is not None:
                yield (
                    row,
                    (
                        "tool_call",
                        {
                            "id": "call_" + secrets.token_hex(12),
                            "type": "function",
                            "function": {
                                "name": ev["name"],
                                "arguments": json.dumps(ev["arguments"]),
                            },
                        },
                    ),
                )
            elif kind == "done":
                done.add(row)
                yield row, ("done", ev["finish_reason"], ev["usage"])
            elif kind == "error":
                yield row, ("error", ev["message"])
                return
            else:  # a server-side tool_call / tool_output, or a notice (old turns dropped from the context)
                yield row, ("nanocode", ev)

    async def complete(req, head):
        """The whole reply as one chat.completion object."""
        n = req["n"]
        texts, parts, calls = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        choices, usage = [None] * n, {"prompt_tokens": 0, "completion_tokens": 0}
        async for row, item in reply(req):
            if item[0] == "text":
                texts[row].append(item[1])
                if parts[row] and parts[row][-1]["type"] == "text":
                    parts[row][-1] = {"type": "text", "text": parts[row][-1]["text"] + item[1]}
                else:
                    parts[row].append({"type": "text", "text": item[1]})
            elif item[0] == "tool_call":
                calls[row].append(item[1])
                fn = item[1]["function"]
                parts[row].append(
                    {
                        "type": "tool_call",
                        "name": fn["name"],
                        "arguments": json.loads(fn["arguments"]),
                    }
                )
            elif item[0] == "nanocode" and item[1]["type"] in ("tool_call", "tool_output"):
                parts[row].append(dict(item[1]))
            elif item[0] == "error":
                return error(500, item[1])
            elif item[0] == "done":
                message = {
                    "role": "assistant",
                    "content": "".join(texts[row]) if texts[row] or not calls[row] else None,
                    "parts": parts[row],
                }
                if calls[row]:
                    message["tool_calls"] = calls[row]
                choices[row] = {
                    "index": row,
                    "finish_reason": item[1],
                    "logprobs": None,
                    "message": message,
                }
                usage = {
                    "prompt_tokens": item[2][
                        "prompt_tokens"
                    ],  # the prompt once, as OpenAI counts it
                    "completion_tokens": usage["completion_tokens"] + item[2]["completion_tokens"],
                }
        if any(c is None for c in choices):
            return error(500, "generation ended without a reply")
        return {**head, "object": "chat.completion", "usage": usage_of(usage), "choices": choices}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        try:
            body = await read_body(request)
            req = parse_request(body, args)
            if counts["admitted"] >= len(engines) + args.max_queue:
                raise RequestError(
                    429, f"server busy: {args.max_queue} requests already waiting; retry later"
                )
            if workspaces is not None and req["tools"] is None:
                if req["n"] > 1:
                    raise RequestError(
                        400,
                        "'n' > 1 with server-side tools: the choices would share one working "
                        "directory; ask for one choice, or send 'tools' (client-side tools)",
                    )
                req["conversation_id"], req["workdir"] = await asyncio.to_thread(
                    workspaces.get, req["conversation_id"]
                )
        except RequestError as e:
            return error(e.status, str(e))
        counts["admitted"] += 1
        released = False

        def release():  # once per admitted request: when its reply is done, failed or abandoned
            nonlocal released
            if not released:
                released = True
                counts["admitted"] -= 1

        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {
            "id": cid,
            "created": created,
            "model": model_name,
            "system_fingerprint": fingerprint,
        }
        if req.get("workdir") is not None:
            head["conversation_id"] = req["conversation_id"]

        if not req["stream"]:
            try:
                return await complete(req, head)
            finally:
                release()

        def chunk(delta, finish_reason=None, index=0, **extra):
            obj = {
                **head,
                "object": "chat.completion.chunk",
                "choices": [
                    {
                        "index": index,
                        "delta": delta,
                        "finish_reason": finish_reason,
                        "logprobs": None,
                    }
                ],
                **extra,
            }
            return f"data: {json.dumps(obj)}\n\n"

        async def sse():
            for row in range(req["n"]):
                yield chunk({"role": "assistant", "content": ""}, index=row)
            n_calls, usage = [0] * req["n"], {"prompt_tokens": 0, "completion_tokens": 0}
            async for row, item in reply(req):
                if item[0] == "text":
                    yield chunk({"content": item[1]}, index=row)
                elif (
                    item[0] == "tool_call"
                ):  # as OpenAI streams one: id and name first, then the arguments
                    call, k = item[1], n_calls[row]
                    yield chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": k,
                                    "id": call["id"],
                                    "type": "function",
                                    "function": {"name": call["function"]["name"], "arguments": ""},
                                }
                            ]
                        },
                        index=row,
                    )
                    yield chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": k,
                                    "function": {"arguments": call["function"]["arguments"]},
                                }
                            ]
                        },
                        index=row,
                    )
                    n_calls[row] += 1
                elif item[0] == "done":
                    usage = {
                        "prompt_tokens": item[2]["prompt_tokens"],
                        "completion_tokens": usage["completion_tokens"]
                        + item[2]["completion_tokens"],
                    }
                    yield chunk({}, item[1], index=row, usage=usage_of(usage))
                elif item[0] == "error":
                    yield f"data: {json.dumps({'error': {'message': item[1], 'type': 'server_error'}})}\n\n"
                else:  # server-side tool_call, tool_output, notice
                    yield chunk({"nanocode": item[1]}, index=row)
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            sse(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
            background=BackgroundTask(release),
        )  # also after a disconnect

    @app.get("/v1/models")
    async def models(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "nanocode"}],
        }

    @app.get("/health")
    async def health():
        busy = len(engines) - free.qsize()
        return {
            "status": "ok",
            "model": model_name,
            "pid": os.getpid(),
            "replicas": len(engines),
            "free": free.qsize(),
            "queued": max(0, counts["admitted"] - busy),
            "max_queue": args.max_queue,
            "tools": "server-side" if workspaces else None,
            "sandbox": args.sandbox if workspaces else None,
        }

    @app.get("/")
    async def ui():
        return HTMLResponse(UI_PATH.read_text())

    return app


def main():
    args = parser.parse_args()
    if args.allow_tools and not Path(args.allow_tools).is_dir():
        raise NanocodeError(f"--allow-tools {args.allow_tools} is not a directory")
    if (
        args.max_tokens < 1
        or args.max_body_bytes < 1
        or args.max_messages < 1
        or args.max_conversations < 1
    ):
        raise NanocodeError(
            "--max-tokens, --max-body-bytes, --max-messages and --max-conversations must be >= 1"
        )
    if args.max_queue < 0:
        raise NanocodeError(f"--max-queue must be >= 0, got {args.max_queue}")
    exposed = args.host not in LOOPBACK and not args.host.startswith("127.")
    if exposed and args.allow_tools is not None and not args.api_key:
        raise NanocodeError(
            f"refusing to serve tools on {args.host} (reachable from other machines) without an API "
            "key: pass --api-key KEY (clients send 'Authorization: Bearer KEY'), or bind 127.0.0.1"
        )
    if exposed:
        print(
            f"warning: serving on {args.host}: reachable from other machines"
            f"{'' if args.api_key else ' by anyone (no --api-key)'}",
            file=sys.stderr,
            flush=True,
        )
    if args.allow_tools is not None and args.sandbox != "off":
        from nanocode import sandbox

        sandbox.isolated(args.sandbox)  # warns now, loudly, if tool calls cannot be isolated here
    import uvicorn

    engines, fingerprint = load_engines(args)
    app = create_app(engines, args, fingerprint)
    tools = (
        "client-side only"
        if args.allow_tools is None
        else f"server-side in per-conversation {'copies of ' + str(Path(args.allow_tools).resolve()) if args.allow_tools else 'empty dirs'}"
        f" (sandbox {args.sandbox}, network {'on' if args.network else 'off'})"
    )
    print(
        f"nanocode server: http://{args.host}:{args.port}/ ({len(engines)} replica(s), tools {tools}"
        f"{', API key required' if args.api_key else ''})",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_main(main)
