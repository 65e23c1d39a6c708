"""Serve the agent over HTTP in the OpenAI chat-completions protocol, with a one-page chat UI at /.

    python -m scripts.code_web                           # sft checkpoint on 127.0.0.1:8000
    python -m scripts.code_web --allow-tools ~/project   # our tools run here, in copies of it
    python -m scripts.code_web --host 0.0.0.0 --api-key $KEY -i dpo

Endpoints: POST /v1/chat/completions (non-streaming, or "stream": true for server-sent events ending
in "data: [DONE]"), GET /v1/models, GET /health (replicas free, requests queued), GET / (the UI).

Client-side tools (the protocol's usual mode): a request with "tools" gets the model's call back as
message.tool_calls (id, type "function", function.name, function.arguments as a JSON string) with
finish_reason "tool_calls" (streamed as delta.tool_calls), and the server runs nothing; the client
sends the result as a role "tool" message (after the assistant message with content null and
tool_calls), and the model goes on. Our five tools (bash, read_file, ...) are the ones the model was
trained on; other functions are listed for it in the system prompt. Decoding follows a grammar
(nanocode.grammar): a call names one of the request's tools and its arguments match that tool's
"parameters" (strict or not; a schema keyword we do not support is a 400 naming it). tool_choice:
"auto" (text, calls or both), "none" (text only), "required" (a call first), a named function (a
call of it), {"type": "allowed_tools", ...} (auto or required among those). response_format:
"text", "json_object" or "json_schema" (the content is JSON matching json_schema.schema; after any
calls). parallel_tool_calls is accepted, but a reply holds at most one call: the model makes one
call per turn. Without "tools" and "response_format" decoding is free: the model writes our tools'
calls as trained.

Server-side tools (--allow-tools [DIR], used by requests without "tools"): our tools run without
asking (a server has nobody to ask), inside nanocode.sandbox (--sandbox, --network), each
conversation in its own copy of DIR (or an empty dir): the first reply carries a "conversation_id",
send it back (a request field) to keep working in the same directory. Serving tools on a
non-loopback address needs --api-key.

Also: "seed" (random per request when absent), "stop", "max_tokens" / "max_completion_tokens",
"top_k", "usage" and "system_fingerprint" in every reply; a conversation longer than the context is
trimmed by the engine (oldest turns first). "n" > 1 samples the choices as one batch (seeds seed,
seed + 1, ...; not with server-side tools, whose choices would share a directory). Beyond the
protocol, a reply's message carries "parts" (text, tool_call and tool_output: nanocode's
conversation format), and server-side tool activity streams as chunks whose delta is {"nanocode":
{"type": "tool_call"|"tool_output"|"notice", ...}}; messages sent back may use such parts as their
content (the UI does). One model replica per GPU (one on CPU) serves one request at a time; up to
--max-queue more wait, beyond that 429.
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

UI_PATH = Path(__file__).with_name("ui.html")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
EMPTY_SCHEMA = {"type": "object", "properties": {}, "additionalProperties": False}
NO_CACHE = {"Cache-Control": "no-cache"}


def add_agent_args(parser):
    """The arguments of the server and the CLI: which checkpoint, where, sampling, tool calls."""
    add = parser.add_argument
    add("-i", "--source", default="sft", choices=PHASES, help="which checkpoint phase")
    add("--tag", default=None, help="checkpoint tag (default: the most recent)")
    add("--step", type=int, default=None, help="checkpoint step (default: the last)")
    add("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    add("-t", "--temperature", type=float, default=0.6, help="(a request to the server may differ)")
    add("--top-k", type=int, default=50, help="(a request to the server may differ)")
    add("--max-tokens", type=int, default=1024, help="sampled tokens per reply (at most)")
    add("--max-tool-calls", type=int, default=8, help="tool calls run per reply")
    modes = ["read-only", "workspace-write", "off"]
    add("--sandbox", default="workspace-write", choices=modes, help="how tool calls run")
    add("--network", action="store_true", help="let tool commands use the network")
    add("--fake-script", default=None, help=argparse.SUPPRESS)  # tests: a ScriptedModel's JSON


parser = argparse.ArgumentParser(description="OpenAI-compatible server and chat page")
add_agent_args(parser)
add = parser.add_argument
add("--host", default="127.0.0.1")
add("--port", type=int, default=8000)
TOOLS_HELP = "run our tools server-side, each conversation in a copy of DIR (no DIR: an empty dir)"
add("--allow-tools", nargs="?", const="", metavar="DIR", help=TOOLS_HELP)
add("--max-conversations", type=int, default=64, help="working dirs kept")
KEY_HELP = "require 'Authorization: Bearer KEY' on /v1 (default: $NANOCODE_API_KEY)"
add("--api-key", default=os.environ.get("NANOCODE_API_KEY"), help=KEY_HELP)
add("--cors-origin", action="append", default=[], help="let pages from it call")
add("--max-queue", type=int, default=16, help="requests waiting; more get 429")
add("--num-gpus", type=int, default=None, help="replicas (default: all GPUs)")
add("--max-body-bytes", type=int, default=1_000_000, help="larger: 413")
add("--max-messages", type=int, default=500, help="more messages: 400")
add("--max-n", type=int, default=8, help="choices per request ('n') at most")


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def bad(message: str) -> RequestError:
    return RequestError(400, message)


def load_engine(args, device):
    """The Engine of the checkpoint `args` names (--fake-script: a test's ScriptedModel) on
    `device`, and the checkpoint's metadata."""
    from nanocode.checkpoint import load_model
    from nanocode.engine import Engine

    if args.fake_script:
        from nanocode.tokenizer import get_tokenizer
        from tests.scripted_model import ScriptedModel

        tokenizer = get_tokenizer()
        return Engine(ScriptedModel.from_file(args.fake_script, tokenizer), tokenizer), {}
    model, tokenizer, meta = load_model(args.source, device, args.tag, args.step)
    return Engine(model, tokenizer), meta


def load_engines(args) -> tuple[list, str]:
    """One Engine per GPU (or one on CPU/MPS), and the system_fingerprint naming the checkpoint."""
    import torch

    devices = [args.device_type or autodetect_device_type()]
    if devices[0] == "cuda" and not args.fake_script:
        n, visible = args.num_gpus or torch.cuda.device_count(), torch.cuda.device_count()
        if not 1 <= n <= visible:
            raise NanocodeError(f"--num-gpus {n}: {visible} GPUs visible")
        devices = [f"cuda:{i}" for i in range(n)]
    loaded = [load_engine(args, device) for device in devices]
    meta = loaded[0][1]
    ident = [args.source, args.tag, args.step, meta.get("step"), meta.get("model_config")]
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    return [engine for engine, _ in loaded], "fp_fake" if args.fake_script else "fp_" + digest[:12]


def text_of(content, where: str) -> str:
    """A system/user/tool message's text: a string, or a list of {"type": "text", "text"} parts."""
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise bad(f"{where}.content must be a string or a list of text parts")
    return content


def tool_call_part(call, where: str) -> dict:
    """An OpenAI tool_calls entry as our tool_call part."""
    try:
        # the protocol carries arguments as JSON text; our parts hold the object
        name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
        if isinstance(name, str) and isinstance(arguments, dict) and isinstance(call["id"], str):
            return {"type": "tool_call", "name": name, "arguments": arguments}
    except (TypeError, KeyError, ValueError):
        pass
    raise bad(f"{where}: expected {{id, function: {{name, arguments: JSON object text}}}}")


def to_conversation(msgs: list) -> list[dict]:
    """OpenAI messages -> nanocode messages. An assistant message's tool_calls become tool_call
    parts, each followed by the tool_output part of the role "tool" message that answers it (by
    tool_call_id), and what the assistant says after a tool's output continues the same assistant
    message (our format has one assistant turn per user turn). Content may also be nanocode parts
    (what the built-in UI sends)."""
    out, calls = [], {}  # calls: tool_call_id -> [call part, output part] of the last assistant
    for i, m in enumerate([*msgs, None]):  # None: the end, where every call must have its output
        where, role = f"messages[{i}]", m.get("role") if isinstance(m, dict) else None
        if role == "tool":
            if m.get("tool_call_id") not in calls:
                raise bad(f"{where}: a role 'tool' message must answer a tool call just before it")
            output = text_of(m.get("content"), where)
            calls[m["tool_call_id"]][1] = {"type": "tool_output", "text": output}
            continue
        if missing := [key for key, (_, output) in calls.items() if output is None]:
            raise bad(f"{where}: tool call(s) {', '.join(missing)} have no role 'tool' result")
        if calls:  # the calls and their outputs join the assistant's turn
            out[-1]["content"] += [part for pair in calls.values() for part in pair]
            calls = {}
        if m is None:
            return out
        if role in ("system", "developer", "user"):  # "developer": OpenAI's newer "system"
            role = "user" if role == "user" else "system"
            out.append({"role": role, "content": text_of(m.get("content"), where)})
            continue
        if role != "assistant":
            raise bad(f"{where}.role must be system, user, assistant or tool, got {role!r}")
        parts = m.get("content") or []
        parts = [{"type": "text", "text": parts}] if isinstance(parts, str) else parts
        if not isinstance(parts, list):
            raise bad(f"{where}.content must be a string, null or a list of parts")
        for j, call in enumerate(m.get("tool_calls") or []):
            calls[call["id"]] = [tool_call_part(call, f"{where}.tool_calls[{j}]"), None]
        if not parts and not calls:
            raise bad(f"{where}: an assistant message needs content or tool_calls")
        if out and in_progress(out[-1]):  # the answer after a tool's output: the same turn
            out[-1]["content"] += parts
        else:
            out.append({"role": "assistant", "content": list(parts)})


def parse_tools(req) -> dict | None:
    """The request's `tools` as {name: function} (None: the request has none)."""
    if req.get("functions") or req.get("function_call"):  # (deprecated: not silently ignored)
        raise bad("'functions' and 'function_call' are not supported: use 'tools', 'tool_choice'")
    tools = req.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list):
        raise bad("'tools' must be a list")
    schemas = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(tool, dict) and tool.get("type", "function") != "function":
            raise bad(f"tools[{i}]: type {tool['type']!r} is not supported, only 'function'")
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]):
            raise bad(f"tools[{i}]: expected {{type: 'function', function: {{name, ...}}}}")
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
            raise bad(f"tools[{i}].function.strict must be true or false")
        # a function without "parameters" takes none: its call's arguments must be {}
        schemas[fn["name"]] = {"description": "", "parameters": EMPTY_SCHEMA, **fn}
    return schemas


