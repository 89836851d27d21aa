"""`unlearnkit report`: renders small fixture runs of every kind — real `eval tofu`, `unlearn` (with in-training
evaluation) and `analyze markov` outputs on the tiny model, the other kinds as JSON in the formats their commands
write — and checks that every expected figure exists, is a non-empty PNG embedded in the HTML, that the HTML
references nothing outside itself, that a missing retain reference is said in place instead of drawn, and that bad
input is refused before anything is written."""
from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import cli_error

from unlearnkit.cli import main
from unlearnkit.eval.aggregate import load_log, summarize
from unlearnkit.eval.tofu import write_eval

PNG = b"\x89PNG\r\n\x1a\n"
ROWS = 6  # rows of each TOFU set evaluated


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """One folder of every kind the report knows, under one parent."""
    root = tmp_path_factory.mktemp("runs")
    tiny = str(tiny_model_dir)
    # Real outputs on the tiny model: two commands, and an unlearn run with in-training evaluation through the API
    # (the command's own evaluation covers the whole split: too slow here).
    assert main(["eval", "tofu", "--model", tiny, "--retain-model", tiny, "--limit", str(ROWS), "--max-new-tokens",
                 "2", "--quiet", "--out", str(root / "eval")]) == 0
    _unlearn(tiny, root / "unlearn", json.loads((root / "eval" / "retain" / "EVAL.json").read_text()))
    assert main(["analyze", "markov", "--out", str(root / "markov"), "--n-retain", "40", "--n-forget", "20",
                 "--pretrain-epochs", "1", "--steps", "2", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
                 "--quiet", "--threads", "1"]) == 0
    ev = json.loads((root / "eval" / "EVAL.json").read_text())
    summary = ev["summary"]
    # The other kinds, in the formats their commands write.
    _sweep(root / "sweep", ev)
    _attacks(root)
    _analyses(root, summary)
    _eco(root / "eco")
    agg = root / "aggregate"
    agg.mkdir()
    (agg / "SUMMARY.json").write_text(json.dumps(summarize(load_log(root / "eval" / "EVAL.json"))))
    return root


def _unlearn(model_dir: str, out: Path, retain_eval: dict) -> None:
    from unlearnkit.data import tofu
    from unlearnkit.eval.tofu import evaluate_tofu, limit_task
    from unlearnkit.methods.cli import EVAL_KEYS
    from unlearnkit.models import load_model
    from unlearnkit.train.monitor import Monitor
    from unlearnkit.unlearning import unlearn

    task = limit_task(tofu.task("mini"), ROWS)
    model, tok = load_model(model_dir, device="cpu")

    def evaluate(m) -> dict:  # what `unlearn --eval-every` evaluates, on the first ROWS rows
        s = evaluate_tofu(m, tok, task, retain_reference=retain_eval, generate=False, only_sets=("forget", "retain"),
                          progress=False)["summary"]
        return {k: s.get(k) for k in EVAL_KEYS}

    unlearn(model, tok, "ga", task.forget, task.retain_eval, {"max_steps": 2, "batch_size": 4, "lr": 1e-3},
            out_dir=out, progress=False, monitor=Monitor(evaluate, 1))


def _with(summary: dict, **values) -> dict:
    return {**summary, **values}


def _sweep(out: Path, ev: dict) -> None:
    points = []
    for i, (fq, mu) in enumerate(((0.02, 0.30), (0.4, 0.25), (0.1, 0.2))):
        name = f"lr={i}e-5"
        s = _with(ev["summary"], forget_quality=fq, model_utility=mu)
        write_eval(out / "points" / name, {**ev, "summary": s})
        points.append({"name": name, "overrides": {"lr": i * 1e-5}, "group": i, "steps": 2, "final_loss": 1.0,
                       "shared_run": False, "train_seconds": 1.0, "eval_seconds": 1.0, "summary": s})
    doc = {"method": "npo", "split": "mini", "grid": {"lr": [0, 1e-5, 2e-5]}, "fixed": {}, "shared_training": True,
           "seconds": 3.0, "points": points, "pareto": ["lr=0e-5", "lr=1e-5"],
           "retain_reference": "the prepared retain model, evaluated once", "target": None}
    (out / "SWEEP.json").write_text(json.dumps(doc))


def _forget(p, fq, n=3) -> dict:
    return {"forget_prob": p, "forget_truth_ratio": 0.6, "forget_quality": fq, "forget_rougeL_recall": p, "n": n}


