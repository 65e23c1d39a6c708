"""The codebase's shape (issue 26): no source file over 600 lines, so each stays readable in one
sitting; ruff (runs/test.sh) checks line length and format."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_source_file_over_600_lines():
    files = subprocess.run(
        ["git", "ls-files", "*.py", "*.rs"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert files, "git ls-files found no sources"
    sizes = {f: len((ROOT / f).read_text().splitlines()) for f in files if (ROOT / f).exists()}
    assert not {f: n for f, n in sizes.items() if n > 600}
