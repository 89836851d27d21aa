"""`unlearnkit demo` end to end on the tiny model: prepare → evaluate → SimNPO → evaluate → run folder."""
import json

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
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".run-")]  # no half-written folder left
