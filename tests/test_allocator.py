"""allocator.keep_freed_memory: what it does where, and that reused (not zeroed) memory changes no value."""
from __future__ import annotations

import dataclasses
import json
import platform

import pytest
import torch

from unlearnkit import allocator
from unlearnkit.data import tofu
from unlearnkit.cli import main
from unlearnkit.errors import UserError
from unlearnkit.eval import evaluate_tofu


def test_opt_outs(monkeypatch, capsys):
    monkeypatch.setenv(allocator.ENV, "default")
    assert allocator.keep_freed_memory() == "default"
    monkeypatch.setenv(allocator.ENV, "bogus")
    with pytest.raises(UserError, match="UNLEARNKIT_MALLOC='bogus'"):
        allocator.keep_freed_memory()
    assert main(["bench", "allocator", "--limit", "0"]) == 2  # before any option or work
    assert "UNLEARNKIT_MALLOC='bogus'" in capsys.readouterr().err
    monkeypatch.delenv(allocator.ENV)
    assert allocator.keep_freed_memory() == "default"  # opt-in: unset leaves glibc as it is
    monkeypatch.setenv(allocator.ENV, "keep")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert allocator.keep_freed_memory() == "the user's MALLOC_* settings"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_evaluation_is_unchanged_on_reused_memory(monkeypatch, tiny_model, tokenizer):
    t = tofu.task("mini")
    small_task = dataclasses.replace(t, forget=t.forget[:5], retain_eval=t.retain_eval[:4], real_authors=[],
                                     world_facts=[], holdout=t.holdout[:5])
    before = evaluate_tofu(tiny_model, tokenizer, small_task, batch_size=3, max_new_tokens=8, progress=False)
    monkeypatch.setenv(allocator.ENV, "keep")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert allocator.keep_freed_memory() == "keep"
    # freed blocks of many sizes, full of NaN, now stay in the heap for the next allocations to reuse
    junk = [torch.full((n,), float("nan")) for n in (2**k for k in range(10, 24)) for _ in range(3)]
    del junk
    after = evaluate_tofu(tiny_model, tokenizer, small_task, batch_size=3, max_new_tokens=8, progress=False)
    # as JSON text: NaN equals NaN there, as it does not in ==
    assert json.dumps(after, sort_keys=True) == json.dumps(before, sort_keys=True)