def _attacks(root: Path) -> None:
    roles = {"mine": "model", "retain": "retain", "target": "target"}
    subjects = {}
    for name, role in roles.items():
        curve = [{"step": s, "train_loss": None if s == 0 else 1.0 / s, **_forget(0.1 * (1 + s), 0.5 / (1 + s)),
                  "relearned_prob": 0.2 * (1 + s), "eval_seconds": 0.1} for s in (0, 1, 2)]
        subjects[name] = {"model": f"/m/{name}", "eco": None, "role": role, "curve": curve,
                          "train_log": {"total_steps": 2, "steps": []}, "config": {}, "seconds": 2.0}
    summary = {n: {f"step_{p['step']}": {k: v for k, v in p.items() if k not in ("step", "eval_seconds")}
                   for p in s["curve"]} for n, s in subjects.items()}
    settings = {"n": 2, "relearn_set": "random", "steps": 2, "lr": 5e-5, "batch_size": 4, "eval_every": 1,
                "lora_r": 0, "seed": 0, "max_new_tokens": 3, "eval_batch_size": 32,
                "prompt_format": {"kind": "chat", "system_prompt": None}}
    (root / "relearn").mkdir()
    (root / "relearn" / "ATTACK.json").write_text(json.dumps({
        "attack": "relearn", "split": "mini", "settings": settings, "relearn_questions": ["q1", "q2"],
        "heldout_questions": ["q3", "q4"], "forget_quality_reference": "the retain control before relearning",
        "notes": [], "subjects": subjects, "summary": summary}))
    attacks = ("clean", "icl", "prefill")
    jsummary = {n: {a: {**_forget(0.1 * (i + 1), 0.3), "forget_quality_reference": "retain model, same attack"}
                    for i, a in enumerate(attacks)} for n in roles}
    (root / "jailbreak").mkdir()
    (root / "jailbreak" / "ATTACK.json").write_text(json.dumps({
        "attack": "jailbreak", "split": "mini", "settings": {"attacks": list(attacks[1:]), "seed": 0}, "notes": [],
        "subjects": {n: {"model": f"/m/{n}", "eco": None, "role": r, "attacks": {}, "seconds": 1.0}
                     for n, r in roles.items()}, "summary": jsummary}))


def _analyses(root: Path, summary: dict) -> None:
    from unlearnkit.analysis.confidence import SETS
    from unlearnkit.analysis.difficulty import SUBSETS

    names = {"target": "target", "retain": "retain", "mine": "model"}
    per_row = {n: {s: {"max_prob": 0.3 + 0.1 * i, "entropy": 2.0 - i, "tokens": 10, "rows": 2,
                       "per_row_max_prob": [0.3, 0.4], "per_row_entropy": [2.0, 1.0]} for i, s in enumerate(SETS)}
               for n in names}
    (root / "confidence").mkdir()
    (root / "confidence" / "CONFIDENCE.json").write_text(json.dumps({
        "split": "mini", "sets": {s: 2 for s in SETS},
        "subjects": {n: {"model": f"/m/{n}", "eco": None, "role": r} for n, r in names.items()},
        "summary": {n: {s: {k: v[k] for k in ("max_prob", "entropy", "tokens")} for s, v in per.items()}
                    for n, per in per_row.items()}, "per_row": per_row}))
    fq = {"all": _forget(0.2, 0.3)} | {s: _forget(0.2, 0.1 * (i + 1)) for i, s in enumerate(SUBSETS)}
    (root / "difficulty").mkdir()
    (root / "difficulty" / "DIFFICULTY.json").write_text(json.dumps({
        "split": "mini", "methods": ["npo"], "fixed": {"max_steps": 1}, "runs": {},
        "subsets": {s: [0, 1] for s in SUBSETS}, "summary": {"target": fq, "npo": fq}}))
    target = {"cosine": 0.01, "norm": 40.0, "tokens": 100, **_forget(0.9, 0.01)}
    (root / "alignment").mkdir()
    (root / "alignment" / "ALIGNMENT.json").write_text(json.dumps({
        "split": "mini", "layer": 1, "fixed": {"layer": 1, "max_steps": 2}, "target": target,
        "points": [{"c": c, "c_over_norm": c / 40.0, "steps": 2, "cosine": 0.1 * i, "norm": 40.0 + c, "tokens": 100,
                    **_forget(0.5 / (i + 1), 0.2)} for i, c in enumerate((1.0, 50.0))]}))


def _eco(out: Path) -> None:
    out.mkdir()
    (out / "eco.json").write_text(json.dumps({
        "version": 1, "mode": "all", "entities": ["A"], "corruption": {"method": "rand_noise_first_n", "sigma": 0.3,
                                                                       "dims": None, "seed": 0},
        "prompt_format": {"kind": "chat", "system_prompt": None}, "tau": 0.4,
        "metadata": {"command": "unlearnkit eco fit --out eco"}}))
    (out / "metrics.json").write_text(json.dumps({"tau": 0.4, "target_fpr": 0.01, "fpr": {"retain": 0.0},
                                                  "fnr": {"forget_train": 0.0}, "search": {"sigma": 0.3}}))


