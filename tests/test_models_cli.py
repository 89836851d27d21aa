"""Models (load/save, default model), `prepare tofu`, and the CLI contract for bad input."""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unlearnkit.cli import main
from unlearnkit.errors import UserError
from unlearnkit import models
from unlearnkit.models import load_model, resolve_model_path, save_model


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
    with pytest.raises(UserError, match="no such model folder"):
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


# --- item 13: a mistyped local path fails at once, never waits on hub retries ---------------------------------------

def test_mistyped_model_path_fails_at_once(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_unreachable", lambda: pytest.fail("a path-like name must not ask the hub"),
                        raising=False)
    for typo in ("models/tiny-typo", "typo/", "~/no-such-model-here", "./typo", "a/b/c"):
        with pytest.raises(UserError, match=f"--model {typo}: no such model folder"):
            resolve_model_path(typo)


def test_hub_id_while_offline_needs_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError, match=r"someorg/somemodel: no such model folder, and not in the Hugging Face "
                                        r"cache \(HF_HUB_OFFLINE is set\)"):
        resolve_model_path("someorg/somemodel")


def test_hub_id_when_the_hub_is_unreachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_connection_problem", lambda: "cannot connect to huggingface.co:443",
                        raising=False)
    with pytest.raises(UserError, match="no such model folder, and not in the Hugging Face cache"):
        resolve_model_path("someorg/not-cached-model")


# --- item 12: truncated weights and a missing CUDA are one-line errors before loading --------------------------------

def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_is_named_before_loading(tiny_model_dir, tmp_path):
    bad = _copy_model(tiny_model_dir, tmp_path / "bad")
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"--model .*bad: model.safetensors is truncated or damaged"):
        resolve_model_path(str(bad))
    with pytest.raises(UserError, match="model.safetensors is truncated"):
        load_model(str(bad), device="cpu")
    weights.write_bytes(data[:5])
    with pytest.raises(UserError, match="shorter than the 8-byte header length"):
        resolve_model_path(str(bad))
    weights.write_bytes((10**9).to_bytes(8, "little") + data[8:100])
    with pytest.raises(UserError, match="header length"):
        resolve_model_path(str(bad))


def test_missing_shard_is_named(tiny_model_dir, tmp_path):
    bad = _copy_model(tiny_model_dir, tmp_path / "sharded")
    (bad / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserError, match="names model-00002-of-00002.safetensors, which is missing"):
        resolve_model_path(str(bad))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["prepare", "tofu"], ["demo"], ["bench", "npo"]])
