"""Shareable weights: export -> load gives the same logits, the export command works end to end, and
nothing that is not plain tensors gets executed on the way in (a tampered file is refused)."""

import json
import pickle
import subprocess
import sys

import pytest
import torch

from nanocode.common import NanocodeError
from nanocode.export import export_model, load_exported, load_weights
from tests.helpers import (
    REPO,
    corpus_text,
    real_tokenizer,
    save_tiny_checkpoint,
    script_env,
    tiny_model,
    trained_tokenizer,
)


class Payload:
    """Unpickling this runs os.system, as a malicious checkpoint would. It only touches a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tok = trained_tokenizer([corpus_text("export")], vocab_size=300)
    model = tiny_model(tok.vocab_size, sequence_len=64)
    out = export_model(
        model, tok, tmp_path_factory.mktemp("export") / "tiny", {"phase": "sft", "step": 7}
    )
    return model, tok, out


def test_export_writes_safetensors_config_and_tokenizer(exported):
    _, _, out = exported
    assert sorted(f.name for f in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer.tiktoken",
    ]
    config = json.loads((out / "config.json").read_text())
    assert (
        config["format"] == "nanocode"
        and config["step"] == 7
        and config["model_config"]["n_layer"] == 2
    )
    assert not list(out.parent.glob(".*tmp*")), "the temp dir must be gone"


def test_round_trip_gives_identical_logits(exported):
    model, tok, out = exported
    loaded, loaded_tok, config = load_exported(out)
    assert loaded.config.to_dict() == model.config.to_dict()
    text = "def add(a, b):\n    return a + b\n"
    assert loaded_tok.encode(text) == tok.encode(text) and loaded_tok.vocab_size == tok.vocab_size
    idx = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_tampered_weights_file_is_refused_without_running_it(exported, tmp_path):
    """A pickle put in place of model.safetensors: refused with a message naming the file; its code
    never ran."""
    _, _, out = exported
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in out.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "pwned"
    (bad / "model.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(NanocodeError, match="model.safetensors is not a valid safetensors file"):
        load_exported(bad)
    assert not marker.exists()


def test_tampered_pickle_is_refused_by_weights_only_loading(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "x": Payload(marker)}, tmp_path / "model.pt")
    with pytest.raises(
        NanocodeError, match=r"refusing to load .*model\.pt: it holds more than tensors"
    ):
        load_weights(tmp_path / "model.pt")
    assert not marker.exists()
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")  # plain tensors load fine
    assert torch.equal(load_weights(tmp_path / "plain.pt")["w"], torch.ones(2))


def test_bad_exports_are_clear_errors(exported, tmp_path):
    _, _, out = exported
    with pytest.raises(NanocodeError, match="no config.json"):
        load_exported(tmp_path)
    (tmp_path / "config.json").write_text((out / "config.json").read_text())
    with pytest.raises(NanocodeError, match="weights file not found"):
        load_exported(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_config"]["n_layer"] = 3  # weights for 2 layers, config says 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    with pytest.raises(NanocodeError, match="does not match its config.json"):
        load_exported(tmp_path)
    # a model of the October 2025 recipe (no value embeddings): this version no longer builds it
    cfg["model_config"].update(n_layer=2, value_embeds=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NanocodeError, match="October 2025 recipe") as refused:
        load_exported(tmp_path)
    assert "value_embeds" in str(refused.value)  # the error names the key
    cfg["model_config"]["value_embeds"] = True  # the one recipe's value: the key is dropped
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer.tiktoken"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    assert load_exported(tmp_path)[0].config.to_dict() == exported[0].config.to_dict()


def test_export_script(module_base_dir):
    """`python -m scripts.export -i sft` on a saved checkpoint, loaded back here: same weights."""
    vocab = real_tokenizer().vocab_size
    save_tiny_checkpoint("tiny-export", vocab)
    env = {**script_env(), "NANOCODE_BASE_DIR": str(module_base_dir)}
    r = subprocess.run(
        [sys.executable, "-m", "scripts.export", "-i", "sft", "--tag", "tiny-export"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = module_base_dir / "export" / "sft_tiny-export_000001"
    assert f"to {out}" in r.stdout
    from nanocode.checkpoint import load_model

    model, _, _ = load_model("sft", "cpu", "tiny-export")
    loaded, _, config = load_exported(out)
    assert config["phase"] == "sft" and config["step"] == 1
    idx = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    r = subprocess.run(
        [sys.executable, "-m", "scripts.export", "-i", "dpo"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and r.stderr.startswith("error: no dpo checkpoint found"), r.stderr
