#!/usr/bin/env bash
# The whole test suite: ruff, Rust unit tests, then pytest (kernels under TRITON_INTERPRET=1 on CPU).
# Usage: bash runs/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source runs/setup_env.sh

# Headless Chromium drives the web UI test, bubblewrap is the sandbox (nanocode/sandbox.py); install them
# when we can (root + apt), else the UI test skips and the sandbox tests exercise only the fallback.
missing=""
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v bwrap >/dev/null 2>&1 || missing="$missing bubblewrap"
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
        || echo "warning: could not install$missing; the tests that need them will be skipped"
fi

echo "== ruff (lint and format, configured in pyproject.toml)"
ruff check .
ruff format --check .

echo "== cargo test (rustbpe)"
cargo test --release -q -p rustbpe

echo "== pytest"
set +e
python -m pytest -q --timeout=900 "$@"
status=$?
set -e
# pytest exits 5 when it collects no tests (e.g. a filter matched nothing): not a failure of the code.
# Every other non-zero status (1 failures, 2 interrupted, 3 internal error, 4 usage error) is.
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests"
    exit 0
fi
exit "$status"
