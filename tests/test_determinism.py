"""The determinism module: every knob is applied and recorded; the CUDA settings are configured."""

from __future__ import annotations

import os

import torch

from provenance._internal.seeds import derive_seed
from provenance.builder.determinism import apply, cuda_settings
from provenance.recipe import Determinism


def test_cuda_settings_are_strict_by_default():
    s = cuda_settings(Determinism(seed=1))
    assert s["env"] == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NCCL_ALGO": "Ring"}
    assert s["cudnn.deterministic"] is True and s["cudnn.benchmark"] is False
    assert s["cudnn.allow_tf32"] is False and s["cuda.matmul.allow_tf32"] is False
    loose = cuda_settings(Determinism(seed=1, allow_tf32=True, cudnn_benchmark=True, cublas_workspace_config=":16:8"))
    assert loose["cuda.matmul.allow_tf32"] is True and loose["env"]["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_apply_sets_and_records_every_knob():
    rec = apply(Determinism(seed=7, threads=1))
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == 1 and rec["threads"] == 1
    assert torch.backends.cudnn.deterministic is True and torch.backends.cudnn.benchmark is False
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert rec["seed"] == "7" and rec["matmul_precision"] == "highest" and rec["sdpa_backend"] == "math"
    assert rec["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    a = torch.rand(3)
    apply(Determinism(seed=7, threads=2))
    assert torch.equal(a, torch.rand(3)) and torch.get_num_threads() == 2


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(42, "model-init") == derive_seed(42, "model-init")
    assert len({derive_seed(42, "model-init"), derive_seed(42, "data-order", 0), derive_seed(42, "data-order", 1),
                derive_seed(43, "model-init")}) == 4
    assert 0 <= derive_seed(2**63 - 1, "x") < 2**63


PIN_CHECK = """
import sys, torch
from provenance.builder.determinism import apply
from provenance.errors import InputError
from provenance.recipe import Determinism
actual = torch.backends.cpu.get_cpu_capability()
rec = apply(Determinism(seed=1, cpu_capability=actual.lower()))
assert rec["cpu_capability"] == actual and rec["cpu_capability_requested"] == actual.lower(), rec
other = "default" if actual != "DEFAULT" else "avx2"
try:
    apply(Determinism(seed=1, cpu_capability=other))  # torch has already chosen its kernels
except InputError as e:
    print(e)
"""


def test_cpu_capability_pin_is_checked():
    """In a fresh process (the pins must come before torch and MKL run a kernel)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    p = subprocess.run([sys.executable, "-c", PIN_CHECK], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert "determinism.cpu_capability" in p.stdout and "torch already runs" in p.stdout, p.stdout


MATMUL = """
import hashlib, json, sys
import torch
def product():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(257, 513, generator=g), torch.randn(513, 129, generator=g)
    return hashlib.sha256((a @ b).numpy().tobytes()).hexdigest()
from provenance.builder.determinism import apply
from provenance.errors import InputError
from provenance.recipe import Determinism
if sys.argv[1] == "late":
    product()  # MKL starts here, on the caller's branch, before the pin
try:
    rec = apply(Determinism(seed=1, cpu_capability="avx2")) if sys.argv[1] != "plain" else {"numerics": None}
except InputError as e:
    print(json.dumps({"error": str(e)}))
else:
    print(json.dumps({"numerics": rec["numerics"], "product": product()}))
"""


def test_mkl_and_onednn_are_pinned_with_the_cpu_level():
    """MKL's branch follows the recipe's level over the caller's MKL_CBWR, giving the bits of a process
    started with the pin; a pin that comes after MKL started is refused, not silently ignored."""
    import json
    import subprocess
    import sys

    import pytest

    from provenance.builder.determinism import _intel, supported_cpu_levels

    if "avx2" not in supported_cpu_levels():
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, "MKL_CBWR": "AUTO", "ATEN_CPU_CAPABILITY": "avx2"}
    pinned = json.loads(subprocess.run([sys.executable, "-c", MATMUL, "pin"], capture_output=True, text=True,
                                       env=env, check=True).stdout)
    # MKL's AVX2 branch on Intel; elsewhere its COMPATIBLE branch (the AVX2 one is Intel's alone)
    branch = "AVX2,STRICT" if _intel() else "COMPATIBLE,STRICT"
    assert pinned["numerics"] == {"MKL_CBWR": branch, "ONEDNN_MAX_CPU_ISA": "AVX2",
                                  "MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE", "mkl_branch": branch}
    fresh = json.loads(subprocess.run([sys.executable, "-c", MATMUL, "plain"], capture_output=True, text=True,
                                      env={**env, "MKL_CBWR": branch}, check=True).stdout)
    assert pinned["product"] == fresh["product"]
    late = json.loads(subprocess.run([sys.executable, "-c", MATMUL, "late"], capture_output=True, text=True,
                                     env=env, check=True).stdout)
    assert f"MKL runs its AUTO code path, not the pinned MKL_CBWR={branch}" in late["error"]


def test_a_rebuild_on_another_vendor_or_other_pins_is_not_held_to_bitwise():
    from provenance.repro.rebuild import stack_matches

    det = {"cpu_capability": "AVX2", "numerics": {"MKL_CBWR": "AVX2,STRICT", "mkl_branch": "AVX2,STRICT"}}
    machine = {"cpu_vendor": "GenuineIntel", "mkl": "2024.2", "onednn": "v3.12.0"}
    st = {"predicate": {"buildDefinition": {"internalParameters": {"determinism": det, "machine": machine},
                                            "resolvedDependencies": [{"name": "toolchain:torch",
                                                                      "uri": "pkg:pypi/torch@2.13.0+cpu"}]}}}
    rec = {"determinism": det, "machine": machine, "toolchain": {"installed": {"torch": "2.13.0+cpu"}}}
    assert stack_matches(st, rec) == (True, "same CPU vendor, capability, numerics libraries and toolchain as the "
                                            "reference")
    amd = {**rec, "machine": {**machine, "cpu_vendor": "AuthenticAMD"}}
    same, why = stack_matches(st, amd)
    assert not same and "CPU vendor AuthenticAMD vs reference GenuineIntel" in why
    loose = {**rec, "determinism": {**det, "numerics": {"mkl_branch": "AVX2", "MKL_CBWR": "AVX2"}}}
    assert stack_matches(st, loose) == (False, "numerics libraries MKL_CBWR=AVX2, mkl_branch=AVX2 vs reference "
                                               "MKL_CBWR=AVX2,STRICT, mkl_branch=AVX2,STRICT")
    # Under MKL's AVX2 branch the thread count does not change the bits; under COMPATIBLE it may.
    strict = {**det, "threads": 2}
    st2 = {"predicate": {"buildDefinition": {**st["predicate"]["buildDefinition"],
                                             "internalParameters": {"determinism": strict, "machine": machine}}}}
    assert stack_matches(st2, {**rec, "determinism": {**strict, "threads": 1}})[0]
    compat = {**strict, "numerics": {"MKL_CBWR": "COMPATIBLE,STRICT", "mkl_branch": "COMPATIBLE,STRICT"}}
    st3 = {"predicate": {"buildDefinition": {**st["predicate"]["buildDefinition"],
                                             "internalParameters": {"determinism": compat, "machine": machine}}}}
    assert stack_matches(st3, {**rec, "determinism": compat})[0]
    assert stack_matches(st3, {**rec, "determinism": {**compat, "threads": 1}}) == (
        False, "threads 1 vs reference 2 (under MKL's COMPATIBLE branch some products' bits depend on the thread "
               "count, docs/reproducibility.md)")
    bf16 = {"predicate": {"buildDefinition": {**st2["predicate"]["buildDefinition"], "externalParameters": {
        "recipe": {"content": '[[stages]]\nname = "a"\nprecision = "float32"\n[[stages]]\nname = "b"\n'
                              'precision = "bf16-autocast"\n'}}}}}
    assert stack_matches(bf16, {**rec, "determinism": {**strict, "threads": 1}}) == (
        False, "threads 1 vs reference 2 (bf16 autocast's bits on the CPU depend on the thread count, "
               "docs/reproducibility.md)")
    old = {"predicate": {"buildDefinition": {"internalParameters": {"determinism": {"cpu_capability": "AVX2"}},
                                             "resolvedDependencies": []}}}
    assert stack_matches(old, rec) == (False, "the reference does not record its MKL and oneDNN pins; CPU vendor "
                                              "GenuineIntel vs reference None (not measured to give the same bits); "
                                              "mkl 2024.2 vs reference None; onednn v3.12.0 vs reference None")


def test_cpu_levels_come_from_the_kernel_or_from_torchs_own_choice(monkeypatch):
    """The levels a build may pin are ATen's rule over /proc/cpuinfo's flags; without /proc/cpuinfo, the level
    torch picks for itself in a fresh process (its public get_cpu_capability) and those below: the same list."""
    import builtins

    from provenance.builder import determinism

    from_proc = determinism.supported_cpu_levels()
    assert from_proc[0] == "default" and set(from_proc) <= {"default", "avx2", "avx512"}
    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise OSError("no /proc here")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert determinism.supported_cpu_levels() == from_proc
