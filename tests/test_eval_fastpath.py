"""The one-forward, length-sorted, head-at-labels path equals a naive per-sample full-logits computation; the whole
TOFU evaluation equals the per-metric reference implementation; the guard hook sees what the contract says."""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from unlearnkit.data import tofu
from unlearnkit.data.format import PromptFormat, encode_prompt, encode_qa, prompt_text
from unlearnkit.errors import UserError
from unlearnkit.eval import evaluate_tofu
from unlearnkit.eval.generate import greedy_generate
from unlearnkit.eval.logprobs import sequence_stats
from unlearnkit.eval.reference import evaluate_tofu_reference

WORDS = "the of author novel born city wrote award mother father book series dark light river".split()


def _random_pairs(n, seed=0):
    r = np.random.default_rng(seed)
    mk = lambda k: " ".join(r.choice(WORDS, k))
    return [(mk(r.integers(3, 12)) + "?", mk(r.integers(1, 20)) + ".") for _ in range(n)]


@pytest.fixture(scope="module")
def small_task():
    t = tofu.task("mini")
    return dataclasses.replace(t, forget=t.forget[:5], retain_eval=t.retain_eval[:4], real_authors=t.real_authors[:4],
                               world_facts=t.world_facts[:4], holdout=t.holdout[:5])


def test_sequence_stats_equal_naive(tiny_model, tokenizer):
    pairs = _random_pairs(9)
    exs = [encode_qa(tokenizer, q, a) for q, a in pairs]
    want = [i % 2 == 0 for i in range(9)]
    fast = sequence_stats(tiny_model, exs, batch_size=4, pad_id=tokenizer.pad_token_id, want_dist=want)
    for ex, st, w in zip(exs, fast, want):
        ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            logits = tiny_model(ids).logits[0].double()  # unbatched, no padding, full logits
        lsm = torch.log_softmax(logits, -1)
        pos = [t for t in range(1, len(ex["labels"])) if ex["labels"][t] != -100]
        lab = [ex["labels"][t] for t in pos]
        np.testing.assert_allclose(st.logp, [lsm[t - 1, y].item() for t, y in zip(pos, lab)], atol=2e-5)
        assert list(st.match) == [int(logits[t - 1].argmax()) == y for t, y in zip(pos, lab)]
        if w:
            p = lsm.exp()
            mu = [(p[t - 1] * lsm[t - 1]).sum().item() for t in pos]
            var = [(p[t - 1] * (lsm[t - 1] - m) ** 2).sum().item() for t, m in zip(pos, mu)]
            np.testing.assert_allclose(st.mu, mu, atol=2e-5)
            np.testing.assert_allclose(st.var, var, rtol=1e-4, atol=1e-6)
        else:
            assert st.mu is None


def test_batched_generation_equals_one_at_a_time(tiny_model, tokenizer):
    qs = [q for q, _ in _random_pairs(5, seed=1)]
    ids = [encode_prompt(tokenizer, q) for q in qs]
    batched = greedy_generate(tiny_model, tokenizer, ids, max_new_tokens=6, batch_size=5)
    single = [greedy_generate(tiny_model, tokenizer, [x], max_new_tokens=6, batch_size=1)[0] for x in ids]
    assert batched == single
    assert all(batched)


