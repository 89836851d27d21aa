"""`unlearnkit plan` (plan.py): parameter counts against real models, persistent bytes against the tensors a
training step really holds on the CPU, activation elements against the tensors autograd saves."""
from __future__ import annotations

import json

import pytest
import torch

from unlearnkit.data import tofu
from unlearnkit.errors import UserError
from unlearnkit.plan import PRESETS, activation_elements, load_shape, param_counts, plan, shape_from_config

FORGET = tofu.load("forget01")[:4]
RETAIN = tofu.load("full")[:4]


def shape_of(model):
    return shape_from_config(model.config.to_dict())


def numel(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_real_models(make_tiny_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    from unlearnkit.models import default_model_dir

    tiny = make_tiny_model(layers=3)
    assert param_counts(shape_of(tiny))["total"] == numel(tiny)
    # the default model (tied embeddings, grouped-query attention) and Llama-2-7b, built on the meta device
    config = AutoConfig.from_pretrained(default_model_dir())
    with torch.device("meta"):
        smol = AutoModelForCausalLM.from_config(config)
    assert param_counts(shape_from_config(config.to_dict()))["total"] == numel(smol)
    assert param_counts(PRESETS["smollm2-135m"])["total"] == numel(smol)
    assert param_counts(PRESETS["llama-2-7b"])["total"] == 6_738_415_616  # the published count


def _step_state_bytes(run) -> dict:
    """Bytes of parameters, gradients and AdamW state after one real optimizer step (fp32, CPU)."""
    from unlearnkit.train.loop import make_optimizer

    batch = run.schedule(0)[0]
    loss, _ = run.step_loss(run.model, batch)
    loss.backward()
    opt = make_optimizer(run.params, run.train_cfg)
    opt.step()
    moments = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    return {"params": sum(p.nbytes for p in run.model.parameters()),
            "grads": sum(p.grad.nbytes for p in run.model.parameters() if p.grad is not None),
            "optimizer": sum(t.nbytes for t in moments)}


@pytest.mark.parametrize("method, config", [("npo", {}), ("simnpo", {"lora_r": 4}), ("rmu", {"layer": 3})])
def test_persistent_bytes_match_a_real_step(make_tiny_model, tokenizer, method, config):
    from unlearnkit.unlearning import build

    model = make_tiny_model(layers=5)
    s = shape_of(model)
    run = build(model, tokenizer, method, FORGET, RETAIN, {"batch_size": 2, **config})
    measured = _step_state_bytes(run)
    p = plan(s, method, 1, lora_r=config.get("lora_r", 0), rmu_layer=config.get("layer", 7), precision="fp32")
    assert p["trained_parameters"] == sum(q.numel() for q in run.params)
    copies = 3 * param_counts(s)["per_layer"] * 4 if method == "rmu" else 0  # RMU's frozen layer copies
    assert sum(measured.values()) == p["persistent_bytes_per_gpu"] - copies
    assert p["bytes_per_parameter"] * p["parameters"] == pytest.approx(p["persistent_bytes_per_gpu"])
    # FSDP divides the persistent state; offload moves it to the host
    assert plan(s, method, 8, lora_r=config.get("lora_r", 0), rmu_layer=config.get("layer", 7),
                precision="fp32")["persistent_bytes_per_gpu"] * 8 == p["persistent_bytes_per_gpu"]


def _saved_elements_per_token(model, tokens: int, batch: int = 2) -> float:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    ids = torch.randint(0, model.config.vocab_size, (batch, tokens))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids).last_hidden_state.sum()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in storages.items() if k not in params) / (batch * tokens)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_elements_match_saved_tensors(checkpointing):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    for hidden, inter, heads, kv in ((48, 128, 4, 2), (64, 96, 8, 8)):
        config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=3,
                             num_attention_heads=heads, num_key_value_heads=kv)
        model = LlamaForCausalLM(config)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        measured = _saved_elements_per_token(model, 32)
        estimate = activation_elements(shape_from_config(config.to_dict()), 3, checkpointing)
        assert abs(estimate - measured) <= 0.03 * measured, (hidden, inter, estimate, measured)


def test_plan_cli_and_errors(tmp_path, capsys):
    from unlearnkit.cli import main

    out = tmp_path / "p.json"
    assert main(["plan", "--model", "llama-2-7b", "--method", "npo", "--gpus", "8", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Llama-2-7b: 6.738 B parameters" in text and "| npo | 8 | yes | no | 16.0 |" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["gpus"] for r in rows] == [8, 8, 8] and rows[0]["bytes_per_parameter"] == 16.0
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    for args, message in ((["--model", str(tmp_path)], "not a Llama-style config"),
                          (["--model", "nowhere/x.json"], "no such config"),
                          (["--method", "dpo"], "unknown method 'dpo'"),
                          (["--method", "rmu", "--layer", "40"], "out of range")):
        assert main(["plan", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert load_shape(None) is PRESETS["smollm2-135m"]
    with pytest.raises(UserError):
        plan(PRESETS["llama-2-7b"], "rmu", 1, lora_r=4)
