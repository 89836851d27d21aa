"""Live logs (train/live_log.py): TensorBoard events of `unlearn` and `prepare` equal the logged steps exactly, live
inside the run folder, survive publication and reruns; a missing tensorboard is a notice, a missing or unconfigured
wandb under --wandb a one-line error before the model loads."""
from __future__ import annotations

import json
import sys
import types

import pytest

from helpers import cli_error
from unlearnkit.cli import main
from unlearnkit.data import tofu
from unlearnkit.train.live_log import TB_DIR, TENSORBOARD_NOTICE, LiveLog, LogOptions, WandbSettings

pytest.importorskip("tensorboard")

FORGET = tofu.load("forget01")[:6]
RETAIN = tofu.load("full")[:6]


def read_events(log_dir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard reads the folder (purged events left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
            for tag in acc.Tags()["tensors"]}


def expected(steps: list[dict]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for s in steps:
        for key, value in s.items():
            if key != "step":
                out.setdefault(f"train/{key}", {})[s["step"]] = float(value)
        out.setdefault("train/tokens_per_second", {})[s["step"]] = s["tokens"] / s["seconds"]
    return out


@pytest.fixture
def data_files(tmp_path):
    forget, retain = tmp_path / "f.jsonl", tmp_path / "r.jsonl"
    forget.write_text("\n".join(json.dumps(r) for r in FORGET))
    retain.write_text("\n".join(json.dumps(r) for r in RETAIN))
    return forget, retain


def unlearn_argv(model, data_files, out, *extra):
    forget, retain = data_files
    return ["unlearn", "--method", "simnpo", "--model", str(model), "--forget", str(forget), "--retain", str(retain),
            "--max-steps", "3", "--batch-size", "2", "--out", str(out), "--quiet", *extra]


def test_unlearn_events_equal_run_json_and_a_rerun_replaces_them(tiny_model_dir, data_files, tmp_path):
    out = tmp_path / "run"
    assert main(unlearn_argv(tiny_model_dir, data_files, out)) == 0
    run = json.loads((out / "run.json").read_text())
    events = read_events(out / TB_DIR)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second",
            "train/forget_simnpo"} <= set(events)
    assert events == expected(run["steps"])  # double precision: exactly what run.json holds
    marker = json.loads((out / ".unlearnkit.json").read_text())
    assert TB_DIR in marker["files"]

    # A second run into the same folder is a fresh run: only its own events remain.
    assert main(unlearn_argv(tiny_model_dir, data_files, out, "--lr", "0.001")) == 0
    run2 = json.loads((out / "run.json").read_text())
    assert run2["config"]["lr"] == 0.001 and read_events(out / TB_DIR) == expected(run2["steps"])
    assert len(list((out / TB_DIR).iterdir())) == 1

    # --no-tensorboard: the next published folder has no events.
    assert main(unlearn_argv(tiny_model_dir, data_files, out, "--no-tensorboard")) == 0
    assert not (out / TB_DIR).exists() and (out / "run.json").is_file()


def test_resumed_run_continues_the_events(make_tiny_model, tokenizer, tmp_path):
    from unlearnkit.unlearning import unlearn

    config = {"max_steps": 4, "batch_size": 2, "checkpoint_every": 1}
    with LiveLog(tmp_path / TB_DIR) as live:
        killed = unlearn(make_tiny_model(layers=2), tokenizer, "npo", FORGET, RETAIN, config, out_dir=tmp_path,
                         progress=False, stop_after_steps=2, live_log=live)
        # As if the process died after logging step 3 but before its checkpoint: a resume must hide it.
        live.on_step(3, {"step": 3, "loss": 123.0, "tokens": 1, "seconds": 1.0})
    assert killed["interrupted_at"] == 2
    with LiveLog(tmp_path / TB_DIR) as live:
        resumed = unlearn(make_tiny_model(layers=2), tokenizer, "npo", FORGET, RETAIN, config, out_dir=tmp_path,
                          progress=False, live_log=live)
    assert [s["step"] for s in resumed["steps"]] == [1, 2, 3, 4]
    assert read_events(tmp_path / TB_DIR) == expected(resumed["steps"])


def test_extra_scalars_and_wandb_sink(tmp_path, monkeypatch):
    logged, finished = [], []

    class Run:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            finished.append(True)

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: logged.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    opts = LogOptions(wandb=WandbSettings("proj")).check()
    with opts.open(tmp_path, name="trial-1", config={"lr": 1e-4}) as live:
        live.on_step(1, {"step": 1, "loss": 0.5, "tokens": 10, "seconds": 2.0, "forget_ce": 1.5})
        live.log_scalars(1, {"forget_quality": 0.25, "note": "text", "missing": None})
    assert logged[0] == ("init", {"project": "proj", "name": "trial-1", "config": {"lr": 1e-4}})
    assert logged[1] == (1, {"train/loss": 0.5, "train/tokens": 10.0, "train/seconds": 2.0, "train/forget_ce": 1.5,
                             "train/tokens_per_second": 5.0})
    assert logged[2] == (1, {"eval/forget_quality": 0.25}) and finished == [True]
    assert read_events(tmp_path / TB_DIR)["eval/forget_quality"] == {1: 0.25}


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with LiveLog(tmp_path / TB_DIR) as live:
        live.on_step(1, {"step": 1, "loss": 0.5})
    assert not (tmp_path / TB_DIR).exists()


def test_without_tensorboard_the_run_goes_on_with_one_notice(tiny_model_dir, data_files, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    assert main(unlearn_argv(tiny_model_dir, data_files, out)) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "tensorboard" in line] == [TENSORBOARD_NOTICE]
    assert (out / "run.json").is_file() and not (out / TB_DIR).exists()


def test_wandb_missing_or_unconfigured_is_one_line_before_the_model_loads(tiny_model_dir, data_files, tmp_path,
                                                                           monkeypatch, capsys, no_model_load):
    out = tmp_path / "run"
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert "wandb package is not installed" in cli_error(unlearn_argv(tiny_model_dir, data_files, out, "--wandb"),
                                                        capsys)
    monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("machine example.org login me password secret\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    err = cli_error(unlearn_argv(tiny_model_dir, data_files, out, "--wandb-project", "p"), capsys)
    assert "wandb is not configured" in err and "api.wandb.ai" in err
    assert not out.exists()


def test_prepare_keeps_the_fine_tune_events(tiny_model_dir, tmp_path, monkeypatch):
    from unlearnkit.prepare import prepare_tofu
    from unlearnkit.train.loop import TrainConfig

    monkeypatch.setenv("UNLEARNKIT_CACHE", str(tmp_path / "cache"))
    paths = prepare_tofu("mini", str(tiny_model_dir), TrainConfig(max_steps=2, batch_size=4), progress=False,
                         logs=LogOptions())
    for role, folder in paths.items():
        meta = json.loads((folder / "unlearnkit_prepare.json").read_text())
        assert read_events(folder / TB_DIR) == expected(meta["train_log"]["steps"]), role
        assert not (folder.parent / f".{role}-work").exists()