def test_pruned_decoding_equals_hf_generate(make_tiny_model, tokenizer):
    """Our decoder drops finished rows from batch and KV cache; the text must equal HF generate's, row by row."""
    model = make_tiny_model(seed=5)
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # make EOS likely so rows finish at different steps
        model.lm_head.weight[eos] += 3.0 * model.lm_head.weight.norm(dim=1).mean() * torch.randn_like(
            model.lm_head.weight[eos]).sign() / model.lm_head.weight.shape[1] ** 0.5
    ids = [encode_prompt(tokenizer, q) for q, _ in _random_pairs(12, seed=3)]
    pruned = greedy_generate(model, tokenizer, ids, max_new_tokens=24, batch_size=6)
    hf = greedy_generate(model, tokenizer, ids, max_new_tokens=24, batch_size=6, engine="hf")
    assert pruned == hf
    lengths = [len(tokenizer(t)["input_ids"]) for t in pruned]
    assert min(lengths) < 12 and max(lengths) >= 24  # rows really stop at EOS, at different steps
    for bs in (4, 5):  # batches that admit waiting prompts mid-flight (KV histories of different lengths joined)
        shapes = []
        hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[:2])))
        assert greedy_generate(model, tokenizer, ids, max_new_tokens=24, batch_size=bs) == hf
        hook.remove()
        assert shapes[0] == (1, 3)  # the prompts' common prefix (<|im_start|>user\n), prefilled once
        prefill_rows = [b for b, t in shapes[1:] if t > 1]
        assert any(b_step > prev for (prev, _), (b_step, t) in zip(shapes, shapes[1:]) if t == 1), "no join"
        assert sum(prefill_rows) == len(ids)
    assert greedy_generate(model, tokenizer, ids, max_new_tokens=24, batch_size=4, engine="pruned") == hf
    stops = greedy_generate(model, tokenizer, ids, max_new_tokens=24, batch_size=6, stop_strings=["the"])
    assert stops == greedy_generate(model, tokenizer, ids, max_new_tokens=24, batch_size=6, stop_strings=["the"],
                                    engine="hf")


def test_stop_strings_cut_generation(tiny_model, tokenizer):
    ids = [encode_prompt(tokenizer, "the author?")]
    full = greedy_generate(tiny_model, tokenizer, ids, max_new_tokens=8)[0]
    stop = full.split()[2]
    cut = greedy_generate(tiny_model, tokenizer, ids, max_new_tokens=8, stop_strings=[stop])[0]
    assert cut == full[:full.index(stop)].strip()


def test_evaluate_tofu_equals_per_metric_reference(tiny_model, tokenizer, small_task):
    ev = evaluate_tofu(tiny_model, tokenizer, small_task, batch_size=3, max_new_tokens=5, progress=False)
    ref = evaluate_tofu_reference(tiny_model, tokenizer, small_task, batch_size=4, max_new_tokens=5)
    assert set(ref) == set(ev["sets"])
    for name, cols in ref.items():
        for field, values in cols.items():
            mine = ev["sets"][name][field]
            if field == "generated_text":
                assert mine == values, (name, field)
            else:
                np.testing.assert_allclose(np.asarray(mine, float), np.asarray(values, float), rtol=1e-4, atol=1e-5,
                                           err_msg=f"{name}.{field}")
    s = ev["summary"]
    forget = ev["sets"]["forget"]
    assert s["forget_prob"] == pytest.approx(np.mean(np.exp(-np.asarray(forget["avg_gt_loss"]))))
    assert s["forget_quality"] is None and "retain" in s["null_reasons"]["forget_quality"]
    assert 0 <= s["mia_auc_loss"] <= 1 and s["privleak"] is None
    assert len(forget["generated_text"]) == 5 and forget["question"][0] == small_task.forget[0]["question"]


class RecordingGuard:
    def __init__(self):
        self.calls = []

    def arm(self, input_ids, prompt_mask, prompts):
        self.calls.append((input_ids.clone(), prompt_mask.clone(), list(prompts)))
        return contextlib.nullcontext()


