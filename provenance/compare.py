"""Comparing two builds: bitwise, within tolerance, or diverged, with the numbers that say so.

Tensor metrics need only numpy (weights are read from safetensors); functional metrics (eval
loss, greedy agreement, greedy continuations) run the models with torch. The fingerprint is the
compact, signed summary of one build's weights that lets a verifier judge another build's
weights without the reference weights (docs/reproducibility.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np

from .digest import canonical_json, tensor_digest
from .errors import InputError

FINGERPRINT_FORMAT = "provenance-fingerprint-v1"
DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32}


# ---- reading weights without torch ---------------------------------------------------------------

def model_dir(path: Path) -> Path:
    """Accept a build dir (holding model/) or a model dir."""
    path = Path(path)
    if (path / "model" / "model.safetensors").is_file():
        return path / "model"
    if (path / "model.safetensors").is_file():
        return path
    raise InputError(f"{path}: no model.safetensors (expected a build dir with model/ or a model dir)")


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as float64-capable numpy arrays (read-only views)."""
    from .digest import _safetensors_header

    out = {}
    with open(path, "rb") as f:
        header, base = _safetensors_header(f)
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=base)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise InputError(f"{path}: tensor {name} has dtype {info['dtype']}, which compare does not read")
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=np.dtype(DTYPES[info["dtype"]]).newbyteorder("<")).reshape(
            info["shape"])
    return out


# ---- tensor fingerprint: norms, sums and Rademacher projections ----------------------------------

def _signs(seed: int, name: str, k: int, n: int) -> np.ndarray:
    """k x n matrix of ±1 from blake3's extendable output: portable across numpy and torch versions."""
    raw = blake3.blake3(f"provenance-fingerprint:{seed}:{name}".encode()).digest(length=(k * n + 7) // 8)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[: k * n].reshape(k, n)
    return bits.astype(np.float64) * 2.0 - 1.0


def tensor_fingerprint(tensors: dict[str, np.ndarray], *, projections: int, seed: int) -> dict:
    out = {}
    for name in sorted(tensors):
        t = tensors[name]
        x = t.astype(np.float64).ravel()
        out[name] = {
            "shape": list(t.shape), "dtype": str(t.dtype), "norm": float(np.linalg.norm(x)), "sum": float(x.sum()),
            "projections": [float(v) for v in _signs(seed, name, projections, x.size) @ x],
        }
    return out


def estimate_from_fingerprint(ref: dict, tensors: dict[str, np.ndarray], *, projections: int, seed: int) -> dict:
    """Estimate per-tensor relative L2 of (candidate - reference) from the projections alone.

    For Rademacher vectors s, E[(s·d)^2] = ||d||^2, so mean over k projections of the squared
    difference of projections estimates ||a - b||^2 (Johnson-Lindenstrauss).
    """
    cand = tensor_fingerprint(tensors, projections=projections, seed=seed)
    problems, per = [], {}
    if set(cand) != set(ref):
        problems.append(f"tensor names differ: {sorted(set(cand) ^ set(ref))}")
    num = den = 0.0
    for name in sorted(set(cand) & set(ref)):
        r, c = ref[name], cand[name]
        if r["shape"] != c["shape"] or r["dtype"] != c["dtype"]:
            problems.append(f"{name}: shape/dtype {c['shape']}/{c['dtype']}, expected {r['shape']}/{r['dtype']}")
            continue
        d2 = float(np.mean([(a - b) ** 2 for a, b in zip(r["projections"], c["projections"])]))
        per[name] = {"rel_l2_est": math.sqrt(d2) / r["norm"] if r["norm"] else math.sqrt(d2),
                     "norm_rel_diff": abs(c["norm"] - r["norm"]) / r["norm"] if r["norm"] else abs(c["norm"]),
                     "sum_diff": abs(c["sum"] - r["sum"])}
        num += d2
        den += r["norm"] ** 2
    return {"problems": problems, "tensors": per, "rel_l2_est": math.sqrt(num / den) if den else math.sqrt(num)}


# ---- exact tensor metrics -------------------------------------------------------------------------

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
               "cosine": dot / math.sqrt(den * nb) if den and nb else 1.0,
               "bitwise_tensors": sum(r["bitwise"] for r in rows), "tensors": len(rows)}
    return {"problems": problems, "tensors": rows, "overall": overall}


