"""Chat with the coding agent in the terminal; it can run tools in --workdir, each call with your approval.

    python -m scripts.code_cli                       # interactive REPL (sft checkpoint)
    python -m scripts.code_cli -p "list the files"   # one shot
    python -m scripts.code_cli -i dpo --yes          # approve every tool call without asking
    python -m scripts.code_cli --sandbox read-only   # the agent may look but not change anything

Each tool call is shown and waits for y (run it), n (refuse: the model is told "denied by the user") or
a (always: run this and every later call). Without a terminal on stdin, calls are refused unless --yes.
bash runs in nanocode.sandbox: by default only --workdir (and a private /tmp) is writable, the network
is off and nothing else of your files is visible; --sandbox read-only | workspace-write | off, --network.
Ctrl-C stops the current reply (and a running tool), not the session; Ctrl-D or /exit leaves; /clear
starts a new conversation.
"""

import argparse
import functools
import json
import signal
import sys
from pathlib import Path

from nanocode.checkpoint import PHASES
from nanocode.common import NanocodeError, autodetect_device_type, run_main
from nanocode.tools import run_tool

parser = argparse.ArgumentParser(description="coding agent in the terminal")
parser.add_argument("-p", "--prompt", default=None, help="one-shot prompt (no REPL)")
parser.add_argument("-i", "--source", default="sft", choices=PHASES, help="which checkpoint phase")
parser.add_argument("--tag", default=None, help="checkpoint tag (default: the most recent)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("-t", "--temperature", type=float, default=0.6)
parser.add_argument("--top-k", type=int, default=50)
parser.add_argument("--max-tokens", type=int, default=1024, help="sampled tokens per reply")
parser.add_argument("--max-tool-calls", type=int, default=8, help="tool calls per reply")
parser.add_argument("--workdir", default=".", help="directory the tools work in")
parser.add_argument("--yes", action="store_true", help="approve every tool call")
parser.add_argument(
    "--sandbox",
    default="workspace-write",
    choices=["read-only", "workspace-write", "off"],
    help="how tool calls run: nothing writable / only --workdir writable (default) / no sandbox",
)
parser.add_argument(
    "--network", action="store_true", help="let commands use the network (off by default)"
)
parser.add_argument("--system", default=None, help="system prompt")
parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
parser.add_argument("--seed", type=int, default=42)
parser.add_argument(
    "--fake-script", default=None, help=argparse.SUPPRESS
)  # tests: a ScriptedModel JSON file

SHOW_LINES = 20  # lines of each tool output echoed to the terminal (the model sees all of it)


def load_engine(args):
    from nanocode.engine import Engine

    if args.fake_script:
        from nanocode.tokenizer import get_tokenizer
        from tests.scripted_model import (
            ScriptedModel,  # a test double: the tests run the scripts with it
        )

        tokenizer = get_tokenizer()
        return Engine(ScriptedModel.from_file(args.fake_script, tokenizer), tokenizer)
    from nanocode.checkpoint import load_model

    model, tokenizer, _ = load_model(
        args.source, args.device_type or autodetect_device_type(), args.tag, args.step
    )
    return Engine(model, tokenizer)


def sandbox_label(mode: str, network: bool) -> str:
    """How a tool call will run, in words (for the approval prompt)."""
    from nanocode import sandbox

    if mode == "off":
        return "NO sandbox"
    if not sandbox.isolated(mode):
        return f"NO sandbox (unavailable: {sandbox.available()[1]})"
    return f"sandbox {mode}, network {'on' if network else 'off'}"


class Approver:
    """approve(name, arguments) -> bool for the engine: asks y / n / always on the terminal."""

    def __init__(self, yes: bool, interactive: bool, label: str = ""):
        self.always, self.interactive, self.label = yes, interactive, label

    def __call__(self, name, arguments) -> bool:
        if self.always:
            return True
        if not self.interactive:
            print("refused: no terminal to ask on (pass --yes to allow tool calls)", flush=True)
            return False
        while True:
            try:
                answer = input(f"allow ({self.label})? [y]es / [n]o / [a]lways: ").strip().lower()
            except EOFError:
                return False
            if answer in ("y", "yes"):
                return True
            if answer in ("n", "no"):
                return False
            if answer in ("a", "always"):
                self.always = True
                return True


def show_tool_call(name, arguments):
    shown = arguments["command"] if name == "bash" else json.dumps(arguments, ensure_ascii=False)
    print(f"\n[tool] {name}: {shown}", flush=True)


def show_tool_output(text):
    lines = text.splitlines() or [""]
    for line in lines[:SHOW_LINES]:
        print(f"  | {line}")
    if len(lines) > SHOW_LINES:
        print(f"  | ... ({len(lines) - SHOW_LINES} more lines)")
    sys.stdout.flush()


def reply(engine, conversation, approve, args):
    """Stream one assistant reply; returns its message (partial if interrupted with Ctrl-C)."""
    parts = []
    events = engine.chat(
        conversation,
        approve=approve,
        workdir=Path(args.workdir),
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        max_tool_calls=args.max_tool_calls,
        tool_runner=functools.partial(run_tool, sandbox=args.sandbox, network=args.network),
    )
    try:
        for ev in events:
            if ev["type"] == "text":
                print(ev["text"], end="", flush=True)
                if parts and parts[-1]["type"] == "text":
                    parts[-1] = {"type": "text", "text": parts[-1]["text"] + ev["text"]}
                else:
                    parts.append({"type": "text", "text": ev["text"]})
            elif ev["type"] == "tool_call":
                show_tool_call(ev["name"], ev["arguments"])
                parts.append(
                    {"type": "tool_call", "name": ev["name"], "arguments": ev["arguments"]}
                )
            elif ev["type"] == "tool_output":
                show_tool_output(ev["text"])
                parts.append({"type": "tool_output", "text": ev["text"]})
            elif ev["type"] == "notice":
                print(f"\n[{ev['text']}]", flush=True)
            elif ev["type"] == "done":
                print(flush=True)
                if ev["finish_reason"] == "length":
                    print(f"[stopped at --max-tokens {args.max_tokens}]", flush=True)
                return ev["message"]
    except KeyboardInterrupt:
        events.close()
        print("\n[interrupted]", flush=True)
    return {"role": "assistant", "content": parts}


def main():
    args = parser.parse_args()
    if not Path(args.workdir).is_dir():
        raise NanocodeError(f"--workdir {args.workdir} is not a directory")
    if args.temperature < 0:
        raise NanocodeError(f"--temperature must be >= 0, got {args.temperature}")
    if args.max_tokens < 1:
        raise NanocodeError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    engine = load_engine(args)
    # Ctrl-C stops a reply even when we were started with SIGINT ignored (a shell's background job, nohup)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    label = sandbox_label(args.sandbox, args.network)
    approve = Approver(args.yes, sys.stdin.isatty(), label)
    messages = [{"role": "system", "content": args.system}] if args.system else []

    if args.prompt is not None:
        reply(
            engine,
            {"messages": messages + [{"role": "user", "content": args.prompt}]},
            approve,
            args,
        )
        return
    print(
        f"nanocode agent: tools work in {Path(args.workdir).resolve()} ({label}). Ctrl-C stops a reply, "
        "Ctrl-D or /exit quits, /clear forgets.",
        flush=True,
    )
    while True:
        try:
            text = input("> ").strip()
        except KeyboardInterrupt:
            print()
            continue
        except EOFError:
            print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/clear":
            messages = messages[:1] if args.system else []
            print("[conversation cleared]", flush=True)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        message = reply(engine, {"messages": messages}, approve, args)
        if message["content"]:
            messages.append(message)
        else:  # interrupted before anything was said: forget the question too, to keep turns alternating
            messages.pop()


if __name__ == "__main__":
    run_main(main)
