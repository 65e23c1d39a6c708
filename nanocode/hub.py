"""The one way nanocode fetches files from the Hugging Face hub: `huggingface_hub` (resumable
downloads, retries, a local cache), behind one function with one offline message.

    path = hub_file("sahil2801/CodeAlpaca-20k", "code_alpaca_20k.json")   # a dataset file, cached

Why a wrapper at all: the client retries for minutes when the hub is unreachable, and its errors
name HTTP internals. We check reachability once, fast, and turn every failure into a NanocodeError
that says what was wanted and how to do without it. HF_ENDPOINT (the client's own variable) points
it at a mirror or, in the tests, at a local server; HF_HUB_OFFLINE=1 uses the cache only.
"""

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from nanocode.common import NanocodeError, get_base_dir


def hub_cache_dir() -> Path:
    """Downloads live under the base dir (not ~/.cache/huggingface), so one NANOCODE_BASE_DIR holds
    every artifact of a run and deleting it frees everything."""
    return get_base_dir() / "hub"


def _check_reachable(endpoint: str, timeout: float = 10.0):
    """Open and close a TCP connection to the endpoint's host and port; ConnectionError if that
    fails within `timeout` (instead of the client's minutes of retries)."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach {url.hostname}:{port} ({e})") from None


def hub_file(repo_id: str, filename: str, revision: str | None = None, hint: str = "") -> Path:
    """Local path of `filename` in the hub dataset `repo_id`, downloaded once into hub_cache_dir().
    Offline or failing -> NanocodeError naming the file, with `hint` (how to do without it)."""
    from huggingface_hub import hf_hub_download  # a dependency, but only download paths need it

    # The endpoint is passed explicitly: the client reads HF_ENDPOINT once, at import, and a test
    # (or a caller) may set it later.
    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        if os.environ.get("HF_HUB_OFFLINE", "0") in ("", "0"):
            _check_reachable(endpoint or "https://huggingface.co")
        kwargs = dict(repo_type="dataset", revision=revision, endpoint=endpoint)
        return Path(hf_hub_download(repo_id, filename, cache_dir=hub_cache_dir(), **kwargs))
    except Exception as e:  # connection, HTTP, cache miss while offline: all mean "not available"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NanocodeError(
            f"could not download {repo_id}/{filename} from the Hugging Face hub ({reason}); "
            f"offline? this machine cannot reach the hub{'; ' + hint if hint else ''}"
        ) from None
