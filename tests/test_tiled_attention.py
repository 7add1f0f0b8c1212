"""`attn_implementation = "tiled"` (provenance/builder/tiled_attention.py): our causal attention kernel for
heads of dimension 16, 32, 48, ... Its values against float64 attention, its bits against the
compiler's target, the thread count and the inputs' memory layout, where it hands over to SDPA, and the
recipe rules."""

from __future__ import annotations

import ctypes
import subprocess

import pytest
import torch

from provenance.builder import clib
from provenance.builder import tiled_attention as ta
from provenance.errors import InputError
from provenance.recipe import parse_recipe

from .conftest import TINY
from .test_small_head_attention import _digest, _levels, _run, check_in_a_llama


@pytest.fixture(autouse=True)
def _kernel_store(tmp_path_factory):
    clib.configure(tmp_path_factory.getbasetemp() / "kernel-store")
    yield
    clib.configure(None)


def _inputs(b=2, h=4, hkv=2, s=37, d=32, seed=0, layout="bshd"):
    """q [B, H, S, D], k and v [B, Hkv, S, D]; with layout "bshd" laid out as the projections give them."""
    g = torch.Generator().manual_seed(seed)

    def make(heads):
        if layout == "bshd":
            return torch.randn(b, s, heads, d, generator=g).transpose(1, 2).requires_grad_()
        return torch.randn(b, heads, s, d, generator=g, requires_grad=True)

    q, k, v = make(h), make(hkv), make(hkv)
    return q, k, v, torch.randn(b, h, s, d, generator=g)


@pytest.mark.parametrize("shape", [(2, 4, 4, 37, 32), (3, 8, 2, 45, 16), (1, 2, 1, 130, 64), (2, 3, 3, 5, 48),
                                   (1, 2, 2, 1, 32), (2, 2, 1, 8, 16), (1, 4, 2, 70, 128)],
                         ids=lambda s: "b{}h{}kv{}s{}d{}".format(*s))
def test_matches_float64_attention(shape):
    q, k, v, go = _inputs(*shape)
    ours = _run(q, k, v, go, ta.attention)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _run(q64, k64, v64, go.double(), lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(
        a, b, c, is_causal=True, enable_gqa=True))
    for name, a, b in zip(("output", "dq", "dk", "dv"), ours, ref):
        # (with one key the query's gradient is 0 in exact arithmetic and float32 rounding in ours)
        err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0)).item()
        assert err < 5e-6, (name, err)


