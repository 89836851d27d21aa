"""The lm-evaluation-harness adapter `unlearnkit-eco` (eco/lm_eval_adapter.py) on a tiny local task (no hub): a
guard that flags nothing gives exactly plain HFLM's results; one that flags everything gives the log-likelihoods of
EcoGuard.sequence_nll on the same (context, continuation) tokens; generation prefill is guarded; a damaged artifact
is refused before the model loads."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

# Everything is local: the task reads a JSON file, the model is a folder. Never reach the hub (read at import).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from unlearnkit.eco.classifier import PromptClassifier  # noqa: E402
from unlearnkit.eco.corrupt import CorruptionConfig  # noqa: E402
from unlearnkit.eco.guard import EcoGuard  # noqa: E402
from unlearnkit.eco.harness import main as harness_main  # noqa: E402
from unlearnkit.eco.lm_eval_adapter import EcoHFLM, _unambiguous_parts  # noqa: E402

DATA = Path(__file__).parent / "fixtures" / "mcq" / "biology.jsonl"  # WMDP's schema: question, choices, answer
# WMDP's lm_eval template (tasks/wmdp/_default_template_yaml), with the data read from a local JSON file.
TEMPLATE = {"dataset_path": "json", "test_split": "test", "output_type": "multiple_choice", "num_fewshot": 0,
            "description": "The following are multiple choice questions (with answers) about biology.\n\n",
            "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                           "D. {{choices[3]}}\nAnswer:",
            "doc_to_target": "answer", "metric_list": [{"metric": "acc", "aggregation": "mean",
                                                         "higher_is_better": True}], "metadata": {"version": 1}}
TASKS = {"tiny_wmdp": {"doc_to_choice": ["A", "B", "C", "D"]},           # one-token continuations
         "tiny_wmdp_text": {"doc_to_choice": "{{choices}}"}}             # multi-token continuations
MODEL_ARGS = dict(device="cpu", dtype="float32", batch_size=4)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    for name, extra in TASKS.items():
        cfg = {"task": name, **TEMPLATE, **extra,
               "dataset_kwargs": {"data_files": {"test": str(DATA)}, "cache_dir": str(d / "cache")}}
        (d / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return d


@pytest.fixture(scope="module")
def artifacts(tiny_model_dir, tmp_path_factory):
    """Two guards on the tiny model: one flags no prompt, one every prompt. A per-token deterministic corruption
    (no noise), so a row's corrupted embeddings do not depend on what else is in the batch."""
    from unlearnkit.models import load_model

    model, tok = load_model(str(tiny_model_dir), device="cpu")
    root = tmp_path_factory.mktemp("eco")
    out = {}
    for name, intercept in (("none", -10.0), ("all", 10.0)):
        clf = PromptClassifier(coef=np.zeros(384, dtype=np.float32), intercept=intercept, tau=0.5)
        out[name] = EcoGuard(model, tok, clf, CorruptionConfig("flip_sign_top_k", 0.0, 8, 0), mode="all").save(
            root / name)
    return out


def evaluate(lm, task_dir):
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    res = simple_evaluate(model=lm, tasks=list(TASKS), task_manager=tm, log_samples=True)
    # per doc: its (context, continuation) pairs and the harness's (log-likelihood, is greedy) for each
    return {name: [(s["arguments"], [r[0] for r in s["resps"]]) for s in res["samples"][name]] for name in TASKS}


@pytest.fixture(scope="module")
def plain(tiny_model_dir, task_dir):
    return evaluate(HFLM(pretrained=str(tiny_model_dir), **MODEL_ARGS), task_dir)


def test_a_guard_that_flags_nothing_changes_nothing(tiny_model_dir, artifacts, task_dir, plain):
    lm = EcoHFLM(pretrained=str(tiny_model_dir), eco=str(artifacts["none"]), **MODEL_ARGS)
    assert evaluate(lm, task_dir) == plain


def test_flagged_contexts_score_as_the_guard_scores_them(tiny_model_dir, artifacts, task_dir, plain):
    lm = EcoHFLM(pretrained=str(tiny_model_dir), eco=str(artifacts["all"]), **MODEL_ARGS)
    guarded = evaluate(lm, task_dir)
    n_changed = 0
    for name in TASKS:
        assert [a for a, _ in guarded[name]] == [a for a, _ in plain[name]]
        for (args, got), (_, before) in zip(guarded[name], plain[name]):
            for (context, continuation), (value, _), (old, _) in zip(args, got, before):
                ctx, cont = lm._encode_pair(context, continuation)  # the harness's own tokens
                batch = {"input_ids": torch.tensor([ctx + cont]), "attention_mask": torch.ones(1, len(ctx + cont)),
                         "labels": torch.tensor([[-100] * len(ctx) + cont])}
                with torch.no_grad():
                    nll, _ = lm.guard.sequence_nll(batch, [context])
                assert lm.guard.last_state.flags == [True] and lm.guard.last_state.fired == 1
                assert value == pytest.approx(-float(nll[0]), abs=2e-5)
                n_changed += abs(value - old) > 1e-3
    assert n_changed > 0  # the corruption reached the scores


def test_generation_prefill_is_guarded(tiny_model_dir, artifacts):
    lm = EcoHFLM(pretrained=str(tiny_model_dir), eco=str(artifacts["all"]), **MODEL_ARGS)
    context = "Question: Which organelle produces most of a cell's ATP?\nAnswer:"
    gen = {"until": ["\n\n"], "max_gen_toks": 5, "do_sample": False}
    [text] = lm.generate_until([Instance("generate_until", {}, (context, gen), 0)], disable_tqdm=True)
    state = lm.guard.last_state
    assert state.flags == [True] and state.fired == 1 and state.calls == 5  # prefill corrupted, 4 decode steps not
    ids, mask = lm.tok_batch_encode([context])
    with lm.guard.arm(ids, mask.bool(), [context], flags=[True]), torch.no_grad():
        out = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id)
    assert text == lm.tok_decode(out[0, ids.shape[1]:].tolist()).split("\n\n")[0]


def test_rows_with_one_key_and_two_contexts_are_scored_apart():
    items = [((1, 2, 3), (2, True)), ((1, 2, 3), (1, True)), ((4,), (1, False)), ((1, 2, 3), (2, True))]
    assert _unambiguous_parts(items) == [[0, 2, 3], [1]]


def test_cli_runs_the_harness_and_refuses_a_damaged_artifact(tiny_model_dir, artifacts, task_dir, tmp_path,
                                                            monkeypatch, capsys):
    args = ["--tasks", "tiny_wmdp", "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "4",
            "--output_path", str(tmp_path / "results")]
    model_args = f"pretrained={tiny_model_dir},eco={artifacts['all']},dtype=float32"
    assert harness_main(["--model", "unlearnkit-eco", "--model_args", model_args, *args]) == 0
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    assert results["results"]["tiny_wmdp"]["acc,none"] is not None
    assert results["config"]["model"] == "unlearnkit-eco"

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in Path(artifacts["all"]).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    doc = json.loads((bad / "classifier.json").read_text())
    doc["coef"][3] = float("nan")
    (bad / "classifier.json").write_text(json.dumps(doc))
    monkeypatch.setattr(HFLM, "__init__", lambda *a, **k: pytest.fail("model loaded with a damaged artifact"))
    capsys.readouterr()
    assert harness_main(["--model", "unlearnkit-eco", "--model_args", f"pretrained={tiny_model_dir},eco={bad}",
                         *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("unlearnkit: error:") and "'coef'[3] must be a finite number" in err[-1]
