"""Benchmark: portable mode (`[determinism] portable = true`, docs/reproducibility.md) against the
ordinary mode on the default recipe, in one run.

Builds, each in its own process, from the same recipe text (the portable one differs by `portable =
true` and by what portable mode requires: SDPA's attention and the vendor's kernels, see portable_text):

    ordinary   recipes/ptrace-0.9.9-debugger.toml as shipped, at its level (avx2)  the baseline
    portable   the same recipe in portable mode, avx2                           makes the rounding log
    follower   portable mode, ATen level `default` (scalar kernels), following the first one's log
    (avx512)   portable mode, avx512, following the log, when the CPU has AVX-512

Prints the training seconds of each and the ratio against the ordinary build, how many values the
portable build logged, whether every portable build has the same weights and transcript, and, on
sampled steps, how far apart the two levels' float64 values were before rounding, in float32 ulps,
against the recipe's margin (the headroom the correctness argument depends on).

Usage: python bench/portable.py [--recipe R] [--sample-every N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu  # bench/machine.py: this script's folder is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def child(argv: list[str]) -> int:
    """Run `provenance build` in this process, saving the float64 values handed to the rounder at
    sampled steps (phase % every == 0) to DUMP (safetensors)."""
    dump, every, *build_args = argv
    every = int(every)
    import torch
    from safetensors.torch import save_file

    import provenance.builder.portable as portable
    from provenance._cli import main

    saved = {}
    original = portable.Rounder.round_

    def round_(self, phase, name, t, fixed=None):
        if phase >= 0 and phase % every == 0 and fixed is not True:  # values that may differ by level
            saved[f"{phase}/{name}"] = t.detach().reshape(-1).clone()
        return original(self, phase, name, t, fixed)

    original_q = portable.Rounder.quantize_grad

    def quantize_grad(self, phase, name, g):
        if phase % every == 0:
            saved[f"{phase}/grad/{name}"] = g.detach().reshape(-1).clone()
        return original_q(self, phase, name, g)

    portable.Rounder.round_ = round_
    portable.Rounder.quantize_grad = quantize_grad
    rc = main(["build", *build_args])
    if saved:
        save_file({k: v.to(torch.float64) for k, v in saved.items()}, dump)
    return rc


def headroom(a: Path, b: Path, margin: float) -> dict:
    import torch
    from safetensors.torch import load_file

    xa, xb = load_file(str(a)), load_file(str(b))
    worst, where, values, differing, over = 0.0, None, 0, 0, 0
    for k in sorted(set(xa) & set(xb)):
        x, y = xa[k], xb[k]
        if "/grad/" in k:  # gradients are rounded on their tensor's block grid
            amax = float(x.abs().max())
            if amax == 0:
                continue
            import math

            ulp = torch.full_like(x, 2.0 ** (math.frexp(amax)[1] - 1 - 23))
        else:
            r32 = x.to(torch.float32)
            toward = torch.where(x > r32.double(), torch.full_like(r32, float("inf")),
                                 torch.full_like(r32, float("-inf")))
            ulp = (torch.nextafter(r32, toward).double() - r32.double()).abs()
        d = (x - y).abs() / ulp
        d = d[torch.isfinite(d)]
        values += d.numel()
        differing += int((d > 0).sum())
        over += int((d >= margin).sum())
        m = float(d.max()) if d.numel() else 0.0
        if m > worst:
            worst, where = m, k
    return {"values": values, "differing": differing, "max_diff_ulps": worst, "at": where,
            "over_margin": over, "margin_ulps": margin, "max_over_margin": worst / margin}


def portable_text(text: str) -> str:
    """The recipe in portable mode. Portable mode computes in float64 and refuses what computes in float32
    of its own (builder/portable.py): our attention kernels and the fixed-order GEMM, which the default
    recipe uses. So the portable variant also takes SDPA's attention and the vendor's kernels; the
    baseline stays the recipe as shipped, so the ratio is what portable mode costs against it."""
    text = text.replace("[determinism]\n", "[determinism]\nportable = true\n", 1)
    text = re.sub(r'(?m)^attn_implementation = .*$', 'attn_implementation = "sdpa"', text)
    return re.sub(r'(?m)^kernels = .*\n', "", text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "ptrace-0.9.9-debugger.toml"))
    ap.add_argument("--sample-every", type=int, default=60, help="steps between sampled float64 dumps")
    ap.add_argument("--keep", help="keep the builds in this directory")
    a = ap.parse_args()
    base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-portable-"))
    base.mkdir(parents=True, exist_ok=True)
    text = Path(a.recipe).read_text()
    if "[determinism]\n" not in text:
        raise SystemExit(f"{a.recipe}: no [determinism] table")
    portable_recipe = base / (Path(a.recipe).stem + "-portable.toml")
    portable_recipe.write_text(portable_text(text))
    import torch

    levels = ["avx2", "default"] + (["avx512"] if torch.backends.cpu.get_cpu_capability() == "AVX512" else [])
    runs = {}

    def build(label: str, recipe: Path, extra: list[str], dump: Path | None = None) -> dict:
        out = base / label
        shutil.rmtree(out, ignore_errors=True)
        args = [str(recipe), "--out", str(out), "--no-cache", "--no-resume", "--json", *extra]
        cmd = ([sys.executable, __file__, "--child", str(dump), str(a.sample_every), *args] if dump
               else [sys.executable, "-m", "provenance", "build", *args])
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if p.returncode != 0:
            raise SystemExit(f"{label} failed ({p.returncode}):\n{p.stderr[-3000:]}")
        rec = json.loads((out / "build.json").read_text())
        runs[label] = rec
        print(f"  {label:20s} train {rec['timings']['train']:8.1f} s  weights "
              f"{rec['weights']['tensors']['digest'][:16]}"
              + (f"  logged {rec['training']['portable']['values_logged']}" if "portable" in rec["training"] else ""),
              flush=True)
        return rec

    print(f"CPU: {cpu()}; builds in {base}:")
    build("ordinary-avx2", Path(a.recipe), ["--cpu-capability", "avx2"])
    build("portable-avx2", portable_recipe, ["--cpu-capability", "avx2"], base / "x64-avx2.safetensors")
    log = str(base / "portable-avx2" / "transcript.jsonl")
    for level in levels[1:]:
        build(f"portable-{level}", portable_recipe, ["--cpu-capability", level, "--rounding-log", log],
              base / f"x64-{level}.safetensors")
    build("portable-default-own-log", portable_recipe, ["--cpu-capability", "default"])

    base_t = runs["ordinary-avx2"]["timings"]["train"]
    ref = runs["portable-avx2"]
    steps = ref["training"]["steps"]
    params = ref["model"]["parameters"]
    logged = ref["training"]["portable"]["values_logged"]
    print(f"portable / ordinary training time (avx2)   = {ref['timings']['train'] / base_t:.2f}")
    for level in levels[1:]:
        print(f"portable {level} / ordinary avx2            = "
              f"{runs[f'portable-{level}']['timings']['train'] / base_t:.2f}")
    rounded = steps * params + params  # gradients on their grids, and the initial weights
    print(f"values logged near a boundary: {logged} of {rounded} rounded ({logged / rounded:.2e}); transcript "
          f"{(base / 'portable-avx2' / 'transcript.jsonl').stat().st_size / 1e6:.1f} MB vs ordinary "
          f"{(base / 'ordinary-avx2' / 'transcript.jsonl').stat().st_size / 1e6:.1f} MB")
    w = ref["weights"]["tensors"]["digest"]
    tr = (base / "portable-avx2" / "transcript.jsonl").read_bytes()
    for label in [f"portable-{lv}" for lv in levels[1:]] + ["portable-default-own-log"]:
        same_w = runs[label]["weights"]["tensors"]["digest"] == w
        same_t = (base / label / "transcript.jsonl").read_bytes() == tr
        print(f"{label:26s} weights {'equal' if same_w else 'DIFFER'}, transcript {'equal' if same_t else 'differs'}")
    print("ordinary avx2 vs portable avx2 weights: "
          + ("equal" if runs["ordinary-avx2"]["weights"]["tensors"]["digest"] == w
             else "differ (expected: other numerics)"))
    margin = ref["determinism"]["portable_margin"]
    for level in levels[1:]:
        h = headroom(base / "x64-avx2.safetensors", base / f"x64-{level}.safetensors", margin)
        print(f"avx2 vs {level}, sampled every {a.sample_every} steps: {h['values']} values, {h['differing']} "
              f"differ before rounding; max {h['max_diff_ulps']:.3g} float32 ulps at {h['at']} "
              f"({h['max_over_margin']:.3g} of the margin {margin:.3g}); {h['over_margin']} at or over the margin")
    if not a.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2:]))
    main()
