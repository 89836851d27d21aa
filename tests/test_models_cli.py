"""Models (load/save, default model), `prepare tofu`, and the CLI contract for bad input."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unlearnkit.cli import main
from unlearnkit.errors import UserError
from unlearnkit.models import load_model, resolve_model_path


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def test_save_and_reload_round_trip(tiny_model_dir, tokenizer):
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    assert (tiny_model_dir / "model.safetensors").is_file() and tok.eos_token == tokenizer.eos_token
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # other tools load our output as-is
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b)


def test_bad_model_paths(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"no weights \(\*.safetensors"):
        resolve_model_path(str(tmp_path / "noweights"))


def test_default_model_is_real_smollm2_with_fixed_config(real_model):
    model, tok = real_model
    assert model.config.num_hidden_layers == 30 and model.config.use_cache
    assert tok.eos_token == "<|im_end|>" and tok("hi")["input_ids"][0] != tok.bos_token_id
    assert getattr(model, "hf_quantizer", None) is None or not model.config.to_dict().get("quantization_config")
    from unlearnkit.data.format import encode_prompt

    ids = torch.tensor([encode_prompt(tok, "What is the capital of France?")])
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_prepare_tofu_on_tiny_model_caches_and_never_writes_input(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UNLEARNKIT_CACHE", str(tmp_path / "cache"))
    before = _tree_digest(tiny_model_dir)
    args = ["prepare", "tofu", "--split", "mini", "--model", str(tiny_model_dir), "--epochs", "1",
            "--batch-size", "16"]
    assert main(args) == 0
    lines = dict(line.split("\t") for line in capsys.readouterr().out.strip().splitlines())
    for role in ("target", "retain"):
        meta = json.loads((Path(lines[role]) / "unlearnkit_prepare.json").read_text())
        assert meta["role"] == role and meta["n_train"] == (80 if role == "target" else 40)
        assert (Path(lines[role]) / "model.safetensors").is_file()
    assert _tree_digest(tiny_model_dir) == before
    stamp = (Path(lines["target"]) / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0  # cached: not re-trained
    assert (Path(lines["target"]) / "model.safetensors").stat().st_mtime_ns == stamp


def _cli(*args, env_cache=None):
    import os

    env = dict(os.environ)
    if env_cache:
        env["UNLEARNKIT_CACHE"] = str(env_cache)
    return subprocess.run([sys.executable, "-m", "unlearnkit.cli", *args], capture_output=True, text=True, env=env)


def test_cli_help_lists_subcommands():
    res = _cli("--help")
    assert res.returncode == 0
    for command in ("demo", "prepare", "bench"):
        assert command in res.stdout


@pytest.mark.parametrize("args,needle", [
    (["prepare", "tofu", "--split", "forget02"], "--split"),
    (["prepare", "tofu", "--model", "/no/such/model"], "/no/such/model"),
    (["prepare", "tofu", "--lr", "0", "--model", "/no/such/model"], "--lr"),
    (["bench", "nosuch"], "nosuch"),
])
def test_cli_bad_input_one_line_exit_2(args, needle, tmp_path):
    res = _cli(*args, env_cache=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not (tmp_path / "tofu").exists()  # nothing half-written
