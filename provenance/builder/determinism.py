"""Every knob that can change the bits, set in one place and returned as a record for build.json.

Call `apply()` once, before the model is built. On CUDA it also fixes cuDNN, TF32 and the
cuBLAS workspace (docs/reproducibility.md); on the CPU those flags are set too, and are inert.
"""

from __future__ import annotations

import contextlib
import os
import random

from ..recipe import Determinism


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
    with SIGILL, so every request is checked against this first. ATen's own rule, from the CPU's
    features as the kernel enables them (/proc/cpuinfo); where there is no /proc/cpuinfo, the level
    a fresh torch picks for itself, and those below it."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        best = _torchs_own_level()
        return [level for level in ("default", "avx2", "avx512")
                if CAPABILITY_ORDER.index(level.upper()) <= CAPABILITY_ORDER.index(best)]
    levels = ["default"]
    if {"avx2", "fma"} <= flags:
        levels.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            levels.append("avx512")
    return levels


def _torchs_own_level() -> str:
    """The kernel level torch picks with no ATEN_CPU_CAPABILITY, asked in a process of its own (a process
    that asks fixes its own level for good); DEFAULT when that fails."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    p = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                       capture_output=True, text=True, env=env, timeout=300)
    level = p.stdout.strip()
    return level if p.returncode == 0 and level in CAPABILITY_ORDER else "DEFAULT"


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


# MKL and oneDNN dispatch on their own, below ATen's level: MKL picks a kernel by CPU vendor and
# ISA (on an Intel AVX-512 CPU its default path gives other bits than its AVX2 path, and its
# non-strict AVX2 path changes bits with the thread count), oneDNN up to AMX. Each ATen level
# pins both to the same instruction set (docs/reproducibility.md, "Numerics libraries").
NUMERICS_ENV = {
    "default": {"MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"MKL_CBWR": "AVX512,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
}
# MKL's AVX2 branch exists on Intel CPUs only (on an AMD EPYC MKL runs it as AUTO, its own choice
# by ISA), so elsewhere the AVX2 level pins MKL's COMPATIBLE branch, strict. COMPATIBLE does not
# give an Intel CPU the AMD machine's bits either (measured: the default recipe, rel_l2 0.308), so
# on Intel the level keeps the AVX2 branch: 2-3x faster there, and thread-invariant for any shape.
NON_INTEL_NUMERICS_ENV = {"avx2": {"MKL_CBWR": "COMPATIBLE,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
# Threads are fixed by the recipe; a library that picks fewer on its own changes a reduction's order.
THREADS_ENV = {"MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE"}
# mkl_service.h: the MKL_CBWR_* branch codes and the strict flag.
MKL_BRANCHES = {0: "OFF", 1: "BRANCH_OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1",
                8: "SSE4_2", 9: "AVX", 10: "AVX2", 12: "AVX512", 14: "AVX512_E1"}
MKL_STRICT = 0x10000


def _mkl():
    """MKL's service functions inside libtorch_cpu (statically linked), or None where torch has no MKL."""
    import ctypes

    import torch

    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get, setter = lib.mkl_serv_cbwr_get, lib.mkl_serv_cbwr_set
    except (OSError, AttributeError):
        return None
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    setter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
    return get, setter


def _branch_name(code: int) -> str:
    name = MKL_BRANCHES.get(code & ~MKL_STRICT, str(code & ~MKL_STRICT))
    return name + (",STRICT" if code & MKL_STRICT else "")


def _branch_code(name: str) -> int:
    parts = name.split(",")
    code = {v: k for k, v in MKL_BRANCHES.items()}[parts[0]]
    return code | (MKL_STRICT if parts[1:] == ["STRICT"] else 0)


def pin_numerics(requested: str) -> dict[str, str]:
    """Set MKL's branch, oneDNN's ISA ceiling and the threading libraries' dynamic mode for a pinned
    level (environment first, so child processes and oneDNN see it). Returns what was set."""
    table = NUMERICS_ENV if _intel() else {**NUMERICS_ENV, **NON_INTEL_NUMERICS_ENV}
    env = {**table.get(requested, {}), **THREADS_ENV}
    os.environ.update(env)
    return env


def _first_cpu() -> dict[str, str]:
    """/proc/cpuinfo's fields for the first processor (they are alike); empty where there is none."""
    cpu: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                k, _, v = line.partition(":")
                cpu[k.strip()] = v.strip()
    except OSError:
        pass
    return cpu


def _intel() -> bool:
    """Whether the CPU is Intel's, the only vendor for which MKL has instruction-set branches."""
    return _first_cpu().get("vendor_id") == "GenuineIntel"


