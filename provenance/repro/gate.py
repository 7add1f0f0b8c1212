"""`provenance gate`, for CI: rebuild a recipe and judge it against its committed reference attestation
(bitwise on the reference's stack), optionally once more under every environment variation at once
(reprotest's), with a JUnit report. The answer is a list of cases, each passed or failed with a line
saying why (docs/ci.md)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ProvenanceError
from .judged import Settings, judged_build
from .rebuild import junit, verified_statement

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .._internal.progress import Reporter
    from ..attest.signing import Signing

Case = tuple[str, bool, str]  # name, passed, detail
SUITE = "provenance-gate"


@dataclass
class GateResult:
    """The gate's cases in order, the reproduced result and verdict of the rebuild (None when none ran)."""

    cases: list[Case] = field(default_factory=list)
    result: str = "FAILED"
    verdict: str | None = None

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.cases)


def gate(recipe_path: Path, *, reference: Path, key: Path, out: Path, settings: Settings,
         signing: Callable[[], Signing], reporter: Reporter, bitwise: bool = False, reprotest: bool = False,
         junit_path: Path | None = None) -> GateResult:
    """Run the gate; the JUnit report is written to `junit_path` whatever the outcome (a ProvenanceError
    is recorded as the failed case "gate" and raised again)."""
    t0 = time.perf_counter()
    res = GateResult()
    try:
        _run(res, recipe_path, reference, key, out, settings, signing, reporter, bitwise, reprotest)
    except ProvenanceError as e:
        res.cases.append(("gate", False, e.diagnostics()))
        raise
    finally:
        if junit_path is not None:
            junit(junit_path, SUITE, res.cases, time.perf_counter() - t0)
    return res


def _run(res: GateResult, recipe_path: Path, reference: Path, key: Path, out: Path, settings: Settings,
         signing: Callable[[], Signing], reporter: Reporter, bitwise: bool, reprotest: bool) -> None:
    from ..recipe import load_recipe
    from ..verify.checks import recipe_file_check
    from ..verify.report import Checks

    payload, st = verified_statement(reference, [key], settings.policy)
    res.cases.append(("reference attestation verifies", True, f"{reference} with {key}"))
    recipe = load_recipe(recipe_path)
    rr = Checks()
    recipe_file_check(rr, st, recipe_path)
    res.cases.append(("recipe matches the reference", rr.ok, rr.checks[0].detail))
    if not rr.ok:  # a build of another recipe cannot reproduce the reference: minutes saved, not spent
        res.cases.append(("rebuild", False, "not started: the recipe differs from the one the reference attests"))
        return
    judged = judged_build(recipe, out, reference, payload, st, settings, signing(), reporter,
                          bitwise=True if bitwise else None)
    res.cases.append(("rebuild", True, f"weights blake3:{judged.record['weights']['tensors']['digest']}"))
    res.cases.append((f"stack ({'bitwise required' if judged.same_stack else 'tolerance from the signed fingerprint'})",
                      True, judged.why))
    res.cases.extend((f"weights: {c.check}", c.ok, c.detail) for c in judged.report.checks)
    if reprotest:
        res.cases.append(reprotest_case(recipe_path, out, judged.record, settings))
    res.result, res.verdict = judged.report.result, judged.report.verdict


def reprotest_case(recipe_path: Path, out: Path, record: dict, settings: Settings) -> Case:
    """One more build with every environment variation at once (reprotest's default): its weights
    and transcript must be the gate build's, byte for byte."""
    import shutil

    from .._internal.hashing import blake3_bytes
    from .matrix import run_cell, variation

    name = "reprotest: every variation at once"
    out = out.resolve()  # the varied build runs in another working directory
    cell = out.parent / f"{out.name}-reprotest"
    shutil.rmtree(cell, ignore_errors=True)
    var = variation("all", cell, 1)
    cmd = [sys.executable, "-m", "provenance", "build", str(recipe_path.resolve()), "--out", str(var.out), "--json",
           "--no-cache", "--no-resume", *(["--store", str(Path(settings.store).resolve())] if settings.store else []),
           *(["--offline"] if settings.offline else [])]
    p = run_cell(cmd, var)
    if p.returncode != 0:
        return (name, False, f"the varied build failed (exit {p.returncode}): "
                + (p.stderr.strip().splitlines() or ["?"])[-1])
    transcript = var.out / "transcript.jsonl"
    if not transcript.is_file():
        return (name, False, f"the varied build wrote no {transcript}")
    got = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])["weights"]
    same_weights = got == f"blake3:{record['weights']['tensors']['digest']}"
    same_transcript = blake3_bytes(transcript.read_bytes()) == blake3_bytes((out / "transcript.jsonl").read_bytes())
    clock = f"clock {var.prefix[-1]}" if var.prefix else "; ".join(f"not varied: {x}" for x in var.not_varied)
    return (name, same_weights and same_transcript,
            f"build path, HOME, USER, locale fr_CH.UTF-8, TZ Pacific/Chatham, umask 077, PYTHONHASHSEED, shuffled "
            f"listings, {clock}: weights {'equal' if same_weights else 'DIFFER: ' + got}, transcript "
            f"{'equal' if same_transcript else 'DIFFERS'}")