def test_guard_is_armed_with_prompt_mask_and_prompts(tiny_model, tokenizer, small_task):
    guard = RecordingGuard()
    task = dataclasses.replace(small_task, forget=small_task.forget[:2], retain_eval=small_task.retain_eval[:1],
                               real_authors=small_task.real_authors[:1], world_facts=small_task.world_facts[:1],
                               holdout=[])
    plain = evaluate_tofu(tiny_model, tokenizer, task, max_new_tokens=3, progress=False)
    guarded = evaluate_tofu(tiny_model, tokenizer, task, max_new_tokens=3, progress=False, guard=guard,
                            batch_size=16)
    # null guard; not bit for bit: unguarded rows take the shared prefix from its cache, guarded rows compute it
    np.testing.assert_allclose(guarded["sets"]["forget"]["avg_gt_loss"], plain["sets"]["forget"]["avg_gt_loss"],
                               rtol=1e-6)
    n_seqs = sum(len(rows) * (1 + (name in ("forget", "retain")) + len(rows[0]["perturbed_answer"]))
                 for name, rows in task.eval_sets().items())
    assert len(guard.calls) == -(-n_seqs // 16) + 1  # teacher-forced batches of 16, then one generation batch
    questions = {r["question"] for rows in task.eval_sets().values() for r in rows}
    for ids, mask, prompts in guard.calls:
        assert mask.dtype == torch.bool and mask.shape == ids.shape and len(prompts) == ids.shape[0]
        for row, prompt in enumerate(prompts):
            assert any(prompt == prompt_text(tokenizer, q) for q in questions)
            n_prompt = len(encode_prompt(tokenizer, next(q for q in questions if prompt_text(tokenizer, q) == prompt)))
            assert int(mask[row].sum()) == n_prompt  # exactly the prompt tokens, never answer or padding
            assert tokenizer.decode(ids[row][mask[row]]) == prompt


def test_reference_from_forget_and_holdout_only_gives_same_forget_quality(make_tiny_model, tokenizer, small_task):
    """The demo's cheap retain reference (forget + holdout sets, teacher-forced) yields the same forget quality and
    PrivLeak as the full reference; the sets it skips are null with a reason, never NaN."""
    retain = make_tiny_model(seed=7)
    full = evaluate_tofu(retain, tokenizer, small_task, max_new_tokens=3, progress=False)
    cheap = evaluate_tofu(retain, tokenizer, small_task, generate=False, only_sets=("forget", "holdout"),
                          progress=False)
    assert set(cheap["sets"]) == {"forget", "holdout"}
    assert cheap["summary"]["retain_prob"] is None and "retain" in cheap["summary"]["null_reasons"]["retain_prob"]
    model = make_tiny_model(seed=8)
    a = evaluate_tofu(model, tokenizer, small_task, max_new_tokens=3, retain_reference=full, progress=False)
    b = evaluate_tofu(model, tokenizer, small_task, max_new_tokens=3, retain_reference=cheap, progress=False)
    assert a["summary"]["forget_quality"] == b["summary"]["forget_quality"] is not None
    assert a["summary"]["privleak"] == b["summary"]["privleak"] is not None
    with pytest.raises(UserError, match="only_sets"):
        evaluate_tofu(model, tokenizer, small_task, only_sets=("nosuch",), progress=False)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_rows_equal_separate_rows(tiny_model, tokenizer, attn):
    """Several answers per question (TOFU's gt/para/perturbed layout), one question with a single answer, and a
    duplicate: the shared-prompt rows give the same statistics as one row per example, and as the naive path."""
    from unlearnkit.eval.logprobs import can_share_prompts

    tiny_model.set_attn_implementation(attn)
    assert can_share_prompts(tiny_model)
    r = np.random.default_rng(3)
    mk = lambda k: " ".join(r.choice(WORDS, k))
    questions = [mk(r.integers(3, 12)) + "?" for _ in range(5)]
    pairs = [(q, mk(r.integers(1, 20)) + ".") for q in questions for _ in range(r.integers(1, 6))]
    pairs.append(pairs[0])
    exs = [encode_qa(tokenizer, q, a) for q, a in pairs]
    want = [i % 3 == 0 for i in range(len(exs))]
    shared = sequence_stats(tiny_model, exs, batch_size=3, pad_id=tokenizer.pad_token_id, want_dist=want)
    separate = sequence_stats(tiny_model, exs, batch_size=3, pad_id=tokenizer.pad_token_id, want_dist=want,
                              share_prompts=False)
    for ex, a, b in zip(exs, shared, separate):
        np.testing.assert_allclose(a.logp, b.logp, atol=2e-5)
        assert list(a.match) == list(b.match)
        if a.mu is not None:
            np.testing.assert_allclose(a.mu, b.mu, atol=2e-5)
            np.testing.assert_allclose(a.var, b.var, rtol=1e-4, atol=1e-6)
        else:
            assert b.mu is None
        with torch.no_grad():
            lsm = torch.log_softmax(tiny_model(torch.tensor([ex["input_ids"]])).logits[0].double(), -1)
        pos = [t for t in range(1, len(ex["labels"])) if ex["labels"][t] != -100]
        np.testing.assert_allclose(a.logp, [lsm[t - 1, ex["labels"][t]].item() for t in pos], atol=2e-5)
    tiny_model.set_attn_implementation("sdpa")


def test_shared_prompt_rows_pack_each_prompt_once(tokenizer):
    from unlearnkit.eval.logprobs import pack_shared_prompts, shared_prompt_batch

    exs = [encode_qa(tokenizer, "who?", a) for a in ("red.", "blue green.", "a b c d.")]
    exs.append(encode_qa(tokenizer, "where?", "here."))
    rows = pack_shared_prompts(exs)
    assert [r.members for r in rows] == [[0, 1, 2], [3]]
    p = next(t for t, y in enumerate(exs[0]["labels"]) if y != -100)
    answers = sum(len(e["input_ids"]) - p for e in exs[:3])
    assert len(rows[0].input_ids) == p + answers
    batch = shared_prompt_batch(rows, tokenizer.pad_token_id, torch.float32)
    mask = batch["attention_mask"][0, 0] == 0
    seg = torch.tensor(rows[0].segment)
    second = (seg == 2).nonzero()[:, 0]
    assert mask[second[-1], :p].all() and mask[second[-1], second].all()       # sees prompt and itself
    assert not mask[second[-1], seg == 1].any()                                  # never the first answer
    assert batch["position_ids"][0, second[0]] == p                               # positions restart after prompt
    p3 = next(t for t, y in enumerate(exs[3]["labels"]) if y != -100)
    assert batch["prompt_mask"][0].sum() == p and batch["prompt_mask"][1].sum() == p3


def test_bench_eval_runs_and_compares_paths(tiny_model_dir, tmp_path):
    """`unlearnkit bench eval` on the tiny model: every path agrees; the figures are written."""
    import json

    from unlearnkit.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "eval", "--model", str(tiny_model_dir), "--n", "2", "--max-new-tokens", "4",
                 "--batch-size", "3", "--json", str(out)]) == 0
    fig = json.loads(out.read_text())
    assert fig["same_generations"] and fig["continuous_same_text"]
    assert fig["max_abs_diff_gt_loss"] < 1e-4 and fig["shared_prompt_max_abs_diff_logp"] < 1e-4
    for k in ("speedup", "shared_prompt_speedup", "continuous_speedup"):
        assert fig[k] > 0


