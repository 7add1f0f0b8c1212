"""`attn_implementation = "small-head"` (provenance/builder/small_head_attention.py): our causal attention
kernel for heads of dimension <= 8. Its values against float64 attention, its bits against the
compiler's target and the thread count, where it hands over to SDPA, and the recipe rules."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from provenance.builder import clib
from provenance.builder import small_head_attention as sha
from provenance.builder.attention import attention_module
from provenance.errors import InputError
from provenance.recipe import parse_recipe

from .conftest import TINY


@pytest.fixture(autouse=True)
def _kernel_store(tmp_path_factory):
    clib.configure(tmp_path_factory.getbasetemp() / "kernel-store")
    yield
    clib.configure(None)


def _inputs(b=3, h=8, hkv=2, s=37, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g, requires_grad=True)
    k = torch.randn(b, hkv, s, d, generator=g, requires_grad=True)
    v = torch.randn(b, hkv, s, d, generator=g, requires_grad=True)
    return q, k, v, torch.randn(b, h, s, d, generator=g)


def _run(q, k, v, go, attend=sha.attention):
    for t in (q, k, v):
        t.grad = None
    o = attend(q, k, v)
    o.backward(go)
    return [o.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone()]


def _digest(ts) -> str:
    return hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in ts)).hexdigest()


@pytest.mark.parametrize("shape", [(3, 8, 2, 37, 2), (2, 4, 4, 16, 1), (1, 6, 3, 70, 4), (2, 2, 1, 5, 8),
                                   (1, 2, 2, 1, 3)], ids=lambda s: "b{}h{}kv{}s{}d{}".format(*s))
def test_matches_float64_attention(shape):
    q, k, v, go = _inputs(*shape)
    ours = _run(q, k, v, go)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _run(q64, k64, v64, go.double(), lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(
        a, b, c, is_causal=True, enable_gqa=True))
    for name, a, b in zip(("output", "dq", "dk", "dv"), ours, ref):
        err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        assert err < 2e-6, (name, err)


def test_bits_do_not_depend_on_thread_count():
    q, k, v, go = _inputs(4, 8, 2, 50, 2, seed=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _digest(_run(q, k, v, go))
        torch.set_num_threads(2)
        two = _digest(_run(q, k, v, go))
    finally:
        torch.set_num_threads(before)
    assert one == two


def _levels() -> list[str]:
    level = clib.x86_level()
    return {"x86-64-v4": ["x86-64", "x86-64-v3", "x86-64-v4"], "x86-64-v3": ["x86-64", "x86-64-v3"],
            "x86-64": ["x86-64"]}.get(level, [])


def _raw(lib, q, k, v, go, scale):
    """One forward and backward through a given compiled library, single-threaded."""
    b, h, s, d = q.shape
    hkv, sp = k.shape[1], -(-s // sha.LANES) * sha.LANES
    q = q.detach().contiguous()
    kt, vt = sha._padded_t(k.detach(), sp), sha._padded_t(v.detach(), sp)
    o, m, l_ = torch.empty_like(q), torch.empty(b, h, s), torch.empty(b, h, s)
    assert lib.small_head_attn_fwd(0, b * h, h, hkv, s, sp, d, scale, q.data_ptr(), kt.data_ptr(), vt.data_ptr(),
                                   o.data_ptr(), m.data_ptr(), l_.data_ptr()) == 0
    dq, dkt, dvt = torch.empty_like(q), torch.empty_like(kt), torch.empty_like(vt)
    go = go.contiguous()
    assert lib.small_head_attn_bwd(0, b * hkv, h, hkv, s, sp, d, scale, q.data_ptr(), kt.data_ptr(), vt.data_ptr(),
                                   o.data_ptr(), m.data_ptr(), l_.data_ptr(), go.data_ptr(), dq.data_ptr(),
                                   dkt.data_ptr(), dvt.data_ptr()) == 0
    return [o, dq, dkt[..., :s], dvt[..., :s]]


def _compiled(tmp_path, level: str, *defines: str):
    so = tmp_path / f"{level}{''.join(defines)}.so"
    subprocess.run([clib.compiler(), *clib.FLAGS, f"-march={level}", *defines, "-o", str(so), str(sha.SOURCE)],
                   check=True)
    lib = ctypes.CDLL(str(so))
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.small_head_attn_fwd.argtypes = [i64] * 7 + [f32] + [ptr] * 6
    lib.small_head_attn_bwd.argtypes = [i64] * 7 + [f32] + [ptr] * 10
    return lib


def test_bits_do_not_depend_on_the_instruction_set_or_the_vector_width(tmp_path):
    """The library compiled for plain x86-64 (SSE2), -v3 (AVX2, FMA) and -v4 (AVX-512), as far as this CPU
    runs them, and with its 16 lanes as one vector or two halves (VW = 16 or 8, whichever its target
    would not choose) gives the same bits: the C source fixes every operation and its order."""
    levels = _levels()
    if not levels:
        pytest.skip("not an x86-64 CPU")
    q, k, v, go = _inputs(2, 8, 2, 45, 2, seed=2)
    digests = {}
    for level in levels:
        for defines in ((), ("-DVW=16",), ("-DVW=8",)):
            digests[(level, *defines)] = _digest(_raw(_compiled(tmp_path, level, *defines), q, k, v, go, 2 ** -0.5))
    assert len(set(digests.values())) == 1, digests
    # and the library the build loads gives those bits too
    assert _digest(_raw(sha.load()[0], q, k, v, go, 2 ** -0.5)) == digests[(levels[0],)]


VECTORS = Path(__file__).with_name("vectors") / "small-head.json"
KNOWN = [(2, 8, 2, 45, 2, 2), (1, 32, 4, 512, 2, 3), (1, 4, 4, 70, 8, 4)]  # b, h, hkv, s, d, seed


def test_known_answers_hold_on_this_machine():
    """Digests of one forward and backward for seeded inputs (torch's CPU generator, the same on every
    machine) at LaaM's shape and two ragged ones, written on the machine named in the file: every
    machine the suite runs on, of either vendor and vector width, checks them."""
    got = {"x".join(map(str, s[:5])): _digest(_raw(sha.load()[0], *_inputs(*s), s[4] ** -0.5))
           for s in KNOWN}
    if os.environ.get("PROVENANCE_WRITE_VECTORS"):
        VECTORS.write_text(json.dumps({"format": "provenance-small-head-vectors-v1", "digests": got}, indent=1) + "\n")
    assert json.loads(VECTORS.read_text())["digests"] == got


def test_the_library_refuses_shapes_it_does_not_compute():
    lib = sha.load()[0]
    x = torch.zeros(64)
    for h, hkv, d, sp in ((4, 3, 2, 16), (4, 2, 9, 16), (4, 2, 2, 15)):
        assert lib.small_head_attn_fwd(0, 0, h, hkv, 8, sp, d, 1.0, *[x.data_ptr()] * 6) == -1


def _tiny_llama(attn: str, heads=8, kv=2, hidden=16):
    from transformers import LlamaConfig, LlamaForCausalLM

    kernel = attention_module(attn)
    if kernel is not None:
        kernel.register()
    cfg = LlamaConfig(vocab_size=50, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float()


def check_in_a_llama(kernel, monkeypatch, **shape):
    """`kernel` (a module of ours) computes a Llama's causal calls, within float32 rounding of SDPA, forward
    and backward; calls with a mask go to SDPA, bit for bit; the saved config names no implementation."""
    calls = []
    real = kernel.attention
    monkeypatch.setattr(kernel, "attention", lambda *a: calls.append(a[0].shape) or real(*a))
    ids = torch.randint(0, 50, (3, 20), generator=torch.Generator().manual_seed(3))
    ours, ref = _tiny_llama(kernel.NAME, **shape), _tiny_llama("sdpa", **shape)
    out = ours(input_ids=ids, use_cache=False).logits
    assert len(calls) == 2  # both layers
    torch.testing.assert_close(out, ref(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    ours(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    ref(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    # a padded batch has a mask: SDPA computes it, bit for bit as under "sdpa"
    calls.clear()
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0
    with torch.no_grad():
        masked = ours(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert calls == []
        assert torch.equal(masked, ref(input_ids=ids, attention_mask=mask, use_cache=False).logits)
    # the saved config names no implementation: stock transformers loads the weights with its own
    assert f'"{kernel.NAME}"' not in ours.config.to_json_string()


def test_in_a_llama_it_is_used_for_causal_calls_and_hands_masked_ones_to_sdpa(monkeypatch):
    check_in_a_llama(sha, monkeypatch)


def _recipe(tmp_path, **replace):
    text = TINY.read_text().replace('attn_implementation = "sdpa"', 'attn_implementation = "small-head"')
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return parse_recipe(tmp_path / "x.toml", text)


def test_recipe_rules(tmp_path):
    # tiny.toml's heads are of dimension 8 (16 / 2): allowed
    assert _recipe(tmp_path).model.attn_implementation == "small-head"
    with pytest.raises(InputError) as e:
        _recipe(tmp_path, **{"hidden_size = 16": "hidden_size = 32",
                             "seq_len = 64\n": 'seq_len = 64\nprecision = "bf16-autocast"\n'})
    msg = e.value.diagnostics()
    assert "'small-head' is for heads of dimension <= 8; this model's are 16" in msg
    assert "stages[0].precision: 'small-head' attention computes in float32" in msg


def test_a_missing_compiler_is_named(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(InputError, match="no C compiler '/nonexistent/cc' was found"):
        clib.compiler()
    monkeypatch.setenv("CC", "gcc -O0")
    with pytest.raises(InputError, match="expected one compiler executable"):
        clib.compiler()
