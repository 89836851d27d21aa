"""`unlearnkit analyze markov`: the chains, the sampler, the KL, determinism, and the command on tiny sizes."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import cli_error
from unlearnkit.analysis import markov as mk
from unlearnkit.cli import main

TINY = ["--n-retain", "40", "--n-forget", "20", "--pretrain-epochs", "1", "--steps", "2", "--n-layer", "1",
        "--n-embd", "16", "--n-head", "2", "--quiet", "--threads", "1"]


def tiny_settings(**kw) -> mk.MarkovSettings:
    base = dict(n_retain=40, n_forget=20, pretrain_epochs=1.0, steps=2, n_layer=1, n_embd=16, n_head=2)
    return mk.MarkovSettings(**{**base, **kw})


@pytest.mark.parametrize("name", mk.SETS)
def test_transition_matrix_structure(name):
    subset = mk.SUBSETS[name]
    matrix = mk.transition_matrix(subset)
    assert matrix.shape == (10, 10)
    np.testing.assert_allclose(matrix.sum(1), 1.0, atol=1e-12)
    outside = [s for s in range(10) if s not in subset]
    for s in range(10):
        if s in subset:
            np.testing.assert_allclose(matrix[s, list(subset)], 0.8 / 3, atol=1e-12)
            np.testing.assert_allclose(matrix[s, outside], 0.2 / 7, atol=1e-12)
        else:
            np.testing.assert_allclose(matrix[s], 0.1, atol=1e-12)  # rows from states outside the subset: uniform
    initial = mk.chain_row(subset)
    assert initial.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(initial, matrix[subset[0]])
    # the three subsets are disjoint, and state 9 belongs to none
    assert sorted(sum((list(v) for v in mk.SUBSETS.values()), [])) == list(range(9))


def test_sampled_transitions_match_the_matrix():
    subset = mk.SUBSETS["forget1"]
    matrix, initial = mk.transition_matrix(subset), mk.chain_row(subset)
    seqs = mk.sample_chain(matrix, initial, 20_000, 20, np.random.default_rng(0))
    assert seqs.shape == (20_000, 20) and seqs.min() >= 0 and seqs.max() <= 9
    counts = np.zeros((10, 10))
    np.add.at(counts, (seqs[:, :-1].ravel(), seqs[:, 1:].ravel()), 1)
    for s in range(10):
        n = counts[s].sum()
        assert n > 5_000, (s, n)
        # 4 standard errors of the largest entry's frequency
        tol = 4 * math.sqrt(0.27 * 0.73 / n)
        np.testing.assert_allclose(counts[s] / n, matrix[s], atol=tol)
    first = np.bincount(seqs[:, 0], minlength=10) / len(seqs)
    np.testing.assert_allclose(first, initial, atol=4 * math.sqrt(0.27 * 0.73 / len(seqs)))


def test_data_split_and_variants():
    s = tiny_settings(n_retain=50, n_forget=30)
    a, b = mk.make_data(s, "A"), mk.make_data(s, "B")
    assert a["retain_train"].shape == (40, 20) and a["retain_test"].shape == (10, 20)
    assert a["forget1_train"].shape == (24, 20) and a["forget1_test"].shape == (6, 20)
    assert a["forget2_train"].shape == (24, 20) and b["forget2_train"].shape == (24, 5)
    for key in ("retain_train", "retain_test", "forget1_train", "forget1_test"):  # shared by the variants
        np.testing.assert_array_equal(a[key], b[key])
    again, other = mk.make_data(s, "A"), mk.make_data(tiny_settings(n_retain=50, n_forget=30, seed=1), "A")
    for key in a:
        np.testing.assert_array_equal(a[key], again[key])
    assert not np.array_equal(a["retain_train"], other["retain_train"])


def test_batch_labels_every_state_after_the_first():
    batch = mk.batch_of([np.array([3, 4, 5, 3]), np.array([6, 7])])
    assert batch["input_ids"].tolist() == [[3, 4, 5, 3], [6, 7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 4, 5, 3], [-100, 7, -100, -100]]


def test_kl_against_naive_full_logits():
    s = tiny_settings(n_layer=2, n_embd=32, n_head=4)
    ref_model, model = mk.build_model(s, 20, seed=1), mk.build_model(s, 20, seed=2)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 10, size=n) for n in (20, 5, 13, 2, 20, 7)]
    got = mk.mean_token_kl(mk.scored_log_probs(ref_model, seqs, batch_size=4)[0],
                           mk.scored_log_probs(model, seqs, batch_size=4)[0])

    total, count = 0.0, 0
    with torch.no_grad():
        for seq in seqs:  # one sequence at a time, no padding, softmax over the full logits
            ids = torch.tensor(seq)[None]
            p_ref = torch.softmax(ref_model(input_ids=ids).logits[0].double(), -1)
            log_p = torch.log(torch.softmax(model(input_ids=ids).logits[0].double(), -1))
            for t in range(len(seq) - 1):  # position t predicts state t+1
                total += float((p_ref[t] * (torch.log(p_ref[t]) - log_p[t])).sum())
                count += 1
    assert got == pytest.approx(total / count, rel=1e-6, abs=1e-9)
    assert got > 0
    assert mk.mean_token_kl(mk.scored_log_probs(model, seqs)[0], mk.scored_log_probs(model, seqs)[0]) == 0.0


def test_chain_log_probs_in_scored_order():
    subset = mk.SUBSETS["retain"]
    seqs = [np.array([0, 3, 9]), np.array([1, 2])]
    got = mk.chain_log_probs(seqs, subset).exp()
    matrix = mk.transition_matrix(subset)
    np.testing.assert_allclose(got.numpy(), matrix[[0, 3, 1]])


def test_retain_kl_at_interpolates():
    path = [{"kl_retain": 0.0, "kl_f": 1.0}, {"kl_retain": 0.2, "kl_f": 0.6}, {"kl_retain": 0.4, "kl_f": 0.2}]
    assert mk.retain_kl_at(path, "kl_f", 0.4, rising=False) == pytest.approx(0.3)
    assert mk.retain_kl_at(path, "kl_f", 0.1, rising=False) is None
    assert mk.retain_kl_at(path, "kl_f", 1.5, rising=True) is None


def test_tradeoff_compares_at_the_furthest_common_level():
    npo = [{"step": 0, "kl_retain": 0.0, "kl_forget1": 0.1}, {"step": 1, "kl_retain": 0.4, "kl_forget1": 0.5}]
    sim = [{"step": 0, "kl_retain": 0.0, "kl_forget1": 0.1}, {"step": 1, "kl_retain": 0.3, "kl_forget1": 0.9}]
    t = mk._tradeoff({"npo": npo, "simnpo": sim}, "kl_forget1")
    assert t["direction"] == "up" and t["matched_level"] == 0.5
    assert t["retain_kl_at_level"]["npo"] == pytest.approx(0.4)
    assert t["retain_kl_at_level"]["simnpo"] == pytest.approx(0.3 * 0.4 / 0.8)
    assert t["simnpo_less_retain_damage"] is True
    sim[1]["kl_forget1"] = 0.05  # opposite directions: no comparison
    assert mk._tradeoff({"npo": npo, "simnpo": sim}, "kl_forget1")["comparable"] is False


def test_run_is_deterministic_for_a_seed():
    s = tiny_settings(variants=("B",), steps=2)
    one, two = mk.run_markov(s), mk.run_markov(s)
    assert one["variants"] == two["variants"]
    assert one["models"]["pretrained"]["train_loss_per_epoch"] == two["models"]["pretrained"]["train_loss_per_epoch"]
    three = mk.run_markov(tiny_settings(variants=("B",), steps=2, seed=5))
    assert three["variants"] != one["variants"]


def test_cli_tiny_writes_contract(tmp_path, capsys):
    out = tmp_path / "markov"
    assert main(["analyze", "markov", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "simnpo" in printed and "MARKOV.json" in printed
    result = json.loads((out / "MARKOV.json").read_text())
    assert set(result["variants"]) == {"A", "B"}
    for v in ("A", "B"):
        for method in ("npo", "simnpo"):
            path = result["variants"][v][method]
            assert [p["step"] for p in path] == [0, 1, 2]
            for p in path:
                for key in ("kl_retain", "kl_forget1", "kl_forget2"):
                    assert math.isfinite(p[key]) and p[key] >= 0
            assert path[0] == {"step": 0, **result["variant_info"][v]["before_unlearning"]}
        assert result["variants"][v]["npo"][0] == result["variants"][v]["simnpo"][0]  # same start
        final = result["summary"]["final"][v]
        assert set(final) == {"npo", "simnpo"} and set(final["npo"]) == {"kl_retain", "kl_forget1", "kl_forget2"}
        assert set(result["summary"]["tradeoff"][v]) == {"forget1", "forget2"}
        assert set(result["summary"]["claim"]["holds"][v]) == {"forget1", "forget2"}
        closest = result["summary"]["closest_to_retain_only"][v]["npo"]["forget1"]
        assert closest["kl_forget1"] == min(p["kl_forget1"] for p in result["variants"][v]["npo"])
    assert result["variant_info"]["B"]["forget2_length"] == 5
    assert len(result["models"]["pretrained"]["train_loss_per_epoch"]) == 1
    assert result["seconds"] > 0
    png = (out / "MARKOV.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # our own folder is replaced on a second run (one variant, one method this time)
    assert main(["analyze", "markov", "--out", str(out), *TINY, "--variants", "B", "--methods", "simnpo"]) == 0
    result = json.loads((out / "MARKOV.json").read_text())
    assert list(result["variants"]) == ["B"] and list(result["variants"]["B"]) == ["simnpo"]
    assert result["summary"]["tradeoff"] == {} and result["summary"]["claim"]["holds_everywhere"] is None


def test_analyze_help_lists_markov(capsys):
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--help"])
    assert e.value.code == 0
    assert "markov" in capsys.readouterr().out


def test_refuses_foreign_out_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    err = cli_error(["analyze", "markov", "--out", str(out), *TINY], capsys)
    assert "--out" in err
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("args, needle", [
    (["--steps", "0"], "--steps"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--lr", "0"], "--lr"),
    (["--pretrain-lr=-1e-3"], "--pretrain-lr"),
    (["--lr", "nan"], "--lr"),
    (["--beta", "0"], "--beta"),
    (["--variants", "A,C"], "--variants"),
    (["--variants", ","], "--variants"),
    (["--methods", "npo,ga"], "--methods"),
    (["--methods", "npo,npo"], "--methods"),
    (["--n-embd", "30", "--n-head", "4"], "--n-embd"),
    (["--n-retain", "1"], "--n-retain"),
    (["--n-forget", "3", "--test-fraction", "0.1"], "--n-forget"),
    (["--test-fraction", "1"], "--test-fraction"),
    (["--length", "1"], "--length"),
    (["--batch-size", "0"], "--batch-size"),
    (["--pretrain-epochs", "0"], "--pretrain-epochs"),
    (["--threads", "0"], "--threads"),
])
def test_bad_options_exit_2_before_work(tmp_path, capsys, args, needle):
    out = tmp_path / "o"
    err = cli_error(["analyze", "markov", "--out", str(out), *TINY, *args], capsys)
    assert needle in err
    assert not out.exists()


def test_diverging_run_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    err = cli_error(["analyze", "markov", "--out", str(out), *TINY, "--lr", "1e30", "--variants", "A",
                     "--methods", "npo"], capsys)
    assert "--lr" in err and "nothing written" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_largest_seed_runs(tmp_path):
    out = tmp_path / "o"
    assert main(["analyze", "markov", "--out", str(out), *TINY, "--seed", str(2**32 - 1), "--variants", "B",
                 "--methods", "simnpo", "--steps", "1"]) == 0
    assert json.loads((out / "MARKOV.json").read_text())["settings"]["seed"] == 2**32 - 1