def test_shared_prompt_rows_are_capped_for_corpora(tiny_model, tokenizer):
    """Corpus chunks share only their first token: rows stay within the token cap, statistics stay exact."""
    from unlearnkit.eval.logprobs import pack_shared_prompts

    g = torch.Generator().manual_seed(0)
    docs = [[7] + torch.randint(10, 300, (int(n),), generator=g).tolist() for n in torch.randint(20, 40, (10,), generator=g)]
    exs = [{"input_ids": d, "labels": [-100] + d[1:]} for d in docs]
    rows = pack_shared_prompts(exs, max_row_tokens=70)
    assert len(rows) > 1 and all(len(r.input_ids) <= 70 for r in rows)
    assert sorted(i for r in rows for i in r.members) == list(range(10))
    shared = sequence_stats(tiny_model, exs, batch_size=2, pad_id=tokenizer.pad_token_id)
    separate = sequence_stats(tiny_model, exs, batch_size=2, pad_id=tokenizer.pad_token_id, share_prompts=False)
    for a, b in zip(shared, separate):
        np.testing.assert_allclose(a.logp, b.logp, atol=2e-5)


SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _eos_prone(model, tokenizer):
    """Make EOS likely so rows finish at different steps (leaves and joins happen)."""
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[eos] += 3.0 * model.lm_head.weight.norm(dim=1).mean() * torch.randn_like(
            model.lm_head.weight[eos]).sign() / model.lm_head.weight.shape[1] ** 0.5
    return model