def test_cuda_without_cuda_is_refused_before_work(command, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UNLEARNKIT_CACHE", str(tmp_path / "cache"))
    extra = ["--out", str(tmp_path / "run")] if command == ["demo"] else []
    assert main([*command, "--device", "cuda", *extra]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


# --- item 1: save_model never deletes a folder that is not ours ------------------------------------------------------

def test_save_model_refuses_a_user_folder_and_replaces_its_own(tiny_model, tokenizer, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not written by unlearnkit"):
        save_model(tiny_model, tokenizer, user, kind="unlearn")
    assert (user / "notes.txt").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    out = tmp_path / "run"
    save_model(tiny_model, tokenizer, out, extra_files={"run.json": "{}"}, kind="unlearn")
    save_model(tiny_model, tokenizer, out, extra_files={"run.json": "{\"again\": 1}"}, kind="unlearn")
    assert json.loads((out / "run.json").read_text()) == {"again": 1}
    with pytest.raises(UserError, match="holds the output of `unlearn`, not `prepare`"):
        save_model(tiny_model, tokenizer, out, kind="prepare")
    (out / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="holds 'mine.txt'"):
        save_model(tiny_model, tokenizer, out, kind="unlearn")
    assert (out / "mine.txt").is_file() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "run"]  # no temporary folder left


# --- item 5: the prepare cache is keyed by the model's content, not its path -----------------------------------------

def test_prepare_cache_key_follows_model_content_and_settings(make_tiny_model, tokenizer, tmp_path, monkeypatch):
    from unlearnkit.data.format import PromptFormat
    from unlearnkit.prepare import FINETUNE_DEFAULTS, prepared_dir
    from unlearnkit.train.loop import TrainConfig

    monkeypatch.setenv("UNLEARNKIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model"
    cfg, fmt = TrainConfig(**FINETUNE_DEFAULTS), PromptFormat()
    save_model(make_tiny_model(seed=0), tokenizer, path)
    first = prepared_dir("mini", str(path), cfg, fmt, 512)
    assert prepared_dir("mini", str(path), cfg, fmt, 512) == first  # stable
    save_model(make_tiny_model(seed=1), tokenizer, path)  # another model at the same path
    second = prepared_dir("mini", str(path), cfg, fmt, 512)
    assert second != first
    assert prepared_dir("mini", str(path), cfg, fmt, 512, dtype="bf16") != second
    assert prepared_dir("mini", str(path), TrainConfig(**{**FINETUNE_DEFAULTS, "seed": 1}), fmt, 512) != second
    assert prepared_dir("mini", str(path), cfg, PromptFormat("plain"), 512) != second
    # options that change how training runs, not what it computes, keep the cache (a new option must not force
    # every user to fine-tune again)
    for how in ({"checkpoint_every": 5}, {"fsdp": True}, {"activation_checkpointing": True},
                {"fsdp": True, "offload": True}):
        assert prepared_dir("mini", str(path), TrainConfig(**{**FINETUNE_DEFAULTS, **how}), fmt, 512) == second


def test_prepare_refuses_a_foreign_folder_in_its_cache(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from unlearnkit.data.format import PromptFormat
    from unlearnkit.prepare import FINETUNE_DEFAULTS, prepared_dir
    from unlearnkit.train.loop import TrainConfig

    monkeypatch.setenv("UNLEARNKIT_CACHE", str(tmp_path / "cache"))
    root = prepared_dir("mini", str(tiny_model_dir), TrainConfig(**{**FINETUNE_DEFAULTS, "epochs": 1.0}),
                        PromptFormat(), 512)
    (root / "retain").mkdir(parents=True)
    (root / "retain" / "notes.txt").write_text("not ours")
    args = ["prepare", "tofu", "--model", str(tiny_model_dir), "--epochs", "1", "--force"]
    assert main(args) == 2
    assert "not written by unlearnkit" in capsys.readouterr().err
    assert (root / "retain" / "notes.txt").is_file() and not (root / "target").exists()  # refused before training


@pytest.mark.parametrize("args,needle", [
    (["--max-length", "0"], "--max-length"),
    (["--warmup-ratio", "0.1", "--batch-size", "0"], "--batch-size"),
    (["--schedule", "linear", "--lr", "-1"], "--lr"),
])
def test_prepare_numbers_checked_before_work(args, needle, tiny_model_dir, tmp_path, monkeypatch, capsys):
    import unlearnkit.prepare

    monkeypatch.setenv("UNLEARNKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(unlearnkit.prepare, "load_model", lambda *a, **k: pytest.fail("loaded before checking"))
    assert main(["prepare", "tofu", "--model", str(tiny_model_dir), *args]) == 2
    assert needle in capsys.readouterr().err and not (tmp_path / "cache").exists()


# --- items 1 + 12: bench --json is checked before the bench runs -----------------------------------------------------

@pytest.mark.parametrize("bench", ["finetune", "rmu", "npo", "eval"])
def test_bench_json_refused_before_the_bench_runs(bench, tmp_path, monkeypatch, capsys):
    import importlib

    module = importlib.import_module(f"unlearnkit.bench.{bench}")
    monkeypatch.setattr(module, "run", lambda args: pytest.fail("the bench started before --json was checked"))
    user = tmp_path / "results.json"
    user.write_text('{"mine": 1}')
    for target, needle in ((tmp_path, "is a folder"), (user, "not written by unlearnkit")):
        assert main(["bench", bench, "--json", str(target)]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1
    assert user.read_text() == '{"mine": 1}'


def test_bench_json_holds_a_bench_key_and_replaces_only_its_own(tmp_path, capsys):
    from unlearnkit.bench import emit

    out = tmp_path / "b.json"
    emit({"speedup": 2.0}, str(out), bench="rmu")
    assert json.loads(out.read_text()) == {"bench": "rmu", "speedup": 2.0}
    emit({"speedup": 3.0}, str(out), bench="rmu")
    assert json.loads(out.read_text())["speedup"] == 3.0
    out.write_text('{"speedup": 1}')
    with pytest.raises(UserError, match="not written by unlearnkit"):
        emit({"speedup": 4.0}, str(out), bench="rmu")
