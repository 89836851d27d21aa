"""Audit items for training: output folders of `unlearn`, finite-only checkpoints, the run fingerprint on resume,
option ranges, NPO's reference under bf16 autocast, α = 0, and the API name `unlearnkit.unlearn`."""
from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from unlearnkit.cli import main
from unlearnkit.data import tofu
from unlearnkit.errors import UserError
from unlearnkit.train.loop import NonFiniteLoss
from unlearnkit.unlearning import build, resolve_config, unlearn

FORGET = tofu.load("forget01")[:6]
RETAIN = tofu.load("full")[:6]
SMALL = {"max_steps": 3, "batch_size": 2}


def run_cli(capsys, *args) -> tuple[int, str]:
    rc = main(list(args))
    return rc, capsys.readouterr().err


@pytest.fixture
def qa_files(tmp_path):
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    forget.write_text("\n".join(json.dumps(r) for r in FORGET))
    retain.write_text("\n".join(json.dumps(r) for r in RETAIN))
    return forget, retain


def cli_args(model_dir, qa_files, *extra):
    forget, retain = qa_files
    return ["unlearn", "--method", "graddiff", "--model", str(model_dir), "--forget", str(forget), "--retain",
            str(retain), "--quiet", "--max-steps", "1", "--batch-size", "2", *extra]


# ---- 1: the run folder never deletes what is not ours ------------------------------------------------------------

def test_out_refuses_user_folder_input_model_and_cwd(tiny_model_dir, qa_files, tmp_path, capsys, monkeypatch):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    rc, err = run_cli(capsys, *cli_args(tiny_model_dir, qa_files, "--out", str(user)))
    assert rc == 2 and err.count("\n") == 1 and "not written by unlearnkit" in err
    assert (user / "thesis.tex").read_text() == "years of work"

    before = sorted(p.name for p in tiny_model_dir.iterdir())
    for out in (tiny_model_dir, tiny_model_dir / "sub"):
        rc, err = run_cli(capsys, *cli_args(tiny_model_dir, qa_files, "--out", str(out)))
        assert rc == 2 and "the input" in err
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before

    monkeypatch.chdir(user)
    rc, err = run_cli(capsys, *cli_args(tiny_model_dir, qa_files, "--out", "."))
    assert rc == 2 and (user / "thesis.tex").exists()


