"""The training transcript: one hash-chained JSON line per optimizer step, and `diverge`, which
names the first step where two transcripts part and in what (data order, loss, grad norm,
learning rate or parameters)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from .errors import InputError

GENESIS = "0" * 64
# Compared in this order at each step: what a build consumed comes before what it computed.
FIELDS = ("samples", "lr", "loss", "grad_norm", "params")


@dataclass
class Transcript:
    """Hash-chained JSON lines: each line's `prev` is the blake3 of the previous line's bytes."""

    lines: list[bytes] = field(default_factory=list)
    prev: str = GENESIS

    def append(self, record: dict) -> None:
        record = {**record, "prev": self.prev}
        line = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        self.prev = blake3.blake3(line).hexdigest()
        self.lines.append(line)

    def to_bytes(self) -> bytes:
        return b"".join(line + b"\n" for line in self.lines)


def read(path: Path) -> list[dict]:
    """Parse a transcript and check its hash chain. Raises InputError if unreadable or broken."""
    try:
        raw = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read transcript: {e.strerror}") from None
    prev, out = GENESIS, []
    for i, line in enumerate(raw, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{path}:{i}: not a JSON line") from None
        if rec.get("prev") != prev:
            raise InputError(f"{path}:{i}: hash chain broken (prev {rec.get('prev')!r}, expected {prev})")
        prev = blake3.blake3(line).hexdigest()
        out.append(rec)
    return out


def _float(v: str | None) -> float | None:
    return float.fromhex(v) if isinstance(v, str) else None


def diverge(path_a: Path, path_b: Path) -> dict:
    """The first step where two transcripts differ. Raises InputError for unreadable transcripts."""
    a, b = read(path_a), read(path_b)
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
    return [float.fromhex(r["loss"]) for r in read(path)]