# ---- functional fingerprint (torch) ---------------------------------------------------------------

def load_model(mdir: Path):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.use_deterministic_algorithms(True)
    model = AutoModelForCausalLM.from_pretrained(str(mdir), dtype=torch.float32)
    model.eval()
    return model


def functional(model, eval_ids: list[list[int]], prompts: list[list[int]], continuation: int, pad_id: int) -> dict:
    """Eval loss and per-position argmax on the eval windows; greedy continuations of the prompts."""
    import torch

    x = torch.tensor(eval_ids, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=x, labels=x)
        argmax = out.logits[:, :-1].argmax(-1).tolist()
        p = torch.tensor(prompts, dtype=torch.long)
        gen = model.generate(input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=continuation,
                             min_new_tokens=continuation, do_sample=False, pad_token_id=pad_id)
    cont = gen[:, p.shape[1]:].tolist()
    return {"eval_loss": float(out.loss), "argmax": argmax, "continuations": cont,
            "continuations_digest": blake3.blake3(canonical_json(cont)).hexdigest()}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    total = same = 0
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            total += 1
            same += x == y
    return same / total if total else 1.0


def make_fingerprint(model, mdir: Path, seqs: list[list[int]], spec, pad_id: int) -> dict:
    """The signed fingerprint of a finished build (spec: the recipe's [reproducibility] section)."""
    import random

    span = spec.eval_tokens
    cands = [(i, a) for i, s in enumerate(seqs) for a in range(0, max(0, len(s) - span) + 1, max(1, span // 2))
             if len(s) >= span]
    picks = sorted(random.Random(spec.seed).sample(cands, min(spec.eval_windows, len(cands))))
    eval_ids = [seqs[i][a:a + span] for i, a in picks]
    prompts = [w[: spec.prompt_tokens] for w in eval_ids[: spec.prompts]]
    fn = functional(model, eval_ids, prompts, spec.continuation_tokens, pad_id)
    tensors = read_tensors(mdir / "model.safetensors")
    return {
        "format": FINGERPRINT_FORMAT,
        "seed": spec.seed,
        "projections": spec.projections,
        "tensors": tensor_fingerprint(tensors, projections=spec.projections, seed=spec.seed),
        "tensor_digest": tensor_digest(mdir / "model.safetensors"),
        "eval": {"ids": eval_ids, "loss": fn["eval_loss"], "argmax": fn["argmax"], "prompts": prompts,
                 "continuation_tokens": spec.continuation_tokens, "continuations": fn["continuations"],
                 "continuations_digest": fn["continuations_digest"], "pad_token_id": pad_id},
        "tolerances": spec.tolerances(),
    }


# ---- verdicts -------------------------------------------------------------------------------------

@dataclass
class Verdict:
    verdict: str  # "bitwise" | "within-tolerance" | "diverged"
    reasons: list[str]
    metrics: dict

    def as_dict(self) -> dict:
        return {"verdict": self.verdict, "reasons": self.reasons, **self.metrics}


def judge(metrics: dict, tol: dict) -> tuple[bool, list[str]]:
    """Apply tolerances to measured metrics; return (within, reasons for divergence)."""
    reasons = []
    checks = [("rel_l2", "max_rel_l2", lambda v, t: v <= t), ("cosine", "min_cosine", lambda v, t: v >= t),
              ("eval_loss_diff", "max_eval_loss_diff", lambda v, t: v <= t),
              ("greedy_agreement", "min_greedy_agreement", lambda v, t: v >= t),
              ("recitation_rate_diff", "max_recitation_rate_diff", lambda v, t: v <= t)]
    for metric, key, ok in checks:
        if metric in metrics and metrics[metric] is not None and key in tol and not ok(metrics[metric], tol[key]):
            reasons.append(f"{metric} {metrics[metric]:.6g} outside {key} {tol[key]:g}")
    return not reasons, reasons


def _build_record(path: Path) -> dict | None:
    for p in (Path(path) / "build.json", Path(path).parent / "build.json"):
        if p.is_file():
            return json.loads(p.read_text())
    return None


def load_fingerprint(path: Path) -> dict | None:
    for p in (Path(path) / "fingerprint.json", Path(path).parent / "fingerprint.json"):
        if p.is_file():
            return json.loads(p.read_text())
    return None


def compare(dir_a: Path, dir_b: Path, *, functional_metrics: bool = True) -> Verdict:
    """Judge build B against build A (the reference), with A's tolerances."""
    ma, mb = model_dir(dir_a), model_dir(dir_b)
    ta, tb = read_tensors(ma / "model.safetensors"), read_tensors(mb / "model.safetensors")
    tm = tensor_metrics(ta, tb)
    fp = load_fingerprint(dir_a)
    tol = (fp or {}).get("tolerances") or default_tolerances()
    metrics: dict = {"tensors": tm["tensors"], "overall": tm["overall"], "tolerances": tol}
    if tm["problems"]:
        return Verdict("diverged", tm["problems"], metrics)
    if tensor_digest(ma / "model.safetensors") == tensor_digest(mb / "model.safetensors"):
        return Verdict("bitwise", [], metrics)
    m = {"rel_l2": tm["overall"]["rel_l2"], "cosine": tm["overall"]["cosine"]}
    ra, rb = _build_record(dir_a), _build_record(dir_b)
    if ra and rb and "recitation" in ra and "recitation" in rb:
        m["recitation_rate_diff"] = abs(ra["recitation"]["rate"] - rb["recitation"]["rate"])
    if functional_metrics and fp is not None:
        ev = fp["eval"]
        fb = functional(load_model(mb), ev["ids"], ev["prompts"], ev["continuation_tokens"], ev["pad_token_id"])
        m["eval_loss_a"], m["eval_loss_b"] = ev["loss"], fb["eval_loss"]
        m["eval_loss_diff"] = abs(ev["loss"] - fb["eval_loss"])
        m["greedy_agreement"] = agreement(ev["argmax"], fb["argmax"])
        m["continuations_equal"] = fb["continuations_digest"] == ev["continuations_digest"]
    metrics["functional"] = m
    within, reasons = judge(m, tol)
    return Verdict("within-tolerance" if within else "diverged", reasons, metrics)


def default_tolerances() -> dict:
    from .recipe import Reproducibility

    return Reproducibility().tolerances()


def judge_against_fingerprint(fp: dict, mdir: Path, record_b: dict | None = None) -> Verdict:
    """Judge a candidate model dir from the reference's fingerprint alone (no reference weights)."""
    tensors = read_tensors(mdir / "model.safetensors")
    if tensor_digest(mdir / "model.safetensors") == fp["tensor_digest"]:
        return Verdict("bitwise", [], {})
    est = estimate_from_fingerprint(fp["tensors"], tensors, projections=fp["projections"], seed=fp["seed"])
    metrics: dict = {"fingerprint": {"rel_l2_est": est["rel_l2_est"]}}
    if est["problems"]:
        return Verdict("diverged", est["problems"], metrics)
    ev = fp["eval"]
    fb = functional(load_model(mdir), ev["ids"], ev["prompts"], ev["continuation_tokens"], ev["pad_token_id"])
    m = {"rel_l2": est["rel_l2_est"], "eval_loss_diff": abs(ev["loss"] - fb["eval_loss"]),
         "greedy_agreement": agreement(ev["argmax"], fb["argmax"]),
         "continuations_equal": fb["continuations_digest"] == ev["continuations_digest"]}
    metrics["functional"] = m
    within, reasons = judge(m, fp["tolerances"])
    return Verdict("within-tolerance" if within else "diverged", reasons, metrics)
