"""`diverge`: the first step where two transcripts part, and in what (data order, learning rate,
loss, grad norm or parameters)."""

from __future__ import annotations

from pathlib import Path

from ..builder.transcript import read
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
        if path.suffix == ".json":  # build.json, audit.json, ...: one JSON document, not a transcript
            raise InputError(f"{path}: not a transcript; diverge expects two transcripts (transcript.jsonl) or two "
                             "build directories")
        return path
    if not (path / "transcript.jsonl").is_file():
        raise InputError(f"{path}: a directory without transcript.jsonl (expected a transcript or a build's "
                         "output dir)")
    return path / "transcript.jsonl"


def _same_architecture(a: Path, b: Path) -> None:
    """Two build dirs whose models differ in shape (parameters, vocabulary) never ran the same steps:
    'diverged at step 0' would be a comparison that was never possible. Raises InputError."""
    from .._internal import jsonstrict

    models = []
    for d in (a, b):
        try:
            record = jsonstrict.loads((d / "build.json").read_bytes()) if d.is_dir() else None
        except (OSError, ValueError):
            record = None
        m = record.get("model") if isinstance(record, dict) else None
        models.append({k: m.get(k) for k in ("parameters", "vocab_size")} if isinstance(m, dict) else None)
    if None not in models and models[0] != models[1]:
        raise InputError(f"{a} and {b}: not comparable: their models differ ({models[0]} vs {models[1]}); diverge "
                         "finds where builds of one model part")


def diverge(path_a: Path, path_b: Path) -> dict:
    """The first step where two transcripts differ; a build's output dir stands for its
    transcript.jsonl. Raises InputError for unreadable transcripts."""
    _same_architecture(Path(path_a), Path(path_b))
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
