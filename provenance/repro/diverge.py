"""`diverge`: the first step where two transcripts part, and in what (data order, learning rate,
loss, grad norm or parameters)."""

from __future__ import annotations

from pathlib import Path

from ..build.transcript import read
from ..errors import InputError

# Compared in this order at each step: what a build consumed comes before what it computed.
FIELDS = ("samples", "lr", "loss", "grad_norm", "params")


def _float(v: object) -> float | None:
    try:
        return float.fromhex(v) if isinstance(v, str) else None
    except ValueError:
        return None


def _transcript(path: Path) -> Path:
    if not path.is_dir():
        return path
    if not (path / "transcript.jsonl").is_file():
        raise InputError(f"{path}: a directory without transcript.jsonl (expected a transcript or a build's "
                         "output dir)")
    return path / "transcript.jsonl"


def diverge(path_a: Path, path_b: Path) -> dict:
    """The first step where two transcripts differ; a build's output dir stands for its
    transcript.jsonl. Raises InputError for unreadable transcripts."""
    path_a, path_b = (_transcript(Path(p)) for p in (path_a, path_b))
    a, b = read(path_a), read(path_b)
    for path, t in ((path_a, a), (path_b, b)):
        if not t:
            raise InputError(f"{path}: empty transcript (no optimizer step to compare)")
    for i, (x, y) in enumerate(zip(a, b)):
        for f in FIELDS:
            if f == "params" and (f not in x or f not in y):
                continue
            if x.get(f) != y.get(f):
                res = {"identical": False, "step": x.get("global_step", i), "field": f, "stage": x.get("stage"),
                       "stage_step": x.get("step"), "a": x.get(f), "b": y.get(f), "steps_compared": i + 1}
                la, lb = _float(x.get("loss")), _float(y.get("loss"))
                if la is not None and lb is not None:
                    res["loss_a"], res["loss_b"], res["loss_diff"] = la, lb, abs(la - lb)
                return res
    if len(a) != len(b):
        n = min(len(a), len(b))
        return {"identical": False, "step": n, "field": "length", "stage": None, "stage_step": None,
                "a": len(a), "b": len(b), "steps_compared": n}
    return {"identical": True, "step": None, "field": None, "steps_compared": len(a)}


def loss_curve(path: Path) -> list[float]:
    return [v for v in (_float(r.get("loss")) for r in read(path)) if v is not None]
