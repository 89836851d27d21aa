"""analyze layers: --layers parses as documented, the layer norm is its definition, the command runs per
(method, layer) with that layer's trained parameters, and every input is checked before any work."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import cli_error, layer_outputs_by_hand

from unlearnkit import methods
from unlearnkit.analysis.layers import check_methods, layer_methods, mean_token_norms, parse_layers
from unlearnkit.cli import main
from unlearnkit.data import tofu
from unlearnkit.data.format import encode_qa
from unlearnkit.errors import UserError
from unlearnkit.methods.contract import Method
from unlearnkit.train.activations import layer_index

ROWS = tofu.task("mini").forget[:3]


@pytest.mark.parametrize("text, expected", [
    ("3..27", list(range(3, 28))),
    ("3..27:4", [3, 7, 11, 15, 19, 23, 27]),
    ("3..12:4", [3, 7, 11]),
    ("11,3,7", [3, 7, 11]),
    ("0..4:2, 3, 4", [0, 2, 3, 4]),
    ("5", [5]),
])
def test_parse_layers(text, expected):
    assert parse_layers(text) == expected


@pytest.mark.parametrize("text", ["", "a", "3..", "-1", "5..3", "3..9:0", "3,,4", "3..9:2:1", "1.5"])
def test_parse_layers_refuses(text):
    with pytest.raises(UserError, match="--layers"):
        parse_layers(text)


def test_methods_come_from_the_registry():
    assert layer_methods() == [n for n, m in methods.METHODS.items() if "layer" in m.defaults]
    assert "rmu" in layer_methods() and "npo" not in layer_methods()
    with pytest.raises(UserError, match="npo takes no layer setting"):
        check_methods(["rmu", "npo"])
    with pytest.raises(UserError, match="unknown method"):
        check_methods(["nope"])
    extra = Method("probe_layer", {"layer": 1, "lr": 1e-3}, setup=lambda *a, **k: None)
    methods.register(extra)
    try:
        assert "probe_layer" in layer_methods() and check_methods(["probe_layer"]) == ["probe_layer"]
    finally:
        methods.unregister("probe_layer")


def test_mean_token_norms_are_their_definition(tiny_model, tokenizer):
    got = mean_token_norms(tiny_model, tokenizer, ROWS, [0, 1, 2], batch_size=2)
    norms = {0: [], 1: [], 2: []}
    for row in ROWS:  # one unpadded row at a time; the command batches (padded) rows
        ids = torch.tensor([encode_qa(tokenizer, row["question"], row["answer"])["input_ids"]])
        for layer, h in enumerate(layer_outputs_by_hand(tiny_model, ids, 3)):
            norms[layer] += [float(v.double().norm()) for v in h[0]]
    assert got["tokens"] == len(norms[0])
    for layer, values in norms.items():
        assert got["norms"][layer] == pytest.approx(sum(values) / len(values), rel=1e-5)
    assert len(set(got["norms"].values())) == 3  # three different layers, three different norms


def test_layers_cli_on_a_tiny_model(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import unlearnkit.prepare

    monkeypatch.setattr(unlearnkit.prepare, "prepare_tofu",
                        lambda *a, **k: {"target": tiny_model_dir, "retain": tiny_model_dir})
    out = tmp_path / "layers"
    # batch_size 40 = the whole mini forget set: Adaptive RMU's first forget batch is every forget row, so its
    # coefficient is beta times the norm this command measures
    assert main(["analyze", "layers", "--model", str(tiny_model_dir), "--layers", "1..2", "--steps", "1",
                 "--set", "batch_size=40", "--limit", "2", "--quiet", "--out", str(out)]) == 0
    doc = json.loads((out / "LAYERS.json").read_text())
    assert doc["methods"] == ["rmu", "adaptive_rmu"] and doc["layers"] == [1, 2]
    norms = {n["layer"]: n["mean_token_norm"] for n in doc["norms"]["per_layer"]}
    assert list(norms) == [1, 2]
    assert doc["target"]["forget_quality"] == pytest.approx(1.0)  # target == retain here
    for method in ("rmu", "adaptive_rmu"):
        assert [r["layer"] for r in doc["runs"][method]] == [1, 2]
        for r in doc["runs"][method]:
            assert r["steps"] == 1 and r["config"]["layer"] == r["layer"] and r["train_seconds"] > 0
            trained = {layer_index(n) for n in r["trained_parameters"]}
            assert trained == set(range(max(0, r["layer"] - 2), r["layer"] + 1))
            for key in ("forget_prob", "forget_truth_ratio", "forget_quality", "retain_prob", "ra_prob"):
                assert isinstance(r[key], float), (method, key)
    for r in doc["runs"]["adaptive_rmu"]:
        beta = r["config"]["beta"]
        assert r["report"]["steering_coeffs"][0] == pytest.approx(beta * norms[r["layer"]], rel=1e-4)
    assert [r["report"]["steering_coeffs"] for r in doc["runs"]["rmu"]] == [[600.0]] * 2
    assert doc["versions"]["torch"] == torch.__version__
    assert (out / "LAYERS.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "adaptive_rmu" in printed and "LAYERS.json" in printed


@pytest.mark.parametrize("extra, needle", [
    (["--layers", "1..3"], "--layers 1..3: rmu at layer 3: config layer: 3 is out of range for a 4-layer model"),
    (["--layers", "3..1"], "must not run backwards"),
    (["--layers", "1", "--methods", "rmu,npo"], "npo takes no layer setting"),
    (["--layers", "1", "--set", "layer=2"], "--set layer"),
    (["--layers", "1", "--set", "params=x"], "--set params"),
    (["--layers", "1", "--set", "nope=1"], "unknown key 'nope'"),
    (["--layers", "1", "--steps", "0"], "--steps"),
])
def test_layers_inputs_checked_first(tmp_path, tiny_model_dir, no_model_load, capsys, extra, needle):
    out = tmp_path / "o"
    err = cli_error(["analyze", "layers", "--model", str(tiny_model_dir), "--out", str(out), *extra], capsys)
    assert needle in err
    assert not out.exists()


def test_analyze_help_lists_every_analysis(capsys):
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in ("layers", "confidence", "alignment", "markov", "difficulty"):
        assert name in text
