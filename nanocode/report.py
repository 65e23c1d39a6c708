"""The report card: each stage logs what it measured to $NANOCODE_BASE_DIR/report/<stage>.json;
the report is built from those files."""
import json
import os

from nanocode.common import get_base_dir


def log_stage(stage: str, **data):
    """Merge `data` into the stage's JSON file (written atomically, so a crash never leaves half a file)."""
    path = get_base_dir() / "report" / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(data)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(current, indent=2, default=str))
    os.replace(tmp, path)
    return path
