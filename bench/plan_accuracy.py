"""Does `check-recipe --plan` predict a build's time per step? For the default recipe and for LaaM's shape
(LaaM's own recipe on a tree of Linux 1.0's shape, made as bench/laam_first_steps.py makes it, each
stage cut to a few steps): build each with --no-cache, take every stage's measured seconds per step
from build.json (`training.stages[].seconds` / steps), then ask `check-recipe --plan` (the timed probe
of every stage's step) and compare. One-time costs (set-up, kernel compilation, the first step) are
what the plan reports apart; a build's stage seconds include its first step, so LaaM's shape, cut to
a few steps, is built twice (N and 2N steps a stage) and its time per step is the difference over N
(the first step's extra is what is left). The default recipe's 720 steps make its first step's share
small; its per-step time is its stage seconds over its steps.

Usage: python bench/plan_accuracy.py [--laam-steps 6] [--out /tmp/plan-accuracy] [--only default|laam]
Prints a markdown table (docs/benchmarks.md, "check-recipe --plan against the build").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from machine import cpu  # bench/machine.py: this script's folder is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROVENANCE = [sys.executable, "-m", "provenance"]


def laam_shape(work: Path, steps: int) -> Path:
    """LaaM's recipe over a 506-file tree of the machine's Linux UAPI headers, `steps` steps a stage."""
    from bench.laam_first_steps import laam_shape_recipe, make_tree
    from provenance.inputs.store import tree_digest

    tree = work / "tree"
    if not tree.exists():
        make_tree(tree)
    text = laam_shape_recipe(tree, tree_digest(tree)["blake3"], steps)
    # the audit is not what is measured here: one short window a file instead of 8 of up to 128 + 50 tokens
    text = text.replace("[audit]\n", "[audit]\nwindows_per_file = 1\nprefix_tokens = [16]\nsuffix_tokens = 8\n"
                                      "header_tokens = 16\n", 1)
    recipe = work / f"laam-shape-{steps}.toml"
    recipe.write_text(text)
    return recipe


def run(*args: str) -> dict:
    p = subprocess.run([*PROVENANCE, *args, "--json"], capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        sys.exit(f"{' '.join(args[:2])} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    return json.loads(p.stdout)


def stage_seconds(recipe: Path, store: Path, out: Path) -> dict[str, tuple[float, int]]:
    """(seconds, steps) of each stage of a fresh build (its stage seconds include the first step)."""
    run("build", str(recipe), "--out", str(out), "--store", str(store), "--no-cache")
    record = json.loads((out / "build.json").read_text())
    return {s["name"]: (s["seconds"], s["steps"]) for s in record["training"]["stages"]}


def per_step(store: Path, out: Path, recipe: Path, longer: Path | None) -> dict[str, tuple[float, float]]:
    """(seconds per step, the first step's extra) of each stage; from two builds when `longer` (2N steps)."""
    short = stage_seconds(recipe, store, out / "n")
    if longer is None:
        return {name: (sec / n, 0.0) for name, (sec, n) in short.items()}
    long = stage_seconds(longer, store, out / "2n")
    out_ = {}
    for name, (sec, n) in short.items():
        step = (long[name][0] - sec) / (long[name][1] - n)
        out_[name] = (step, sec - n * step)
    return out_


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--laam-steps", type=int, default=6)
    ap.add_argument("--out", default="/tmp/plan-accuracy")
    ap.add_argument("--only", choices=("default", "laam"), help="measure one of the two recipes")
    a = ap.parse_args()
    work = Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store"
    recipes: dict[str, tuple[Path, Path | None]] = {}
    if a.only != "laam":
        recipes["default (ptrace-0.9.9-debugger)"] = (ROOT / "recipes" / "ptrace-0.9.9-debugger.toml", None)
    if a.only != "default":
        n = a.laam_steps
        recipes[f"LaaM shape ({n} and {2 * n} steps a stage)"] = (laam_shape(work, n), laam_shape(work, 2 * n))
    print(f"CPU: {cpu()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}\n")
    print("| recipe | stage | plan: s / step | build: s / step | plan / build | build: first step's extra "
          "| plan: one-time costs |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, (recipe, longer) in recipes.items():
        got = per_step(store, work / re.sub(r"\W+", "-", label), recipe, longer)
        plan = run("check-recipe", str(recipe), "--plan", "--store", str(store))["plan"]
        one_time = plan["probe"]["one_time_seconds"]
        for st in plan["stages"]:
            want, (step, extra) = st["seconds_per_step"], got[st["name"]]
            print(f"| {label} | {st['name']} | {want:.3f} | {step:.3f} | {want / step:.2f} | "
                  f"{'-' if longer is None else f'{extra:.1f} s'} | {one_time:.1f} s |")


if __name__ == "__main__":
    main()