# ---- checks ------------------------------------------------------------------------------------------------------

def check_self_contained(html: str) -> None:
    """No external reference anywhere, no script; every src is an embedded image and every link an anchor."""
    assert not re.search(r"https?:", html, re.I)
    assert "<script" not in html.lower() and "@import" not in html and "url(" not in html
    assert all(v.startswith("data:image/png;base64,") for v in re.findall(r'src="([^"]*)"', html))
    assert all(v.startswith("#") for v in re.findall(r'href="([^"]*)"', html))


def figures_of(out: Path) -> dict[str, Path]:
    """Figure name → PNG path, from the figures report.md shows."""
    md = (out / "report.md").read_text()
    return {f: out / f for f in re.findall(r"!\[Figure \d+: [^\]]*\]\(([^)]+\.png)\)", md)}


EXPECTED = ("forget-quality-vs-utility", "truth-ratios", "per-set-metrics", "mia-roc", "training-unlearn",
            "in-training-eval-unlearn", "frontier-sweep", "relearn-relearn", "jailbreak-jailbreak", "markov-markov",
            "confidence-confidence", "difficulty-difficulty", "alignment-alignment")


def test_report_over_every_kind(runs, tmp_path, capsys):
    out = tmp_path / "report"
    folders = sorted(str(p) for p in runs.iterdir())
    assert main(["report", *folders, "--out", str(out), "--title", "fixture runs"]) == 0
    assert f"{out / 'report.html'}" in capsys.readouterr().out
    html = (out / "report.html").read_text()
    check_self_contained(html)
    figures = figures_of(out)
    for stem in EXPECTED:
        assert any(re.fullmatch(rf"fig\d\d-{stem}\.png", f) for f in figures), (stem, sorted(figures))
    for name, path in figures.items():
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
        assert base64.b64encode(data).decode() in html, f"{name} not embedded"  # the very same image
    listed = re.findall(r'<a href="#fig-(\d+)">Figure', html)
    images = re.findall(r'<img src="data:image/png;base64,', html)
    assert len(listed) == len(figures) == len(images) >= len(EXPECTED)
    # The results table: every headline number of the evaluated models, with the command that made each run.
    summary = json.loads((runs / "eval" / "SUMMARY.json").read_text())
    assert f"{summary['forget_quality']:.4g}" in html and f"{summary['model_utility']:.4g}" in html
    assert "unlearnkit eval tofu --model " in html and f"--out {runs / 'eval'}" in html
    marker = json.loads((runs / "eval" / ".unlearnkit.json").read_text())
    assert marker["command"].startswith("unlearnkit eval tofu") and marker["seconds"] > 0
    assert marker["versions"]["python"] and "torch" in marker["versions"]
    assert json.loads((out / ".unlearnkit.json").read_text())["kind"] == "report"


def test_truth_ratio_panels_are_the_ks_test_behind_forget_quality(runs):
    from scipy.stats import ks_2samp

    from unlearnkit.eval.metrics import auc
    from unlearnkit.report.figures import roc, truth_ratios

    model, retain = load_log(runs / "eval" / "EVAL.json"), load_log(runs / "eval" / "retain" / "EVAL.json")
    r, ref = truth_ratios(model["sets"]["forget"]), truth_ratios(retain["sets"]["forget"])
    summary = json.loads((runs / "eval" / "SUMMARY.json").read_text())
    assert ks_2samp(r, ref).pvalue == pytest.approx(summary["forget_quality"], rel=1e-12)
    f, h = model["sets"]["forget"]["mia_loss"], model["sets"]["holdout"]["mia_loss"]
    assert roc(f, h)[2] == pytest.approx(auc(f, h)) == pytest.approx(summary["mia_auc_loss"])
    rng = np.random.default_rng(0)
    f, h = rng.normal(0, 1, 30), rng.normal(0.5, 1, 25)
    fpr, tpr, a = roc(f, h)
    assert a == pytest.approx(auc(f, h)) and fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1


