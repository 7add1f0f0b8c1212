"""The machine a benchmark ran on, in one line for its output: docs/benchmarks.md quotes every figure
with the CPU's vendor and model. The model name alone is not enough here: the virtual machines report
"AMD EPYC" for both Zen 3 (AVX2 only) and Zen 4 (AVX-512), so the line also gives the family, the model
number and the widest vector instructions."""

from __future__ import annotations

import os
import platform


def cpu() -> str:
    """e.g. "AuthenticAMD AMD EPYC (family 25, model 17; AVX-512), 2 cores"."""
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(_fields(f.read().split("\n\n")[0]))
    except OSError:
        return f"{platform.processor() or '?'}, {os.cpu_count()} cores"
    flags = info.get("flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (f"{info.get('vendor_id', '?')} {info.get('model name', '?')} (family {info.get('cpu family', '?')}, "
            f"model {info.get('model', '?')}; {isa}), {os.cpu_count()} cores")


def _fields(block: str):
    for line in block.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            yield key.strip(), value.strip()


if __name__ == "__main__":
    print(cpu())
