"""The reproducibility matrix: build one recipe under every combination of settings, each cell in
its own process, then group bitwise-identical cells and judge every cell against the first."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

AXES = {"threads": "--threads", "cpu": "--cpu-capability", "world-size": "--world-size"}
CPU_LEVELS = ("native", "default", "avx2", "avx512")


def parse_vary(values: list[str]) -> list[tuple[str, list[str]]]:
    axes = []
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep or not rest:
            raise InputError(f"--vary {v!r}: expected AXIS=V1,V2 (axes: {', '.join(AXES)})")
        if name not in AXES:
            raise InputError(f"--vary {v!r}: unknown axis {name!r} (axes: {', '.join(AXES)})")
        vals = [x.strip() for x in rest.split(",") if x.strip()]
        for x in vals:
            if name == "cpu" and x not in CPU_LEVELS:
                raise InputError(f"--vary {v!r}: cpu level {x!r} is not one of {', '.join(CPU_LEVELS)}")
            if name != "cpu" and not (x.isdigit() and int(x) > 0):
                raise InputError(f"--vary {v!r}: {name} values must be positive integers, got {x!r}")
        axes.append((name, vals))
    if not axes:
        raise InputError("give at least one --vary AXIS=V1,V2")
    return axes


@dataclass
class Cell:
    index: int
    settings: dict[str, str]
    out: Path
    status: str = "pending"  # built | skipped | failed
    reason: str = ""
    weights: str | None = None
    group: int | None = None
    verdict: str | None = None
    rel_l2: float | None = None
    max_abs_diff: float | None = None
    first_divergent_step: int | None = None
    first_divergent_field: str | None = None
    losses: list[float] = field(default_factory=list)

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.settings.items())

    def as_dict(self) -> dict:
        return {"cell": self.index, "settings": self.settings, "status": self.status, "reason": self.reason,
                "weights": self.weights, "group": self.group, "verdict": self.verdict, "rel_l2": self.rel_l2,
                "max_abs_diff": self.max_abs_diff, "first_divergent_step": self.first_divergent_step,
                "first_divergent_field": self.first_divergent_field, "out": str(self.out)}


def run_matrix(recipe: Path, axes, out: Path, *, store: str | None, offline: bool, log=print) -> list[Cell]:
    from .compare import compare
    from .diverge import diverge, loss_curve

    cells = []
    for i, combo in enumerate(itertools.product(*[vals for _, vals in axes])):
        settings = dict(zip([name for name, _ in axes], combo))
        cells.append(Cell(i, settings, out / f"cell-{i:02d}"))
    for c in cells:
        cmd = [sys.executable, "-m", "provenance", "build", str(recipe), "--out", str(c.out), "--json",
               "--no-cache", "--no-resume"]
        for name, value in c.settings.items():
            cmd += [AXES[name], value]
        if store:
            cmd += ["--store", store]
        if offline:
            cmd.append("--offline")
        log(f"cell {c.index}: {c.label()} ...")
        p = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
        try:
            res = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            res = {}
        if p.returncode == 0 and res.get("ok"):
            c.status, c.weights = "built", res["weights"].removeprefix("blake3:")
            c.losses = loss_curve(c.out / "transcript.jsonl")
        elif p.returncode == 2 and "this CPU offers only" in (res.get("error", "") + p.stderr):
            c.status, c.reason = "skipped", (res.get("error") or p.stderr).strip().splitlines()[-1]
        else:
            c.status = "failed"
            c.reason = (res.get("error") or p.stderr.strip() or p.stdout.strip()).splitlines()[-1:]
            c.reason = c.reason[0] if c.reason else f"exit {p.returncode}"
        log(f"cell {c.index}: {c.status} {c.weights or c.reason}")
    built = [c for c in cells if c.status == "built"]
    groups: dict[str, int] = {}
    for c in built:
        c.group = groups.setdefault(c.weights, len(groups) + 1)
    if built:
        ref = built[0]
        for c in built:
            if c is ref or c.weights == ref.weights:
                c.verdict, c.rel_l2, c.max_abs_diff = "bitwise", 0.0, 0.0
            else:
                v = compare(ref.out, c.out)
                c.verdict = v.verdict
                c.rel_l2 = v.metrics["overall"]["rel_l2"]
                c.max_abs_diff = v.metrics["overall"]["max_abs_diff"]
            d = diverge(ref.out / "transcript.jsonl", c.out / "transcript.jsonl")
            c.first_divergent_step, c.first_divergent_field = d["step"], d["field"]
    return cells


def table(cells: list[Cell]) -> str:
    rows = [("cell", "settings", "status", "weights", "group", "verdict vs cell 0", "rel L2", "max |diff|",
             "first divergent step")]
    for c in cells:
        step = "-" if c.first_divergent_step is None else f"{c.first_divergent_step} ({c.first_divergent_field})"
        rows.append((str(c.index), c.label(), c.status, (c.weights or c.reason)[:16] if c.status == "built" else c.reason[:60],
                     str(c.group or "-"), c.verdict or "-", "-" if c.rel_l2 is None else f"{c.rel_l2:.3g}",
                     "-" if c.max_abs_diff is None else f"{c.max_abs_diff:.3g}", step if c.status == "built" else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def plot(cells: list[Cell], path: Path) -> Path | None:
    built = [c for c in cells if c.status == "built"]
    if len(built) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = built[0]
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    drawn = False
    for c in built[1:]:
        n = min(len(ref.losses), len(c.losses))
        diffs = [abs(a - b) for a, b in zip(ref.losses[:n], c.losses[:n])]
        if any(diffs):
            ax.plot(range(n), [d if d > 0 else float("nan") for d in diffs], label=f"cell {c.index}: {c.label()}",
                    linewidth=1)
            drawn = True
        else:
            ax.plot([], [], label=f"cell {c.index}: {c.label()} (identical losses)")
    if drawn:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"|loss - loss of cell 0| ({ref.label()})")
    ax.set_title("Per-step training loss difference against cell 0")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    plt.close(fig)
    return path
