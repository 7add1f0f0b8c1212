"""The determinism module: every knob is applied and recorded; the CUDA settings are configured."""

from __future__ import annotations

import os

import torch

from provenance.build.determinism import apply, cuda_settings, derive_seed
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


def test_cpu_capability_pin_is_checked(monkeypatch):
    import pytest

    from provenance.errors import InputError

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)  # restored to its absence afterwards
    actual = torch.backends.cpu.get_cpu_capability()
    rec = apply(Determinism(seed=1, cpu_capability=actual.lower()))
    assert rec["cpu_capability"] == actual and rec["cpu_capability_requested"] == actual.lower()
    other = "default" if actual != "DEFAULT" else "avx2"
    with pytest.raises(InputError, match="cpu_capability"):
        apply(Determinism(seed=1, cpu_capability=other))  # torch has already chosen its kernels
