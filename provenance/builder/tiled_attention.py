"""`model.attn_implementation = "tiled"`: causal attention for heads of dimension 16, 32, 48, ... (a
multiple of 16) on the CPU.

The default recipe's heads have dimension 32. PyTorch's math attention (the backend a deterministic
recipe pins) writes the scaled score matrix, masks it, softmaxes it with a pass that checks for rows
with no key, and multiplies, each a separate operation over memory with its own thread fork and
join; with its backward it was about a tenth of a default-recipe step (docs/benchmarks.md).
`tiled_attention.c` computes each (batch, head) as one task in cache, as small tiled products that
skip the keys a query cannot see.

Its numerics are its own (its own exponential; fused multiply-adds in a fixed order), so it is a
recipe choice that changes the bits, recorded in the recipe, and the library's source digest,
compiler and flags go into build.json (`training.attention`). The bits do not depend on the
compiler's target or on the thread count (see the C file's header; the tests compare builds for
x86-64, -v3 and -v4 and 1 vs 2 threads).

It is used where it applies, as "small-head" is: a causal call without a mask, queries and keys of
the same length, float32 on the CPU, no dropout. Anything else (a padded batch in evaluation, a
decoding step with a cache) goes to PyTorch's SDPA with the recipe's `sdpa_backend`.

The library is compiled once per machine into the input store (builder/clib.py), with OpenMP: its
tasks run on PyTorch's own thread pool (libgomp), not on threads of their own that would compete
with PyTorch's spinning workers for the cores.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from . import clib

NAME = "tiled"
HEAD_DIM_MULTIPLE = 16  # two vectors of 8 lanes per tile row in the C source
MAX_HEAD_DIM = 1024
MAX_SEQ = 4096  # MAX_S in the C source: per thread the scratch holds two S x S float32 matrices
SOURCE = Path(__file__).with_name("tiled_attention.c")


def load() -> tuple[ctypes.CDLL, dict]:
    """The compiled library and what build.json records of it; compiled on first use."""
    handle, record = clib.build(NAME, SOURCE, ("-fopenmp",))
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    handle.tiled_attn_fwd.argtypes = [i64] * 6 + [f32] + [ptr] * 10
    handle.tiled_attn_bwd.argtypes = [i64] * 6 + [f32] + [ptr] * 18
    handle.tiled_attn_fwd.restype = handle.tiled_attn_bwd.restype = ctypes.c_int
    return handle, record


def record() -> dict:
    return load()[1]


def scratch_bytes(seq_len: int, head_dim: int) -> int:
    """The C library's working memory per thread during a backward pass (the forward's is less)."""
    sp = -(-seq_len // 8) * 8
    return 4 * (2 * head_dim * sp + 2 * seq_len * sp)


def _strides(t):
    """The strides of a [B, H, S, D] tensor's first three axes, as the C functions take them."""
    import torch

    if t.stride(-1) != 1:
        raise ValueError("tiled attention: the last axis must be contiguous")
    return torch.tensor(t.stride()[:3], dtype=torch.int64)


def _bshd(b: int, h: int, s: int, d: int):
    """A new [B, H, S, D] tensor laid out as [B, S, H, D]: what transformers reshapes after attention."""
    import torch

    return torch.empty(b, s, h, d, dtype=torch.float32).transpose(1, 2)


def _check(rc: int) -> None:
    if rc == -2:
        raise MemoryError("tiled attention: the C library could not allocate its scratch memory")
    if rc:
        raise RuntimeError("tiled attention: the library refused the shapes")  # guarded by applies()


def _function():
    import torch

    class TiledAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, scale: float):
            lib, _ = load()
            b, h, s, d = q.shape
            hkv = k.shape[1]
            q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
            o = _bshd(b, h, s, d)
            m = torch.empty(b, h, s, dtype=torch.float32)
            l_ = torch.empty(b, h, s, dtype=torch.float32)
            st = [_strides(t) for t in (q, k, v, o)]
            _check(lib.tiled_attn_fwd(0, b * h, h, hkv, s, d, scale, q.data_ptr(), st[0].data_ptr(), k.data_ptr(),
                                      st[1].data_ptr(), v.data_ptr(), st[2].data_ptr(), o.data_ptr(),
                                      st[3].data_ptr(), m.data_ptr(), l_.data_ptr()))
            ctx.save_for_backward(q, k, v, o, m, l_)
            ctx.scale = scale
            return o

        @staticmethod
        def backward(ctx, grad_o):
            lib, _ = load()
            q, k, v, o, m, l_ = ctx.saved_tensors
            b, h, s, d = q.shape
            hkv = k.shape[1]
            grad_o = grad_o if grad_o.stride(-1) == 1 else grad_o.contiguous()
            dq, dk, dv = _bshd(b, h, s, d), _bshd(b, hkv, s, d), _bshd(b, hkv, s, d)
            st = [_strides(t) for t in (q, k, v, o, grad_o, dq, dk, dv)]
            _check(lib.tiled_attn_bwd(0, b * hkv, h, hkv, s, d, ctx.scale, q.data_ptr(), st[0].data_ptr(),
                                      k.data_ptr(), st[1].data_ptr(), v.data_ptr(), st[2].data_ptr(), o.data_ptr(),
                                      st[3].data_ptr(), m.data_ptr(), l_.data_ptr(), grad_o.data_ptr(),
                                      st[4].data_ptr(), dq.data_ptr(), st[5].data_ptr(), dk.data_ptr(),
                                      st[6].data_ptr(), dv.data_ptr(), st[7].data_ptr()))
            return dq, dk, dv, None

    return TiledAttention


@functools.lru_cache(maxsize=1)
def _fn():
    return _function()


def attention(q, k, v, scale: float | None = None):
    """Causal attention: q [B, H, S, D], k and v [B, Hkv, S, D] (float32, CPU) -> [B, H, S, D] (laid out as
    [B, S, H, D])."""
    return _fn().apply(q, k, v, float(q.shape[-1] ** -0.5 if scale is None else scale))


def head_dim_ok(d: int) -> bool:
    return 0 < d <= MAX_HEAD_DIM and d % HEAD_DIM_MULTIPLE == 0


def applies(module, query, key, value, attention_mask, dropout: float, is_causal, kwargs: dict) -> bool:
    """Whether a call is one this kernel computes (else it goes to SDPA)."""
    return clib.causal_call(module, query, key, value, attention_mask, dropout, is_causal, kwargs,
                            head_dim_ok=head_dim_ok, max_seq=MAX_SEQ)


# transformers' attention-function interface (what `sdpa_attention_forward` is for "sdpa") and the call
# that makes this kernel an implementation transformers knows, once per process (builder/clib.py).
attention_forward, register = clib.attention_implementation(__name__)
