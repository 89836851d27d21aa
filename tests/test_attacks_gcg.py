"""GCG: the prompt pieces reproduce the usual encoding; fast candidate losses (prefix KV cache, batches, head at
target rows) equal the naive full forward and a plain NLL written out here; the search is seeded, keeps its best,
respects the token filter and leaves the model as it found it; the bench runs on a tiny model."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import cli_error
from unlearnkit.attacks.gcg import (GCGConfig, GCGTarget, PreparedTarget, allowed_mask, allowed_token_ids,
                                    candidate_losses, gcg_step, gcg_targets, run_gcg, token_gradients)
from unlearnkit.data import tofu
from unlearnkit.data.format import IGNORE, PromptFormat, encode_prompt, encode_qa
from unlearnkit.errors import UserError

FORMATS = [PromptFormat(), PromptFormat("plain"), PromptFormat(system_prompt="You are terse.")]


@pytest.fixture(scope="module")
def pairs():
    return [(r["question"], r["answer"]) for r in tofu.task("mini").forget[:3]]


def _random_suffixes(tokenizer, n, length, seed=0):
    pool = torch.tensor(allowed_token_ids(tokenizer))
    return pool[torch.randint(len(pool), (n, length), generator=torch.Generator().manual_seed(seed))]


def _plain_nll(model, target: GCGTarget, suffix: list[int]) -> float:
    """Mean NLL of the target given before + suffix + after, from one full forward: the definition, written out."""
    prompt = target.before + suffix + target.after
    ids = torch.tensor([prompt + target.target])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return -sum(float(logp[len(prompt) + j - 1, tok]) for j, tok in enumerate(target.target)) / len(target.target)


@pytest.mark.parametrize("fmt", FORMATS, ids=["chat", "plain", "chat+system"])
def test_targets_reproduce_the_usual_encoding(tokenizer, pairs, fmt):
    for (q, a), t in zip(pairs, gcg_targets(tokenizer, pairs, fmt)):
        # Empty suffix: the prompt of "question " exactly, and the answer ids exactly as encode_qa labels them.
        assert t.before + t.after == encode_prompt(tokenizer, q + " ", fmt)
        assert t.example([]) == encode_qa(tokenizer, q + " ", a, fmt)
        assert t.target == [y for y in encode_qa(tokenizer, q, a, fmt)["labels"] if y != IGNORE]
        assert tokenizer.decode(t.before).endswith(q + " ")
    cut = gcg_targets(tokenizer, pairs[:1], fmt, target_tokens=3)[0]
    assert cut.target == gcg_targets(tokenizer, pairs[:1], fmt)[0].target[:3]


@pytest.mark.parametrize("fmt", FORMATS[:2], ids=["chat", "plain"])
def test_fast_candidate_losses_equal_naive_and_the_plain_nll(tiny_model, tokenizer, pairs, fmt):
    targets = gcg_targets(tokenizer, pairs[:2], fmt)
    cands = _random_suffixes(tokenizer, 7, 5)
    prepared = PreparedTarget(tiny_model, targets[0])
    naive = candidate_losses(tiny_model, targets[0], cands, fast=False)
    plain = torch.tensor([_plain_nll(tiny_model, targets[0], c.tolist()) for c in cands])
    torch.testing.assert_close(naive, plain, atol=1e-5, rtol=0)
    for batch_size in (1, 3, 5, 7, 32):  # 3 and 5 do not divide 7; the one prepared cache serves every call
        fast = candidate_losses(tiny_model, prepared, cands, fast=True, batch_size=batch_size)
        torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)
    # Universal: the mean over targets.
    both = candidate_losses(tiny_model, targets, cands, batch_size=3)
    naive_both = (naive + candidate_losses(tiny_model, targets[1], cands, fast=False)) / 2
    torch.testing.assert_close(both, naive_both, atol=1e-5, rtol=0)


def test_fast_gradient_equals_naive(tiny_model, tokenizer, pairs):
    targets = gcg_targets(tokenizer, pairs[:2])
    suffix = _random_suffixes(tokenizer, 1, 6)[0]
    fast = token_gradients(tiny_model, targets, suffix, fast=True)
    naive = token_gradients(tiny_model, targets, suffix, fast=False)
    assert fast.shape == (6, tiny_model.get_input_embeddings().weight.shape[0])
    torch.testing.assert_close(fast, naive, atol=1e-6, rtol=1e-4)


def _snapshot(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def test_run_gcg_keeps_its_best_is_seeded_and_leaves_the_model_alone(make_tiny_model, tokenizer, pairs):
    model = make_tiny_model()
    model.lm_head.weight.requires_grad_(False)  # a mix of flags, which must survive as they are
    model.train()
    before = _snapshot(model)
    targets = gcg_targets(tokenizer, pairs[:1])
    cfg = GCGConfig(suffix_len=4, top_k=16, candidates=12, steps=4, batch_size=5, seed=3)
    res = run_gcg(model, targets, cfg, tokenizer=tokenizer)

    assert len(res.history) == len(res.step_losses) == 4
    assert all(b <= a for a, b in zip([res.initial_loss] + res.history, res.history))  # best so far never rises
    assert res.loss == res.history[-1] < res.initial_loss
    assert min(res.step_losses) == res.loss
    assert len(res.suffix_ids) == 4 and set(res.suffix_ids) <= set(allowed_token_ids(tokenizer))
    assert res.suffix_text == tokenizer.decode(res.suffix_ids) and res.config["seed"] == 3
    # The reported loss is the suffix's loss, by the definition.
    assert res.loss == pytest.approx(_plain_nll(model, targets[0], res.suffix_ids), abs=1e-5)
    assert res.prompt_ids() == targets[0].before + res.suffix_ids + targets[0].after
    assert res.example()["labels"][-len(targets[0].target):] == targets[0].target

    assert model.training
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name][0]) and p.requires_grad == before[name][1] and p.grad is None, name

    again = run_gcg(model, targets, cfg, tokenizer=tokenizer)
    assert again.suffix_ids == res.suffix_ids and again.history == res.history
    other = run_gcg(model, targets, GCGConfig(**{**res.config, "seed": 4}), tokenizer=tokenizer)
    assert other.suffix_ids != res.suffix_ids


def test_universal_suffix_over_two_targets(tiny_model, tokenizer, pairs):
    targets = gcg_targets(tokenizer, pairs[:2], target_tokens=8)
    res = run_gcg(tiny_model, targets, GCGConfig(suffix_len=3, top_k=8, candidates=8, steps=2, init="random"),
                  tokenizer=tokenizer)
    assert all(len(t.target) == 8 for t in res.targets)
    per_target = [_plain_nll(tiny_model, t, res.suffix_ids) for t in targets]
    assert res.loss == pytest.approx(sum(per_target) / 2, abs=1e-5)
    assert res.loss <= res.initial_loss
    assert res.prompt_ids(1) == targets[1].before + res.suffix_ids + targets[1].after


def test_candidates_change_one_allowed_token_and_retokenize_filters(tiny_model, tokenizer, pairs):
    target = gcg_targets(tokenizer, pairs[:1])[0]
    allowed = allowed_mask(tiny_model, tokenizer)
    suffix = torch.tensor(tokenizer(" the quick brown fox jumps", add_special_tokens=False)["input_ids"])
    cfg = GCGConfig(suffix_len=len(suffix), top_k=32, candidates=24)
    cands, losses = gcg_step(tiny_model, target, suffix, allowed, cfg, torch.Generator().manual_seed(0))
    assert cands.shape == (24, len(suffix)) and losses.shape == (24,)
    assert ((cands != suffix).sum(1) == 1).all() and allowed[cands].all()
    strict = GCGConfig(**{**cfg.__dict__, "retokenize": True})
    kept, _ = gcg_step(tiny_model, target, suffix, allowed, strict, torch.Generator().manual_seed(0),
                       tokenizer=tokenizer)
    assert 0 < len(kept) <= 24
    for c in kept.tolist():
        assert tokenizer(tokenizer.decode(c), add_special_tokens=False)["input_ids"] == c


def test_allowed_tokens_are_printable_ascii_and_not_special(tokenizer):
    ids = allowed_token_ids(tokenizer)
    assert not set(ids) & set(tokenizer.all_special_ids) and 3 not in ids  # <repo_name>: an added special token
    assert all(tokenizer.decode([i]).isascii() and tokenizer.decode([i]).isprintable() for i in ids[::97])
    assert tokenizer("!", add_special_tokens=False)["input_ids"][0] in ids


@pytest.mark.parametrize("field, value", [("suffix_len", 0), ("top_k", -1), ("candidates", 1.5), ("steps", -1),
                                          ("batch_size", True), ("seed", "0"), ("target_tokens", 0), ("init", ""),
                                          ("retokenize", "yes")])
def test_bad_config_is_a_one_line_user_error(field, value):
    with pytest.raises(UserError, match=f"GCGConfig.{field}") as e:
        GCGConfig(**{field: value})
    assert "\n" not in str(e.value) and repr(value) in str(e.value)


def test_init_must_be_one_allowed_token(tiny_model, tokenizer, pairs):
    with pytest.raises(UserError, match="GCGConfig.init"):
        run_gcg(tiny_model, gcg_targets(tokenizer, pairs[:1]), GCGConfig(init="<|im_end|>", steps=0),
                tokenizer=tokenizer)


def test_bench_help_and_bad_option(capsys, no_model_load):
    from unlearnkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "gcg", "--help"])
    assert e.value.code == 0 and "--candidates" in capsys.readouterr().out
    assert "--candidates" in cli_error(["bench", "gcg", "--candidates", "0", "--device", "cpu"], capsys)


def test_bench_gcg_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    from unlearnkit.cli import main

    out = tmp_path / "gcg.json"
    assert main(["bench", "gcg", "--model", str(tiny_model_dir), "--candidates", "6", "--suffix-len", "3",
                 "--top-k", "8", "--batch-size", "4", "--rounds", "1", "--device", "cpu", "--json", str(out)]) == 0
    fig = json.loads(out.read_text())
    assert fig["bench"] == "gcg" and fig["candidates"] == 6 and fig["suffix_len"] == 3
    assert fig["speedup"] > 0 and fig["max_loss_difference"] < 1e-5
    assert "speedup" in capsys.readouterr().out