def parse_request(body: bytes, args) -> dict:
    """Validate a chat-completions request: the engine's conversation and call settings (with
    settings["grammar"] as compile_grammar's arguments: the app compiles it), and how to answer
    (n, stream, conversation_id)."""
    from nanocode.conversations import validate_conversation
    from nanocode.engine import check_sampling
    from nanocode.grammar import OUR_TOOLS, openai_grammar
    from nanocode.tools import TOOLS, tools_prompt

    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"request body is not valid JSON ({e})") from None
    if not isinstance(req, dict):
        raise bad("request body must be a JSON object")
    msgs = req.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' is required: a non-empty list of {role, content} objects")
    if len(msgs) > args.max_messages:
        raise bad(f"'messages': too many ({len(msgs)} > {args.max_messages})")
    messages = to_conversation(msgs)
    tools = parse_tools(req)
    params = None if tools is None else {name: fn["parameters"] for name, fn in tools.items()}
    extra = [schema for name, schema in (tools or {}).items() if name not in TOOLS]
    if extra:  # functions the model was not trained on: listed for it, in the system prompt
        system = [m["content"] for m in messages[:1] if m["role"] == "system"]
        listing = "\n\n".join([tools_prompt(extra), *system])
        messages[: len(system)] = [{"role": "system", "content": listing}]
    given = {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens}
    fields = ("temperature", "top_k", "top_p", "seed", "max_tokens", "max_completion_tokens", "n")
    given.update({key: req[key] for key in fields if req.get(key) is not None})
    # the caps: OpenAI's temperature range, a seed that fits int64, and the server's own flags
    limits = dict(temperature=2, seed=2**63 - 1, n=args.max_n, max_tokens=args.max_tokens)
    try:  # each callee's error names the value that is wrong
        grammar = openai_grammar(req, params, OUR_TOOLS if args.allow_tools is not None else {})
        validate_conversation({"messages": messages}, "messages", last_role=None)
        check_sampling(dict(limits, max_completion_tokens=args.max_tokens), **given)
    except (ValueError, NanocodeError) as e:
        raise bad(str(e)) from None
    # a tool result last means an assistant turn in progress: the model goes on with it
    if messages[-1]["role"] != "user" and not in_progress(messages[-1]):
        raise bad("'messages' must end with a user message or with a tool result")
    stop = [req["stop"]] if isinstance(req.get("stop"), str) else req.get("stop") or []
    strings = isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)
    if not strings or len(stop) > 4:  # at most 4, as the OpenAI API allows
        raise bad(f"'stop' must be a string or a list of at most 4 non-empty strings, got {stop!r}")
    kinds = {"stream": bool, "parallel_tool_calls": bool, "conversation_id": str}
    for key, kind in kinds.items():  # parallel_tool_calls: accepted; a reply holds one call
        if req.get(key) is not None and not isinstance(req[key], kind):
            raise bad(f"'{key}' must be {'true or false' if kind is bool else 'a string'}")
    settings = {key: given.get(key) for key in ("temperature", "top_k", "top_p")}
    # like the OpenAI API: a request without a seed samples afresh
    settings["seed"] = given["seed"] if "seed" in given else secrets.randbelow(2**63)
    # max_completion_tokens, the protocol's newer name, wins over max_tokens when both are sent
    settings.update(max_tokens=given.get("max_completion_tokens", given["max_tokens"]), stop=stop)
    # client-side tools: a valid call ends the reply unrun ("tool_calls"); the client runs it
    settings.update(tools=tools, grammar=grammar, stop_at_tool_call=tools is not None)
    answer = dict(n=given.get("n", 1), stream=req.get("stream"), cid=req.get("conversation_id"))
    return dict(answer, conversation={"messages": messages}, settings=settings)


