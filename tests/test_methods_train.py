"""unlearn() end to end on the tiny model: output folder, resume after a kill, NaN stop, LoRA, multi-process
equality (2 gloo processes == 1 process with the same global batch), validation and the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from unlearnkit.data import tofu
from unlearnkit.errors import UserError
from unlearnkit.train.loop import NonFiniteLoss
from unlearnkit.unlearning import unlearn

FORGET = tofu.load("forget01")[:6]
RETAIN = tofu.load("full")[:6]


def weights(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_output_folder_and_run_json(make_tiny_model, tokenizer, tmp_path):
    from unlearnkit.models import load_model

    model = make_tiny_model(layers=2)
    before = weights(model)
    info = unlearn(model, tokenizer, "simnpo", FORGET, RETAIN, {"max_steps": 3, "batch_size": 2}, out_dir=tmp_path,
                   progress=False)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["method"] == "simnpo" and run["config"]["beta"] == info["config"]["beta"]
    assert [s["step"] for s in run["steps"]] == [1, 2, 3] and "forget_simnpo" in run["steps"][0]
    assert run["seed"] == 0 and run["versions"]["torch"] == torch.__version__ and run["seconds_per_step"] > 0
    assert not (tmp_path / "checkpoint").exists()
    loaded = load_model(str(tmp_path), device="cpu", with_tokenizer=False)
    after = weights(loaded)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    for n, value in weights(model).items():
        torch.testing.assert_close(after[n], value)


@pytest.mark.parametrize("method", ["npo", "adaptive_rmu"])
def test_kill_and_resume_equals_uninterrupted(make_tiny_model, tokenizer, tmp_path, method):
    config = {"max_steps": 5, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 1}
    if method == "adaptive_rmu":
        config["layer"] = 1
    full = unlearn(make_tiny_model(layers=3), tokenizer, method, FORGET, RETAIN, config, progress=False)
    killed = unlearn(make_tiny_model(layers=3), tokenizer, method, FORGET, RETAIN, config, out_dir=tmp_path,
                     progress=False, stop_after_steps=2)
    assert killed["interrupted_at"] == 2 and not (tmp_path / "model.safetensors").exists()
    resumed = unlearn(make_tiny_model(layers=3), tokenizer, method, FORGET, RETAIN, config, out_dir=tmp_path,
                      progress=False)
    a, b = weights(full["model"]), weights(resumed["model"])
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    assert [s["loss"] for s in resumed["steps"]] == pytest.approx([s["loss"] for s in full["steps"]])


def test_nan_loss_stops_with_message_and_keeps_checkpoint(make_tiny_model, tokenizer, tmp_path):
    from unlearnkit.methods import ga, register, unregister
    from unlearnkit.methods.contract import Method

    def setup_with_nan(model, data, cfg):
        step_loss, calls = ga.setup(model, data, cfg), {"n": 0}

        def nan_at_third(m, batch):
            calls["n"] += 1
            loss, parts = step_loss(m, batch)
            return (loss * float("nan") if calls["n"] == 3 else loss), parts
        return nan_at_third

    register(Method("ga_nan", ga.DEFAULTS, setup_with_nan))
    try:
        with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 3.*last finite checkpoint \(step 2\) is kept"):
            unlearn(make_tiny_model(layers=2), tokenizer, "ga_nan", FORGET, None,
                    {"max_steps": 5, "batch_size": 2, "checkpoint_every": 1}, out_dir=tmp_path, progress=False)
    finally:
        unregister("ga_nan")
    assert torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)["step"] == 2
    assert not (tmp_path / "model.safetensors").exists()  # no half-finished model


@pytest.mark.parametrize("method, extra", [("graddiff", {}), ("rmu", {"layer": 1})])
def test_lora_trains_adapters_and_merges(make_tiny_model, tokenizer, tmp_path, method, extra):
    model = make_tiny_model(layers=3)
    before = weights(model)
    info = unlearn(model, tokenizer, method, FORGET, RETAIN, {"max_steps": 2, "batch_size": 2, "lr": 1e-2,
                                                               "lora_r": 4, **extra}, out_dir=tmp_path, progress=False)
    assert all("lora_" in n for n in info["trained_parameters"])
    merged = weights(info["model"])
    assert set(merged) == set(before)  # merged back into a plain model
    changed = {n for n in before if not torch.equal(before[n], merged[n])}
    if method == "rmu":
        assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)}
    else:
        assert changed and all("proj" in n for n in changed)


def test_validation_errors(make_tiny_model, tokenizer):
    m = make_tiny_model(layers=2)
    cases = [
        (("dpo", FORGET, RETAIN, {}), "unknown method 'dpo'"),
        (("npo", [], RETAIN, {}), "forget: empty data set"),
        (("graddiff", FORGET, [], {}), "retain: empty data set"),
        (("npo", FORGET, RETAIN[:2] + FORGET[:1], {}), "overlap in 1 rows"),
        (("ga", FORGET, None, {"params": "nothing_like_this"}), "matches no parameter"),
        (("ga", FORGET, None, {"bogus": 1}), "unknown key 'bogus'"),
        (("simnpo", FORGET, RETAIN, {"gamma_form": "mine"}), "choose one of paper, authors"),
        (("rmu", FORGET, RETAIN, {"layer": 5}), "out of range"),
    ]
    for args, message in cases:
        with pytest.raises(UserError, match=message):
            unlearn(m, tokenizer, *args, progress=False)


def test_cli_runs_and_bad_input_is_one_line(tiny_model_dir, tmp_path):
    forget, retain = tmp_path / "f.jsonl", tmp_path / "r.jsonl"
    forget.write_text("\n".join(json.dumps(r) for r in FORGET))
    retain.write_text("\n".join(json.dumps(r) for r in RETAIN))
    (tmp_path / "c.yaml").write_text("beta: 0.2\nlr: 0.001\n")
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "unlearnkit.cli", "unlearn", "--model", str(tiny_model_dir), "--quiet"]
    ok = subprocess.run(cmd + ["--method", "npo", "--forget", str(forget), "--retain", str(retain), "--config",
                               str(tmp_path / "c.yaml"), "--set", "gamma=2", "--max-steps", "2",
                               "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert (run["config"]["beta"], run["config"]["gamma"], run["config"]["lr"], run["total_steps"]) == (0.2, 2, 1e-3, 2)
    bad = subprocess.run(cmd + ["--method", "rmu", "--forget", str(forget), "--retain", str(retain),
                                "--set", "layer=9"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "layer: 9 is out of range" in bad.stderr


def _ddp_worker(rank, world, port, model_dir, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from unlearnkit.models import load_model

    model, tok = load_model(model_dir, device="cpu")
    info = unlearn(model, tok, "graddiff", FORGET, RETAIN, {"max_steps": 3, "batch_size": 2, "lr": 1e-3},
                   progress=False)
    if rank == 0:
        torch.save({"weights": weights(info["model"]), "world": info["world_size"]}, out_file)
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_equal_one_process_with_same_global_batch(tiny_model_dir, tmp_path):
    import socket

    import torch.multiprocessing as mp
    from unlearnkit.models import load_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, port, str(tiny_model_dir), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=False)
    assert ddp["world"] == 2
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    single = unlearn(model, tok, "graddiff", FORGET, RETAIN,
                     {"max_steps": 3, "batch_size": 2, "grad_accum": 2, "lr": 1e-3}, progress=False)
    ref = weights(single["model"])
    original = weights(load_model(str(tiny_model_dir), device="cpu", with_tokenizer=False))
    assert any(not torch.equal(ref[n], original[n]) for n in ref)
    for n, value in ddp["weights"].items():
        torch.testing.assert_close(value, ref[n], rtol=1e-5, atol=1e-6)


def test_example_configs_resolve():
    import yaml
    from pathlib import Path

    from unlearnkit.unlearning import resolve_config

    files = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    methods = {"ga": "ga", "graddiff": "graddiff", "npo": "npo", "simnpo": "simnpo", "rmu": "rmu",
               "adaptive": "adaptive_rmu"}
    checked = 0
    for f in files:
        method = methods.get(f.stem.split("_")[0])
        if method:
            cfg = resolve_config(method, yaml.safe_load(f.read_text()))
            assert all(cfg[k] == v or (isinstance(v, list) and list(cfg[k]) == v)
                       for k, v in yaml.safe_load(f.read_text()).items())
            checked += 1
    assert checked >= 6