def test_out_reuses_its_own_folder_but_not_a_foreign_file_in_it(make_tiny_model, tokenizer, tmp_path):
    out = tmp_path / "run"
    unlearn(make_tiny_model(layers=2), tokenizer, "ga", FORGET, None, SMALL, out_dir=out, progress=False)
    unlearn(make_tiny_model(layers=2), tokenizer, "ga", FORGET, None, SMALL, out_dir=out, progress=False)
    assert (out / "run.json").is_file()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        unlearn(make_tiny_model(layers=2), tokenizer, "ga", FORGET, None, SMALL, out_dir=out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def test_unwritable_out_fails_before_training(tiny_model_dir, qa_files, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc, err = run_cli(capsys, *cli_args(tiny_model_dir, qa_files, "--out", str(blocker / "run")))
    assert rc == 2 and err.count("\n") == 1 and "is a file" in err


# ---- 2: checkpoints hold only finite values -----------------------------------------------------------------------

def _checkpoint_is_finite(path) -> bool:
    state = torch.load(path, weights_only=False)
    tensors = list(state["params"].values())
    tensors += [v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def test_huge_lr_never_writes_a_non_finite_checkpoint(make_tiny_model, tokenizer, tmp_path):
    config = {"lr": 1e6, "checkpoint_every": 1, "max_steps": 8, "batch_size": 2}
    with pytest.raises(NonFiniteLoss, match="--restart"):
        unlearn(make_tiny_model(layers=2), tokenizer, "ga", FORGET, None, config, out_dir=tmp_path, progress=False)
    state = tmp_path / "checkpoint" / "state.pt"
    assert state.is_file() and _checkpoint_is_finite(state)
    assert not (tmp_path / "model.safetensors").exists()
    # The advised re-run with a lower lr does not silently resume the lr-1e6 checkpoint.
    lower = dict(config, lr=1e-4)
    with pytest.raises(UserError, match=r"lr: 1000000\.0 → 0\.0001"):
        unlearn(make_tiny_model(layers=2), tokenizer, "ga", FORGET, None, lower, out_dir=tmp_path, progress=False)
    info = unlearn(make_tiny_model(layers=2), tokenizer, "ga", FORGET, None, lower, out_dir=tmp_path,
                   progress=False, resume=False)
    assert len(info["steps"]) == 8 and info["steps"][0]["lr"] == pytest.approx(1e-4)


def test_non_finite_gradient_stops_before_the_weights_change(make_tiny_model, tokenizer, tmp_path):
    """A finite loss with an infinite gradient (sqrt at 0): the old loop stepped and checkpointed NaN weights."""
    from unlearnkit.methods import ga, register, unregister
    from unlearnkit.methods.contract import Method

    def setup(model, data, cfg):
        base, calls = ga.setup(model, data, cfg), {"n": 0}

        def step_loss(m, batch):
            loss, parts = base(m, batch)
            calls["n"] += 1
            if calls["n"] == 3:
                w = next(p for p in m.parameters() if p.requires_grad)
                loss = loss + torch.sqrt((w - w.detach()).abs().sum())  # value +0, gradient inf
            return loss, parts
        return step_loss

    register(Method("ga_inf_grad", ga.DEFAULTS, setup))
    model = make_tiny_model(layers=2)
    try:
        with pytest.raises(NonFiniteLoss, match="gradient norm is (nan|inf) at step 3"):
            unlearn(model, tokenizer, "ga_inf_grad", FORGET, None, {"max_steps": 5, "batch_size": 2,
                    "checkpoint_every": 1}, out_dir=tmp_path, progress=False)
    finally:
        unregister("ga_inf_grad")
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert _checkpoint_is_finite(tmp_path / "checkpoint" / "state.pt")
    assert torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)["step"] == 2


# ---- 3: resume checks that it is the same run -----------------------------------------------------------------------

@pytest.mark.parametrize("change, key", [
    (dict(config={"lr": 3e-3}), "lr"),
    (dict(config={"seed": 1}), "seed"),
    (dict(config={"beta": 0.2}), "method_config"),
    (dict(forget=FORGET[:4]), "forget_data"),
    (dict(method="rmu", config={"layer": 1}), "method"),
    (dict(model_seed=1), "model"),
])
def test_resume_with_changed_arguments_is_refused(make_tiny_model, tokenizer, tmp_path, change, key):
    config = {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 1}
    unlearn(make_tiny_model(layers=3), tokenizer, "npo", FORGET, RETAIN, config, out_dir=tmp_path, progress=False,
            stop_after_steps=2)
    method = change.get("method", "npo")
    new_config = {**config, **change.get("config", {})}
    args = (make_tiny_model(layers=3, seed=change.get("model_seed", 0)), tokenizer, method,
            change.get("forget", FORGET), RETAIN, new_config)
    with pytest.raises(UserError, match=rf"checkpoint of a different run \(.*\b{key}: "):
        unlearn(*args, out_dir=tmp_path, progress=False)
    info = unlearn(*args, out_dir=tmp_path, progress=False, resume=False)  # --restart
    assert [s["step"] for s in info["steps"]] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "run.json").read_text())["method"] == method


def test_restart_flag_on_the_cli(tiny_model_dir, qa_files, tmp_path, capsys):
    out = tmp_path / "run"
    args = cli_args(tiny_model_dir, qa_files, "--out", str(out), "--checkpoint-every", "1")
    from unlearnkit.models import load_model

    model, tok = load_model(str(tiny_model_dir), device="cpu")
    unlearn(model, tok, "graddiff", FORGET, RETAIN, {"max_steps": 3, "batch_size": 2, "checkpoint_every": 1},
            out_dir=out, progress=False, stop_after_steps=1)
    rc, err = run_cli(capsys, *args)  # --max-steps 1 now: a different run
    assert rc == 2 and err.count("\n") == 1 and "max_steps: 3 → 1" in err and "--restart" in err
    rc, err = run_cli(capsys, *args, "--restart")
    assert rc == 0, err
    assert (out / "model.safetensors").is_file() and not (out / "checkpoint").exists()