def test_bits_do_not_depend_on_thread_count_or_layout():
    q, k, v, go = _inputs(4, 8, 2, 50, 32, seed=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _digest(_run(q, k, v, go, ta.attention))
        torch.set_num_threads(2)
        two = _digest(_run(q, k, v, go, ta.attention))
    finally:
        torch.set_num_threads(before)
    assert one == two
    # the same values laid out [B, H, S, D] instead of [B, S, H, D]
    q2, k2, v2 = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    assert _digest(_run(q2, k2, v2, go, ta.attention)) == one


def _raw(lib, q, k, v, go, scale):
    """One forward and backward through a given compiled library."""
    b, h, s, d = q.shape
    hkv = k.shape[1]
    q, k, v, go = (t.detach() for t in (q, k, v, go))
    o, m, l_ = ta._bshd(b, h, s, d), torch.empty(b, h, s), torch.empty(b, h, s)
    st = [ta._strides(t) for t in (q, k, v, o)]
    assert lib.tiled_attn_fwd(0, b * h, h, hkv, s, d, scale, q.data_ptr(), st[0].data_ptr(), k.data_ptr(),
                              st[1].data_ptr(), v.data_ptr(), st[2].data_ptr(), o.data_ptr(), st[3].data_ptr(),
                              m.data_ptr(), l_.data_ptr()) == 0
    dq, dk, dv = ta._bshd(b, h, s, d), ta._bshd(b, hkv, s, d), ta._bshd(b, hkv, s, d)
    go = go.contiguous()
    st += [ta._strides(t) for t in (go, dq, dk, dv)]
    assert lib.tiled_attn_bwd(0, b * hkv, h, hkv, s, d, scale, q.data_ptr(), st[0].data_ptr(), k.data_ptr(),
                              st[1].data_ptr(), v.data_ptr(), st[2].data_ptr(), o.data_ptr(), st[3].data_ptr(),
                              m.data_ptr(), l_.data_ptr(), go.data_ptr(), st[4].data_ptr(), dq.data_ptr(),
                              st[5].data_ptr(), dk.data_ptr(), st[6].data_ptr(), dv.data_ptr(),
                              st[7].data_ptr()) == 0
    return [o, dq, dk, dv]


def test_bits_do_not_depend_on_the_instruction_set(tmp_path):
    """The library compiled for plain x86-64 (SSE2, where fmaf is the C library's), -v3 (AVX2, FMA) and
    -v4 (AVX-512), as far as this CPU runs them, gives the same bits: the C source fixes every operation
    and its order."""
    levels = _levels()
    if len(levels) < 2:
        pytest.skip(f"this CPU runs only {levels or 'no x86-64 level'}: nothing to compare")
    cc = clib.compiler()
    q, k, v, go = _inputs(2, 4, 2, 29, 32, seed=2)
    digests = {}
    for level in levels:
        so = tmp_path / f"{level}.so"
        subprocess.run([cc, *clib.FLAGS, "-fopenmp", f"-march={level}", "-o", str(so), str(ta.SOURCE)], check=True)
        lib = ctypes.CDLL(str(so))
        i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
        lib.tiled_attn_fwd.argtypes = [i64] * 6 + [f32] + [ptr] * 10
        lib.tiled_attn_bwd.argtypes = [i64] * 6 + [f32] + [ptr] * 18
        digests[level] = _digest(_raw(lib, q, k, v, go, 32 ** -0.5))
    assert len(set(digests.values())) == 1, digests
    # and the library the build loads gives those bits too, through the autograd function
    assert _digest(_raw(ta.load()[0], q, k, v, go, 32 ** -0.5)) == digests[levels[0]]
    assert _digest(_run(q, k, v, go, ta.attention)) == digests[levels[0]]


def test_the_library_refuses_shapes_it_does_not_compute():
    lib = ta.load()[0]
    x = torch.zeros(64)
    st = torch.zeros(3, dtype=torch.int64)
    for h, hkv, s, d in ((4, 3, 8, 32), (4, 2, 8, 8), (4, 2, 8, 24), (4, 2, 0, 32), (4, 2, ta.MAX_SEQ + 1, 32)):
        args = [x.data_ptr(), st.data_ptr()] * 4 + [x.data_ptr()] * 2
        assert lib.tiled_attn_fwd(0, 0, h, hkv, s, d, 1.0, *args) == -1, (h, hkv, s, d)


def test_in_a_llama_it_is_used_for_causal_calls_and_hands_masked_ones_to_sdpa(monkeypatch):
    check_in_a_llama(ta, monkeypatch, heads=4, kv=2, hidden=64)


def _recipe(tmp_path, **replace):
    text = TINY.read_text().replace('attn_implementation = "sdpa"', 'attn_implementation = "tiled"')
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return parse_recipe(tmp_path / "x.toml", text)


def test_recipe_rules(tmp_path):
    # tiny.toml's heads are of dimension 8 (16 / 2): not a multiple of 16
    with pytest.raises(InputError) as e:
        _recipe(tmp_path)
    assert ("'tiled' is for heads of dimension 16, 32, 48, ... (a multiple of 16, at most 1024); this model's "
            "are 8 (hidden_size / num_attention_heads): use 'small-head' or 'sdpa'") in e.value.diagnostics()
    assert _recipe(tmp_path, **{"hidden_size = 16": "hidden_size = 64"}).model.attn_implementation == "tiled"
    with pytest.raises(InputError) as e:
        _recipe(tmp_path, **{"hidden_size = 16": "hidden_size = 64",
                             "seq_len = 64\n": 'seq_len = 5000\nprecision = "bf16-autocast"\n',
                             "max_position_embeddings = 64": "max_position_embeddings = 8192"})
    msg = e.value.diagnostics()
    assert "stages[0].precision: 'tiled' attention computes in float32" in msg
    assert "stages[0].seq_len: 'tiled' attention takes sequences of at most 4096 positions" in msg
    # and the small-head rule names "tiled" where it would fit
    text = TINY.read_text().replace('attn_implementation = "sdpa"', 'attn_implementation = "small-head"')
    with pytest.raises(InputError) as e:
        parse_recipe(tmp_path / "y.toml", text.replace("hidden_size = 16", "hidden_size = 64"))
    assert "this model's are 32 (hidden_size / num_attention_heads): use 'sdpa', or 'tiled'" in e.value.diagnostics()
