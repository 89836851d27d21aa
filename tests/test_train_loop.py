"""Training loop and the answer-NLL fast path."""
import pytest
import torch
import torch.nn.functional as F

from unlearnkit.data import tofu
from unlearnkit.data.batching import collate, encode_items
from unlearnkit.data.format import IGNORE
from unlearnkit.train.finetune import finetune
from unlearnkit.train.loop import NonFiniteLoss, TrainConfig, train
from unlearnkit.train.nll import mean_token_nll, sequence_nll


def _batch(tokenizer, n=4):
    return collate(encode_items(tokenizer, tofu.load("forget01")[:n]), tokenizer.pad_token_id)


def test_sequence_nll_matches_naive_definition(tiny_model, tokenizer):
    b = _batch(tokenizer)
    nll_sum, n_tok = sequence_nll(tiny_model, b)
    logits = tiny_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    for row in range(b["input_ids"].shape[0]):
        total, count = 0.0, 0
        for t in range(1, b["input_ids"].shape[1]):
            if b["labels"][row, t] != IGNORE:
                total -= torch.log_softmax(logits[row, t - 1].double(), -1)[b["labels"][row, t]].item()
                count += 1
        assert n_tok[row].item() == count
        assert nll_sum[row].item() == pytest.approx(total, rel=1e-5)
    # token-mean CE equals HF's own loss on the same labels
    hf = tiny_model(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    torch.testing.assert_close(mean_token_nll(tiny_model, b), hf, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean_token_nll(tiny_model, b, full_logits=True), hf, rtol=1e-5, atol=1e-6)


def test_fast_path_gradients_match_full_logits(make_tiny_model, tokenizer):
    b = _batch(tokenizer)
    grads = []
    for full in (False, True):
        m = make_tiny_model(seed=1)
        mean_token_nll(m, b, full_logits=full).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_finetune_learns(make_tiny_model, tokenizer):
    m = make_tiny_model(layers=2, hidden=64)
    items = tofu.load("forget01")[:4]
    log = finetune(m, tokenizer, items, TrainConfig(lr=1e-2, epochs=30, batch_size=4, warmup_ratio=0.0,
                                                                   schedule="constant"),
                   progress=False)
    losses = [s["loss"] for s in log["steps"]]
    assert losses[-1] < 0.5 * losses[0]
    assert log["tokens_per_second"] > 0 and all("lr" in s and "grad_norm" in s for s in log["steps"])


def test_schedule_warmup_and_decay():
    from unlearnkit.train.loop import lr_lambda

    f = lr_lambda(TrainConfig(warmup_ratio=0.2, schedule="linear"), total_steps=10)
    values = [f(s) for s in range(10)]
    assert values[0] < values[1] <= 1.0 and values[-1] < values[3]
    assert max(values) == pytest.approx(1.0)


def test_grad_accumulation_equals_big_batch(make_tiny_model, tokenizer):
    exs = encode_items(tokenizer, tofu.load("forget01")[:4])
    exs = [{"input_ids": e["input_ids"][:20], "labels": e["labels"][:20]} for e in exs]  # equal lengths
    for e in exs:
        e["labels"][-5:] = e["input_ids"][-5:]
        e["labels"][:-5] = [IGNORE] * 15

    def loss(model, b):
        return mean_token_nll(model, b), {}

    results = []
    for bs, accum in ((4, 1), (2, 2)):
        m = make_tiny_model(seed=2)
        cfg = TrainConfig(lr=1e-2, max_steps=3, batch_size=bs, grad_accum=accum, warmup_ratio=0)
        train(m, loss, lambda e: [collate(exs[i:i + bs], 0) for i in range(0, 4, bs)], cfg, progress=False)
        results.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)


def test_kill_and_resume_equals_uninterrupted(make_tiny_model, tokenizer, tmp_path):
    items = tofu.load("forget01")[:6]
    cfg = TrainConfig(lr=1e-3, epochs=3, batch_size=2, checkpoint_every=1)
    ref = make_tiny_model(seed=3)
    finetune(ref, tokenizer, items, cfg, out_dir=tmp_path / "ref", progress=False)
    run = make_tiny_model(seed=3)
    log = finetune(run, tokenizer, items, cfg, out_dir=tmp_path / "run", progress=False, stop_after_steps=4)
    assert log["interrupted_at"] == 4 and (tmp_path / "run" / "checkpoint" / "state.pt").is_file()
    resumed = make_tiny_model(seed=3)  # a fresh process starts from the base weights again
    log = finetune(resumed, tokenizer, items, cfg, out_dir=tmp_path / "run", progress=False)
    assert [s["step"] for s in log["steps"]] == list(range(1, 10))
    for (name, a), b in zip(ref.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_non_finite_loss_stops_and_keeps_checkpoint(make_tiny_model, tokenizer, tmp_path):
    m = make_tiny_model()
    b = _batch(tokenizer, 2)
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        value = mean_token_nll(model, batch)
        return (value * float("nan") if calls["n"] == 3 else value), {}

    cfg = TrainConfig(max_steps=5, checkpoint_every=1)
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 3.*checkpoint"):
        train(m, loss, lambda e: [b], cfg, out_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 2


def test_bad_config_is_user_error():
    from unlearnkit.errors import UserError

    with pytest.raises(UserError, match="--lr"):
        TrainConfig(lr=0)
    with pytest.raises(UserError, match="--schedule"):
        TrainConfig(schedule="exp")


def test_answer_nll_on_a_model_without_a_separate_decoder():
    """GPT-2's get_decoder() returns the whole model: the full-logits path is taken, with the same values."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from unlearnkit.train.nll import backbone_and_head, sequence_nll

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    assert backbone_and_head(model) == (None, None)
    ids = torch.randint(0, 20, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.where(torch.arange(6) < 2, torch.tensor(-100), ids)}
    nll, n = sequence_nll(model, batch)
    logp = torch.log_softmax(model(ids).logits, -1)
    direct = -sum(logp[0, t - 1, ids[0, t]] for t in range(2, 6))
    assert n.tolist() == [4.0, 4.0] and torch.allclose(nll[0], direct, atol=1e-5)
