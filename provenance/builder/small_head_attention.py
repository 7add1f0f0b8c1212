"""`model.attn_implementation = "small-head"`: causal attention for heads of dimension <= 8 on the CPU.

LaaM's heads have dimension 2. PyTorch's CPU flash kernel computes each block of scores and each
weighted sum as a matrix product whose inner dimension is the head's, 2, and was half of a
training step at LaaM's shape (docs/benchmarks.md, "LaaM's shape"). `small_head_attention.c` does
each query's scores, softmax and weighted sum, and their gradients, as a few vector operations over
the keys: 3-4x faster there, and more accurate than float32 flash against float64.

Its numerics are its own (its own exponential; fixed-order sums), so it is a recipe choice that
changes the bits, recorded in the recipe, and the library's source digest, compiler and flags go into
build.json (`training.attention`). The bits do not depend on the compiler's target or on the thread
count (see the C file's header; the tests compare builds for x86-64, -v3 and -v4 and 1 vs 2 threads).

It is used where it applies: a causal call without a mask, queries and keys of the same length,
float32 on the CPU, no dropout. Training with right padding (the recipes' layout) is always that
case. Anything else (a padded batch in evaluation, a decoding step with a cache) goes to PyTorch's
SDPA with the recipe's `sdpa_backend`, as `attn_implementation = "sdpa"` would.

The library is compiled once per machine into the input store (builder/clib.py).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from . import clib

NAME = "small-head"
MAX_HEAD_DIM = 8  # MAX_D in the C source
MAX_SEQ = 1 << 16  # the forward keeps one query's scores on the thread's stack (4 bytes per key)
LANES = 16  # W in the C source: keys are padded to a multiple of it
SOURCE = Path(__file__).with_name("small_head_attention.c")


def load() -> tuple[ctypes.CDLL, dict]:
    """The compiled library and what build.json records of it; compiled on first use."""
    handle, record = clib.build(NAME, SOURCE)
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    handle.small_head_attn_fwd.argtypes = [i64] * 7 + [f32] + [ptr] * 6
    handle.small_head_attn_bwd.argtypes = [i64] * 7 + [f32] + [ptr] * 10
    handle.small_head_attn_fwd.restype = handle.small_head_attn_bwd.restype = ctypes.c_int
    return handle, record


def record() -> dict:
    return load()[1]


_run = clib.run_in_threads


def _padded_t(x, sp: int):
    """[B, Hkv, S, D] -> [B, Hkv, D, Sp], keys along the last axis, zero past S."""
    import torch

    b, h, s, d = x.shape
    out = torch.zeros(b, h, d, sp, dtype=torch.float32)
    out[..., :s] = x.transpose(-1, -2)
    return out


def _function():
    import torch

    class SmallHeadAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, scale: float):
            lib, _ = load()
            b, h, s, d = q.shape
            hkv = k.shape[1]
            sp = -(-s // LANES) * LANES
            q = q.contiguous()
            kt, vt = _padded_t(k, sp), _padded_t(v, sp)
            o = torch.empty_like(q)
            m = torch.empty(b, h, s, dtype=torch.float32)
            l_ = torch.empty(b, h, s, dtype=torch.float32)
            _run(lib.small_head_attn_fwd, b * h, h, hkv, s, sp, d, scale,
                 q.data_ptr(), kt.data_ptr(), vt.data_ptr(), o.data_ptr(), m.data_ptr(), l_.data_ptr())
            ctx.save_for_backward(q, kt, vt, o, m, l_)
            ctx.scale = scale
            return o

        @staticmethod
        def backward(ctx, grad_o):
            lib, _ = load()
            q, kt, vt, o, m, l_ = ctx.saved_tensors
            b, h, s, d = q.shape
            hkv, sp = kt.shape[1], kt.shape[-1]
            grad_o = grad_o.contiguous()
            dq = torch.empty_like(q)
            dkt, dvt = torch.empty_like(kt), torch.empty_like(vt)
            _run(lib.small_head_attn_bwd, b * hkv, h, hkv, s, sp, d, ctx.scale,
                 q.data_ptr(), kt.data_ptr(), vt.data_ptr(), o.data_ptr(), m.data_ptr(), l_.data_ptr(),
                 grad_o.data_ptr(), dq.data_ptr(), dkt.data_ptr(), dvt.data_ptr())
            return dq, dkt[..., :s].transpose(-1, -2), dvt[..., :s].transpose(-1, -2), None

    return SmallHeadAttention


@functools.lru_cache(maxsize=1)
def _fn():
    return _function()


def attention(q, k, v, scale: float | None = None):
    """Causal attention: q [B, H, S, D], k and v [B, Hkv, S, D] (float32, CPU) -> [B, H, S, D]."""
    return _fn().apply(q, k, v, float(q.shape[-1] ** -0.5 if scale is None else scale))


def applies(module, query, key, value, attention_mask, dropout: float, is_causal, kwargs: dict) -> bool:
    """Whether a call is one this kernel computes (else it goes to SDPA)."""
    return clib.causal_call(module, query, key, value, attention_mask, dropout, is_causal, kwargs,
                            head_dim_ok=lambda d: 0 < d <= MAX_HEAD_DIM, max_seq=MAX_SEQ)


# transformers' attention-function interface (what `sdpa_attention_forward` is for "sdpa") and the call
# that makes this kernel an implementation transformers knows, once per process (builder/clib.py).
attention_forward, register = clib.attention_implementation(__name__)
