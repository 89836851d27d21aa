"""Each method's loss against a direct computation of its definition on the tiny model (full logits, per-sample
Python loops), and NPO's cached reference against per-step recomputation."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from unlearnkit.data import tofu
from unlearnkit.unlearning import build

FORGET = tofu.load("forget01")[:6]
RETAIN = tofu.load("full")[:6]


def naive_answer_nll(model, batch):
    """Per sample: [(summed NLL, n answer tokens)] and the list of every answer-token NLL, from full logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    per_sample, all_tokens = [], []
    for b in range(logits.shape[0]):
        total, n = 0.0, 0
        for t in range(logits.shape[1] - 1):
            y = int(batch["labels"][b, t + 1])
            if y != -100:
                nll = -F.log_softmax(logits[b, t], -1)[y]
                total, n = total + nll, n + 1
                all_tokens.append(nll)
        per_sample.append((total, n))
    return per_sample, all_tokens


def naive_ce(model, batch):
    return sum(naive_answer_nll(model, batch)[1]) / len(naive_answer_nll(model, batch)[1])


def naive_kl(model, ref, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    ref_logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    terms = []
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            if int(batch["labels"][b, t + 1]) != -100:
                p_ref = F.softmax(ref_logits[b, t], -1)
                terms.append((p_ref * (p_ref.log() - F.log_softmax(logits[b, t], -1))).sum())
    return sum(terms) / len(terms)


def perturb(model, seed=1, scale=0.05):
    """Move the model away from where setup took its reference, so reference terms are not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def first_step(method, make_tiny_model, tokenizer, config):
    model = make_tiny_model(layers=2)
    original = copy.deepcopy(model).eval()
    run = build(model, tokenizer, method, FORGET, RETAIN, {"batch_size": 3, **config})
    perturb(run.model)
    batch = run.schedule(0)[0]
    loss, parts = run.step_loss(run.model, batch)
    return loss, batch, run.model, original


def close(a, b):
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), rtol=1e-5, atol=1e-6)


def test_grad_ascent(make_tiny_model, tokenizer):
    loss, batch, model, _ = first_step("ga", make_tiny_model, tokenizer, {})
    close(loss, -naive_ce(model, batch["forget"]))


@pytest.mark.parametrize("retain_loss", ["nll", "kl"])
def test_grad_diff(make_tiny_model, tokenizer, retain_loss):
    loss, batch, model, original = first_step("graddiff", make_tiny_model, tokenizer,
                                              {"retain_loss": retain_loss, "gamma": 0.7, "alpha": 2.0})
    r = naive_ce(model, batch["retain"]) if retain_loss == "nll" else naive_kl(model, original, batch["retain"])
    assert r > 1e-4  # the retain term is live
    close(loss, -0.7 * naive_ce(model, batch["forget"]) + 2.0 * r)


@pytest.mark.parametrize("retain_loss", ["nll", "kl"])
def test_npo(make_tiny_model, tokenizer, retain_loss):
    beta, gamma, alpha = 0.1, 0.8, 1.5
    loss, batch, model, original = first_step("npo", make_tiny_model, tokenizer,
                                              dict(beta=beta, gamma=gamma, alpha=alpha, retain_loss=retain_loss))
    theta, _ = naive_answer_nll(model, batch["forget"])
    ref, _ = naive_answer_nll(original, batch["forget"])
    terms = [-(2 / beta) * F.logsigmoid(beta * (t - r)) for (t, _), (r, _) in zip(theta, ref)]
    r = naive_ce(model, batch["retain"]) if retain_loss == "nll" else naive_kl(model, original, batch["retain"])
    close(loss, gamma * sum(terms) / len(terms) + alpha * r)


@pytest.mark.parametrize("form", ["paper", "authors"])
def test_simnpo(make_tiny_model, tokenizer, form):
    beta, lam, gamma_m, alpha = 0.2, 0.3, 1.0, 1.2  # a random model's NLL/token is ~10.8: keep σ unsaturated
    loss, batch, model, _ = first_step("simnpo", make_tiny_model, tokenizer,
                                       dict(beta=beta, lam=lam, gamma_m=gamma_m, alpha=alpha, gamma_form=form))
    terms = []
    for nll, n in naive_answer_nll(model, batch["forget"])[0]:
        # |y| counts the answer tokens including the end-of-turn token
        margin = beta * nll / n - gamma_m if form == "paper" else beta * (nll / n - gamma_m)
        terms.append(-(2 / beta) * math.log(1 / (1 + math.exp(-float(margin)))))
    assert sum(terms) / len(terms) > 0.1
    close(loss, lam * sum(terms) / len(terms) + alpha * naive_ce(model, batch["retain"]))


def test_simnpo_forms_differ_only_with_margin(make_tiny_model, tokenizer):
    step = lambda **kw: first_step("simnpo", make_tiny_model, tokenizer, dict(beta=0.2, **kw))[0]
    a, b = step(gamma_m=5.0, gamma_form="paper"), step(gamma_m=5.0, gamma_form="authors")
    c, d = step(gamma_m=0.0, gamma_form="paper"), step(gamma_m=0.0, gamma_form="authors")
    assert abs(float(a - b)) > 1e-4
    close(c, d)


def test_npo_cached_reference_equals_per_step_recomputation(make_tiny_model, tokenizer):
    """Training with the one-pass cache gives the same weights as recomputing the reference model every step."""
    from unlearnkit.methods.npo import npo_forget_loss
    from unlearnkit.train.loop import train
    from unlearnkit.train.nll import mean_token_nll, sequence_nll

    config = {"batch_size": 3, "max_steps": 4, "lr": 1e-3, "beta": 0.1}
    cached = build(make_tiny_model(layers=2), tokenizer, "npo", FORGET, RETAIN, config)
    train(cached.model, cached.step_loss, cached.schedule, cached.train_cfg, params=cached.params, progress=False)

    plain = build(make_tiny_model(layers=2), tokenizer, "npo", FORGET, RETAIN, config)
    reference = copy.deepcopy(make_tiny_model(layers=2)).eval()

    def recompute(m, batch):
        nll, _ = sequence_nll(m, batch["forget"])
        with torch.no_grad():
            ref, _ = sequence_nll(reference, batch["forget"])
        return npo_forget_loss(nll, ref, 0.1) + mean_token_nll(m, batch["retain"]), {}

    train(plain.model, recompute, plain.schedule, plain.train_cfg, params=plain.params, progress=False)
    moved = 0.0
    for (name, a), b, c in zip(cached.model.named_parameters(), plain.model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, float((a - c).abs().max()))
    assert moved > 1e-4  # training did change the weights
