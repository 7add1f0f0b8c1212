"""What the canonical reduction costs: DistributedDataParallel's all-reduce against the canonical fold
(docs/formats.md, "Canonical reduction"), on one process, two, and two local "nodes" (two launchers on
127.0.0.1 with one rank each), at the default recipe's shape and LaaM's.

Each cell is a fresh build (--no-cache) of the recipe cut to N and then 2N optimizer steps a stage; its
time per step is the difference of the two builds' stage seconds over N (so set-up and the first step
fall out), and its memory the largest resident set of any of its processes (the kernel's account of
the launcher's waited-for descendants, wait4). Every canonical cell must end with the weights of the
one-process canonical build (checked: the bench stops otherwise).

LaaM's shape (its recipe over a tree of this machine's Linux UAPI headers, bench/laam_first_steps.py)
uses the chunked loss, which the all-reduce path refuses at world size 2: that cell is reported as such.

Usage: python bench/topology.py [--steps 4] [--out /tmp/topology] [--only default|laam]
Prints a markdown table (docs/benchmarks.md, "Canonical reduction against all-reduce").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from machine import cpu  # bench/machine.py: this script's folder is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROVENANCE = [sys.executable, "-m", "provenance"]
CELLS = [("all-reduce", 1, 1), ("canonical", 1, 1), ("all-reduce", 2, 1), ("canonical", 2, 1), ("canonical", 2, 2)]


def default_shape(work: Path, steps: int, reduction: str) -> Path:
    text = (ROOT / "recipes" / "ptrace-0.9.9-debugger.toml").read_text()
    text = text.replace("epochs = 90", f"steps = {steps}").replace("warmup_steps = 20", "warmup_steps = 1")
    return _write(work / f"default-{reduction}-{steps}.toml", text, reduction)


def laam_shape(work: Path, steps: int, reduction: str) -> Path:
    from bench.plan_accuracy import laam_shape as plan_accuracy_shape  # the same shape, its audit cut short

    return _write(work / f"laam-{reduction}-{steps}.toml", plan_accuracy_shape(work, steps).read_text(), reduction)


def _write(path: Path, text: str, reduction: str) -> Path:
    text = re.sub(r'^reduction = "\w[\w-]*"$', f'reduction = "{reduction}"', text, flags=re.M)
    path.write_text(text)
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(recipe: Path, out: Path, store: Path, world: int, nodes: int) -> tuple[dict, float] | str:
    """(build.json, peak RSS in MiB) of one build, or the error line of a refused one."""
    common = ["build", str(recipe), "--store", str(store), "--no-cache"]
    if nodes == 1:
        cmds = [[*PROVENANCE, *common, "--out", str(out), "--world-size", str(world)]]
    else:
        port = _port()
        cmds = [[*PROVENANCE, *common, "--out", str(out) + ("" if r == 0 else f"-node{r}"), "--nnodes", str(nodes),
                 "--node-rank", str(r), "--rdzv-endpoint", f"127.0.0.1:{port}"] for r in range(nodes)]
    logs = [out.parent / f"{out.name}-node{r}.log" for r in range(len(cmds))]
    procs = []
    for c, log in zip(cmds, logs):
        with open(log, "w") as f:  # a file, not a pipe: a long build's output cannot fill it and stall it
            procs.append(subprocess.Popen(c, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f))
    peak = 0.0
    for p, log in zip(procs, logs):
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        err = log.read_text()
        if p.returncode != 0:
            return next((line for line in err.splitlines() if line.startswith("error:")), err[-300:])
        peak = max(peak, usage.ru_maxrss / 1024)
    return json.loads((out / "build.json").read_text()), peak


def cell(make, work: Path, store: Path, steps: int, reduction: str, world: int, nodes: int):
    """(seconds per step by stage, peak MiB, weights digest) of one cell, or a refusal's message."""
    name = f"{reduction}-w{world}-n{nodes}"
    got = [build(make(work, n, reduction), work / f"{name}-{n}", store, world, nodes) for n in (steps, 2 * steps)]
    if isinstance(got[0], str):
        return got[0]
    (short, peak1), (long, peak2) = got
    per = {a["name"]: (b["seconds"] - a["seconds"]) / (b["steps"] - a["steps"])
           for a, b in zip(short["training"]["stages"], long["training"]["stages"])}
    return per, max(peak1, peak2), long["weights"]["tensors"]["digest"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="/tmp/topology")
    ap.add_argument("--only", choices=("default", "laam"))
    a = ap.parse_args()
    work = Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    shapes = {"default (ptrace-0.9.9-debugger)": default_shape, "LaaM shape": laam_shape}
    if a.only:
        shapes = {k: v for k, v in shapes.items() if k.lower().startswith(a.only)}
    print(f"CPU: {cpu()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
          f"{a.steps} and {2 * a.steps} steps a stage\n")
    print("| shape | reduction | ranks | nodes | stage | s / step | vs all-reduce, 1 rank | peak RSS | weights |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, make in shapes.items():
        base, canonical = None, None
        shape_dir = work / re.sub(r"\W+", "-", label).strip("-")
        shape_dir.mkdir(exist_ok=True)
        for reduction, world, nodes in CELLS:
            got = cell(make, shape_dir, work / "store", a.steps, reduction, world, nodes)
            if isinstance(got, str):
                print(f"| {label} | {reduction} | {world} | {nodes} | - | refused: {got} | | | |")
                continue
            per, peak, digest = got
            base = base or per
            if reduction == "canonical":
                canonical = canonical or digest
                if digest != canonical:
                    sys.exit(f"{label}: {reduction} on {world} ranks, {nodes} nodes gave other weights: {digest}")
            same = "= canonical, 1 rank" if reduction == "canonical" else digest[:12]
            for stage, sec in per.items():
                print(f"| {label} | {reduction} | {world} | {nodes} | {stage} | {sec:.3f} | {sec / base[stage]:.2f} | "
                      f"{peak:.0f} MiB | {same} |")


if __name__ == "__main__":
    main()
