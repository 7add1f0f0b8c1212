"""`[determinism] kernels = "fixed-order"`: every float32 matrix product on the CPU through our own GEMM.

PyTorch sends matrix products to MKL, whose code branch (and so its summation order) depends on the CPU
model and vendor: the same recipe then gives other bits on an AMD and an Intel CPU (docs/
reproducibility.md). `fixed_gemm.c` sums every output element as one chain of fused multiply-adds over
the inner index in order, whatever the CPU, the instruction set or the thread count (see its header).

`enabled()` puts it under PyTorch's operators for as long as the context lasts, with the public
`torch.library` API: the CPU kernels of `aten::mm`, `bmm`, `addmm`, `baddbmm`, `mv`, `dot` and their
in-place and out= forms are replaced. Autograd's backward formulas and PyTorch's own composite operators
(`linear`, `matmul`, SDPA's math attention) call these operators, so the forward and both backward
products of every linear layer, the output layer, the chunked loss and the rotary embedding's outer
product all run through it. Any other product of float32 on the CPU that reaches a vendor library
(`tests/test_fixed_gemm.py` watches with MKL's and oneDNN's own verbose modes) is a gap in this list.

Only float32 is computed; a product of another dtype inside the context is refused (the recipe rules
keep bf16 and portable mode's float64 out of this mode before any work). SDPA's fused CPU kernels
(flash) call the BLAS directly, under no operator that can be replaced: the context allows SDPA's math
backend only, and the recipe rules ask for `sdpa_backend = "math"`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from pathlib import Path

from . import clib

NAME = "fixed-order"
SOURCE = Path(__file__).with_name("fixed_gemm.c")
WHAT = '[determinism] kernels = "fixed-order"'


def load() -> tuple[ctypes.CDLL, dict]:
    """The compiled library and what build.json records of it; compiled on first use."""
    handle, record = clib.build(NAME, SOURCE, ("-fopenmp",), what=WHAT)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    handle.fixed_gemm_batched.argtypes = [i64, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, i64,
                                          i64, i64]
    handle.fixed_gemm_batched.restype = ctypes.c_int
    return handle, record


def record() -> dict:
    return load()[1]


@functools.cache
def _kernel():
    """The batched product's entry point, found once per process (`load` looks the library up by digest,
    about 30 us: a tenth of the time of a small product)."""
    return load()[0].fixed_gemm_batched


def _threads() -> int:
    import torch

    return max(1, torch.get_num_threads())


def _check(*tensors) -> None:
    import torch

    for t in tensors:
        if t.dtype != torch.float32:
            raise RuntimeError(f"{WHAT}: a matrix product of {t.dtype} was asked for; this mode computes float32 "
                               "products only")


def bmm_into(a, b, out) -> None:
    """out[t] = a[t] @ b[t] (3-D float32 CPU tensors, any strides; out's last axis contiguous)."""
    bt, m, k = a.shape
    n = b.shape[2]
    if out.numel() == 0:
        return
    if out.stride(2) != 1 or (bt > 1 and out.stride(0) < m * out.stride(1)):
        tmp = out.new_empty(out.shape)
        bmm_into(a, b, tmp)
        out.copy_(tmp)
        return
    sa, sb, so = a.stride(), b.stride(), out.stride()
    rc = _kernel()(bt, m, n, k, a.data_ptr(), *sa, b.data_ptr(), *sb, out.data_ptr(), so[0], so[1], _threads())
    if rc:
        raise MemoryError(f"{WHAT}: the GEMM could not allocate its packing buffers")


def mm(a, b):
    """a @ b for 2-D float32 CPU tensors."""
    _check(a, b)
    out = a.new_empty((a.shape[0], b.shape[1]))
    bmm_into(a.unsqueeze(0), b.unsqueeze(0), out.unsqueeze(0))
    return out


def bmm(a, b):
    _check(a, b)
    out = a.new_empty((a.shape[0], a.shape[1], b.shape[2]))
    bmm_into(a, b, out)
    return out


def _scaled_sum(base, product, beta, alpha):
    """beta * base + alpha * product, ATen's convention for addmm (beta == 0 ignores base, NaNs included)."""
    if alpha != 1:
        product.mul_(alpha)
    if beta == 0:  # the result has the product's shape: base only broadcasts to it
        return product
    return (base * beta if beta != 1 else base) + product


def addmm(base, a, b, *, beta=1, alpha=1):
    return _scaled_sum(base, mm(a, b), beta, alpha)


def _accumulate(base, product, beta, alpha):
    """base = beta * base + alpha * product, in place (addmm_'s convention; beta == 0 ignores base)."""
    if alpha != 1:
        product.mul_(alpha)
    if beta == 0:
        return base.copy_(product)
    if beta != 1:
        base.mul_(beta)
    return base.add_(product)


def addmm_(base, a, b, *, beta=1, alpha=1):
    return _accumulate(base, mm(a, b), beta, alpha)


def baddbmm(base, a, b, *, beta=1, alpha=1):
    return _scaled_sum(base, bmm(a, b), beta, alpha)


def baddbmm_(base, a, b, *, beta=1, alpha=1):
    return _accumulate(base, bmm(a, b), beta, alpha)


def mv(a, v):
    return mm(a, v.unsqueeze(1)).squeeze(1)


def addmv(base, a, v, *, beta=1, alpha=1):
    return _scaled_sum(base, mv(a, v), beta, alpha)


def dot(x, y):
    return mm(x.unsqueeze(0), y.unsqueeze(1)).reshape(())


def _out(fn):
    """The out= form of an operator: compute, then copy into `out` (resized as ATen's out= forms do)."""
    def wrapped(*args, out, **kw):
        got = fn(*args, **kw)
        if out.shape != got.shape:
            out.resize_(got.shape)
        out.copy_(got)
        return out
    return wrapped


# operator overload -> our implementation (each a CPU kernel registered with torch.library)
IMPLS = {
    "mm": mm, "mm.out": _out(mm),
    "bmm": bmm, "bmm.out": _out(bmm),
    "addmm": addmm, "addmm.out": _out(addmm), "addmm_": addmm_,
    "baddbmm": baddbmm, "baddbmm.out": _out(baddbmm), "baddbmm_": baddbmm_,
    "mv": mv, "mv.out": _out(mv),
    "addmv": addmv, "addmv.out": _out(addmv),
    "dot": dot, "dot.out": _out(dot),
}


@contextlib.contextmanager
def enabled():
    """Every float32 matrix product on the CPU through the fixed-order GEMM while the context lasts."""
    import warnings

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    load()  # compile (or find) the library before any product needs it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*previously registered kernel")
        lib = torch.library.Library("aten", "IMPL")
        for name, fn in IMPLS.items():
            lib.impl(name, fn, "CPU")
    try:
        # SDPA's fused CPU kernels call the BLAS directly, below the operators replaced here: only its math
        # backend, built of matmul and softmax, computes attention in this mode (also outside training).
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        del lib  # the registrations end with the Library object (torch.library)


@functools.lru_cache(maxsize=1)
def _enabled_for_process():
    """For a build process: enter `enabled()` once and never leave it."""
    ctx = enabled()
    ctx.__enter__()
    return ctx


def enable_for_process() -> None:
    _enabled_for_process()
