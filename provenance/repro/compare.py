"""The reproduced question: is this model a rebuild of that one, and how close?

Verdicts are `bitwise`, `within tolerance` or `diverged`, never `verified` (that word belongs to
exact verification). Bounds are the verifier's (verify.policy.Bounds: built-in defaults, or a
policy file's `[reproduced]` section), tightened, never loosened, by the reference's signed
tolerances. Every tensor is judged, not only the total.

Tensor metrics need only numpy; functional metrics (eval loss, greedy agreement, greedy
continuations) run the candidate with torch (builder/fingerprint.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._internal import jsonstrict
from .._internal.hashing import tensor_digest
from .._internal.safetensors import SafetensorsError, read_tensors
from ..errors import InputError
from ..verify.policy import Bounds

BITWISE, WITHIN, DIVERGED = "bitwise", "within tolerance", "diverged"


def model_dir(path: Path) -> Path:
    """Accept a build dir (holding model/) or a model dir."""
    path = Path(path)
    if (path / "model" / "model.safetensors").is_file():
        return path / "model"
    if (path / "model.safetensors").is_file():
        return path
    raise InputError(f"{path}: no model.safetensors (expected a build dir with model/ or a model dir)")


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a well-formed safetensors file. Raises InputError naming the file and the problem."""
    try:
        return read_tensors(path)
    except SafetensorsError as e:
        raise InputError(f"{path}: not a well-formed safetensors file: {e}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None


def weights_digest(path: Path) -> str:
    try:
        return tensor_digest(path)
    except SafetensorsError as e:
        raise InputError(f"{path}: not a well-formed safetensors file: {e}") from None


# ---- metrics ----------------------------------------------------------------------------------------

def tensor_metrics(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict:
    problems = []
    if set(a) != set(b):
        problems.append(f"tensor names differ: {sorted(set(a) ^ set(b))}")
    rows, num, den, dot, nb = [], 0.0, 0.0, 0.0, 0.0
    max_abs = 0.0
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{name}: {y.shape}/{y.dtype} vs {x.shape}/{x.dtype}")
            continue
        x64, y64 = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
        d = y64 - x64
        nx, ny, nd = np.linalg.norm(x64), np.linalg.norm(y64), np.linalg.norm(d)
        mad = float(np.abs(d).max()) if d.size else 0.0
        scale = float(np.abs(x64).max()) if x64.size else 0.0
        rows.append({"name": name, "bitwise": bool(np.array_equal(x.view(np.uint8), y.view(np.uint8))),
                     "max_abs_diff": mad, "max_rel_diff": mad / scale if scale else mad,
                     "rel_l2": float(nd / nx) if nx else float(nd),
                     "cosine": float(x64 @ y64 / (nx * ny)) if nx and ny else 1.0})
        num += nd ** 2
        den += nx ** 2
        dot += float(x64 @ y64)
        nb += ny ** 2
        max_abs = max(max_abs, mad)
    overall = {"rel_l2": math.sqrt(num / den) if den else math.sqrt(num), "max_abs_diff": max_abs,
               "max_rel_diff": max((r["max_rel_diff"] for r in rows), default=0.0),
               "max_tensor_rel_l2": max((r["rel_l2"] for r in rows), default=0.0),
               "cosine": dot / math.sqrt(den * nb) if den and nb else 1.0,
               "bitwise_tensors": sum(r["bitwise"] for r in rows), "tensors": len(rows)}
    return {"problems": problems, "tensors": rows, "overall": overall}


def estimate_from_fingerprint(ref: dict, tensors: dict[str, np.ndarray], *, projections: int, seed: int) -> dict:
    """Estimate per-tensor relative L2 of (candidate - reference) from the signed projections alone.

    For Rademacher vectors s, E[(s·d)^2] = ||d||^2, so the mean over k projections of the squared
    difference of projections estimates ||a - b||^2 (Johnson-Lindenstrauss)."""
    from ..builder.fingerprint import tensor_fingerprint

    cand = tensor_fingerprint(tensors, projections=projections, seed=seed)
    problems, per = [], {}
    if set(cand) != set(ref):
        problems.append(f"tensor names differ: {sorted(set(cand) ^ set(ref))}")
    num = den = 0.0
    for name in sorted(set(cand) & set(ref)):
        r, c = ref[name], cand[name]
        if r.get("shape") != c["shape"] or r.get("dtype") != c["dtype"]:
            problems.append(f"{name}: shape/dtype {c['shape']}/{c['dtype']}, "
                            f"expected {r.get('shape')}/{r.get('dtype')}")
            continue
        d2 = float(np.mean([(a - b) ** 2 for a, b in zip(r["projections"], c["projections"], strict=True)]))
        norm = float(r["norm"])
        per[name] = {"rel_l2_est": math.sqrt(d2) / norm if norm else math.sqrt(d2),
                     "norm_rel_diff": abs(c["norm"] - norm) / norm if norm else abs(c["norm"])}
        num += d2
        den += norm ** 2
    return {"problems": problems, "tensors": per, "rel_l2_est": math.sqrt(num / den) if den else math.sqrt(num)}


# ---- verdicts -----------------------------------------------------------------------------------------

@dataclass
class Verdict:
    verdict: str  # BITWISE | WITHIN | DIVERGED
    reasons: list[str]
    metrics: dict

    def as_dict(self) -> dict:
        return {"verdict": self.verdict, "reasons": self.reasons, **self.metrics}


def judge(metrics: dict, bounds: Bounds, per_tensor: dict[str, float] | None = None) -> list[str]:
    """Reasons the metrics fall outside the bounds (empty when within)."""
    b = bounds.as_dict()
    reasons = []
    checks = [("rel_l2", "max_rel_l2", lambda v, t: v <= t), ("cosine", "min_cosine", lambda v, t: v >= t),
              ("eval_loss_diff", "max_eval_loss_diff", lambda v, t: v <= t),
              ("greedy_agreement", "min_greedy_agreement", lambda v, t: v >= t),
              ("recitation_rate_diff", "max_recitation_rate_diff", lambda v, t: v <= t)]
    for metric, key, ok in checks:
        v = metrics.get(metric)
        if v is not None and not (math.isfinite(v) and ok(v, b[key])):
            reasons.append(f"{metric} {v:.6g} outside {key} {b[key]:g}")
    over = {n: v for n, v in (per_tensor or {}).items() if not (math.isfinite(v) and v <= b["max_tensor_rel_l2"])}
    if over:
        worst = sorted(over.items(), key=lambda kv: -kv[1] if math.isfinite(kv[1]) else -math.inf)[:3]
        reasons.append(f"{len(over)} tensor(s) outside max_tensor_rel_l2 {b['max_tensor_rel_l2']:g}: "
                       + ", ".join(f"{n} {v:.3g}" for n, v in worst))
    return reasons


def _json_file(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        obj = jsonstrict.loads(path.read_bytes())
    except (ValueError, OSError) as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object")
    return obj


def _beside(path: Path, name: str) -> dict | None:
    for p in (Path(path) / name, Path(path).parent / name):
        got = _json_file(p)
        if got is not None:
            return got
    return None


def compare(dir_a: Path, dir_b: Path, *, bounds: Bounds | None = None, functional_metrics: bool = True) -> Verdict:
    """Judge build B against build A (the reference), with the verifier's bounds tightened by A's."""
    from ..builder.fingerprint import agreement, functional, load_model

    ma, mb = model_dir(dir_a), model_dir(dir_b)
    ta, tb = load_tensors(ma / "model.safetensors"), load_tensors(mb / "model.safetensors")
    tm = tensor_metrics(ta, tb)
    fp = _beside(dir_a, "fingerprint.json")
    bounds, notes = (bounds or Bounds()).tightened_by((fp or {}).get("tolerances"))
    metrics: dict = {"tensors": tm["tensors"], "overall": tm["overall"], "bounds": bounds.as_dict(),
                     "bounds_notes": notes}
    if tm["problems"]:  # other tensors, not other values: there is no distance to judge
        from ..errors import InputError

        raise InputError(f"{dir_a} and {dir_b}: not comparable: their models have different tensors ("
                         + "; ".join(tm["problems"][:3]) + (f"; and {len(tm['problems']) - 3} more"
                                                            if len(tm["problems"]) > 3 else "")
                         + "); compare judges rebuilds of one architecture")
    if weights_digest(ma / "model.safetensors") == weights_digest(mb / "model.safetensors"):
        return Verdict(BITWISE, [], metrics)
    m = {"rel_l2": tm["overall"]["rel_l2"], "cosine": tm["overall"]["cosine"]}
    ra, rb = _beside(dir_a, "build.json"), _beside(dir_b, "build.json")
    try:
        m["recitation_rate_diff"] = abs(float(ra["recitation"]["rate"]) - float(rb["recitation"]["rate"]))
    except (TypeError, KeyError, ValueError):
        pass
    if functional_metrics and fp is not None:
        ev = fp["eval"]
        fb = functional(load_model(mb), ev["ids"], ev["prompts"], ev["continuation_tokens"], ev["pad_token_id"])
        m["eval_loss_a"], m["eval_loss_b"] = ev["loss"], fb["eval_loss"]
        m["eval_loss_diff"] = abs(ev["loss"] - fb["eval_loss"])
        m["greedy_agreement"] = agreement(ev["argmax"], fb["argmax"])
        m["continuations_equal"] = fb["continuations_digest"] == ev["continuations_digest"]
    metrics["functional"] = m
    reasons = judge(m, bounds, {r["name"]: r["rel_l2"] for r in tm["tensors"]})
    return Verdict(DIVERGED if reasons else WITHIN, reasons, metrics)


def judge_against_fingerprint(fp: object, mdir: Path, bounds: Bounds) -> Verdict:
    """Judge a candidate model dir from the reference's signed fingerprint alone (no reference weights).

    What this can and cannot establish against an adversary is in docs/threat-model.md."""
    from ..builder.fingerprint import FINGERPRINT_FORMAT, agreement, functional, load_model

    if not isinstance(fp, dict) or fp.get("format") != FINGERPRINT_FORMAT:
        return Verdict(DIVERGED, ["the attestation carries no fingerprint this verifier reads"], {})
    bounds, notes = bounds.tightened_by(fp.get("tolerances"))
    metrics: dict = {"bounds": bounds.as_dict(), "bounds_notes": notes}
    weights = mdir / "model.safetensors"
    if weights_digest(weights) == fp.get("tensor_digest"):
        return Verdict(BITWISE, [], metrics)
    tensors = load_tensors(weights)
    try:
        est = estimate_from_fingerprint(fp["tensors"], tensors, projections=int(fp["projections"]),
                                        seed=int(fp["seed"]))
        ev = fp["eval"]
        per = {n: t["rel_l2_est"] for n, t in est["tensors"].items()}
        metrics["fingerprint"] = {"rel_l2_est": est["rel_l2_est"],
                                  "max_tensor_rel_l2_est": max(per.values(), default=0.0)}
        if est["problems"]:
            return Verdict(DIVERGED, est["problems"], metrics)
        fb = functional(load_model(mdir), ev["ids"], ev["prompts"], ev["continuation_tokens"], ev["pad_token_id"])
        m = {"rel_l2": est["rel_l2_est"], "eval_loss_diff": abs(float(ev["loss"]) - fb["eval_loss"]),
             "greedy_agreement": agreement(ev["argmax"], fb["argmax"]),
             "continuations_equal": fb["continuations_digest"] == ev["continuations_digest"]}
    except (KeyError, TypeError, ValueError) as e:
        return Verdict(DIVERGED, [f"the signed fingerprint is malformed ({type(e).__name__}: {e})"], metrics)
    metrics["functional"] = m
    reasons = judge(m, bounds, per)
    return Verdict(DIVERGED if reasons else WITHIN, reasons, metrics)
