"""nanocode.hub.hub_file, the one way files come from the Hugging Face hub, against a local stand-in
for the hub (tests.helpers.FakeHub): resumes a dropped download, copes with a server that ignores
ranges, caches, and turns every failure into one message naming the file."""

import socket

import pytest

from nanocode.common import NanocodeError
from nanocode.hub import hub_cache_dir, hub_file
from tests.helpers import REPO as REPO_ROOT
from tests.helpers import FakeHub

REPO, FILE = "someone/data", "sub dir/f.bin"
KEY = f"{REPO}/{FILE}"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCODE_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hubs = []

    def start(files, **kw):
        hubs.append(FakeHub(files, **kw))
        monkeypatch.setenv("HF_ENDPOINT", hubs[-1].url)
        return hubs[-1]

    yield start
    for h in hubs:
        h.close()


def gets(hub):
    """(file, Range header) of each GET of a file (the client also asks the hub's API other
    things)."""
    return [(r[1], r[2]) for r in hub.requests if r[0] == "GET" and r[1] is not None]


def test_resumes_after_a_dropped_connection_then_caches(hub):
    # 24 MB: the client writes in chunks of 10 MB, so a drop after 12 MB leaves a whole chunk to
    # resume from
    blob = bytes(range(256)) * (24 << 12)
    h = hub({KEY: blob}, fail_once={KEY})
    path = hub_file(REPO, FILE)
    assert path.read_bytes() == blob and hub_cache_dir() in path.parents
    (first, first_range), (second, second_range) = gets(h)
    assert first == second == KEY and first_range is None
    resumed_at = int(
        second_range.removeprefix("bytes=").removesuffix("-")
    )  # the retry asked for the rest only
    assert 0 < resumed_at <= len(blob) // 2
    assert not list(hub_cache_dir().rglob("*.incomplete"))
    assert (
        hub_file(REPO, FILE).read_bytes() == blob and len(gets(h)) == 2
    )  # cached: not downloaded again


def test_restarts_when_the_server_ignores_ranges(hub):
    blob = bytes(range(256)) * 1000
    h = hub({KEY: blob}, fail_once={KEY}, ranges=False)
    assert hub_file(REPO, FILE).read_bytes() == blob
    assert len(gets(h)) == 2


def test_a_missing_file_is_one_clear_error(hub):
    hub({KEY: b"x"})
    with pytest.raises(
        NanocodeError, match=r"could not download someone/data/nope.bin .*use a local copy"
    ):
        hub_file(REPO, "nope.bin", hint="use a local copy")


def test_unreachable_hub_is_one_clear_error(hub, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(NanocodeError, match=rf"cannot reach 127.0.0.1:{port}.*offline\?"):
        hub_file(REPO, FILE)


def test_mbpp_comes_through_the_hub_once(hub):
    """code_tasks.load_mbpp() with no file: the sanitized split from the hub, converted to JSONL
    once."""
    import io
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanocode.code_tasks import MBPP_FILE, MBPP_REPO, load_mbpp

    rows = [
        json.loads(line)
        for line in (REPO_ROOT / "tests" / "fixtures" / "mbpp_sample.jsonl")
        .read_text()
        .splitlines()
    ]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    h = hub({f"{MBPP_REPO}/{MBPP_FILE}": buf.getvalue()})
    problems = load_mbpp()
    assert [p["task_id"] for p in problems] == [f"Mbpp/{r['task_id']}" for r in rows]
    assert load_mbpp() == problems and len(gets(h)) == 1  # converted once, then read from the JSONL
