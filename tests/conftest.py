"""Test-wide setup: an isolated base dir, the Triton interpreter on CPU-only machines, and the
PyTorch references as the default kernels (kernel tests opt in to Triton with NANOCODE_KERNELS)."""

import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch

# Must be set before any @triton.jit function is created (i.e. before kernels are imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NANOCODE_KERNELS", "torch")
os.environ["NANOCODE_BASE_DIR"] = tempfile.mkdtemp(prefix="nanocode-test-")


def pytest_sessionfinish(session, exitstatus):
    # the base dir holds every test checkpoint (~3 MB a run): without this each run left one behind
    shutil.rmtree(os.environ["NANOCODE_BASE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def stdlib_functions():
    """stdlib_functions(n_files, limit): functions of the first n_files stdlib modules, found by
    synth_corpus.corpus_functions (the synthetic-data generator's own path), standing in for the
    corpus, with the Python install's small C headers as its non-Python files
    (synth_corpus.corpus_files)."""
    from nanocode import synth_corpus

    def get(n_files, limit):
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        docs = [
            {"text": p.read_text(errors="replace"), "lang": "python"}
            for p in sorted(stdlib.glob("*.py"))[:n_files]
        ]
        headers = sorted(Path(sysconfig.get_paths()["include"]).rglob("*.h"))[:200]
        others = [{"text": p.read_text(errors="replace"), "lang": "c"} for p in headers]
        return synth_corpus.Corpus(
            synth_corpus.corpus_functions(docs, limit=limit),
            synth_corpus.corpus_files(others, limit=40),
        )

    return get


@pytest.fixture(scope="module")
def module_base_dir(tmp_path_factory, request):
    """A NANOCODE_BASE_DIR of the test module's own, set for as long as the module's tests run."""
    with pytest.MonkeyPatch.context() as mp:
        d = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
        mp.setenv("NANOCODE_BASE_DIR", str(d))
        yield d


@pytest.fixture
def fresh_seed():
    """Fresh random inputs every run; the seed is printed (pytest shows it for a failing test),
    so a failure can be replayed with torch.manual_seed."""
    print(f"seed {torch.seed()}")