class Workspaces:
    """The working directories of server-side tools: per conversation a copy of the --allow-tools
    DIR (or an empty dir), made on its first request and found again by the conversation_id its
    replies carry (random, so not guessable). Beyond `limit` the oldest one is deleted."""

    def __init__(self, source: Path | None, limit: int):
        self.source, self.limit = source, limit
        self.root = Path(tempfile.mkdtemp(prefix="nanocode-conversations-"))
        self.dirs, self.lock = OrderedDict(), threading.Lock()

    def get(self, cid: str | None) -> tuple[str, Path]:
        """(conversation_id, directory): cid's own (now the most recent), or for None a fresh
        copy under a new id, the oldest deleted beyond `limit`. An unknown cid is a 400."""
        with self.lock:
            if cid is not None:
                if cid not in self.dirs:
                    raise bad(f"unknown 'conversation_id' {cid!r} (expired, or another server's)")
                self.dirs.move_to_end(cid)
                return cid, self.dirs[cid]
            cid = "conv-" + secrets.token_hex(16)
            path = self.dirs[cid] = self.root / cid
            if self.source is not None:
                shutil.copytree(self.source, path, symlinks=True)
            else:
                path.mkdir()
            while len(self.dirs) > self.limit:
                shutil.rmtree(self.dirs.popitem(last=False)[1], ignore_errors=True)
            return cid, path


