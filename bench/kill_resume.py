"""Rehearsal: SIGKILL the default recipe's build at random steps, resume it, and count how many
resumed builds are bitwise equal to an uninterrupted one (goal: all). Also times the checkpoint
overhead: the build with the default interval and with a checkpoint every 10 steps, against a
build without checkpoints, in the same run.

Usage: python bench/kill_resume.py [--kills 20] [--every 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "ptrace-0.9.9-debugger.toml"
PY = str(ROOT / ".venv" / "bin" / "python")


def build(out: Path, *extra: str) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([PY, "-m", "provenance", "build", str(RECIPE), "--out", str(out), "--no-cache", *extra],
                       capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-2000:])
    return time.perf_counter() - t0


def train_seconds(out: Path) -> float:
    return json.loads((out / "build.json").read_text())["timings"]["train"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="builds per checkpoint setting for the overhead")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        walls = {"no checkpoints": [], "default interval": [], f"every {a.every} steps": []}
        trains = {k: [] for k in walls}
        for i in range(a.repeats):  # interleaved, so drift on a shared machine hits all three alike
            for name, extra in (("no checkpoints", ["--no-resume"]), ("default interval", []),
                                (f"every {a.every} steps", ["--checkpoint-every", str(a.every)])):
                out = base / f"{name.replace(' ', '-')}-{i}"
                walls[name].append(build(out, *extra))
                trains[name].append(train_seconds(out))
        ref = base / f"every-{a.every}-steps-0"
        want_w = (ref / "model" / "model.safetensors").read_bytes()
        want_t = (ref / "transcript.jsonl").read_bytes()
        med = {k: statistics.median(v) for k, v in trains.items()}
        setup = statistics.median(walls["no checkpoints"]) - med["no checkpoints"]
        print(f"training seconds, median of {a.repeats} (build wall seconds):")
        for k in walls:
            print(f"  {k:20s} {med[k]:7.2f}  ({statistics.median(walls[k]):.2f})", flush=True)
        for k in list(walls)[1:]:
            print(f"  overhead of {k}: {100 * (med[k] / med['no checkpoints'] - 1):+.2f} % of training time")
        equal = 0
        for k in range(a.kills):
            out = base / f"kill-{k}"
            proc = subprocess.Popen([PY, "-m", "provenance", "build", str(RECIPE), "--out", str(out),
                                     "--no-cache", "--checkpoint-every", str(a.every)], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            # Somewhere in training: after the set-up, before the last step.
            delay = rng.uniform(setup + 1, setup + 0.97 * med[f"every {a.every} steps"])
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            ck = sorted((out / "checkpoint").glob("step-*.safetensors")) if (out / "checkpoint").is_dir() else []
            at = int(ck[-1].stem.split("-")[1]) if ck else 0
            build(out, "--checkpoint-every", str(a.every))
            same = ((out / "model" / "model.safetensors").read_bytes() == want_w
                    and (out / "transcript.jsonl").read_bytes() == want_t)
            resumed = json.loads((out / "build.json").read_text())["training"]["resumed_after_step"]
            equal += same
            print(f"  kill {k + 1:2d}: SIGKILL after {delay:5.1f} s (last checkpoint: step {at}), resumed after "
                  f"step {resumed}: {'bitwise equal' if same else 'DIFFERENT'}", flush=True)
        print(f"resumed builds bitwise equal to the uninterrupted one: {equal}/{a.kills}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
