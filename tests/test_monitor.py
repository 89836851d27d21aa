"""In-training evaluation and checkpoint selection (train/monitor.py): the rule language, the kept step's weights
are exactly those of that step, the evaluation history is in run.json, and a killed run resumes to the same choice."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import cli_error

from unlearnkit.data import tofu
from unlearnkit.errors import UserError
from unlearnkit.train.monitor import KeepRule, Monitor
from unlearnkit.unlearning import unlearn

FORGET = tofu.task("mini").forget[:4]


def test_keep_rule_language():
    assert KeepRule.parse("last") is None and KeepRule.parse(None) is None
    r = KeepRule.parse("best:forget_quality,retain_prob>=0.9,forget_prob<0.5")
    assert (r.metric, r.direction) == ("forget_quality", "max")
    assert r.constraints == (("retain_prob", ">=", 0.9), ("forget_prob", "<", 0.5))
    assert KeepRule.parse("best:forget_prob").direction == "min"
    assert KeepRule.parse("best:max:my_score").direction == "max"
    assert r.better({"forget_quality": 0.3, "retain_prob": 0.95, "forget_prob": 0.1}, None)
    assert not r.better({"forget_quality": 0.9, "retain_prob": 0.85, "forget_prob": 0.1}, None)  # constraint fails
    assert not r.better({"forget_quality": 0.2, "retain_prob": 0.95, "forget_prob": 0.1},
                        {"forget_quality": 0.3})
    assert not r.better({"forget_quality": None, "retain_prob": 0.95, "forget_prob": 0.1}, None)
    for bad, needle in (("best:nope", "unknown metric 'nope'"), ("first", "expected last or best"),
                        ("best:forget_quality,retain_prob=0.9", "constraint 'retain_prob=0.9'"),
                        ("best:up:x", "'up' is not max or min")):
        with pytest.raises(UserError, match=needle):
            KeepRule.parse(bad)


class Scripted:
    """An evaluation that returns scripted scores and snapshots the weights it saw."""

    def __init__(self, scores):
        self.scores, self.seen = list(scores), []

    def __call__(self, model):
        assert not model.training and not torch.is_grad_enabled()
        self.seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return {"score": self.scores[len(self.seen) - 1]}


def _run(model, tokenizer, evaluate, out=None, **kw):
    monitor = Monitor(evaluate, 2, keep=KeepRule.parse("best:max:score"))
    config = {"max_steps": 6, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 1}
    return unlearn(model, tokenizer, "ga", FORGET, None, config, out_dir=out, progress=False, monitor=monitor, **kw)


def test_kept_step_has_exactly_that_steps_weights(make_tiny_model, tokenizer, tmp_path):
    evaluate = Scripted([0.0, 1.0, 5.0, 2.0])  # before, step 2, step 4, step 6
    info = _run(make_tiny_model(layers=2), tokenizer, evaluate, out=tmp_path / "run")
    kept = info["in_training_eval"]
    assert kept["kept_step"] == 4 and kept["kept_metrics"] == {"score": 5.0} and kept["before"] == {"score": 0.0}
    for n, p in info["model"].named_parameters():
        torch.testing.assert_close(p, evaluate.seen[2][n], rtol=0, atol=0)
    assert [s.get("eval") for s in info["steps"]] == [None, {"score": 1.0}, None, {"score": 5.0}, None,
                                                      {"score": 2.0}]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["in_training_eval"]["kept_step"] == 4 and run["steps"][3]["eval"] == {"score": 5.0}


def test_no_admissible_step_keeps_the_last(make_tiny_model, tokenizer):
    monitor = Monitor(lambda m: {"forget_prob": 1.0, "retain_prob": 0.1}, 3,
                      keep=KeepRule.parse("best:forget_prob,retain_prob>=0.5"))
    info = unlearn(make_tiny_model(layers=2), tokenizer, "ga", FORGET, None, {"max_steps": 3, "batch_size": 2},
                   progress=False, monitor=monitor)
    assert info["in_training_eval"]["kept_step"] == 3 and "no evaluated step" in info["in_training_eval"]["note"]


def test_killed_run_resumes_to_the_same_choice(make_tiny_model, tokenizer, tmp_path):
    whole = _run(make_tiny_model(layers=2), tokenizer, Scripted([0.0, 3.0, 1.0, 2.0]))
    out = tmp_path / "run"
    first = _run(make_tiny_model(layers=2), tokenizer, Scripted([0.0, 3.0]), out=out, stop_after_steps=3)
    assert first["interrupted_at"] == 3
    resumed = _run(make_tiny_model(layers=2), tokenizer, Scripted([1.0, 2.0]), out=out)  # no new step-0 eval
    assert resumed["in_training_eval"]["kept_step"] == 2 == whole["in_training_eval"]["kept_step"]
    assert resumed["in_training_eval"]["before"] == {"score": 0.0}
    for (n, p), (_, q) in zip(resumed["model"].named_parameters(), whole["model"].named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("extra, needle", [
    (["--keep", "best:forget_quality"], "--keep needs --eval-every"),
    (["--retain-log", "x.json"], "--retain-log needs --eval-every"),
    (["--eval-every", "0", "--split", "mini"], "--eval-every: must be a whole number >= 1"),
    (["--eval-every", "2", "--forget", "F"], "in-training evaluation runs on a TOFU --split"),
    (["--eval-every", "2", "--split", "mini", "--keep", "best:model_utility"], "is not evaluated during training"),
    (["--eval-every", "2", "--split", "mini", "--keep", "best:forget_quality"], "forget quality needs --retain-log"),
])
def test_unlearn_eval_options_checked_before_loading(tmp_path, no_model_load, capsys, extra, needle):
    extra = [str(tmp_path / "f.json") if e == "F" else e for e in extra]
    (tmp_path / "f.json").write_text(json.dumps([{"question": "q", "answer": "a"}]))
    err = cli_error(["unlearn", "--method", "ga", "--out", str(tmp_path / "o"), *extra], capsys)
    assert needle in err, err