# ---- 6, 12: every option's range and type, before any work ---------------------------------------------------------

@pytest.mark.parametrize("config, message", [
    ({"max_grad_norm": -1}, "max-grad-norm: must be a number > 0"),
    ({"max_steps": 0}, "max-steps: must be an integer >= 1"),
    ({"max_steps": -3}, "max-steps"),
    ({"warmup_ratio": 5}, r"warmup-ratio: must be in \[0, 1\)"),
    ({"lr": float("nan")}, "lr: must be a number > 0"),
    ({"batch_size": 2.5}, "batch_size: expected an integer"),
    ({"beta": "abc"}, "beta: expected a number, got 'abc'"),
    ({"beta": 0}, "beta: must be a number > 0"),
    ({"lora_r": -4}, "lora_r: must be an integer >= 0"),
    ({"lora_merge": "yes"}, "lora_merge: expected true or false"),
    ({"seed": -1}, "seed"),
])
def test_option_ranges(config, message):
    with pytest.raises(UserError, match=message):
        resolve_config("npo", config)


def test_yaml_style_numbers_and_null_optionals_are_accepted():
    assert resolve_config("npo", {"lr": "1e-5"})["lr"] == 1e-5  # YAML 1.1 reads 1e-5 as a string
    assert resolve_config("npo", {"max_grad_norm": None})["max_grad_norm"] is None  # no clipping
    with pytest.raises(UserError, match="beta: expected a number"):
        resolve_config("npo", {"beta": None})


@pytest.mark.parametrize("extra, message", [
    (["--set", "gamma=abc"], "gamma: expected a number"),
    (["--lora-r", "-4"], "lora_r: must be an integer >= 0"),
    (["--max-grad-norm", "-1"], "max-grad-norm"),
    (["--warmup-ratio", "5"], "warmup-ratio"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--set", "alpha=[1"], "not valid YAML"),
])
def test_bad_options_are_one_line_exit_2(tiny_model_dir, qa_files, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    rc, err = run_cli(capsys, *cli_args(tiny_model_dir, qa_files, "--out", str(out), *extra))
    assert rc == 2 and err.count("\n") == 1 and message in err
    assert not out.exists()


# ---- 8: NPO's reference in the step's precision ---------------------------------------------------------------------

def test_npo_reference_matches_the_step_under_bf16_autocast(make_tiny_model, tokenizer):
    beta = 0.1
    run = build(make_tiny_model(layers=2), tokenizer, "npo", FORGET, RETAIN,
                {"beta": beta, "alpha": 0, "batch_size": 2, "mixed_precision": "bf16"})
    batch = run.schedule(0)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = run.step_loss(run.model, batch)
    assert float(loss) == pytest.approx(2 / beta * math.log(2), abs=1e-5)


# ---- 9: α = 0 drops the retain term --------------------------------------------------------------------------------

@pytest.mark.parametrize("method, extra", [("graddiff", {}), ("rmu", {"layer": 1}), ("npo", {}), ("simnpo", {})])
def test_alpha_zero_runs_without_a_retain_set(make_tiny_model, tokenizer, method, extra):
    info = unlearn(make_tiny_model(layers=3), tokenizer, method, FORGET, None, {**SMALL, "alpha": 0, **extra},
                   progress=False)
    assert info["n_retain"] == 0 and len(info["steps"]) == 3
    assert not any(k.startswith("retain") for k in info["steps"][0])


# ---- 10: unlearnkit.unlearn stays the function -----------------------------------------------------------------------

def test_unlearnkit_unlearn_is_always_the_function():
    import unlearnkit

    first = unlearnkit.unlearn
    importlib.import_module("unlearnkit.unlearning")
    importlib.import_module("unlearnkit.methods.cli")
    assert unlearnkit.unlearn is first and callable(first) and first.__name__ == "unlearn"
