"""Compression of the trained tokenizer: UTF-8 bytes per token on code in several languages and on
English prose, beside GPT-2's and GPT-4's (cl100k) tokenizers when tiktoken has them cached locally.

    python -m scripts.tok_eval [--kb 300]

The samples are files found on this machine (Python's standard library, C headers, JavaScript
shipped in site-packages, Rust crates in the cargo registry, license texts and package READMEs for
English). The offline corpus is built from the same places, so the code samples may have been seen
in training: read the numbers as a comparison between tokenizers, not as held-out compression.
"""

import argparse
import glob
import os
import sysconfig
from pathlib import Path

import tiktoken
import tiktoken.load

from nanocode.common import NanocodeError, run_main
from nanocode.report import log_stage
from nanocode.tokenizer import get_tokenizer
from nanocode.training import posint

parser = argparse.ArgumentParser(description="bytes per token of the trained tokenizer")
parser.add_argument("--kb", type=posint, default=300, help="KB of text per sample")

SITE = sysconfig.get_paths()["purelib"]
SOURCES = {
    "python": [os.path.join(sysconfig.get_paths()["stdlib"], "*.py")],
    "c": ["/usr/include/*.h", "/usr/include/*/*.h"],
    "javascript": [os.path.join(SITE, "**", "*.js"), "/usr/share/javascript/**/*.js"],
    "rust": [os.path.expanduser("~/.cargo/registry/src/*/*/src/**/*.rs")],
    "english": ["/usr/share/common-licenses/*", os.path.join(SITE, "*.dist-info", "METADATA")],
}


def sample(patterns: list[str], max_bytes: int) -> str:
    """Files in sorted path order, cut to max_bytes characters; "" when no file matches."""
    parts, total = [], 0
    for path in sorted({p for pattern in patterns for p in glob.glob(pattern, recursive=True)}):
        if total >= max_bytes:
            break
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # a directory, a binary or unreadable file
            continue
        parts.append(text)
        total += len(text.encode())
    return "".join(parts)[:max_bytes]


def offline_encoding(name: str):
    """tiktoken's encoding `name` if its files are in tiktoken's cache, else None (never downloads:
    tiktoken would otherwise fetch the ranks on a cache miss, which hangs for minutes on an offline
    machine, and an evaluation should not need the network)."""

    def no_download(blobpath):
        raise FileNotFoundError(f"{blobpath} is not in tiktoken's local cache")

    real_read_file = tiktoken.load.read_file
    tiktoken.load.read_file = no_download
    try:
        return tiktoken.get_encoding(name)
    except Exception:
        return None
    finally:
        tiktoken.load.read_file = real_read_file


def main():
    args = parser.parse_args()
    tokenizers = {"ours": get_tokenizer().encode}
    # GPT-2's (50k, trained on web text) and GPT-4's cl100k (100k, code-aware): the two that
    # published bytes-per-token numbers are usually quoted against; ours has a third of cl100k's
    # vocab.
    for name in ("gpt2", "cl100k_base"):
        if (enc := offline_encoding(name)) is None:
            print(f"{name}: skipped (tiktoken has no local copy and this script does not download)")
        else:
            tokenizers[name] = enc.encode_ordinary  # as ours: special-token text is plain text

    results = {}
    names = " ".join(f"{name:>12}" for name in tokenizers)
    print(f"{'sample':<12} {'bytes':>9} {names}   (bytes per token)")
    for lang, patterns in SOURCES.items():
        if not (text := sample(patterns, args.kb * 1000)):
            print(f"{lang:<12} skipped: no files found ({', '.join(patterns)})")
            continue
        nbytes = len(text.encode())
        # bytes per token: higher is better (the same context and compute cover more text)
        ratios = {name: nbytes / max(len(encode(text)), 1) for name, encode in tokenizers.items()}
        results[lang] = {"bytes": nbytes, **{name: round(r, 3) for name, r in ratios.items()}}
        print(f"{lang:<12} {nbytes:>9} " + " ".join(f"{r:>12.2f}" for r in ratios.values()))
    if not results:
        raise NanocodeError("no sample files found on this machine")
    log_stage("tokenizer", [f"compression.{lang}.ours" for lang in results], compression=results)


if __name__ == "__main__":
    run_main(main)
