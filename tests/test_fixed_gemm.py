"""The fixed-order GEMM (provenance/builder/fixed_gemm.c): one summation order whatever the thread count,
the instruction set it is compiled for and the CPU, and the operators it stands in for.

Inputs are exact dyadic numbers drawn from numpy's PCG64 (the same on every machine), so the known-answer
digests in tests/vectors/fixed-gemm.json hold across machines: every session that lands on another CPU
vendor checks the claim again.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import blake3
import numpy as np
import pytest

from provenance.builder import clib, fixed_gemm

VECTORS = Path(__file__).parent / "vectors" / "fixed-gemm.json"
# (M, N, K, transpose A, transpose B): the shipped recipes' products and ragged ones
SHAPES = [
    (2048, 128, 128, False, True), (2048, 512, 128, False, True), (2048, 128, 512, False, False),
    (128, 128, 2048, True, False), (2048, 1600, 128, False, True), (1600, 128, 2048, True, False),
    (512, 64, 64, False, True), (300, 1027, 64, False, True), (64, 1027, 300, True, False),
    (7, 5, 1, False, False), (1, 1, 3, False, False), (13, 17, 257, False, True), (6, 16, 0, False, False),
]


def operands(m: int, n: int, k: int, ta: bool, tb: bool):
    """Seeded dyadic operands laid out as a step lays them out (a transposed view where asked)."""
    rng = np.random.Generator(np.random.PCG64(m * 1_000_003 + n * 1_009 + k))
    a = (rng.integers(-4096, 4096, size=(k, m) if ta else (m, k)) / 1024).astype(np.float32)
    b = (rng.integers(-4096, 4096, size=(n, k) if tb else (k, n)) / 1024).astype(np.float32)
    return (a.T if ta else a), (b.T if tb else b)


def run_lib(lib: ctypes.CDLL, a: np.ndarray, b: np.ndarray, threads: int) -> np.ndarray:
    m, k = a.shape
    n = b.shape[1]
    c = np.full((m, n), np.nan, dtype=np.float32)
    f = lib.fixed_gemm_batched
    f.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] + \
        [ctypes.c_int64] * 3 + [ctypes.c_void_p] + [ctypes.c_int64] * 3
    f.restype = ctypes.c_int
    isz = 4
    rc = f(1, m, n, k, a.ctypes.data, 0, a.strides[0] // isz, a.strides[1] // isz, b.ctypes.data, 0,
           b.strides[0] // isz, b.strides[1] // isz, c.ctypes.data, 0, n, threads)
    assert rc == 0
    return c


def digest(c: np.ndarray) -> str:
    return blake3.blake3(np.ascontiguousarray(c).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    clib.configure(tmp_path_factory.mktemp("store"))
    return fixed_gemm.load()[0]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The same source compiled for each x86-64 level this CPU runs (speed only: the bits must agree)."""
    if clib.x86_level() is None:
        pytest.skip("not an x86-64 machine")
    out = {}
    levels = ["x86-64", "x86-64-v3", "x86-64-v4"]
    for level in levels[:levels.index(clib.x86_level()) + 1]:
        so = tmp_path_factory.mktemp("gemm") / f"{level}.so"
        subprocess.run([clib.compiler(), *clib.FLAGS, "-fopenmp", f"-march={level}", "-o", str(so),
                        str(fixed_gemm.SOURCE)], check=True, capture_output=True)
        out[level] = ctypes.CDLL(str(so))
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3])) + "".join("T" * x for x in s[3:]))
def test_same_bits_for_every_thread_count_and_instruction_set(builds, shape):
    a, b = operands(*shape)
    got = {(level, t): digest(run_lib(lib, a, b, t)) for level, lib in builds.items() for t in (1, 2, 3)}
    assert len(set(got.values())) == 1, got