class Abandoned(Exception):
    """Raised in the engine's thread when the client has gone: ends the generation."""


def add_usage(total: dict, usage: dict) -> dict:
    """The request's usage after one more choice: the prompt once (as OpenAI counts it), the
    completion tokens of every choice."""
    done = total.get("completion_tokens", 0) + usage["completion_tokens"]
    prompt = usage["prompt_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def call_of(part: dict) -> dict:
    """A tool_call part as an OpenAI tool_calls entry (with a fresh id)."""
    function = {"name": part["name"], "arguments": json.dumps(part["arguments"])}
    return {"id": "call_" + secrets.token_hex(12), "type": "function", "function": function}


def create_app(engines, args, fingerprint: str = "fp_unknown"):
    """The FastAPI app: key and CORS middleware, then the endpoints. `engines` are replicas lent
    through a queue of free ones; each request generates in a thread (start), whose events reach
    the async handlers through an asyncio.Queue; `admitted` counts requests for the 429 limit."""
    from fastapi import FastAPI, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    source = Path(args.allow_tools).resolve() if args.allow_tools else None
    workspaces = None if args.allow_tools is None else Workspaces(source, args.max_conversations)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if workspaces is not None:  # on shutdown (SIGTERM, Ctrl-C): the directories go
            shutil.rmtree(workspaces.root, ignore_errors=True)

    app = FastAPI(title="nanocode", lifespan=lifespan)
    free = queue.Queue()  # the replicas not serving a request
    for engine in engines:
        free.put(engine)
    admitted = set()  # requests waiting for or holding a replica (their threads remove them)
    model_name = "nanocode-fake" if args.fake_script else f"nanocode-{args.source}"
    # our tools, run without asking (a server has nobody to ask), sandboxed
    runner = functools.partial(run_tool, sandbox=args.sandbox, network=args.network)
    server_tools = dict(approve=lambda name, arguments: True, tool_runner=runner)

    def error(status, message):
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(status)
        kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        body = {"error": {"message": message, "type": kind, "code": status}}
        return JSONResponse(body, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        """/v1 needs 'Authorization: Bearer KEY' when the server has a key."""
        got, key = request.headers.get("authorization", ""), (args.api_key or "").encode()
        if key and request.url.path.startswith("/v1"):
            # compare_digest: no early exit at the first wrong byte, so timing does not leak the key
            if not (got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), key)):
                return error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        return await call_next(request)

    # added after check_key, so outside it: preflights pass, and errors carry the CORS headers
    headers = ["Authorization", "Content-Type"]
    cors = dict(allow_origins=args.cors_origin, allow_methods=["GET", "POST"])
    app.add_middleware(CORSMiddleware, allow_headers=headers, **cors)

    async def read_body(request: Request) -> bytes:
        """The body, read chunk by chunk so that one over --max-body-bytes is refused (413) as
        soon as it passes the limit, never held whole in memory."""
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > args.max_body_bytes:
                raise RequestError(413, f"request body exceeds the limit of {args.max_body_bytes}")
        return body

    def grammar_of(spec):
        """parse_request's grammar spec (compile_grammar's arguments) compiled for the tokenizer
        every replica shares; what the schema check or llguidance refuses is a 400."""
        from nanocode.grammar import compile_grammar

        try:  # (cached: milliseconds once per distinct tools, tool_choice and response_format)
            return compile_grammar(engines[0].tokenizer, *spec)
        except ValueError as e:
            raise bad(str(e)) from None

    def start(req, rid):
        """Run the engine for this request in a thread, on the first free replica (chat_batch of
        n choices, choice i sampled with seed + i); its (choice, event) pairs come out of the
        returned async generator. When that generator is closed (the client went away), the
        engine stops at its next event (or before starting, if it still waits for a replica)."""
        loop, out, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        n, workdir = req["n"], req.get("workdir")
        ours = server_tools if workdir is not None else {}  # in the conversation's directory
        kwargs = dict(req["settings"], max_tool_calls=args.max_tool_calls, **ours)

        def put(item):  # asyncio.Queue is not thread-safe: the event loop's thread does the put
            loop.call_soon_threadsafe(out.put_nowait, item)

        def on_event(row, event):
            if cancel.is_set():  # raised inside chat_batch: it unwinds, and the replica is free
                raise Abandoned
            put((row, event))

        def work():
            """Wait for a free replica, generate unless the client is gone, always give it back
            and end the stream (None); a generation error is an "error" event for the client."""
            engine = free.get()  # blocks this thread, not the event loop: the request queue
            try:
                if not cancel.is_set():
                    kwargs.update(workdirs=[workdir] * n, on_event=on_event)
                    engine.chat_batch([req["conversation"]] * n, **kwargs)
            except Abandoned:
                pass
            except Exception as e:  # noqa: BLE001 -- reported to the client, the server goes on
                message = f"generation failed: {type(e).__name__}: {e}"
                put((0, {"type": "error", "message": message}))
            finally:
                free.put(engine)
                admitted.discard(rid)
                put(None)

        async def events():
            try:
                while (item := await out.get()) is not None:
                    yield item
            finally:
                cancel.set()

        threading.Thread(target=work, daemon=True).start()
        return events()

    async def complete(req, head, events):
        """The whole reply as one chat.completion object: each choice's content is its streamed
        text, its parts the engine's message (nanocode's format)."""
        n, usage, client_side = req["n"], {}, req["settings"]["tools"] is not None
        choices, texts = [None] * n, [""] * n
        async for row, event in events:
            if event["type"] == "error":
                return error(500, event["message"])
            texts[row] += event["text"] if event["type"] == "text" else ""
            if event["type"] == "done":
                parts = event["message"]["content"]
                calls = [call_of(p) for p in parts if p["type"] == "tool_call" and client_side]
                # content null beside tool_calls when the reply said nothing, as the protocol has it
                message = {"role": "assistant", "content": texts[row] or (None if calls else "")}
                message.update({"parts": parts, "tool_calls": calls} if calls else {"parts": parts})
                choice = {"index": row, "finish_reason": event["finish_reason"], "logprobs": None}
                choices[row] = dict(choice, message=message)
                usage = add_usage(usage, event["usage"])
        if None in choices:
            return error(500, "generation ended without a reply")
        return {**head, "object": "chat.completion", "usage": usage, "choices": choices}

    async def stream(req, head, events):
        """The reply as server-sent events: chat.completion.chunk objects, then [DONE]."""

        def chunk(row, delta, finish=None, **extra):
            choice = {"index": row, "delta": delta, "finish_reason": finish, "logprobs": None}
            obj = {**head, "object": "chat.completion.chunk", "choices": [choice], **extra}
            return f"data: {json.dumps(obj)}\n\n"

        for row in range(req["n"]):  # each choice's first chunk names the role, as OpenAI's do
            yield chunk(row, {"role": "assistant", "content": ""})
        usage = {}
        async for row, event in events:
            kind = event["type"]
            if kind == "text":
                yield chunk(row, {"content": event["text"]})
            elif kind == "tool_call" and req["settings"]["tools"] is not None:
                # whole, in one chunk; index 0: a reply holds at most one call
                yield chunk(row, {"tool_calls": [dict(call_of(event), index=0)]})
            elif kind == "done":
                usage = add_usage(usage, event["usage"])
                yield chunk(row, {}, event["finish_reason"], usage=usage)
            elif kind == "error":
                problem = {"message": event["message"], "type": "server_error"}
                yield f"data: {json.dumps({'error': problem})}\n\n"
            else:  # a server-side tool_call / tool_output, or a notice
                yield chunk(row, {"nanocode": event})
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        """Parse and admit a request (429 past replicas + --max-queue), then answer with one
        chat.completion or an SSE stream; grammar compiles and dir copies run off the loop."""
        try:
            req = parse_request(await read_body(request), args)
            if (spec := req["settings"]["grammar"]) is not None:
                req["settings"]["grammar"] = await asyncio.to_thread(grammar_of, spec)
            if len(admitted) >= len(engines) + args.max_queue:
                raise RequestError(429, f"server busy: {args.max_queue} requests waiting; retry")
            if workspaces is not None and req["settings"]["tools"] is None:
                if req["n"] > 1:
                    raise bad("'n' > 1 with server-side tools: the choices would share one dir")
                req["cid"], req["workdir"] = await asyncio.to_thread(workspaces.get, req["cid"])
        except RequestError as e:
            return error(e.status, str(e))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = dict(id=rid, created=created, model=model_name, system_fingerprint=fingerprint)
        if req.get("workdir") is not None:
            head["conversation_id"] = req["cid"]
        admitted.add(rid)
        events = start(req, rid)
        if not req["stream"]:
            return await complete(req, head, events)
        sse = stream(req, head, events)
        return StreamingResponse(sse, media_type="text/event-stream", headers=NO_CACHE)

    @app.get("/v1/models")
    async def models():
        model = {"id": model_name, "object": "model", "created": 0, "owned_by": "nanocode"}
        return {"object": "list", "data": [model]}

    @app.get("/health")
    async def health():
        busy = len(engines) - free.qsize()
        tools = "server-side" if workspaces else None
        load = dict(replicas=len(engines), free=free.qsize(), queued=max(0, len(admitted) - busy))
        return dict(status="ok", model=model_name, pid=os.getpid(), tools=tools, **load)

    @app.get("/")
    async def ui():
        return HTMLResponse(UI_PATH.read_text())

    return app