def _accepted(wanted: str) -> set[int]:
    """The branch codes MKL may report for a pin: the pin itself; and on a CPU not made by Intel,
    where MKL's instruction-set branches (SSE2 ... AVX512) do not exist and MKL runs them as AUTO
    (measured on an AMD EPYC: AVX2,STRICT reads back as AUTO,STRICT), AUTO with the pin's STRICT
    flag. build.json records what MKL reports, so such a build is not mistaken for an Intel one."""
    code = _branch_code(wanted)
    ok = {code}
    isa_branch = MKL_BRANCHES.get(code & ~MKL_STRICT) not in ("OFF", "BRANCH_OFF", "AUTO", "COMPATIBLE")
    if isa_branch and not _intel():
        ok.add(_branch_code("AUTO") | (code & MKL_STRICT))
    return ok


def mkl_branch(wanted: str | None) -> str | None:
    """Make sure MKL runs the code path `wanted` (its conditional numerical reproducibility branch)
    and return the branch MKL reports. MKL reads MKL_CBWR when it starts, and its own setter works
    only until then, so a pin that comes too late is an error, never a silent other path.

    Raises InputError when MKL already runs another branch or refuses this one."""
    fns = _mkl()
    if fns is None:
        return None
    get, setter = fns
    if wanted is not None and get(-1) not in _accepted(wanted):
        from ..errors import InputError

        setter(_branch_code(wanted))
        if get(-1) not in _accepted(wanted):
            raise InputError(f"MKL runs its {_branch_name(get(-1))} code path, not the pinned MKL_CBWR={wanted}: "
                             "MKL started before the pin (set it before any matrix product, e.g. in a fresh "
                             "process) or this CPU lacks the branch")
    return _branch_name(get(-1))


def machine() -> dict[str, object]:
    """The machine a build ran on: CPU vendor, model and flags, the C library, MKL, oneDNN and OpenMP
    as torch reports them (build.json and the attestation; `rebuild` and `gate` name what differs)."""
    import platform
    import re

    import torch

    cpu = _first_cpu()
    config = torch.__config__.show()

    def found(pattern: str) -> str | None:
        m = re.search(pattern, config)
        return m.group(1).strip() if m else None

    libc = platform.libc_ver()
    return {
        "cpu_vendor": cpu.get("vendor_id") or platform.processor() or None,
        "cpu_model": cpu.get("model name"),
        "cpu_flags": " ".join(sorted(cpu.get("flags", "").split())) or None,
        "machine": platform.machine(),
        "libc": f"{libc[0]} {libc[1]}".strip() or None,
        "mkl": found(r"Math Kernel Library Version ([^\n]+?) for"),
        "onednn": found(r"MKL-DNN (v[0-9.]+)"),
        "openmp": found(r"OpenMP ([0-9]+)"),
    }


def apply(det: Determinism, *, threads: int | None = None, cpu_capability: str | None = None) -> dict[str, object]:
    """Set seeds, threads, algorithms and precision; return what was set and observed.

    Raises InputError when the pinned CPU capability cannot be honoured on this machine.
    """
    requested = cpu_capability or det.cpu_capability
    env_before = os.environ.get("ATEN_CPU_CAPABILITY")
    pin_cpu_capability(requested)
    numerics_env = pin_numerics(requested) if requested != "native" else {}
    import numpy as np
    import torch

    from ..errors import InputError

    actual = torch.backends.cpu.get_cpu_capability()
    if requested != "native" and actual != requested.upper():
        if actual in CAPABILITY_ORDER and CAPABILITY_ORDER.index(actual) < CAPABILITY_ORDER.index(requested.upper()):
            raise InputError(f"determinism.cpu_capability = {requested!r}: this CPU offers only {actual}")
        raise InputError(f"determinism.cpu_capability = {requested!r}: torch already runs {actual} kernels "
                         "(set before torch starts, e.g. in a fresh process)")

    numerics = {**numerics_env, "mkl_branch": mkl_branch(numerics_env.get("MKL_CBWR"))}

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

    gemm = None
    if det.kernels == "fixed-order":  # every float32 product through our GEMM from here on (builder/fixed_gemm.py)
        from . import fixed_gemm

        fixed_gemm.enable_for_process()
        gemm = fixed_gemm.record()

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
        "numerics": numerics,
        "cuda": {k: v for k, v in cuda.items()},
        "compile": False,
        "pythonhashseed": os.environ.get("PYTHONHASHSEED"),
        # only for portable recipes, so that the record of every other recipe stays as it was
        **({"portable": True, "portable_margin": det.portable_margin} if det.portable else {}),
        # only for fixed-order recipes, likewise: the GEMM's source, compiler, flags and library digests
        **({"kernels": "fixed-order", "gemm": gemm} if gemm is not None else {}),
        # only for canonical-reduction recipes, likewise (builder/train.py, canonical_gradient)
        **({"reduction": "canonical"} if det.reduction == "canonical" else {}),
    }


def sdpa_context(det: Determinism):
    """Restrict scaled-dot-product attention to the recipe's backend for the whole build."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[det.sdpa_backend]
    return sdpa_kernel([backend])
