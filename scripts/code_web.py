"""Serve the agent over HTTP in the OpenAI chat-completions protocol, with a one-page chat UI at /.

    python -m scripts.code_web                              # sft checkpoint on 127.0.0.1:8000, tools off
    python -m scripts.code_web --allow-tools ~/sandbox      # tool calls run (without asking) in that directory
    python -m scripts.code_web --host 0.0.0.0 --port 8080 -i dpo

Endpoints: POST /v1/chat/completions (non-streaming, or "stream": true for server-sent events ending in
"data: [DONE]"), GET /v1/models, GET /health, GET / (the UI). Any OpenAI client works:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="nanocode", messages=[{"role": "user", "content": "hi"}])

Beyond the protocol: "top_k" is accepted; a reply's message carries "parts" (text, tool_call and
tool_output, the conversation format of nanocode.conversations), and while streaming, tool activity
comes as chunks whose delta is {"nanocode": {"type": "tool_call"|"tool_output"|"notice", ...}}. Messages
sent back may use such parts as their content, so the model sees its earlier tool calls.

Tools run only with --allow-tools DIR (every call is then approved: a server has nobody to ask);
otherwise a tool call gets "error: tools are disabled here". One model replica per GPU (one on CPU)
serves one request at a time; other requests wait for a free replica.
"""
import argparse
import asyncio
import json
import os
import queue
import threading
import time
import uuid
from pathlib import Path

from nanocode.common import NanocodeError, autodetect_device_type, run_main

parser = argparse.ArgumentParser(description="OpenAI-compatible server and web UI for the coding agent")
parser.add_argument("-i", "--source", default="sft", choices=["sft", "dpo", "base"], help="which checkpoint phase")
parser.add_argument("--tag", default=None, help="checkpoint tag (default: the most recent)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8000)
parser.add_argument("--allow-tools", default=None, metavar="DIR", help="run tool calls in DIR (off by default)")
parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
parser.add_argument("--num-gpus", type=int, default=None, help="replicas on cuda:0..N-1 (default: all visible GPUs)")
parser.add_argument("--temperature", type=float, default=0.6, help="default when a request gives none")
parser.add_argument("--top-k", type=int, default=50, help="default when a request gives none")
parser.add_argument("--max-tokens", type=int, default=1024, help="default and upper limit of a request's max_tokens")
parser.add_argument("--max-tool-calls", type=int, default=8, help="tool calls per reply")
parser.add_argument("--max-body-bytes", type=int, default=1_000_000, help="larger requests get 413")
parser.add_argument("--max-messages", type=int, default=500, help="more messages in a request get 400")
parser.add_argument("--fake-script", default=None, help=argparse.SUPPRESS)  # tests: a ScriptedModel JSON file

UI_PATH = Path(__file__).with_name("ui.html")


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def load_engines(args) -> list:
    """One Engine per GPU (or one on CPU/MPS)."""
    import torch
    from nanocode.engine import Engine
    if args.fake_script:
        from tests.scripted_model import ScriptedModel  # a test double: the tests run the scripts with it
        from nanocode.tokenizer import get_tokenizer
        tokenizer = get_tokenizer()
        return [Engine(ScriptedModel.from_file(args.fake_script, tokenizer), tokenizer)]
    from nanocode.checkpoint import load_model
    device_type = args.device_type or autodetect_device_type()
    if device_type == "cuda":
        n = args.num_gpus or torch.cuda.device_count()
        if not 1 <= n <= torch.cuda.device_count():
            raise NanocodeError(f"--num-gpus {n}: {torch.cuda.device_count()} GPUs visible")
        devices = [f"cuda:{i}" for i in range(n)]
    else:
        devices = [device_type]
    engines = []
    for device in devices:
        model, tokenizer, _ = load_model(args.source, device, args.tag, args.step)
        engines.append(Engine(model, tokenizer))
    return engines


def parse_request(body: bytes, args, engine) -> dict:
    """Validate a chat-completions request; returns the engine's conversation and sampling settings."""
    from nanocode.conversations import validate_conversation
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"request body is not valid JSON ({e})") from None
    if not isinstance(req, dict):
        raise RequestError(400, "request body must be a JSON object")
    msgs = req.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError(400, "'messages' is required: a non-empty list of {role, content} objects")
    if len(msgs) > args.max_messages:
        raise RequestError(400, f"too many messages: {len(msgs)} > {args.max_messages}")
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant"):
            hint = " (tools run on the server, so there are no tool messages)" if role == "tool" else ""
            raise RequestError(400, f"messages[{i}]: role must be system, user or assistant, got {role!r}{hint}")
    conv = {"messages": [{"role": m["role"], "content": m.get("content")} for m in msgs]}
    try:
        validate_conversation(conv, "messages", last_role="user")
    except NanocodeError as e:
        raise RequestError(400, str(e)) from None

    def number(key, default, lo, hi, kind=float):
        value = req.get(key, default)
        if value is None:
            return default
        ok = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
        if not ok or not lo <= value <= hi:
            raise RequestError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'} in [{lo}, {hi}], "
                                    f"got {value!r}")
        return value

    max_tokens = number("max_completion_tokens", None, 1, args.max_tokens, int) or \
        number("max_tokens", args.max_tokens, 1, args.max_tokens, int)
    settings = dict(max_tokens=max_tokens,
                    temperature=number("temperature", args.temperature, 0.0, 2.0),
                    top_p=number("top_p", None, 0.0, 1.0),
                    top_k=number("top_k", args.top_k, 1, 1 << 30, int),
                    seed=number("seed", 42, 0, 2**63 - 1, int))
    if settings["top_p"] == 0:
        raise RequestError(400, "'top_p' must be in (0, 1], got 0")
    if req.get("n", 1) != 1:
        raise RequestError(400, f"'n' must be 1 (one choice per request), got {req.get('n')!r}")
    stream = req.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"'stream' must be true or false, got {stream!r}")
    prompt_tokens = len(engine.tokenizer.render_for_completion(conv))
    if prompt_tokens >= engine.max_len:
        raise RequestError(400, f"too many tokens: the conversation is {prompt_tokens} tokens, the model's context "
                                f"is {engine.max_len}")
    return dict(conversation=conv, stream=stream, settings=settings)