def main():
    args = parser.parse_args()
    if args.allow_tools and not Path(args.allow_tools).is_dir():
        raise NanocodeError(f"--allow-tools {args.allow_tools} is not a directory")
    for name in ("max_tokens", "max_body_bytes", "max_messages", "max_conversations", "max_n"):
        if getattr(args, name) < 1:
            raise NanocodeError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_queue < 0:
        raise NanocodeError(f"--max-queue must be >= 0, got {args.max_queue}")
    exposed = args.host not in LOOPBACK and not args.host.startswith("127.")  # 127/8: loopback
    if exposed and args.allow_tools is not None and not args.api_key:
        raise NanocodeError(
            f"refusing to serve tools on {args.host} (reachable from other machines) without an "
            "API key: pass --api-key KEY (clients send 'Authorization: Bearer KEY'), or bind "
            "127.0.0.1"
        )
    if exposed:
        anyone = "" if args.api_key else " by anyone (no --api-key)"
        print(f"warning: serving on {args.host}: reachable from others{anyone}", file=sys.stderr)
    if args.allow_tools is not None and args.sandbox != "off":
        from nanocode import sandbox

        sandbox.isolated(args.sandbox)  # warns now, loudly, if tool calls cannot be isolated here
    import uvicorn

    engines, fingerprint = load_engines(args)
    tools = "client-side"
    if args.allow_tools is not None:
        tools = f"server-side in copies of {args.allow_tools or 'an empty dir'}, {args.sandbox}"
    url = f"http://{args.host}:{args.port}/"
    print(f"nanocode server: {url} ({len(engines)} replica(s), tools {tools})", flush=True)
    app = create_app(engines, args, fingerprint)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_main(main)
