"""`unlearnkit demo` end to end on the tiny model: prepare → evaluate → SimNPO → evaluate → run folder."""
import json
import re

import pytest

from unlearnkit.cli import main


def test_demo_runs_the_whole_story_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UNLEARNKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["demo", "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "forget_quality" in printed and "unlearned (simnpo)" in printed
    summary = json.loads((out / "summary.json").read_text())
    unlearned = summary["summaries"]["unlearned (simnpo)"]
    assert unlearned["forget_quality"] is not None and 0.0 <= unlearned["forget_quality"] <= 1.0
    assert summary["summaries"]["target"]["model_utility"] is not None
    for name in ("retain", "target", "unlearned"):
        assert (out / "eval" / name / "EVAL.json").is_file() and (out / "eval" / name / "SUMMARY.json").is_file()
    run = json.loads((out / "unlearned" / "run.json").read_text())
    assert run["method"] == "simnpo" and run["total_steps"] == 10
    assert sorted(p.name for p in out.parent.iterdir()) == ["cache", "run"]  # no half-written folder left
    marker = json.loads((out / ".unlearnkit.json").read_text())
    assert marker["kind"] == "demo" and "report" in marker["files"]  # ours: a rerun may replace it
    # It ends with its report: the real outputs of a real command, rendered (formats cannot drift apart).
    html = out / "report" / "report.html"
    assert f"report: {html}" in printed
    text = html.read_text()
    assert not re.search(r"https?:", text, re.I) and "<script" not in text
    figures = sorted(p.name for p in (out / "report").glob("fig*.png"))
    for stem in ("forget-quality-vs-utility", "truth-ratios", "per-set-metrics", "mia-roc", "training"):
        assert any(stem in f for f in figures), (stem, figures)
    assert text.count('<img src="data:image/png;base64,') == len(figures)
    assert all(f"]({f})" in (out / "report" / "report.md").read_text() for f in figures)


@pytest.mark.parametrize("setup", ["user_folder", "foreign_file_in_old_run", "model_folder"])
def test_demo_out_refuses_what_it_did_not_write_before_any_work(setup, tiny_model_dir, tmp_path, monkeypatch, capsys):
    import unlearnkit.prepare

    monkeypatch.setenv("UNLEARNKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(unlearnkit.prepare, "prepare_tofu", lambda *a, **k: pytest.fail("work started"))
    out = tmp_path / "run"
    if setup == "model_folder":
        out = tiny_model_dir
    else:
        out.mkdir()
        if setup == "foreign_file_in_old_run":  # a run folder from before the marker existed, plus a user file
            (out / "summary.json").write_text("{}")
            (out / "eval").mkdir()
        (out / "thesis.tex").write_text("keep me")
    before = sorted(p.name for p in out.iterdir())
    assert main(["demo", "--model", str(tiny_model_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out}" in err
    assert sorted(p.name for p in out.iterdir()) == before and not (tmp_path / "cache").exists()


def test_demo_accepts_an_old_demo_folder_and_checks_the_method(tiny_model_dir, tmp_path, monkeypatch):
    from argparse import Namespace

    from unlearnkit.demo import check_args
    from unlearnkit.errors import UserError

    monkeypatch.setenv("UNLEARNKIT_CACHE", str(tmp_path / "cache"))
    old = tmp_path / "old"
    (old / "eval").mkdir(parents=True)
    (old / "summary.json").write_text("{}")
    args = Namespace(out=str(old), model=str(tiny_model_dir), method="simnpo", device=None)
    assert check_args(args) == old
    with pytest.raises(UserError, match="--method"):
        check_args(Namespace(**{**vars(args), "method": "nosuch"}))
