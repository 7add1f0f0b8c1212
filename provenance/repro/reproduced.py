"""`verify-attestation --reproduced`: are these weights a rebuild of the attested model?

Everything but the weights must still be exact (the same closed set of files, config and tokenizer
byte for byte, well-formed safetensors); `model.safetensors` may differ, and is then judged
against the signed fingerprint with the verifier's bounds. The answer is `reproduced (bitwise)`,
`reproduced (within tolerance)` or `diverged`; never `verified`.
"""

from __future__ import annotations

from pathlib import Path

from ..verify.model_dir import inspect, report_exact
from ..verify.policy import Bounds
from ..verify.report import Report
from .compare import BITWISE, DIVERGED, WITHIN, judge_against_fingerprint

WEIGHTS = "model.safetensors"


def check_reproduced(report: Report, st, model_dir: Path, bounds: Bounds, *, sha256: bool = False,
                     prefetch=None) -> None:
    """Add the model-dir checks and the `reproduced` check to `report` (st: attest.model.Statement)."""
    report.question = "reproduced"
    res = inspect(st, Path(model_dir), sha256=sha256, prefetch=prefetch)
    judged = frozenset({WEIGHTS}) if WEIGHTS in res.differing else frozenset()
    report_exact(report, res, sha256=sha256, judged_elsewhere=judged)
    if not report.ok:
        report.verdict = DIVERGED if res.differing else None
        return
    if not judged:
        report.verdict = BITWISE
        report.add("reproduced", True, "every file is bitwise equal to the attested one")
        return
    fp = st.runDetails.provenance_outputs.fingerprint
    v = judge_against_fingerprint(fp, Path(model_dir), bounds)
    report.verdict = v.verdict
    report.divergence = v.metrics
    f = v.metrics.get("functional", {})
    fpm = v.metrics.get("fingerprint", {})
    nums = (f"rel_l2~{f['rel_l2']:.3g}, worst tensor~{fpm.get('max_tensor_rel_l2_est', float('nan')):.3g} "
            f"(from {fp.get('projections')} projections), eval loss diff {f['eval_loss_diff']:.3g}, "
            f"greedy agreement {f['greedy_agreement']:.4f}") if f else ""
    ok = v.verdict in (BITWISE, WITHIN)
    if v.verdict == BITWISE:
        report.add("reproduced", True, f"{WEIGHTS} differs from the attested file, but its tensors are bitwise equal "
                   "(blake3-tensors-v1): only the header or metadata differs")
        return
    detail = f"{WEIGHTS} is not bitwise equal; judged against the signed fingerprint: {v.verdict}"
    detail += (f": {nums}" if nums else "") + ("" if ok else f"; {'; '.join(v.reasons)}")
    notes = v.metrics.get("bounds_notes") or []
    if notes:
        detail += f" ({'; '.join(notes)})"
    report.add("reproduced", ok, detail)
