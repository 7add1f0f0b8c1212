"""Fuzz the four readers of untrusted text with hypothesis, N generated inputs each (default 10,000):
the recipe loader, the policy loader, the attestation reader, diverge's transcript reader. Prints,
per target, how many inputs ran, the exit codes seen and the number of tracebacks or internal
errors (goal: 0). Uses the same strategies as tests/adversarial/test_fuzz.py.

Usage: python bench/fuzz.py [--examples 10000]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from hypothesis import HealthCheck, given, settings

    from tests.adversarial import fuzz_targets as ft

    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=10_000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        env = {**os.environ, "PROVENANCE_KEY": str(base / "keys" / "k.key")}
        p = subprocess.run([sys.executable, "-m", "provenance", "build", str(ROOT / "tests" / "recipes" / "tiny.toml"),
                            "--out", str(base / "build")], env=env, capture_output=True, text=True, cwd=ROOT)
        if p.returncode != 0:
            raise SystemExit(p.stderr)
        att, pub = base / "build" / "attestation.intoto.jsonl", base / "keys" / "k.pub"
        good = base / "build" / "transcript.jsonl"
        envelope = json.loads(att.read_text())
        targets = {
            "recipe loader": (ft.recipe_inputs(), lambda t, tmp: ft.check_recipe_target(t, tmp)),
            "policy loader": (ft.policy_inputs(), lambda t, tmp: ft.policy_target(t, tmp, att, pub)),
            "attestation reader": (ft.attestation_inputs(envelope), lambda t, tmp: ft.attestation_target(t, tmp, pub)),
            "transcript reader": (ft.transcript_inputs(good.read_text().splitlines()[0]),
                                  lambda t, tmp: ft.diverge_target(t, tmp, good)),
        }
        print(f"{a.examples} generated inputs per target")
        for name, (strategy, target) in targets.items():
            codes: collections.Counter = collections.Counter()
            bad: list[str] = []
            t0 = time.perf_counter()

            @settings(max_examples=a.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(strategy)
            def prop(text):
                with ft.scratch() as tmp:
                    code, out = target(text, tmp)
                codes[code] += 1
                if not ft.ok(code, out):
                    bad.append(out[-300:])

            prop()
            print(f"  {name:20s} {sum(codes.values()):6d} inputs in {time.perf_counter() - t0:6.1f} s; exit codes "
                  f"{dict(sorted(codes.items()))}; tracebacks or internal errors: {len(bad)}")
            for b in bad[:3]:
                print("    " + b.replace("\n", "\n    "))


if __name__ == "__main__":
    main()
