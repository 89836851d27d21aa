"""`unlearnkit bench generate` on the tiny model: every figure is there and consistent, the on/off paths agree, bad
options fail before any model loads; the switches it times with really change the code path."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import cli_error
from unlearnkit.cli import main

FLOATS = ("hf_seconds", "ours_seconds", "speedup", "step_ms_stock", "step_ms_gqa", "step_ms_gqa_buffer",
          "gqa_step_speedup", "buffer_step_speedup", "step_speedup", "batch_scaling")
OTHERS = ("split", "n", "max_new_tokens", "device", "threads", "hf_batch_size", "ours_batch_size", "same_text",
          "generated_tokens", "context_tokens", "step_batch", "steps", "repeats", "step_max_abs_diff",
          "batch_sizes", "ms_per_token_row")


def test_bench_generate_tiny(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "generate", "--model", str(tiny_model_dir), "--device", "cpu", "--n", "3",
                 "--max-new-tokens", "4", "--batch-size", "2", "--step-batch", "2", "--batch-sizes", "1,2",
                 "--repeats", "1", "--json", str(path)]) == 0
    fig = json.loads(path.read_text())
    assert fig["bench"] == "generate" and set(fig) >= {*FLOATS, *OTHERS}
    for k in FLOATS:
        assert isinstance(fig[k], float) and fig[k] > 0, k
    assert fig["speedup"] == pytest.approx(fig["hf_seconds"] / fig["ours_seconds"])
    assert fig["gqa_step_speedup"] == pytest.approx(fig["step_ms_stock"] / fig["step_ms_gqa"])
    assert fig["buffer_step_speedup"] == pytest.approx(fig["step_ms_gqa"] / fig["step_ms_gqa_buffer"])
    assert fig["same_text"] is True and fig["generated_tokens"] > 0
    assert 0 <= fig["step_max_abs_diff"] < 1e-5
    assert fig["hf_batch_size"] == 2 and fig["n"] == 3 and fig["batch_sizes"] == [1, 2]
    cost = fig["ms_per_token_row"]
    assert set(cost) == {"1", "2"} and all(isinstance(v, float) and v > 0 for v in cost.values())
    assert fig["batch_scaling"] == pytest.approx(cost["1"] / cost["2"])
    assert "speedup" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["--n", "0"], "--n 0"),
    (["--batch-sizes", "0"], "--batch-sizes '0'"),
    (["--batch-sizes", "x"], "--batch-sizes 'x'"),
    (["--batch-sizes", "16,,32"], "--batch-sizes"),
    (["--step-batch", "0"], "--step-batch"),
    (["--repeats", "0"], "--repeats"),
    (["--gen-batch-size", "0"], "--gen-batch-size"),
    (["--n", "1000"], "forget questions"),
])
def test_bench_generate_options_checked_first(tiny_model_dir, no_model_load, capsys, extra, needle):
    err = cli_error(["bench", "generate", "--model", str(tiny_model_dir), *extra], capsys)
    assert needle in err


def test_off_switches_take_the_stock_code_path(make_tiny_model, monkeypatch):
    """grouped_kv_attention(enabled=False) leaves transformers' sdpa, which copies KV heads (repeat_kv), and
    enabled=True never copies them; without add_kv_buffer a cache appends by concatenation (storage exactly the
    history), with it the history lives in a buffer with room; logits agree throughout."""
    import transformers.integrations.sdpa_attention as sdpa

    from unlearnkit.eval.generate import GROUPED_KV_ATTENTION, add_kv_buffer, grouped_kv_attention

    model = make_tiny_model(seed=3, kv_heads=2)  # 4 query heads on 2 KV heads
    copies = []
    real = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda x, n: copies.append(n) or real(x, n))
    ids = torch.randint(5, 300, (2, 7))
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # left padding: transformers' sdpa then takes the repeat_kv path on CPU

    def run(grouped, buffer):
        copies.clear()
        with torch.no_grad(), grouped_kv_attention(model, enabled=grouped):
            implementation = model.config._attn_implementation
            out = model(input_ids=ids, attention_mask=attn, use_cache=True)
            cache = out.past_key_values
            if buffer:
                add_kv_buffer(cache)
            step = model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True,
                         attention_mask=torch.cat([attn, attn.new_ones(2, 1)], 1))
        keys = step.past_key_values.layers[0].keys
        room = keys.untyped_storage().nbytes() // keys.element_size() - keys.numel()
        return implementation, list(copies), room, step.logits

    stock = run(False, False)
    assert stock[0] == "sdpa" and stock[1] and set(stock[1]) == {2} and stock[2] == 0
    grouped = run(True, False)
    assert grouped[0] == GROUPED_KV_ATTENTION and grouped[1] == [] and grouped[2] == 0
    buffered = run(True, True)
    assert buffered[1] == [] and buffered[2] > 0  # the keys are a view into a buffer with spare positions
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(stock[3], grouped[3]) and torch.equal(grouped[3], buffered[3])