def test_grouped_kv_attention_is_bit_identical(make_tiny_model, tokenizer):
    """Inside grouped_kv_attention an sdpa model on CPU attends with torch's own grouped heads: the logits of a
    left-padded batch (prefill) and of a decode step equal transformers' repeat_kv path bit for bit."""
    from unlearnkit.eval.generate import grouped_kv_attention

    model = make_tiny_model(seed=2, kv_heads=2)
    prompts = [encode_prompt(tokenizer, q, PromptFormat("chat", SYSTEM)) for q, _ in _random_pairs(4, seed=4)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attn = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    attn[1, -3] = 0  # a hidden token inside a prompt (--compat open-unlearning)

    def forward():
        out = model(input_ids=ids, attention_mask=attn, use_cache=True)
        step = model(input_ids=out.logits[:, -1].argmax(-1)[:, None], past_key_values=out.past_key_values,
                     attention_mask=torch.cat([attn, attn.new_ones(len(prompts), 1)], 1))
        return out.logits, step.logits

    with torch.no_grad():
        plain = forward()
        with grouped_kv_attention(model):
            assert model.config._attn_implementation != "sdpa"
            grouped = forward()
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(a, b) for a, b in zip(plain, grouped))
    model.set_attn_implementation("eager")  # other implementations are left alone
    with grouped_kv_attention(model):
        assert model.config._attn_implementation == "eager"
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("compat", [False, True])
def test_decoding_with_system_prompt_equals_hf_generate(make_tiny_model, tokenizer, monkeypatch, compat):
    """Grouped-query model, the system prompt, rows leaving and joining, the KV buffer refilled every few steps
    (room 3): our text equals HF generate's; compat: the open-unlearning rendering with end-of-turn tokens hidden."""
    from unlearnkit.eval.conventions import OPEN_UNLEARNING
    from unlearnkit.eval.generate import _growing_layer_class

    monkeypatch.setattr(_growing_layer_class(), "room", 3)
    model = _eos_prone(make_tiny_model(seed=7, kv_heads=2), tokenizer)
    fmt = PromptFormat("chat", SYSTEM)
    qs = [q for q, _ in _random_pairs(10, seed=6)]
    encode = OPEN_UNLEARNING.encode_prompt if compat else encode_prompt
    ids = [encode(tokenizer, q, fmt) for q in qs]
    # the new token ids themselves are compared (decode → their numbers)
    kw = dict(hidden_token=tokenizer.pad_token_id if compat else None, decode=lambda x: " ".join(map(str, x)))
    hf = greedy_generate(model, tokenizer, ids, max_new_tokens=20, batch_size=5, engine="hf", **kw)
    lengths = [len(t.split()) for t in hf]
    assert min(lengths) < 10 and max(lengths) == 20  # rows stop at different steps
    for bs in (4, 5, 10):
        assert greedy_generate(model, tokenizer, ids, max_new_tokens=20, batch_size=bs, **kw) == hf, bs


