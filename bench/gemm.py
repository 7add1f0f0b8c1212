"""The fixed-order GEMM (provenance/builder/fixed_gemm.c) against MKL's code branches, at the products of
a training step of the shipped recipes, in one run on this machine.

Each MKL branch runs in its own process (MKL reads MKL_CBWR once, at its first call): unpinned (its
fastest branch here), pinned to COMPATIBLE,STRICT and to AVX2,STRICT (what the `avx2` level pins on other
and on Intel CPUs). In each, `torch.matmul` (MKL) and ours (`fixed_gemm.mm`, what the replaced operators
call, on the same strided views a step uses) alternate call by call, and the ratio is the median of the
paired calls' time ratios: a shared machine's speed drifts over seconds, so two runs timed one after the
other compare the drift as much as the kernels. Prints GFLOP/s (medians) per shape and the ratio ours /
MKL's fastest branch (the smallest paired ratio), with the CPU's vendor and model: docs/benchmarks.md
records them.

Usage: python bench/gemm.py [--threads 2] [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from machine import cpu  # bench/machine.py: this script's folder is on sys.path

# (name, M, N, K, transpose A, transpose B): C[M,N] = op(A) op(B), as a step computes them.
DEFAULT = [  # the default recipe: 16 x 128 tokens, hidden 128, MLP 512, vocabulary 1,600
    ("attn q/k/v/o fwd", 2048, 128, 128, False, True),
    ("mlp gate/up fwd", 2048, 512, 128, False, True),
    ("mlp down fwd", 2048, 128, 512, False, True),
    ("lm_head fwd", 2048, 1600, 128, False, True),
    ("attn dX", 2048, 128, 128, False, False),
    ("mlp down dX", 2048, 512, 128, False, False),
    ("lm_head dX", 2048, 128, 1600, False, False),
    ("attn dW", 128, 128, 2048, True, False),
    ("mlp gate dW", 512, 128, 2048, True, False),
    ("lm_head dW", 1600, 128, 2048, True, False),
]
LAAM = [  # LaaM's 5M shape: micro-batch 16 x 512 tokens, hidden 64, MLP 256, vocabulary 32,768, chunks of 1,024
    ("laam attn fwd", 8192, 64, 64, False, True),
    ("laam mlp fwd", 8192, 256, 64, False, True),
    ("laam lm_head chunk fwd", 1024, 32768, 64, False, True),
    ("laam lm_head chunk dX", 1024, 64, 32768, False, False),
    ("laam lm_head chunk dW", 32768, 64, 1024, True, False),
]
BRANCHES = {"mkl": None, "mkl COMPATIBLE,STRICT": "COMPATIBLE,STRICT", "mkl AVX2,STRICT": "AVX2,STRICT"}


def child(threads: int, reps: int) -> None:
    """One MKL branch (this process's MKL_CBWR) against ours, call by call in alternation: a shared,
    noisy machine drifts over seconds, so each ratio is the median of paired calls, not of two runs."""
    import time

    import torch

    from provenance.builder import fixed_gemm

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fixed_gemm.load()
    out = {}
    for name, m, n, k, ta, tb in DEFAULT + LAAM:
        a = torch.randn(k, m).t() if ta else torch.randn(m, k)
        b = torch.randn(n, k).t() if tb else torch.randn(k, n)
        calls = (lambda: torch.matmul(a, b), lambda: fixed_gemm.mm(a, b))
        for _ in range(3):
            for call in calls:
                call()
        times = ([], [])
        for _ in range(reps):
            for call, got in zip(calls, times):
                t0 = time.perf_counter()
                call()
                got.append(time.perf_counter() - t0)
        flop = 2.0 * m * n * k
        ratios = sorted(t_mkl / t_ours for t_mkl, t_ours in zip(*times))
        out[name] = {"mkl": flop / median(times[0]) / 1e9, "ours": flop / median(times[1]) / 1e9,
                     "ratio": ratios[len(ratios) // 2]}
    print(json.dumps(out))


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.threads, args.reps)
        return
    res = {}
    for branch, cbwr in BRANCHES.items():
        env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
        if cbwr:
            env["MKL_CBWR"] = cbwr
        p = subprocess.run([sys.executable, __file__, "--child", "--threads", str(args.threads), "--reps",
                            str(args.reps)], env=env, capture_output=True, text=True, check=True)
        res[branch] = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"CPU: {cpu()}; {args.threads} threads; GFLOP/s, median of {args.reps}; ratios: median of paired calls")
    print(f"| product | M x N x K | {' | '.join(BRANCHES)} | fixed-order | ours / MKL's fastest |")
    print("| --- | --- |" + " --- |" * (len(BRANCHES) + 2))
    for name, m, n, k, _, _ in DEFAULT + LAAM:
        cells = " | ".join(f"{res[b][name]['mkl']:.1f}" for b in BRANCHES)
        ours = median([res[b][name]["ours"] for b in BRANCHES])
        worst = min(res[b][name]["ratio"] for b in BRANCHES)
        print(f"| {name} | {m} x {n} x {k} | {cells} | {ours:.1f} | {worst:.2f} |")


if __name__ == "__main__":
    main()
