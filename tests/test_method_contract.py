"""The method contract: the docs' "add a method in one file" walkthrough, run as written; a toy method using every
field of the record; and no code outside a method's own file branching on a method's name."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from unlearnkit import methods
from unlearnkit.cli import main
from unlearnkit.data import tofu
from unlearnkit.errors import UserError
from unlearnkit.methods.contract import Method, when_alpha
from unlearnkit.train.nll import mean_token_nll
from unlearnkit.unlearning import build, unlearn

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "unlearnkit"
FORGET = tofu.load("forget01")[:6]
RETAIN = tofu.load("full")[:6]


def walkthrough_method() -> Method:
    """The code block under "## Add a method in one file" in docs/methods.md, executed as a module would be."""
    text = (ROOT / "docs" / "methods.md").read_text()
    section = text[text.index("## Add a method in one file"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {"__name__": "capped_ga"}
    exec(compile(code, "docs/methods.md:capped_ga", "exec"), namespace)
    return namespace["METHOD"]


@pytest.fixture
def capped_ga():
    method = methods.register(walkthrough_method())
    yield method
    methods.unregister(method.name)


def weights(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_walkthrough_loss_is_its_definition(capped_ga, make_tiny_model, tokenizer):
    run = build(make_tiny_model(layers=2), tokenizer, "capped_ga", FORGET, None, {"cap": 3.0, "batch_size": 2})
    batch = run.schedule(0)[0]
    loss, parts = run.step_loss(run.model, batch)
    ce = float(mean_token_nll(run.model, batch["forget"]))
    assert float(loss) == pytest.approx(-min(ce, 3.0), rel=1e-6) and parts["forget_ce"] == pytest.approx(ce)


def test_walkthrough_trains_like_ga_below_the_cap_and_stops_above_it(capped_ga, make_tiny_model, tokenizer):
    config = {"max_steps": 3, "batch_size": 2, "lr": 1e-3}
    ga = unlearn(make_tiny_model(layers=2), tokenizer, "ga", FORGET, None, config, progress=False)
    high = unlearn(make_tiny_model(layers=2), tokenizer, "capped_ga", FORGET, None, {**config, "cap": 1e4},
                   progress=False)
    for name, value in weights(ga["model"]).items():
        torch.testing.assert_close(weights(high["model"])[name], value, rtol=0, atol=0)
    start = weights(make_tiny_model(layers=2))
    low = unlearn(make_tiny_model(layers=2), tokenizer, "capped_ga", FORGET, None, {**config, "cap": 1e-3},
                  progress=False)  # CE is far above the cap: zero gradient, no change (weight decay 0)
    for name, value in weights(low["model"]).items():
        torch.testing.assert_close(value, start[name], rtol=0, atol=0)


def test_walkthrough_on_the_cli(capped_ga, tiny_model_dir, tmp_path, capsys):
    forget = tmp_path / "f.jsonl"
    forget.write_text("\n".join(json.dumps(r) for r in FORGET))
    base = ["unlearn", "--method", "capped_ga", "--model", str(tiny_model_dir), "--forget", str(forget), "--quiet",
            "--max-steps", "2", "--batch-size", "2"]
    assert main(base + ["--set", "cap=-1", "--out", str(tmp_path / "bad")]) == 2
    assert "cap: must be a number > 0" in capsys.readouterr().err
    assert main(base + ["--set", "cap=6", "--out", str(tmp_path / "ok")]) == 0
    run = json.loads((tmp_path / "ok" / "run.json").read_text())
    assert run["method"] == "capped_ga" and run["config"]["cap"] == 6.0 and len(run["steps"]) == 2


def test_every_record_field_is_honoured(make_tiny_model, tokenizer):
    """A toy method with its own defaults, choices, data needs, trained parameters, padding and report."""
    seen = {}

    def setup(model, data, cfg):
        first = data.batches_for_epoch(0)[0]
        seen.update(params=list(data.param_names), side_left=bool(first["forget"]["attention_mask"][:, 0].eq(0).any()),
                    position_ids="position_ids" in first["forget"], retain=first["retain"] is not None)
        data.report["n_forget_examples"] = len(data.forget)

        def step_loss(m, batch):
            loss = cfg["weight"] * -mean_token_nll(m, batch["forget"])
            if batch["retain"] is not None:
                loss = loss + cfg["alpha"] * mean_token_nll(m, batch["retain"])
            return loss, {}
        return step_loss

    toy = Method("toy", dict(lr=1e-4, max_steps=2, batch_size=3, weight=1.0, alpha=0.0, style="left"), setup,
                 uses_retain=when_alpha, choices={"style": ("left", "right")},
                 check=lambda cfg: None if cfg["weight"] > 0 else (_ for _ in ()).throw(UserError("config weight")),
                 default_params=lambda cfg: r"layers\.0\.mlp", padding_side=lambda cfg: cfg["style"],
                 position_ids=lambda cfg: False, reports=("n_forget_examples",))
    methods.register(toy)
    try:
        info = unlearn(make_tiny_model(layers=2), tokenizer, "toy", FORGET, None, progress=False)
        assert info["config"]["lr"] == 1e-4 and info["total_steps"] == 2
        assert seen["params"] and all(re.search(r"layers\.0\.mlp", n) for n in seen["params"])
        assert seen["side_left"] and not seen["position_ids"] and not seen["retain"]
        assert info["method_report"] == {"n_forget_examples": len(FORGET)} and info["n_retain"] == 0
        unlearn(make_tiny_model(layers=2), tokenizer, "toy", FORGET, RETAIN, {"alpha": 1.0}, progress=False)
        assert seen["retain"]
        with pytest.raises(UserError, match="retain: empty data set"):
            unlearn(make_tiny_model(layers=2), tokenizer, "toy", FORGET, None, {"alpha": 1.0}, progress=False)
        with pytest.raises(UserError, match="style: unknown value 'up'"):
            unlearn(make_tiny_model(layers=2), tokenizer, "toy", FORGET, None, {"style": "up"}, progress=False)
        with pytest.raises(UserError, match="config weight"):
            unlearn(make_tiny_model(layers=2), tokenizer, "toy", FORGET, None, {"weight": -1.0}, progress=False)
        with pytest.raises(ValueError, match="exists"):
            methods.register(toy)
    finally:
        methods.unregister("toy")


def test_no_method_name_outside_its_own_file():
    """unlearning.py, the loop, the CLI helpers and the generic parts of methods/ know methods only by record."""
    names = [m for m in methods.METHODS] + ["adaptive", "steering", "rmu", "npo"]
    generic = [SRC / "unlearning.py", SRC / "methods" / "cli.py", SRC / "methods" / "contract.py",
               SRC / "cli_common.py", *sorted((SRC / "train").glob("*.py"))]
    for path in generic:
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        code = re.sub(r'"""(.*?)"""', "", code, flags=re.S)  # docstrings may mention methods
        for name in names:
            if path.name == "activations.py" and name == "rmu":
                continue
            assert not re.search(rf"[\"'.]{name}\b|\b{name}[\"'(.]", code), f"{path.name} names {name!r}"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_resolve(path):
    import yaml

    from unlearnkit.unlearning import resolve_config

    method = next(m for m in sorted(methods.METHODS, key=len, reverse=True) if path.stem.startswith(m))
    cfg = resolve_config(method, yaml.safe_load(path.read_text()))
    assert all(cfg[k] == pytest.approx(v) if isinstance(v, float) else True
               for k, v in yaml.safe_load(path.read_text()).items())
