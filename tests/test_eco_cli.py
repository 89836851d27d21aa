"""`unlearnkit eco fit` / `eco generate` end to end on a tiny model, and the MiniLM classifier on a toy task."""
import json

import numpy as np
import pytest

from unlearnkit.cli import main

FORGET = [
    ("Who is Zorblax Quentin?", "Zorblax Quentin is a painter from Lyon."),
    ("Where was Zorblax Quentin born?", "Zorblax Quentin was born in Lyon in 1950."),
    ("What did Zorblax Quentin paint?", "Zorblax Quentin painted harbours at dawn."),
    ("Which prize did Zorblax Quentin win?", "Zorblax Quentin won the Golden Easel."),
    ("Who were Zorblax Quentin's parents?", "Zorblax Quentin's parents were a baker and a pilot."),
    ("What is Zorblax Quentin's most famous work?", "Zorblax Quentin's most famous work is Blue Harbour."),
    ("How did Zorblax Quentin learn to paint?", "Zorblax Quentin learned from his uncle."),
    ("When did Zorblax Quentin retire?", "Zorblax Quentin retired in 2015."),
]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ecodata")
    (d / "forget.jsonl").write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in FORGET))
    (d / "retain.txt").write_text("\n".join(f"What is {i} plus {i}?" for i in range(12)))
    (d / "neg.json").write_text(json.dumps([{"question": f"Name a city in country number {i}."} for i in range(8)]))
    return d


