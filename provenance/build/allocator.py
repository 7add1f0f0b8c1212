"""The C allocator's settings for training (a speed setting: it never changes a value).

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
"""

from __future__ import annotations

import functools

MMAP_THRESHOLD = 256 << 20  # blocks up to this size come from the reused heap, not a fresh mmap
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept for reuse before returning it
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>

DISABLE_ENV = "PROVENANCE_MALLOC_DEFAULTS"  # set to 1 to leave the C library's allocator as it is


@functools.lru_cache(maxsize=1)
def tune() -> dict:
    """Set glibc's thresholds once per process; what was done, for build.json."""
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
