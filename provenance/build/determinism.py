"""Every knob that can change the bits, set in one place and returned as a record for build.json.

Call `apply()` once, before the model is built. On CUDA it also fixes cuDNN, TF32 and the
cuBLAS workspace (docs/reproducibility.md); on the CPU those flags are set too, and are inert.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct

import blake3

from ..recipe import Determinism


def derive_seed(seed: int, *labels: object) -> int:
    """A 63-bit seed for one purpose (model init, data order of stage N, ...), stable across runs."""
    digest = blake3.blake3(":".join(map(str, (seed, *labels))).encode()).digest()
    return struct.unpack("<Q", digest[:8])[0] >> 1


def cuda_settings(det: Determinism) -> dict[str, object]:
    """The CUDA-side settings this recipe asks for (pure function; unit-tested on the CPU)."""
    return {
        # NCCL picks Ring or Tree per message size; Ring alone fixes the all-reduce's summation order.
        "env": {"CUBLAS_WORKSPACE_CONFIG": det.cublas_workspace_config, "NCCL_ALGO": "Ring"},
        "cudnn.deterministic": det.deterministic_algorithms,
        "cudnn.benchmark": det.cudnn_benchmark,
        "cudnn.allow_tf32": det.allow_tf32,
        "cuda.matmul.allow_tf32": det.allow_tf32,
    }


CAPABILITY_ORDER = ("DEFAULT", "AVX2", "AVX512")


def supported_cpu_levels() -> list[str]:
    """ATen kernel levels this CPU can run. Asking torch for one it cannot run kills the process
    with SIGILL, so every request is checked against this first."""
    import torch

    levels = ["default"]
    try:
        avx2, avx512 = torch.cpu._is_avx2_supported(), torch.cpu._is_avx512_supported()
    except AttributeError:  # older torch: read the kernel's view of the CPU
        try:
            flags = set(open("/proc/cpuinfo").read().split())
        except OSError:
            flags = set()
        avx2 = {"avx2", "fma"} <= flags
        avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    if avx2:
        levels.append("avx2")
    if avx2 and avx512:
        levels.append("avx512")
    return levels


def pin_cpu_capability(requested: str) -> None:
    """Set ATEN_CPU_CAPABILITY for a pinned instruction set. Must run before torch runs a kernel.

    Raises InputError when this CPU lacks the level."""
    if requested == "native":
        return
    levels = supported_cpu_levels()
    if requested not in levels:
        from ..errors import InputError

        raise InputError(f"determinism.cpu_capability = {requested!r}: this CPU offers only "
                         f"{', '.join(levels)}")
    os.environ["ATEN_CPU_CAPABILITY"] = requested


def apply(det: Determinism, *, threads: int | None = None, cpu_capability: str | None = None) -> dict[str, object]:
    """Set seeds, threads, algorithms and precision; return what was set and observed.

    Raises InputError when the pinned CPU capability cannot be honoured on this machine.
    """
    requested = cpu_capability or det.cpu_capability
    env_before = os.environ.get("ATEN_CPU_CAPABILITY")
    pin_cpu_capability(requested)
    import numpy as np
    import torch

    from ..errors import InputError

    actual = torch.backends.cpu.get_cpu_capability()
    if requested != "native" and actual != requested.upper():
        if actual in CAPABILITY_ORDER and CAPABILITY_ORDER.index(actual) < CAPABILITY_ORDER.index(requested.upper()):
            raise InputError(f"determinism.cpu_capability = {requested!r}: this CPU offers only {actual}")
        raise InputError(f"determinism.cpu_capability = {requested!r}: torch already runs {actual} kernels "
                         "(set before torch starts, e.g. in a fresh process)")

    cuda = cuda_settings(det)
    for key, value in cuda["env"].items():
        # cuBLAS reads this when the CUDA context starts, so it must be set before any CUDA call.
        os.environ[key] = value
    torch.backends.cudnn.deterministic = cuda["cudnn.deterministic"]
    torch.backends.cudnn.benchmark = cuda["cudnn.benchmark"]
    torch.backends.cudnn.allow_tf32 = cuda["cudnn.allow_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = cuda["cuda.matmul.allow_tf32"]

    n_threads = threads or det.threads
    torch.set_num_threads(n_threads)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel region
        torch.set_num_interop_threads(det.interop_threads)
    torch.use_deterministic_algorithms(det.deterministic_algorithms)
    torch.set_float32_matmul_precision(det.matmul_precision)

    random.seed(det.seed)
    np.random.seed(det.seed % (1 << 32))
    torch.manual_seed(det.seed)

    device = det.device
    if device == "cuda" and not torch.cuda.is_available():
        from ..errors import InputError

        raise InputError("determinism.device = 'cuda' but no CUDA device is available here")
    return {
        "seed": str(det.seed),
        "threads": n_threads,
        "interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "sdpa_backend": det.sdpa_backend,
        "device": device,
        "cpu_capability": actual,
        "cpu_capability_requested": requested,
        "aten_cpu_capability_env": env_before,  # as the caller set it; a pinned level overrides it
        "cuda": {k: v for k, v in cuda.items()},
        "compile": False,
        "pythonhashseed": os.environ.get("PYTHONHASHSEED"),
    }


def sdpa_context(det: Determinism):
    """Restrict scaled-dot-product attention to the recipe's backend for the whole build."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[det.sdpa_backend]
    return sdpa_kernel([backend])
