"""Keep freed memory in the process instead of handing it back to the OS after every batch.

glibc's malloc serves a block above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh mmap and
unmaps it on free, and trims the heap's free top. torch's CPU tensors come from malloc, so every batch's
activations, logits and KV growth are new pages: each is faulted in and zeroed by the kernel again, batch after
batch. On a 2-core VM that is millions of page faults per evaluation (docs/results.md, `bench allocator`).
Raising both thresholds keeps freed blocks for the next batch, which reuses them. Numbers do not change; the
process keeps its peak heap until it exits.

It is opt-in: UNLEARNKIT_MALLOC=keep. The price is peak memory: freed blocks of one shape are not always reusable
by the next, so how the heap fragments decides the peak, which then varies from run to run and can exceed glibc's
by a lot (docs/results.md); glibc's behaviour (UNLEARNKIT_MALLOC=default, or unset) keeps it predictable.
The CLI calls keep_freed_memory() at start; API users may call it themselves. Nothing happens off glibc, or when the
user set glibc's MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ themselves.
"""
from __future__ import annotations

import os
import platform

ENV = "UNLEARNKIT_MALLOC"             # "keep": raise the thresholds; "default" (or unset): leave glibc as it is
MODES = ("keep", "default")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # mallopt parameters (malloc.h)
_THRESHOLDS = (1 << 30, 32 << 20)     # glibc before 2.35 refuses an mmap threshold above 32 MiB: then that


def keep_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds for this process. Returns what was done: "keep", or why not.
    A bad UNLEARNKIT_MALLOC value is a UserError."""
    mode = os.environ.get(ENV, "default")
    if mode not in MODES:
        from .errors import UserError

        raise UserError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "default":
        return "default"
    if any(os.environ.get(v) for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return "the user's MALLOC_* settings"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "no mallopt"
    for value in _THRESHOLDS:
        if mallopt(_M_MMAP_THRESHOLD, value) and mallopt(_M_TRIM_THRESHOLD, value):
            return "keep"
    return "mallopt refused"