def create_app(engines, args):
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from nanocode.engine import message_text

    app = FastAPI(title="nanocode")
    free = queue.Queue()
    for e in engines:
        free.put(e)
    model_name = f"nanocode-{args.source}" if not args.fake_script else "nanocode-fake"
    workdir = Path(args.allow_tools).resolve() if args.allow_tools else None
    approve = (lambda name, arguments: True) if workdir else None

    def error(status, message):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > args.max_body_bytes:
            raise RequestError(413, f"request body of {length} bytes exceeds the limit of {args.max_body_bytes}")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > args.max_body_bytes:
                raise RequestError(413, f"request body exceeds the limit of {args.max_body_bytes} bytes")
        return body

    async def events(conversation, settings):
        """Run engine.chat on a free replica in a thread; yield its events here as they come.
        If the client goes away (this generator is closed), the worker stops at its next event."""
        loop = asyncio.get_running_loop()
        out, cancel = asyncio.Queue(), threading.Event()

        def put(item):
            loop.call_soon_threadsafe(out.put_nowait, item)

        def work():
            engine = free.get()
            try:
                gen = engine.chat(conversation, approve=approve, workdir=workdir,
                                  max_tool_calls=args.max_tool_calls, **settings)
                for ev in gen:
                    if cancel.is_set():
                        break
                    put(ev)
                gen.close()
            except Exception as e:  # noqa: BLE001 -- reported to the client, the server goes on
                put({"type": "error", "message": f"generation failed: {type(e).__name__}: {e}"})
            finally:
                free.put(engine)
                put(None)

        threading.Thread(target=work, daemon=True).start()
        try:
            while (ev := await out.get()) is not None:
                yield ev
        finally:
            cancel.set()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await read_body(request)
            req = parse_request(body, args, engines[0])
        except RequestError as e:
            return error(e.status, str(e))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "created": created, "model": model_name}

        if not req["stream"]:
            async for ev in events(req["conversation"], req["settings"]):
                if ev["type"] == "error":
                    return error(500, ev["message"])
                if ev["type"] == "done":
                    parts = ev["message"]["content"]
                    text = message_text(ev["message"])
                    usage = dict(ev["usage"], total_tokens=sum(ev["usage"].values()))
                    return {**head, "object": "chat.completion", "usage": usage, "choices": [{
                        "index": 0, "finish_reason": ev["finish_reason"],
                        "message": {"role": "assistant", "content": text, "parts": parts}}]}
            return error(500, "generation ended without a reply")

        def chunk(delta, finish_reason=None, **extra):
            obj = {**head, "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
            return f"data: {json.dumps(obj)}\n\n"

        async def sse():
            yield chunk({"role": "assistant", "content": ""})
            async for ev in events(req["conversation"], req["settings"]):
                if ev["type"] == "text":
                    yield chunk({"content": ev["text"]})
                elif ev["type"] == "done":
                    usage = dict(ev["usage"], total_tokens=sum(ev["usage"].values()))
                    yield chunk({}, ev["finish_reason"], usage=usage)
                elif ev["type"] == "error":
                    yield f"data: {json.dumps({'error': {'message': ev['message'], 'type': 'server_error'}})}\n\n"
                else:  # tool_call, tool_output, notice
                    yield chunk({"nanocode": ev})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "nanocode"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "pid": os.getpid(), "replicas": len(engines),
                "free": free.qsize(), "tools": str(workdir) if workdir else None}

    @app.get("/")
    async def ui():
        return HTMLResponse(UI_PATH.read_text())

    return app


def main():
    args = parser.parse_args()
    if args.allow_tools and not Path(args.allow_tools).is_dir():
        raise NanocodeError(f"--allow-tools {args.allow_tools} is not a directory")
    if args.max_tokens < 1 or args.max_body_bytes < 1 or args.max_messages < 1:
        raise NanocodeError("--max-tokens, --max-body-bytes and --max-messages must be >= 1")
    import uvicorn
    engines = load_engines(args)
    app = create_app(engines, args)
    print(f"nanocode server: http://{args.host}:{args.port}/ ({len(engines)} replica(s), tools "
          f"{'in ' + str(Path(args.allow_tools).resolve()) if args.allow_tools else 'off'})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_main(main)
