"""Our C kernels (the attention implementations "small-head" and "tiled"): compiled once per machine by
the C compiler (`$CC`, else `cc`) into the input store (`<store>/kernels/`), named by the digest of
their source, the headers it includes, the compiler and the flags, written atomically.

Their numerics are the C source's: every value is a fixed sequence of IEEE single-precision operations
over vectors of a fixed lane count, compiled with -ffp-contract=off and without -ffast-math, so no
compiler may fuse or reorder an operation (a fused multiply-add is only ever one the source asks for,
which is exact on every target). The instruction set the library is compiled for is a matter of speed
only; the tests compare x86-64, -v3 and -v4 builds bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import subprocess
from pathlib import Path

from .._internal.atomic import atomic_write_bytes
from .._internal.hashing import sha256_hex
from ..errors import InputError

# Never -ffast-math or -ffp-contract=fast: the source's order of IEEE operations is the numerics.
FLAGS = ("-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-Wno-psabi")
HEADER = Path(__file__).with_name("kernel_exp.h")  # the exponential both kernels share

_state: dict = {"root": None}


def x86_level() -> str | None:
    """The x86-64 micro-architecture level to compile for (speed only: the bits are the same)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "x86-64"
    have = set(flags)
    if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "bmi2"} <= have:
        return "x86-64-v4"
    if {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"} <= have:
        return "x86-64-v3"
    return "x86-64"


def compiler(what: str = "our attention kernels") -> str:
    """The C compiler to use: $CC (one executable, no arguments) or `cc`, resolved on $PATH."""
    import shutil

    cc = os.environ.get("CC") or "cc"
    if not cc.strip() or any(c.isspace() for c in cc) or "\0" in cc:
        raise InputError(f"$CC = {cc!r}: expected one compiler executable (no arguments), for {what}")
    found = shutil.which(cc)
    if found is None:
        raise InputError(f"{what} compile a small C library, but no C compiler {cc!r} was found (install one, "
                         "e.g. `apt-get install gcc`, or set $CC)" + ("; or choose 'sdpa'" if "attn" in what else ""))
    return found


def configure(store_root: Path | None) -> None:
    """Where compiled libraries are kept: `<store_root>/kernels/` (the build's input store)."""
    _state["root"] = Path(store_root) if store_root is not None else None


def flags_for(extra: tuple[str, ...] = ()) -> list[str]:
    """The flags a library is compiled with on this machine."""
    level = x86_level()
    return [*FLAGS, *extra, *([f"-march={level}"] if level else [])]


def build(name: str, source: Path, extra_flags: tuple[str, ...] = (), what: str | None = None,
          ) -> tuple[ctypes.CDLL, dict]:
    """The compiled library of `source` and what build.json records of it; compiled on first use.
    `what`: the recipe setting that needs it, for messages (default: the attention implementation)."""
    from ..inputs.store import default_root

    return _build(str(_state["root"] or default_root()), name, str(source), tuple(extra_flags),
                  what or f"model.attn_implementation = {name!r}")


@functools.cache
def _build(root: str, name: str, source_path: str, extra: tuple[str, ...], what: str) -> tuple[ctypes.CDLL, dict]:
    source = Path(source_path)
    cc = compiler(what)
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60,
                                 check=True).stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        raise InputError(f"the C compiler {cc} did not report its version ({e})") from None
    flags = flags_for(extra)
    text, header = source.read_bytes(), HEADER.read_bytes()
    key = sha256_hex(b"\0".join([text, header, version.encode(), " ".join(flags).encode()]))
    kernels = Path(root) / "kernels"
    lib = kernels / f"{source.stem.replace('_', '-')}-{key[:32]}.so"
    if not lib.is_file():
        import tempfile

        try:
            kernels.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=kernels, prefix="tmp.") as tmp:
                out = Path(tmp) / "lib.so"
                run = subprocess.run([cc, *flags, "-o", str(out), str(source)], capture_output=True, text=True,
                                     timeout=600, check=False)
                if run.returncode != 0:
                    raise InputError(f"compiling {source.name} with {cc} failed (exit {run.returncode}): "
                                     f"{run.stderr.strip()[-2000:]}")
                atomic_write_bytes(lib, out.read_bytes())
        except OSError as e:
            raise InputError(f"cannot write the compiled library for {what} under {kernels} ({e.strerror}); "
                             "set --store or $PROVENANCE_STORE to a writable directory") from None
    data = lib.read_bytes()
    try:
        handle = ctypes.CDLL(str(lib))
    except OSError as e:
        raise InputError(f"cannot load {lib} ({e}); delete it to have it compiled again") from None
    record = {"implementation": name, "source": {"sha256": sha256_hex(text)},
              "header": {"name": HEADER.name, "sha256": sha256_hex(header)}, "compiler": version,
              "flags": flags, "library": {"sha256": sha256_hex(data)}}
    return handle, record