def _prefix_examples(tokenizer, compat, seed=11):
    """Chat prompts with the system prompt (a long common prefix; under compat it holds a hidden <|im_end|>), one to
    five answers each, and one prompt that is exactly the common prefix + 1 token."""
    from unlearnkit.eval.conventions import OPEN_UNLEARNING, UNLEARNKIT

    conv = OPEN_UNLEARNING if compat else UNLEARNKIT
    fmt = PromptFormat("chat", SYSTEM)
    r = np.random.default_rng(seed)
    mk = lambda k: " ".join(r.choice(WORDS, k))
    exs = [conv.encode_qa(tokenizer, q, mk(r.integers(1, 12)) + ".", fmt)
           for q in (mk(r.integers(2, 10)) + "?" for _ in range(5)) for _ in range(r.integers(1, 6))]
    prompts = [e["input_ids"][:next(t for t, y in enumerate(e["labels"]) if y != -100)] for e in exs]
    common = next(k for k in range(min(map(len, prompts))) if len({p[k] for p in prompts}) > 1)
    answer = [int(t) for t in r.integers(300, 3000, 6)]
    short = prompts[0][:common] + [int(tokenizer.convert_tokens_to_ids("Ġthe"))]
    exs.append({"input_ids": short + answer, "labels": [-100] * len(short) + answer})
    return exs, common


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("compat", [False, True])
def test_shared_prefix_equals_full_rows(make_tiny_model, tokenizer, attn, compat):
    """The prefix all prompts share, computed once at batch 1 and handed to every batch as a KV cache, gives the
    statistics of rows that compute it themselves (and of the naive path): several batches, hidden <|im_end|> inside
    the prefix (compat), one prompt that is the prefix + 1 token. The prefix is really left out of the batches."""
    from unlearnkit.eval.logprobs import common_prefix_length

    model = make_tiny_model(seed=3, kv_heads=2)
    model.set_attn_implementation(attn)
    exs, common = _prefix_examples(tokenizer, compat)
    pad = tokenizer.pad_token_id
    hidden = pad if compat else None
    assert hidden is None or hidden in exs[0]["input_ids"][:common]
    p = common_prefix_length([e["input_ids"][:next(t for t, y in enumerate(e["labels"]) if y != -100)]
                              for e in exs])
    assert p == common > 10
    want = [i % 2 == 0 for i in range(len(exs))]
    kw = dict(batch_size=2, pad_id=pad, want_dist=want, hidden_token=hidden)

    def shapes(**extra):
        seen = []
        hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[:2])))
        stats = sequence_stats(model, exs, **kw, **extra)
        hook.remove()
        return stats, seen

    (shared, with_prefix), (full, without) = shapes(), shapes(share_prefix=False)
    assert with_prefix[0] == (1, p) and len(without) > 3  # the prefix once, then several batches
    assert with_prefix[1:] == [(b, t - p) for b, t in without]  # which start after it
    naive = sequence_stats(model, exs, share_prompts=False, **kw)
    for a, b, c in zip(shared, full, naive):
        np.testing.assert_allclose(a.logp, b.logp, atol=1e-5)
        assert list(a.match) == list(b.match) == list(c.match)
        np.testing.assert_allclose(a.logp, c.logp, atol=2e-5)
        if a.mu is not None:
            np.testing.assert_allclose(a.mu, b.mu, atol=1e-5)
            np.testing.assert_allclose(a.var, b.var, atol=1e-5)
        else:
            assert b.mu is None
    model.set_attn_implementation("sdpa")


