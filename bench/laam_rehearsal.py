"""A LaaM-scale rehearsal: bench/recipes/laam-shape-uwsgi.toml (LaaM's 5M model, tokenizer and stages
on uWSGI 2.0.28's C core, a real GPL-2.0 tree pinned by hash on PyPI), built with checkpoints every
2 steps, SIGKILLed at a seeded step, resumed, then spot-checked with `provenance replay` (3 segments).

Prints the figures recorded in docs/benchmarks.md: wall time of each phase, tokens/s, peak RSS
(/usr/bin/time -v), checkpoints kept and their size, replay time and fraction. Not part of
`make test`: it takes about 10 minutes on 2 cores (18 with the CPU flash kernel).

Usage: python bench/laam_rehearsal.py [--out /tmp/laam-rehearsal] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "bench" / "recipes" / "laam-shape-uwsgi.toml"
PROV = str(ROOT / ".venv" / "bin" / "provenance")


def timed(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float, float]:
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return p, wall, (int(m.group(1)) / (1 << 20)) if m else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/laam-rehearsal")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    work = Path(a.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    keys, store, out = work / "keys", work / "store", work / "build"
    env = {**os.environ, "PROVENANCE_STORE": str(store), "PROVENANCE_KEY": str(keys / "k.key")}
    subprocess.run([PROV, "keygen", str(keys), "--name", "k"], check=True, capture_output=True, env=env)
    t = time.perf_counter()
    subprocess.run([PROV, "fetch", str(RECIPE)], check=True, capture_output=True, env=env)
    print(f"fetch: {time.perf_counter() - t:.1f} s")

    # 1. Build, and SIGKILL it once a seeded step's checkpoint exists (between 30 % and 60 % of stage 1).
    kill_at = 2 * random.Random(a.seed).randint(20, 40)
    t0 = time.perf_counter()
    proc = subprocess.Popen([PROV, "build", str(RECIPE), "--out", str(out), "--no-cache"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target = out / "checkpoint" / f"step-{kill_at:09d}.safetensors"
    while proc.poll() is None and not target.exists():
        time.sleep(0.5)
    if proc.poll() is not None:
        sys.exit(f"the build ended before step {kill_at}:\n{proc.stderr.read()[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = time.perf_counter() - t0
    print(f"build killed (SIGKILL) after step {kill_at}: {first:.1f} s")

    # 2. Resume: the same command.
    p, wall, rss = timed([PROV, "build", str(RECIPE), "--out", str(out), "--no-cache"], env)
    if p.returncode != 0:
        sys.exit(p.stderr[-3000:])
    b = json.loads((out / "build.json").read_text())
    tr = b["training"]
    print(f"resumed after step {tr['resumed_after_step']}: {wall:.1f} s, peak RSS {rss:.2f} GiB")
    for s in tr["stages"]:
        print(f"  stage {s['name']}: {s['steps']} steps, {s['tokens']} tokens in {s['seconds']:.1f} s "
              f"({s['tokens'] / s['seconds']:.0f} tokens/s; includes the killed run's time), "
              f"loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}")
    kept = sorted((out / "replay").glob("step-*.safetensors"))
    size = sum(f.stat().st_size for f in kept)
    print(f"checkpoints kept for replay: {len(kept)}, {size / (1 << 30):.2f} GiB; build total "
          f"{first + wall:.1f} s; recitation {b['recitation']}")

    # 3. Replay 3 seeded segments.
    p, rwall, rrss = timed([PROV, "replay", str(out), "--key", str(keys / "k.pub"), "--segments", "3",
                            "--seed", str(a.seed), "--json"], env)
    rep = json.loads(p.stdout)
    print(f"replay: exit {p.returncode}, {rep['verdict']}; {rwall:.1f} s wall, peak RSS {rrss:.2f} GiB")
    for s in rep["segments"]:
        print(f"  segment {s['start']} -> {s['end']}: {s['verdict']} in {s['seconds']:.1f} s")
    train = b["timings"]["train"]
    print(f"replay re-executed {rep['fraction_replayed']:.1%} of the steps; its wall time is "
          f"{rwall / (first + wall):.1%} of the build's ({rwall:.1f} s vs {first + wall:.1f} s; "
          f"the resumed run's training alone: {train:.1f} s)")


if __name__ == "__main__":
    main()