@pytest.mark.parametrize("shape", SHAPES[:9], ids=lambda s: "x".join(map(str, s[:3])))
def test_every_element_is_the_fma_chain_over_k_in_order(lib, shape):
    """Checked against an independent evaluation of the defined order: numpy float64 fma emulation is
    exact here (dyadic inputs of 13 bits: every product and partial sum of float32s fits a float64 exactly,
    so rounding the float64 chain to float32 after each step is the float32 fma chain)."""
    a, b = operands(*shape)
    c = run_lib(lib, a, b, 2)
    m, k = a.shape
    rows = sorted({0, m // 2, m - 1})
    acc = np.zeros((len(rows), b.shape[1]), dtype=np.float32)
    for kk in range(k):  # fma(a, b, acc) = round(a*b + acc): exact in float64 for these operands
        acc = (a[rows, kk:kk + 1].astype(np.float64) * b[kk].astype(np.float64) + acc.astype(np.float64)) \
            .astype(np.float32)
    assert np.array_equal(c[rows], acc)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    assert np.allclose(c, ref, rtol=1e-5, atol=1e-3 * max(1, k) ** 0.5)


def test_known_answer_digests(lib):
    """tests/vectors/fixed-gemm.json: the digests of every shape's product, the same on every machine."""
    want = json.loads(VECTORS.read_text())
    got = {"x".join(map(str, s[:3])) + "".join("T" if x else "N" for x in s[3:]): digest(run_lib(lib, *operands(*s), 2))
           for s in SHAPES}
    if os.environ.get("PROVENANCE_WRITE_VECTORS"):
        VECTORS.write_text(json.dumps({"format": "provenance-fixed-gemm-vectors-v1", "digests": got}, indent=1) + "\n")
    assert want["digests"] == got


ARM_CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"  # Debian's gcc-aarch64-linux-gnu and qemu-user


@pytest.mark.skipif(not (shutil.which(ARM_CC) and shutil.which(QEMU)),
                    reason="needs Debian's gcc-aarch64-linux-gnu and qemu-user (.ci/run installs them as root)")
def test_an_aarch64_build_gives_the_known_answers(tmp_path):
    """The order is the algorithm's, so the kernel cross-compiled for aarch64 (NEON fused multiply-adds)
    gives the x86 known answers, run here under qemu-user (an emulator: real ARM hardware not measured)."""
    exe = tmp_path / "gemm-aarch64"
    subprocess.run([ARM_CC, *[f for f in clib.FLAGS if f not in ("-fPIC", "-shared")], "-fopenmp", "-static",
                    "-o", str(exe), str(fixed_gemm.SOURCE), str(Path(__file__).parent / "c" / "fixed_gemm_main.c")],
                   check=True, capture_output=True)
    want = json.loads(VECTORS.read_text())["digests"]
    for shape in [s for s in SHAPES if s[0] * s[1] * s[2] <= 2048 * 512 * 128]:  # the two largest take ~15 s each
        a, b = operands(*shape)
        m, k = a.shape
        n = b.shape[1]
        inp = np.array([m, n, k, 2], dtype=np.int64).tobytes() + np.ascontiguousarray(a).tobytes() + \
            np.ascontiguousarray(b).tobytes()
        p = subprocess.run([QEMU, str(exe)], input=inp, capture_output=True, timeout=300)
        assert p.returncode == 0, p.stderr
        c = np.frombuffer(p.stdout, dtype=np.float32).reshape(m, n)
        key = "x".join(map(str, shape[:3])) + "".join("T" if x else "N" for x in shape[3:])
        assert digest(c) == want[key], key


def test_operators_run_through_it_only_inside_the_context():
    """torch's matmul, linear (forward and both backward products), bmm and addmm_ give the kernel's bits
    inside `enabled()`; outside it PyTorch's own kernels are back."""
    import torch

    a, b = (torch.from_numpy(x.copy()) for x in operands(300, 1027, 64, False, True))
    want = torch.from_numpy(run_lib(fixed_gemm.load()[0], a.numpy(), b.numpy(), 2))
    calls = []
    real = fixed_gemm.bmm_into

    def counting(*args):
        calls.append(1)
        return real(*args)

    fixed_gemm.bmm_into = counting
    try:
        with fixed_gemm.enabled():
            assert torch.equal(a @ b, want) and torch.equal(torch.bmm(a[None], b[None])[0], want)
            acc = torch.zeros(300, 1027)
            acc.addmm_(a, b)
            assert torch.equal(acc, want)
            lin = torch.nn.Linear(64, 1027, bias=False)
            x = torch.randn(3, 100, 64, requires_grad=True)
            lin(x).square().sum().backward()
            inside = len(calls)
        a @ b
        assert len(calls) == inside >= 6  # forward, dX, dW of the linear layer went through it; nothing after
    finally:
        fixed_gemm.bmm_into = real
    with fixed_gemm.enabled(), pytest.raises(RuntimeError, match="float32 products only"):
        torch.ones(2, 2, dtype=torch.float64) @ torch.ones(2, 2, dtype=torch.float64)


def test_the_mkl_watch_sees_a_product_of_pytorchs_own_kernels():
    """MKL's verbose mode reports a float32 product of PyTorch's own kernels: the watch under which the
    default recipe's fixed-order rebuild makes not one call (tests/cli/test_default_recipe.py; a whole
    vendor build of the tiny recipe makes 3,712 such calls)."""
    env = {"MKL_VERBOSE": "1", "ONEDNN_VERBOSE": "1"}
    p = subprocess.run([sys.executable, "-c", "import torch; torch.ones(64, 64) @ torch.ones(64, 64)"],
                       capture_output=True, text=True, env={**os.environ, **env})
    assert p.returncode == 0 and "MKL_VERBOSE SGEMM" in p.stdout + p.stderr


@pytest.mark.parametrize("edit, field", [
    ('sdpa_backend = "flash"\n', "determinism.sdpa_backend"),
    ('portable = true\n', "determinism.kernels"),
    ('device = "cuda"\n', "determinism.kernels"),
])
def test_fixed_order_is_refused_where_it_cannot_hold(tmp_path, edit, field):
    from .conftest import TINY, run_cli

    text = TINY.read_text().replace("threads = 2\n", f'threads = 2\nkernels = "fixed-order"\ncpu_capability = '
                                                     f'"avx2"\n{edit}')
    (tmp_path / "r.toml").write_text(text)
    p = run_cli("check-recipe", str(tmp_path / "r.toml"))
    assert p.returncode == 2 and field in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_fixed_order_needs_a_pinned_capability(tmp_path):
    from .conftest import TINY, run_cli

    text = TINY.read_text().replace("threads = 2\n", 'threads = 2\nkernels = "fixed-order"\n')
    (tmp_path / "r.toml").write_text(text)
    p = run_cli("check-recipe", str(tmp_path / "r.toml"))
    assert p.returncode == 2 and "pin determinism.cpu_capability" in p.stderr, p.stderr


if __name__ == "__main__":  # pragma: no cover - regenerate the vectors: PROVENANCE_WRITE_VECTORS=1 pytest this file
    sys.exit(pytest.main([__file__, "-k", "known_answer"]))