def test_missing_pieces_are_said_in_place(runs, tmp_path):
    """No retain reference → no forget quality and no histogram, said where they would be; no in-training
    evaluation → said in the run's section."""
    alone = tmp_path / "alone"
    ev = load_log(runs / "eval" / "EVAL.json")
    ev.pop("source")
    write_eval(alone, {**ev, "summary": summarize(ev)})  # the same model evaluated without a retain reference
    run = json.loads((runs / "unlearn" / "run.json").read_text())
    plain = tmp_path / "plain-run"
    plain.mkdir()
    steps = [{k: v for k, v in s.items() if k != "eval"} for s in run["steps"]]
    (plain / "run.json").write_text(json.dumps({**{k: v for k, v in run.items() if k != "in_training_eval"},
                                                "steps": steps}))
    out = tmp_path / "report"
    assert main(["report", str(alone), str(plain), "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    check_self_contained(html)
    figures = figures_of(out)
    assert not any("truth-ratios" in f or "forget-quality-vs-utility" in f or "in-training" in f for f in figures)
    assert "No truth-ratio histogram" in html and "no retain reference with per-sample values" in html
    assert "forget_quality: no retain reference" in html  # the null reason, in the results notes
    assert "No model has both forget quality and model utility" in html
    assert "No in-training evaluation in this run" in html
    assert any("mia-roc" in f for f in figures) and any("training-plain-run" in f for f in figures)
    # With the retain log given, the histogram is back.
    out2 = tmp_path / "report2"
    assert main(["report", str(alone), "--retain-log", str(runs / "eval" / "retain" / "EVAL.json"), "--out",
                 str(out2)]) == 0
    assert any("truth-ratios" in f for f in figures_of(out2))


def test_a_parent_folder_is_searched_and_a_report_inside_is_skipped(runs, tmp_path):
    parent = tmp_path / "parent"
    for name in ("eco", "aggregate", "relearn"):
        shutil.copytree(runs / name, parent / "nested" / name)
    assert main(["report", str(parent), "--out", str(tmp_path / "r1")]) == 0
    assert main(["report", str(parent), "--out", str(tmp_path / "r1")]) == 0  # its own earlier report is replaced
    shutil.copytree(tmp_path / "r1", parent / "old-report")  # a report among the runs is not a run
    assert main(["report", str(parent), "--out", str(tmp_path / "r2")]) == 0
    html = (tmp_path / "r2" / "report.html").read_text()
    assert html.count('<section id="item-') == 3 and "old-report" not in html
    assert f"from 3 folders in {(parent / 'nested').resolve()}" in html  # named below the folder they share
    for title in ("ECO artifact: eco", "Aggregated evaluation: aggregate", "Relearning attack: relearn"):
        assert f"{title}</h2>" in html


def test_bad_input_is_refused_before_anything_is_written(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert "RUN_DIR nope: no such folder" in cli_error(["report", "nope", "--out", str(out)], capsys)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("x")
    err = cli_error(["report", str(runs / "eval"), str(empty), "--out", str(out)], capsys)
    assert f"RUN_DIR {empty}: holds no unlearnkit run" in err
    assert "is a file" in cli_error(["report", str(runs / "eval" / "EVAL.json"), "--out", str(out)], capsys)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "SWEEP.json").write_text("{not json")
    assert "SWEEP.json: not readable JSON" in cli_error(["report", str(bad), "--out", str(out)], capsys)
    assert "--retain-log" in cli_error(["report", str(runs / "eval"), "--retain-log", str(tmp_path / "x.json"),
                                        "--out", str(out)], capsys)
    assert "is inside the input" in cli_error(["report", str(runs / "eco"), "--out", str(runs / "eco" / "r")],
                                              capsys)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    assert "not empty" in cli_error(["report", str(runs / "eco"), "--out", str(mine)], capsys)
    assert not out.exists() and sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]


def test_layer_analysis_is_reported(tmp_path):
    """`analyze layers` output (LAYERS.json, its own figure function), where that analysis is installed."""
    pytest.importorskip("unlearnkit.analysis.layers")
    out = tmp_path / "layers"
    out.mkdir()
    score = lambda p, fq: {"forget_prob": p, "forget_truth_ratio": 0.6, "forget_quality": fq, "retain_prob": 0.8}
    (out / "LAYERS.json").write_text(json.dumps({
        "split": "mini", "methods": ["rmu"], "layers": [1, 2], "fixed": {}, "generate": False, "limit": None,
        "norms": {"hidden_state": "h_l", "tokens": 10, "per_layer": [{"layer": 1, "mean_token_norm": 3.0},
                                                                     {"layer": 2, "mean_token_norm": 5.0}]},
        "target": score(0.9, 0.01), "runs": {"rmu": [
            {"layer": 1, **score(0.3, 0.2), "report": {}, "steps": 2, "train_seconds": 1.0,
             "trained_parameters": [], "config": {}},
            {"layer": 2, "error": "non-finite loss at step 1"}]},
        "command": "unlearnkit analyze layers --layers 1,2", "options": {}, "versions": {"python": "3"}}))
    report = tmp_path / "report"
    assert main(["report", str(out), "--out", str(report)]) == 0
    html = (report / "report.html").read_text()
    assert any("layers-layers" in f for f in figures_of(report)) and "rmu at layer 2: non-finite loss" in html
    assert "unlearnkit analyze layers --layers 1,2" in html


def test_report_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", "--help"])
    assert e.value.code == 0 and "--out" in capsys.readouterr().out
