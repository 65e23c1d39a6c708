"""Chat with the coding agent in the terminal; it can run tools in --workdir, each call with your
approval.

    python -m scripts.code_cli                       # interactive REPL (sft checkpoint)
    python -m scripts.code_cli -p "list the files"   # one shot
    python -m scripts.code_cli -i dpo --yes          # approve every tool call without asking
    python -m scripts.code_cli --sandbox read-only   # the agent may look but not change anything
    python -m scripts.code_cli --constrained         # every call parses and matches its tool

Each tool call is shown and waits for y (run it), n (refuse: the model is told "denied by the
user") or a (always: run this and every later call). Without a terminal on stdin, calls are refused
unless --yes. bash runs in nanocode.sandbox: by default only --workdir (and a private /tmp) is
writable, the network is off and nothing else of your files is visible; --sandbox read-only |
workspace-write | off, --network. Ctrl-C stops the current reply (and a running tool), not the
session; Ctrl-D or /exit leaves; /clear starts a new conversation. --constrained decodes under
nanocode.grammar: text, and calls of our five tools whose arguments match the tool's schema (the
model cannot write a malformed call; without it, what the model learned is all there is).
"""

import argparse
import functools
import json
import signal
import sys
from pathlib import Path

from nanocode import sandbox
from nanocode.common import NanocodeError, autodetect_device_type, run_main
from nanocode.grammar import OUR_TOOLS, compile_grammar
from nanocode.tools import run_tool
from scripts.code_web import add_agent_args, load_engine

parser = argparse.ArgumentParser(description="coding agent in the terminal")
add_agent_args(parser)
add = parser.add_argument
add("-p", "--prompt", default=None, help="one-shot prompt (no REPL)")
add("--workdir", default=".", help="directory the tools work in")
add("--yes", action="store_true", help="approve every tool call")
add("--system", default=None, help="system prompt")
add("--seed", type=int, default=42)
add("--constrained", action="store_true", help="calls must match our tools' schemas")

SHOW_LINES = 20  # lines of each tool output echoed to the terminal (the model sees all of it)
SETTINGS = ("max_tokens", "temperature", "top_k", "seed", "max_tool_calls")  # as engine.chat names


class Approver:
    """approve(name, arguments) -> bool for the engine: asks y / n / always on the terminal."""

    def __init__(self, yes: bool, interactive: bool, label: str = ""):
        self.always, self.interactive, self.label = yes, interactive, label

    def __call__(self, name, arguments) -> bool:
        """Asks until the answer is one it knows; "always" approves this call and every later
        one. Without a terminal (and without --yes) every call is refused, and so is one whose
        question meets the end of input."""
        if self.always:
            return True
        if not self.interactive:
            print("refused: no terminal to ask on (pass --yes to allow tool calls)", flush=True)
            return False
        answers = {"y": True, "yes": True, "n": False, "no": False, "a": True, "always": True}
        answer = None
        while answer not in answers:
            try:
                answer = input(f"allow ({self.label})? [y]es / [n]o / [a]lways: ").strip().lower()
            except EOFError:
                return False
        self.always = answer in ("a", "always")
        return answers[answer]


def show(event):
    """Print an event of the reply as it comes: text as is, tool calls and their outputs marked."""
    if event["type"] == "text":
        print(event["text"], end="", flush=True)
    elif event["type"] == "tool_call":
        name, arguments = event["name"], event["arguments"]
        shown = json.dumps(arguments, ensure_ascii=False)
        print(f"\n[tool] {name}: {arguments['command'] if name == 'bash' else shown}", flush=True)
    elif event["type"] == "tool_output":
        lines = event["text"].splitlines() or [""]
        more = [f"... ({len(lines) - SHOW_LINES} more lines)"] if len(lines) > SHOW_LINES else []
        print("".join(f"  | {line}\n" for line in lines[:SHOW_LINES] + more), end="", flush=True)
    elif event["type"] == "notice":
        print(f"\n[{event['text']}]", flush=True)


def reply(engine, conversation, approve, args, grammar=None):
    """Stream one assistant reply; returns its message (partial if interrupted with Ctrl-C).
    grammar: nanocode.grammar's, which every token of the reply must follow (--constrained)."""
    settings = {key: getattr(args, key) for key in SETTINGS}
    runner = functools.partial(run_tool, sandbox=args.sandbox, network=args.network)
    settings.update(tool_runner=runner, grammar=grammar)
    events = engine.chat(conversation, approve, Path(args.workdir), **settings)
    parts = []  # what was said so far, for a reply cut short
    try:
        for event in events:
            show(event)
            if event["type"] == "done":
                print(flush=True)
                if event["finish_reason"] == "length":
                    print(f"[stopped at --max-tokens {args.max_tokens}]", flush=True)
                return event["message"]
            if event["type"] != "notice":
                parts.append(dict(event))
    except KeyboardInterrupt:
        events.close()
        print("\n[interrupted]", flush=True)
    return {"role": "assistant", "content": parts}


def main():
    args = parser.parse_args()
    if not Path(args.workdir).is_dir():
        raise NanocodeError(f"--workdir {args.workdir} is not a directory")
    if args.temperature < 0 or args.max_tokens < 1:
        raise NanocodeError("--temperature must be >= 0 and --max-tokens >= 1")
    engine = load_engine(args, args.device_type or autodetect_device_type())[0]
    grammar = compile_grammar(engine.tokenizer, OUR_TOOLS) if args.constrained else None
    # Ctrl-C stops a reply even when we were started with SIGINT ignored (a background job, nohup)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    label = f"sandbox {args.sandbox}, network {'on' if args.network else 'off'}"
    if args.sandbox == "off":
        label = "NO sandbox"
    elif not sandbox.isolated(args.sandbox):
        label = f"NO sandbox (unavailable: {sandbox.available()[1]})"
    approve = Approver(args.yes, sys.stdin.isatty(), label)
    # (rendered at the head of the first user turn: the token table has no system token)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    if args.prompt is None:
        where = Path(args.workdir).resolve()
        print(f"nanocode agent: tools work in {where} ({label}). Ctrl-C stops a reply, Ctrl-D or")
        print("/exit quits, /clear forgets.", flush=True)
    while True:
        try:
            text = input("> ").strip() if args.prompt is None else args.prompt
        except KeyboardInterrupt:
            print()
            continue
        except EOFError:
            print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/clear":
            messages = list(system)
            print("[conversation cleared]", flush=True)
        elif text:
            messages.append({"role": "user", "content": text})
            message = reply(engine, {"messages": messages}, approve, args, grammar)
            if message["content"]:
                messages.append(message)
            else:  # interrupted before a word: forget the question too, so turns alternate
                messages.pop()
        if args.prompt is not None:  # one shot
            return


if __name__ == "__main__":
    run_main(main)