def test_no_common_prefix_falls_back(tiny_model, tokenizer):
    """Prompts that differ at their first token (or share one token only, capped at the shortest prompt − 1) leave
    nothing to share: the result is the one without prefix, exactly."""
    from unlearnkit.eval.logprobs import common_prefix_length

    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(10, 3000, (int(n),), generator=g).tolist() for n in torch.randint(8, 20, (6,), generator=g)]
    exs = [{"input_ids": s, "labels": [-100] * 4 + s[4:]} for s in seqs]
    assert common_prefix_length([s[:4] for s in seqs]) == 0
    one = [{"input_ids": [7] + s, "labels": [-100] + s} for s in seqs]  # a shared first token is a whole prompt
    assert common_prefix_length([[7]] * 3) == 0 and common_prefix_length([[7, 8, 9], [7, 8]]) == 1
    for batch in (exs, one):
        a = sequence_stats(tiny_model, batch, batch_size=2, pad_id=tokenizer.pad_token_id)
        b = sequence_stats(tiny_model, batch, batch_size=2, pad_id=tokenizer.pad_token_id, share_prefix=False)
        assert all(np.array_equal(x.logp, y.logp) and np.array_equal(x.match, y.match) for x, y in zip(a, b))


@pytest.mark.parametrize("compat", [False, True])
def test_decoding_with_shared_prefix_equals_hf_generate(make_tiny_model, tokenizer, compat):
    """Continuous and pruned decoding that prefill the common prefix once and then only each prompt's rest (left
    padded after the prefix's KV, rows leaving and joining): the new token ids equal HF generate's on whole prompts,
    with the hidden <|im_end|> inside the prefix (compat) and a prompt that is the prefix + 1 token."""
    from unlearnkit.eval.conventions import OPEN_UNLEARNING
    from unlearnkit.eval.logprobs import common_prefix_length

    model = _eos_prone(make_tiny_model(seed=7, kv_heads=2), tokenizer)
    fmt = PromptFormat("chat", SYSTEM)
    encode = OPEN_UNLEARNING.encode_prompt if compat else encode_prompt
    ids = [encode(tokenizer, q, fmt) for q, _ in _random_pairs(9, seed=6)]
    common = next(k for k in range(min(map(len, ids))) if len({p[k] for p in ids}) > 1)
    ids.append(ids[0][:common] + [int(tokenizer.convert_tokens_to_ids("Ġthe"))])
    p = common_prefix_length(ids)
    assert p == common > 10
    kw = dict(hidden_token=tokenizer.pad_token_id if compat else None, decode=lambda x: " ".join(map(str, x)),
              max_new_tokens=20)
    hf = greedy_generate(model, tokenizer, ids, batch_size=5, engine="hf", **kw)
    lengths = [len(t.split()) for t in hf]
    assert min(lengths) < 10 and max(lengths) == 20  # rows stop at different steps
    for engine, bs in (("continuous", 3), ("continuous", 4), ("pruned", 4), ("continuous", 10)):
        shapes = []
        hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[:2])))
        assert greedy_generate(model, tokenizer, ids, batch_size=bs, engine=engine, **kw) == hf, (engine, bs)
        hook.remove()
        assert shapes[0] == (1, p)  # the prefix, once
        prefills = [(b, t) for b, t in shapes[1:] if t > 1]
        assert sum(b for b, _ in prefills) == len(ids)
        assert max(t for _, t in prefills) == max(map(len, ids)) - p  # only the rest of each prompt
        if engine == "continuous" and bs < 10:
            assert any(b_step > prev for (prev, _), (b_step, t) in zip(shapes[1:], shapes[2:]) if t == 1), "no join"
    assert greedy_generate(model, tokenizer, ids, batch_size=4, share_prefix=False, **kw) == hf


