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

AXES = {"threads": "--threads", "cpu": "--cpu-capability", "world-size": "--world-size", "env": None}
CPU_LEVELS = ("native", "default", "avx2", "avx512")
# reprotest's variations (docs/reproducibility.md, "Varying the environment"): each changes what a
# build must not depend on; `all` applies every one at once, as reprotest's own default does.
ENV_VARIATIONS = ("baseline", "build-path", "home", "user", "locale", "timezone", "umask", "pythonhashseed",
                  "file-order", "clock", "all")
FAKE_TIME = "@2031-07-15 03:04:05"  # faketime: start the clock there and let it run


@dataclass
class Variation:
    """How one cell's build process differs from a plain one."""

    out: Path
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)
    umask: int | None = None
    missing: str = ""  # why this variation cannot run here
    not_varied: list[str] = field(default_factory=list)  # parts of `all` that cannot run here


def variation(name: str, cell_dir: Path, seed: int) -> Variation:
    import shutil

    names = [n for n in ENV_VARIATIONS if n not in ("baseline", "all")] if name == "all" else [name]
    v = Variation(out=cell_dir / "out")
    for n in names:
        if n == "build-path":
            v.out = cell_dir / "a longer build path with spaces" / "bülд" / "out"
            v.cwd = cell_dir
        elif n == "home":
            v.env["HOME"] = str(cell_dir / "home")
        elif n == "user":
            v.env.update(USER="provenance-reprotest", LOGNAME="provenance-reprotest")
        elif n == "locale":
            v.env.update(LANG="fr_CH.UTF-8", LC_ALL="fr_CH.UTF-8", LANGUAGE="fr_CH:fr")
        elif n == "timezone":
            v.env["TZ"] = "Pacific/Chatham"  # UTC+12:45, +13:45 in summer
        elif n == "umask":
            v.umask = 0o077
        elif n == "pythonhashseed":
            v.env["PYTHONHASHSEED"] = str(1000 + seed)
        elif n == "file-order":
            from .._internal.listing import SHUFFLE_ENV

            v.env[SHUFFLE_ENV] = f"reprotest-{seed}"
        elif n == "clock":
            if shutil.which("faketime") is None:
                why = "faketime is not installed (Debian: apt-get install faketime)"
                if name == "all":
                    v.not_varied.append(f"clock ({why})")
                else:
                    v.missing = why
            else:
                v.prefix = ["faketime", "-f", FAKE_TIME]
    return v


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
            if name == "env" and x not in ENV_VARIATIONS:
                raise InputError(f"--vary {v!r}: env variation {x!r} is not one of {', '.join(ENV_VARIATIONS)}")
            if name not in ("cpu", "env") and not (x.isdigit() and int(x) > 0):
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
    transcript: str | None = None  # blake3 of transcript.jsonl

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.settings.items())

    def as_dict(self) -> dict:
        return {"cell": self.index, "settings": self.settings, "status": self.status, "reason": self.reason,
                "weights": self.weights, "group": self.group, "verdict": self.verdict, "rel_l2": self.rel_l2,
                "max_abs_diff": self.max_abs_diff, "first_divergent_step": self.first_divergent_step,
                "first_divergent_field": self.first_divergent_field, "transcript": self.transcript,
                "out": str(self.out)}


def _blake3(path: Path) -> str:
    import blake3

    return blake3.blake3(Path(path).read_bytes()).hexdigest()


def run_cell(cmd: list[str], var: Variation | None) -> subprocess.CompletedProcess:
    """Run one cell's build in its own process, under its variation of the environment."""
    env = dict(os.environ)
    if var is None:
        return subprocess.run(cmd, capture_output=True, text=True, env=env)
    env.update(var.env)
    if "HOME" in var.env:
        Path(var.env["HOME"]).mkdir(parents=True, exist_ok=True)
        # The store and the signing key default to places under HOME; keep them where the user
        # has them, so that only HOME itself varies.
        env.setdefault("PROVENANCE_STORE", str(Path(os.path.expanduser("~/.cache/provenance"))))
        env.setdefault("PROVENANCE_KEY", str(Path(os.path.expanduser("~/.config/provenance/keys/provenance.key"))))
    if var.cwd is not None:
        var.cwd.mkdir(parents=True, exist_ok=True)
    umask = var.umask

    def preexec():
        if umask is not None:
            os.umask(umask)

    return subprocess.run(var.prefix + cmd, capture_output=True, text=True, env=env, cwd=var.cwd,
                          preexec_fn=preexec if umask is not None else None)


def run_matrix(recipe: Path, axes, out: Path, *, store: str | None, offline: bool, log=print) -> list[Cell]:
    from .compare import compare
    from .diverge import diverge, loss_curve

    out = Path(out).resolve()  # a varied build may run in another working directory
    cells = []
    for i, combo in enumerate(itertools.product(*[vals for _, vals in axes])):
        settings = dict(zip([name for name, _ in axes], combo))
        cells.append(Cell(i, settings, out / f"cell-{i:02d}"))
    for c in cells:
        var = variation(c.settings["env"], out / f"cell-{c.index:02d}", c.index) if "env" in c.settings else None
        if var is not None:
            c.out = var.out
        cmd = [sys.executable, "-m", "provenance", "build", str(Path(recipe).resolve()), "--out", str(c.out),
               "--json", "--no-cache", "--no-resume"]
        for name, value in c.settings.items():
            if AXES[name]:
                cmd += [AXES[name], value]
        if store:
            cmd += ["--store", str(Path(store).resolve())]
        if offline:
            cmd.append("--offline")
        if var is not None and var.missing:
            c.status, c.reason = "skipped", var.missing
            log(f"cell {c.index}: skipped: {var.missing}")
            continue
        log(f"cell {c.index}: {c.label()} ...")
        p = run_cell(cmd, var)
        lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
        try:
            res = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            res = {}
        if p.returncode == 0 and res.get("ok"):
            c.status, c.weights = "built", res["weights"].removeprefix("blake3:")
            c.losses = loss_curve(c.out / "transcript.jsonl")
            c.transcript = _blake3(c.out / "transcript.jsonl")
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
             "first divergent step", "transcript")]
    for c in cells:
        step = "-" if c.first_divergent_step is None else f"{c.first_divergent_step} ({c.first_divergent_field})"
        what = (c.weights or c.reason)[:16] if c.status == "built" else c.reason[:60]
        rows.append((str(c.index), c.label(), c.status, what,
                     str(c.group or "-"), c.verdict or "-", "-" if c.rel_l2 is None else f"{c.rel_l2:.3g}",
                     "-" if c.max_abs_diff is None else f"{c.max_abs_diff:.3g}", step if c.status == "built" else "-",
                     (c.transcript or "-")[:16]))
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
