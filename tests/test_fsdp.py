"""Sharded training (FSDP2, train/sharding.py) on CPU with gloo: one `torchrun --nproc_per_node 2` launch
(tests/fsdp_worker.py) runs every sharded run; each is compared with one unsharded process taking the same global
batch (grad_accum 2), to fp32 tolerance. Also: kill/resume under FSDP, resume of a 2-rank sharded checkpoint in one
process, the sharded frozen copies (RMU's layers, the KL reference) and LoRA + activation checkpointing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unlearnkit.errors import UserError
from unlearnkit.unlearning import unlearn

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_worker  # noqa: E402

SRC = str(Path(__file__).parent.parent / "src")


def weights(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


@pytest.fixture(scope="module")
def launch(tiny_model_dir, tmp_path_factory):
    """Starts the 2-process launch (the single-process runs are computed meanwhile); returns its output folder
    once it has finished."""
    out = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             str(Path(fsdp_worker.__file__)), str(tiny_model_dir), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def finished():
        try:
            _, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == 0, err[-4000:]
        return out

    yield finished
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def fsdp_runs(launch, single_runs):
    return launch()


def one_process(model_dir, method, config, **kw):
    from unlearnkit.models import load_model

    model, tok = load_model(str(model_dir), device="cpu")
    config = {**fsdp_worker.BASE, **config, "fsdp": False, "offload": False, "grad_accum": 2}
    return unlearn(model, tok, method, fsdp_worker.FORGET, fsdp_worker.RETAIN, config, progress=False, **kw)


def assert_same(sharded: dict, single: dict):
    assert set(sharded) == set(single)
    for n, value in single.items():
        torch.testing.assert_close(sharded[n], value, rtol=1e-5, atol=1e-6, msg=n)


@pytest.fixture(scope="module")
def single_runs(launch, tiny_model_dir):
    """Each run of fsdp_worker.RUNS in one unsharded process with the same global batch: name -> (info, weights)."""
    out = {}
    for name, (method, config) in fsdp_worker.RUNS.items():
        info = one_process(tiny_model_dir, method, config)
        out[name] = (info, weights(info.pop("model")))
    return out


def test_two_sharded_processes_equal_one_process(fsdp_runs, single_runs, tiny_model_dir):
    from unlearnkit.models import load_model

    original = weights(load_model(str(tiny_model_dir), device="cpu", with_tokenizer=False))
    for name in fsdp_worker.RUNS:
        meta = json.loads((fsdp_runs / f"{name}.json").read_text())
        assert meta["world_size"] == 2 and meta["sharded"] is True, name
        single, ref = single_runs[name]
        assert single["sharded"] is False and meta["n_trained_parameters"] == single["n_trained_parameters"]
        assert any(not torch.equal(ref[n], original[n]) for n in ref), name  # the runs do change the model
        assert_same(torch.load(fsdp_runs / f"{name}.pt"), ref)


def test_kill_and_resume_under_fsdp_is_exact(fsdp_runs):
    resumed, uninterrupted = torch.load(fsdp_runs / "npo_resumed.pt"), torch.load(fsdp_runs / "npo.pt")
    for n, value in uninterrupted.items():
        assert torch.equal(resumed[n], value), n


def test_two_rank_checkpoint_resumes_in_one_process(fsdp_runs, single_runs, tiny_model_dir, tmp_path):
    import shutil

    from unlearnkit.models import load_model

    ckpt = fsdp_runs / "run-2to1" / "checkpoint"
    assert (ckpt / "state.pt").is_file() and [p.name for p in ckpt.glob("shards-*")] == ["shards-1"]
    # another global batch (1 process, grad_accum 1) is another run: refused, naming it, nothing changed
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp_runs / "run-2to1", run_dir)
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    with pytest.raises(UserError, match="micro_batches_per_step: 2 → 1"):
        unlearn(model, tok, "npo", fsdp_worker.FORGET, fsdp_worker.RETAIN,
                {**fsdp_worker.BASE, "checkpoint_every": 1, "fsdp": False}, out_dir=run_dir, progress=False)
    # the same global batch (grad_accum 2): resumes at step 2 and ends where the uninterrupted run ends
    resumed = one_process(tiny_model_dir, "npo", {"checkpoint_every": 1}, out_dir=run_dir)
    assert [s["step"] for s in resumed["steps"]] == [1, 2] and resumed["world_size"] == 1
    assert_same(weights(resumed["model"]), single_runs["npo"][1])
    assert not (run_dir / "checkpoint").exists() and (run_dir / "model.safetensors").is_file()


def test_fsdp_options_are_checked_before_any_work(make_tiny_model, tokenizer):
    m = make_tiny_model(layers=2)
    before = weights(m)
    cases = [({"fsdp": True}, "--fsdp: needs a process group"),
             ({"offload": True}, "--offload: needs --fsdp"),
             ({"fsdp": "yes"}, "fsdp: expected true or false")]
    for config, message in cases:
        with pytest.raises(UserError, match=message):
            unlearn(m, tokenizer, "simnpo", fsdp_worker.FORGET, fsdp_worker.RETAIN, config, progress=False)
    assert all(torch.equal(before[n], v) for n, v in weights(m).items())
    assert all(p.requires_grad for p in m.parameters())


def test_cli_scale_out_flags_are_checked_before_any_work(tiny_model_dir, tmp_path, capsys):
    from helpers import cli_error

    out = tmp_path / "never"
    base = ["unlearn", "--method", "npo", "--model", str(tiny_model_dir), "--split", "mini", "--out", str(out)]
    assert "--fsdp: needs a process group" in cli_error(base + ["--fsdp"], capsys)
    assert "--offload: needs --fsdp" in cli_error(base + ["--offload"], capsys)
    assert "--steps, --batch-size: must be >= 1" in cli_error(["bench", "fsdp", "--steps", "0"], capsys)
    assert not out.exists()