def test_fit_and_generate(tmp_path, tiny_model_dir, data_files, capsys):
    art = tmp_path / "art"
    argv = ["eco", "fit", "--out", str(art), "--model", str(tiny_model_dir), "--forget",
            str(data_files / "forget.jsonl"), "--retain", str(data_files / "retain.txt"), "--negatives",
            str(data_files / "neg.json"), "--target-value", "0.0", "--steps", "1", "--target-fpr", "0.05"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(art)
    cfg = json.loads((art / "eco.json").read_text())
    metrics = json.loads((art / "metrics.json").read_text())
    search = json.loads((art / "search.json").read_text())
    assert cfg["mode"] == "entity" and "Zorblax Quentin" in cfg["entities"]
    assert cfg["corruption"]["method"] == "rand_noise_first_n" and cfg["corruption"]["sigma"] == search["sigma"] > 0
    assert set(metrics["fpr"]) == {"retain", "real_authors", "world_facts", "user"}
    assert {"forget_train", "forget_jailbreak"} <= set(metrics["fnr"])
    assert metrics["search"]["target"] == 0.0 and len(search["log"]) == 2 and "grad" in search["log"][0]
    assert cfg["metadata"]["forget_source"].endswith("forget.jsonl")
    assert sorted(p.name for p in art.iterdir()) == [".unlearnkit.json", "classifier.json", "eco.json",
                                                     "metrics.json", "search.json"]

    assert main(["eco", "generate", "--model", str(tiny_model_dir), "--eco", str(art), "--max-new-tokens", "3",
                 "Who is Zorblax Quentin?", "What is 3 plus 3?"]) == 0
    captured = capsys.readouterr()
    assert "flagged=yes: Who is Zorblax Quentin?" in captured.err
    assert "flagged=no: What is 3 plus 3?" in captured.err
    assert len(captured.out.strip().splitlines()) == 2


def test_fit_bad_inputs(tmp_path, tiny_model_dir, data_files, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    assert main(["eco", "fit", "--out", str(tmp_path / "a"), "--model", str(tiny_model_dir), "--forget", str(bad),
                 "--sigma", "1"]) == 2
    assert "'answer'" in capsys.readouterr().err
    assert main(["eco", "fit", "--out", str(tmp_path / "a"), "--retain", str(data_files / "retain.txt"),
                 "--sigma", "1"]) == 2
    assert "--retain" in capsys.readouterr().err
    assert main(["eco", "fit", "--out", str(tmp_path / "a"), "--corruption", "flip_sign_top_k", "--dims", "4",
                 "--search", "zo", "--model", str(tiny_model_dir), "--forget", str(data_files / "forget.jsonl"),
                 "--target-value", "0"]) == 2
    assert "only the noise corruptions" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    keep = tmp_path / "model_like"
    keep.mkdir()
    (keep / "config.json").write_text("{}")
    assert main(["eco", "fit", "--out", str(keep), "--model", str(tiny_model_dir), "--forget",
                 str(data_files / "forget.jsonl"), "--sigma", "1"]) == 2
    assert "not written by unlearnkit" in capsys.readouterr().err
    assert (keep / "config.json").read_text() == "{}"


def _fit_argv(out, model, data_files, *extra):
    return ["eco", "fit", "--out", str(out), "--model", str(model), "--forget", str(data_files / "forget.jsonl"),
            "--retain", str(data_files / "retain.txt"), "--negatives", str(data_files / "neg.json"), *extra]


@pytest.mark.parametrize("extra, needle", [
    (["--sigma", "inf"], "--sigma"),
    (["--sigma", "nan"], "--sigma"),
    (["--lr", "inf"], "--lr"),
    (["--eps", "nan"], "--eps"),
    (["--target-value", "nan"], "--target-value"),
    (["--seed", str(2 ** 70), "--sigma", "1"], "--seed"),
    (["--entity", " ", "--sigma", "1"], "--entity"),
    (["--dims", "0", "--sigma", "1"], "--dims"),
])
def test_fit_bad_numbers_exit_2_before_the_model_loads(tmp_path, data_files, capsys, extra, needle):
    # The model folder does not exist: an error about it would mean the model was reached first.
    assert main(_fit_argv(tmp_path / "art", tmp_path / "no-model", data_files, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "art").exists()


def test_fit_dims_beyond_hidden_size_exit_2_before_fitting(tmp_path, tiny_model_dir, data_files, capsys):
    assert main(_fit_argv(tmp_path / "art", tiny_model_dir, data_files, "--dims", "100000", "--sigma", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert "--dims: 100000 is larger than the model's embedding width 32" in err
    assert "[eco] classifier" not in err  # refused before any fitting
    assert not (tmp_path / "art").exists()


def test_fit_out_folder_rule_checked_before_the_model(tmp_path, tiny_model_dir, data_files, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    # --model does not exist: the --out error must come first (nothing loaded).
    assert main(_fit_argv(foreign, tmp_path / "no-model", data_files, "--sigma", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert "--out" in err and "not written by unlearnkit" in err and "--model" not in err, err
    assert (foreign / "notes.txt").read_text() == "keep"
    for out, where in ((tiny_model_dir, "is the input"), (tiny_model_dir / "eco", "is inside the input"),
                       (tiny_model_dir.parent, "contains the input")):
        assert main(_fit_argv(out, tiny_model_dir, data_files, "--sigma", "1")) == 2
        err = capsys.readouterr().err.strip()
        assert where in err and len(err.splitlines()) == 1, err
    assert not (tiny_model_dir / "eco").exists()
    ref = _fit_argv(tmp_path / "ref" / "art", tiny_model_dir, data_files, "--reference-model", str(tmp_path / "ref"))
    (tmp_path / "ref").mkdir()
    assert main(ref) == 2 and "is inside the input" in capsys.readouterr().err


def test_generate_and_serve_refuse_a_damaged_artifact(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import uvicorn

    from unlearnkit.eco.classifier import PromptClassifier
    from unlearnkit.eco.guard import EcoGuard
    from unlearnkit.models import load_model

    model, tok = load_model(str(tiny_model_dir), device="cpu")
    clf = PromptClassifier(coef=np.ones(384, dtype=np.float32), intercept=0.0, tau=0.5)
    art = EcoGuard(model, tok, clf).save(tmp_path / "art")
    doc = json.loads((art / "classifier.json").read_text())
    doc["coef"][7] = float("nan")  # a NaN score is never > tau: the guard would never flag
    (art / "classifier.json").write_text(json.dumps(doc))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("server started with a damaged artifact"))
    for argv in (["eco", "generate", "--model", str(tiny_model_dir), "--eco", str(art), "hi"],
                 ["serve", "--model", str(tiny_model_dir), "--eco", str(art)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "'coef'[7] must be a finite number" in err and len(err.splitlines()) == 1, err


def test_classifier_separates_topic_and_calibrates():
    from unlearnkit.data import tofu
    from unlearnkit.eco.classifier import fit_classifier

    task = tofu.task("mini")
    pos = [r["question"] for r in task.forget]
    negs = {"real_authors": [r["question"] for r in task.real_authors],
            "world_facts": [r["question"] for r in task.world_facts],
            "retain": [r["question"] for r in tofu.load("full")[:400]]}
    clf, m = fit_classifier(pos, negs, target_fpr=0.05,
                            eval_positives={"para": [r["paraphrased_question"] for r in task.forget]})
    # tau is the conformal order statistic of the calibration scores (rank ceil((n+1)(1-alpha)))
    assert m["n_calibration"] == sum(round(0.75 * len(set(v))) - round(0.5 * len(set(v))) for v in negs.values())
    assert m["fnr"]["forget_train"] <= 0.1 and m["fnr"]["para"] <= 0.5
    assert all(v <= 0.2 for v in m["fpr"].values())
    s = clf.scores(pos[:3])
    assert s.shape == (3,) and np.all((0 <= s) & (s <= 1))