def test_guard_sees_whole_prompts_not_the_shared_prefix(tiny_model, tokenizer):
    """With a guard (it corrupts the prompt's embeddings and must see all of it) neither generation nor teacher
    forcing takes the prefix out: every armed row holds a whole prompt."""
    fmt = PromptFormat("chat", SYSTEM)
    qs = [q for q, _ in _random_pairs(5, seed=2)]
    ids = [encode_prompt(tokenizer, q, fmt) for q in qs]
    guard = RecordingGuard()
    greedy_generate(tiny_model, tokenizer, ids, max_new_tokens=3, batch_size=2, guard=guard, prompts=qs)
    seen = [row[mask].tolist() for x, mask, _ in guard.calls for row, mask in zip(x, mask)]
    assert sorted(seen) == sorted(ids)
    guard = RecordingGuard()
    exs = [encode_qa(tokenizer, q, a, fmt) for q, a in _random_pairs(5, seed=2)]
    plain = sequence_stats(tiny_model, exs, batch_size=2, pad_id=tokenizer.pad_token_id)
    guarded = sequence_stats(tiny_model, exs, batch_size=2, pad_id=tokenizer.pad_token_id, guard=guard, prompts=qs)
    seen = [row[mask].tolist() for x, mask, _ in guard.calls for row, mask in zip(x, mask)]
    assert sorted(seen) == sorted(ids)
    for a, b in zip(plain, guarded):
        np.testing.assert_allclose(a.logp, b.logp, atol=1e-5)


def test_generation_batch_size_from_memory_budget(make_tiny_model):
    """The decoding batch: the KV cache at full length plus prefill activations per row, written out by hand for
    a grouped-query config, under the budget; never above the number of prompts nor below 1."""
    from unlearnkit.eval.generate import _ROOM, FALLBACK_GEN_BATCH, generation_batch_size, row_bytes

    config = make_tiny_model(layers=3, hidden=32, kv_heads=2).config  # 4 heads of 8 dims, 2 KV heads, MLP 64
    prompt, new = 40, 200
    kv = 2 * 3 * 2 * 8 * 4 * (prompt + new + _ROOM)  # K and V, layers, KV heads, head dim, fp32, positions
    act = 4 * (prompt * (6 * 32 + 3 * 64 + 4 * prompt) + 2 * config.vocab_size)
    assert row_bytes(config, prompt, new) == kv + act
    gib = 10 * (kv + act) / 2**30
    assert generation_batch_size(config, [12, prompt, 30] * 10, new, memory_gb=gib) == 10  # the longest counts
    assert generation_batch_size(config, [prompt] * 4, new, memory_gb=gib) == 4
    assert generation_batch_size(config, [prompt] * 30, new, memory_gb=gib * 0.99) == 9
    assert generation_batch_size(config, [prompt] * 30, new, memory_gb=1e-9) == 1
    assert generation_batch_size(config, [prompt] * 30, new, memory_gb=2 * gib, dtype_bytes=2) > 20
    assert generation_batch_size(object(), [prompt] * 100, new) == FALLBACK_GEN_BATCH


def test_tokenisation_is_reused_across_evaluations(make_tiny_model, tokenizer, small_task, monkeypatch):
    """A second evaluation of the same rows with the same tokenizer, format and conventions reuses the first one's
    tokenisation; another format or other rows do not; the numbers are those of a fresh tokenisation."""
    import unlearnkit.eval.tofu as T

    calls = []
    real = T._encode_now
    monkeypatch.setattr(T, "_encode_now", lambda *a: calls.append(a[1:4]) or real(*a))
    monkeypatch.setattr(T, "_ENCODED", [])
    a, b = make_tiny_model(seed=1), make_tiny_model(seed=2)
    kw = dict(generate=False, progress=False, only_sets=("forget", "holdout"))
    first = evaluate_tofu(a, tokenizer, small_task, **kw)
    evaluate_tofu(b, tokenizer, small_task, **kw)
    assert len(calls) == 1
    evaluate_tofu(b, tokenizer, small_task, fmt=PromptFormat("chat", SYSTEM), **kw)
    evaluate_tofu(b, tokenizer, dataclasses.replace(small_task, forget=small_task.forget[:2]), **kw)
    assert len(calls) == 3
    again = evaluate_tofu(a, tokenizer, small_task, **kw)
    assert len(calls) == 3 and again["sets"] == first["sets"]
    monkeypatch.setattr(T, "_ENCODED", [])
    assert evaluate_tofu(a, tokenizer, small_task, **kw)["sets"] == first["sets"] and len(calls) == 4
