#!/usr/bin/env bash
# Create or reuse .venv at the repo root and install nanocode (this compiles the rustbpe extension).
# Sourced by runs/test.sh and runs/speedrun.sh; safe to rerun. Registries only: PyPI and crates.io.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Editable install: maturin builds rustbpe (release, LTO) into .venv; nanocode, kernels, scripts
# and bench import from the repo root. The `dev` extra holds the test and server dependencies.
.venv/bin/python -m pip install -q -e ".[dev]"
export PATH="$PWD/.venv/bin:$PATH"
# bubblewrap: the sandbox for evaluated code and the agent's commands (nanocode/sandbox.py). Best effort:
# without it everything still runs, with a loud warning that nothing is isolated.
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null) \
        || echo "warning: could not install bubblewrap; commands will run without the sandbox"
fi