def causal_call(module, query, key, value, attention_mask, dropout: float, is_causal, kwargs: dict, *,
                head_dim_ok, max_seq: int) -> bool:
    """Whether a transformers attention call is one our kernels compute: causal without a mask, no dropout,
    queries and keys of one length (at most `max_seq`), float32 on the CPU, a head dimension `head_dim_ok`
    accepts, query heads a multiple of key/value heads, and none of the extras we do not implement."""
    import torch

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return (attention_mask is None and bool(causal) and not dropout
            and query.shape[2] == key.shape[2] == value.shape[2] and 0 < query.shape[2] <= max_seq
            and head_dim_ok(query.shape[-1]) and query.shape[1] % key.shape[1] == 0
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (query, key, value))
            and all(kwargs.get(k) is None for k in ("softcap", "sliding_window", "position_bias", "cache",
                                                     "s_aux", "sinks")))


def forward_or_sdpa(applies, attention, module, query, key, value, attention_mask, dropout, scaling, is_causal,
                    kwargs):
    """transformers' attention-function interface for one of our kernels ("small-head", "tiled"): its
    `attention` where it `applies`, else PyTorch's SDPA with the recipe's backend, as
    `attn_implementation = "sdpa"` would."""
    if applies(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
        return attention(query, key, value, scaling).transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def attention_implementation(module_name: str):
    """(forward, register) for the kernel module `module_name` (its NAME, `applies` and `attention`, looked
    up when called, as the module's own functions would): `forward` is transformers' attention-function
    interface (forward_or_sdpa); `register()` makes NAME an attention implementation transformers knows,
    once per process."""
    import sys

    def forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                **kwargs):
        kernel = sys.modules[module_name]
        return forward_or_sdpa(kernel.applies, kernel.attention, module, query, key, value, attention_mask, dropout,
                               scaling, is_causal, kwargs)

    @functools.lru_cache(maxsize=1)
    def register() -> None:
        register_attention(sys.modules[module_name].NAME, forward)

    return forward, register


def register_attention(name: str, forward) -> None:
    """Make `name` an attention implementation transformers knows; its masks are SDPA's (None where a call
    is plainly causal, which is where our kernels apply)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)


def run_in_threads(fn, n: int, *args) -> None:
    """fn(start, stop, *args) over [0, n) split into one contiguous range per torch thread (for a library
    without OpenMP). Each range's values do not depend on the split (the C functions compute each task
    alone); ctypes releases the GIL for the call."""
    import itertools

    import torch

    threads = max(1, min(torch.get_num_threads(), n))
    cuts = [n * t // threads for t in range(threads + 1)]
    if threads == 1:
        rc = [fn(0, n, *args)]
    else:
        from concurrent.futures import ThreadPoolExecutor

        pool = _pool.get(threads)
        if pool is None:
            pool = _pool[threads] = ThreadPoolExecutor(threads, thread_name_prefix="attention-kernel")
        rc = list(pool.map(lambda ab: fn(ab[0], ab[1], *args), itertools.pairwise(cuts)))
    if any(rc):
        raise RuntimeError("attention kernel: the library refused the shapes")  # guarded by applies()


_pool: dict = {}
