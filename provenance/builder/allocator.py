"""Memory settings for training: the C allocator's thresholds, and PyTorch's NaN fill of new tensors
(speed settings: neither changes a value).

PyTorch's CPU tensors come from the C library's `malloc`. glibc serves a block above its mmap
threshold (128 KiB, raised as large blocks are freed, to at most 32 MiB) with a fresh `mmap`, so
every step's large temporaries (activations, logits, their gradients) are new pages the kernel
must zero and fault in, and it trims the top of its heap back to the system whenever more than
the trim threshold is free. Training allocates and frees the same sizes every step, so both are
wasted work: with the thresholds below, freed blocks up to 256 MiB are kept and reused. Measured
in docs/benchmarks.md: the default recipe's system time halves and a step is a few percent faster;
LaaM's shape (128 MiB logits chunks, above glibc's 32 MiB cap) about 7 % faster, peak RSS +9 %.

Tensor contents do not depend on where they live (PyTorch aligns every block to 64 bytes itself),
so the bits are the same with and without (the test suite builds both ways).

Under `torch.use_deterministic_algorithms(True)` PyTorch also fills every tensor made by
`torch.empty` (each op's output, before the op writes it) with NaN, by default
(`torch.utils.deterministic.fill_uninitialized_memory`), so that reading memory nobody wrote gives
NaN rather than whatever was there. That is a pass over every new tensor, 200 fills a default-recipe
step, 7-14 % of its time (docs/benchmarks.md). Training turns it off: a kernel that read such memory
into arithmetic would turn the build's loss into NaN with the fill on, and the suite builds both ways
and compares the bits.
"""

from __future__ import annotations

import functools

MMAP_THRESHOLD = 256 << 20  # blocks up to this size come from the reused heap, not a fresh mmap
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept for reuse before returning it
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>

DISABLE_ENV = "PROVENANCE_MALLOC_DEFAULTS"  # set to 1 to leave the C library's allocator as it is
NAN_FILL_ENV = "PROVENANCE_NAN_FILL"  # set to 1 to keep PyTorch's NaN fill of new tensors


@functools.lru_cache(maxsize=1)
def tune() -> dict:
    """Set glibc's thresholds and PyTorch's NaN fill once per process; what was done, for build.json."""
    return {**_malloc(), **_nan_fill()}


def _nan_fill() -> dict:
    import os

    import torch

    if os.environ.get(NAN_FILL_ENV) == "1":
        return {"nan_fill": f"unchanged ({NAN_FILL_ENV}=1)"}
    torch.utils.deterministic.fill_uninitialized_memory = False
    return {"nan_fill": "off"}


def _malloc() -> dict:
    import ctypes
    import os
    import platform

    if os.environ.get(DISABLE_ENV) == "1":
        return {"malloc": f"unchanged ({DISABLE_ENV}=1)"}
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return {"malloc": "unchanged (not glibc)"}
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return {"malloc": "unchanged (no mallopt)"}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return {"malloc": "unchanged (glibc refused the thresholds)"}
    return {"malloc": "glibc", "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
