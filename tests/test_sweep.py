"""Sweeps: grid parsing, exact sharing of training between points that differ only in length, the Pareto set, and
the command (inputs checked first, SWEEP.json / points / FRONTIER.png written)."""
from __future__ import annotations

import json

import pytest
from helpers import cli_error

from unlearnkit.cli import main
from unlearnkit.data import tofu
from unlearnkit.errors import UserError
from unlearnkit.sweep import group_points, grid_points, pareto, parse_grid, run_sweep

FORGET = tofu.task("mini").forget[:6]


def test_parse_grid_and_points():
    grid = parse_grid(["lr=1e-5,2e-5", "epochs=1,2", "beta=0.1"])
    assert grid == {"lr": [1e-5, 2e-5], "epochs": [1, 2], "beta": [0.1]}
    points = grid_points("npo", grid)
    assert [p.name for p in points][:2] == ["lr=1e-05,epochs=1,beta=0.1", "lr=1e-05,epochs=2,beta=0.1"]
    assert len(points) == 4 and points[3].config["lr"] == 2e-5 and points[3].config["epochs"] == 2.0
    for bad, needle in ((["lr"], "expected KEY=V1"), (["lr=1", "lr=2"], "given twice"), ([], "at least one")):
        with pytest.raises(UserError, match=needle):
            parse_grid(bad)
    with pytest.raises(UserError, match="--grid point lr=-1: .*lr"):
        grid_points("npo", {"lr": [-1]})
    with pytest.raises(UserError, match="unknown key 'nope'"):
        grid_points("npo", {"nope": [1]})


def checksums(model) -> dict:
    return {n: float(p.detach().double().sum()) for n, p in model.named_parameters()}


def test_shared_training_equals_separate_runs(make_tiny_model, tokenizer):
    base = make_tiny_model(layers=2)
    before = checksums(base)
    grid = {"lr": [1e-3, 3e-3], "epochs": [1, 2]}
    kw = dict(forget=FORGET, retain=None, evaluate=checksums, progress=False)
    shared = run_sweep(base, tokenizer, "ga", grid_points("ga", grid, {"batch_size": 2}), **kw)
    alone = run_sweep(base, tokenizer, "ga", grid_points("ga", grid, {"batch_size": 2}), share=False, **kw)
    assert checksums(base) == before  # the base model is never trained
    assert len({p.group for p in shared}) == 2 and len({p.group for p in alone}) == 4
    assert [p.total_steps for p in shared] == [3, 6, 3, 6]
    for a, b in zip(shared, alone):
        assert a.name == b.name and a.summary == b.summary  # bit-identical weights at every point
    assert shared[0].summary != shared[1].summary
    assert shared[0].info["shared_run"] and not alone[0].info["shared_run"]


def test_length_dependent_schedules_are_not_shared():
    points = grid_points("ga", {"epochs": [1, 2], "schedule": ["linear"]})
    groups = group_points(points, lambda cfg: int(cfg["epochs"]) * 3)
    assert len(groups) == 2
    points = grid_points("ga", {"epochs": [1, 2], "warmup_ratio": [0.1]})
    assert len(group_points(points, lambda cfg: int(cfg["epochs"]) * 3)) == 2


def test_pareto_set():
    rows = [{"name": n, "summary": {"model_utility": mu, "forget_quality": fq}}
            for n, mu, fq in (("a", 0.3, 0.9), ("b", 0.4, 0.5), ("c", 0.2, 0.4), ("d", 0.4, 0.5), ("e", None, 1.0))]
    assert pareto(rows) == ["a", "b", "d"]  # c is dominated by a; ties stay; e has no utility


def test_sweep_cli_on_a_tiny_model(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import unlearnkit.prepare

    monkeypatch.setattr(unlearnkit.prepare, "prepare_tofu",
                        lambda *a, **k: {"target": tiny_model_dir, "retain": tiny_model_dir})
    out = tmp_path / "sweep"
    argv = ["sweep", "--method", "ga", "--grid", "epochs=1,2", "--set", "batch_size=16", "--set", "lr=1e-3",
            "--limit", "2", "--max-new-tokens", "2", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads((out / "SWEEP.json").read_text())
    assert [p["name"] for p in doc["points"]] == ["epochs=1", "epochs=2"]
    assert doc["fixed"] == {"batch_size": 16, "lr": 1e-3} and doc["shared_training"]
    for p in doc["points"]:
        assert p["summary"]["forget_quality"] is not None and p["summary"]["model_utility"] is not None
        assert json.loads((out / "points" / p["name"] / "SUMMARY.json").read_text()) == p["summary"]
    assert set(doc["pareto"]) <= {"epochs=1", "epochs=2"} and doc["pareto"]
    assert (out / "FRONTIER.png").stat().st_size > 1000
    assert main(argv) == 0  # its own output is replaced


@pytest.mark.parametrize("extra, needle", [
    (["--grid", "lr"], "expected KEY=V1"),
    (["--grid", "lr=abc"], "lr"),
    (["--grid", "lr=1e-4", "--limit", "0"], "--limit"),
    (["--grid", "lr=1e-4", "--set", "nope=1"], "unknown key 'nope'"),
])
def test_sweep_inputs_checked_before_loading(tmp_path, no_model_load, capsys, extra, needle):
    err = cli_error(["sweep", "--method", "npo", "--out", str(tmp_path / "o"), *extra], capsys)
    assert needle in err, err


def test_bench_sweep_checks_its_options_first(tmp_path, no_model_load, capsys):
    assert "--limit" in cli_error(["bench", "sweep", "--limit", "0"], capsys)
    assert "unknown key 'nope'" in cli_error(["bench", "sweep", "--grid", "nope=1"], capsys)
    (tmp_path / "mine.json").write_text("{}")
    assert "not written by unlearnkit" in cli_error(["bench", "sweep", "--json", str(tmp_path / "mine.json")], capsys)
