"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node 2` (gloo, CPU): every FSDP run of the test in one
launch. argv: MODEL_DIR OUT_DIR. Rank 0 saves each run's gathered weights to OUT_DIR/NAME.pt."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from unlearnkit.data import tofu  # noqa: E402
from unlearnkit.models import load_model  # noqa: E402
from unlearnkit.unlearning import unlearn  # noqa: E402

FORGET = tofu.load("forget01")[:8]
RETAIN = tofu.load("full")[:8]
BASE = {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "fsdp": True}
# name -> (method, extra config); the test runs each in one process with grad_accum 2 and compares
RUNS = {
    "simnpo": ("simnpo", {}),
    "npo": ("npo", {}),
    "graddiff_offload": ("graddiff", {"offload": True}),  # FSDP2 CPUOffloadPolicy: shards + AdamW on the host
    "rmu": ("rmu", {"layer": 2}),
    "npo_kl_checkpointing": ("npo", {"retain_loss": "kl", "activation_checkpointing": True}),
    "simnpo_lora": ("simnpo", {"lora_r": 4}),
}


def main(model_dir: str, out: str) -> None:
    out = Path(out)
    rank = 0

    def run(method, config, **kw):
        t0 = time.perf_counter()
        model, tok = load_model(model_dir, device="cpu")
        info = unlearn(model, tok, method, FORGET, RETAIN, {**BASE, **config}, progress=False, **kw)
        print(f"{method} {config} {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return info

    def save(name, info):
        if rank == 0:
            torch.save({n: p.detach().clone() for n, p in info["model"].state_dict().items()}, out / f"{name}.pt")
            (out / f"{name}.json").write_text(json.dumps({k: info[k] for k in ("world_size", "sharded",
                                                                                 "n_trained_parameters")}))

    for name, (method, config) in RUNS.items():
        info = run(method, config)
        rank = torch.distributed.get_rank()
        save(name, info)
    # kill after step 1, then resume on 2 ranks: must equal the uninterrupted run (RUNS["npo"]); a copy of the
    # checkpoint is left for the test to resume in one process
    killed = run("npo", {"checkpoint_every": 1}, out_dir=out / "run-kill", stop_after_steps=1)
    assert killed["interrupted_at"] == 1
    if rank == 0:
        shutil.copytree(out / "run-kill", out / "run-2to1")
    torch.distributed.barrier()
    save("npo_resumed", run("npo", {"checkpoint_every": 1}, out_dir=out / "run-kill"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
