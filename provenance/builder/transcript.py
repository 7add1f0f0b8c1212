"""The training transcript: one hash-chained JSON line per optimizer step (docs/formats.md).

Written by the training loop; read back (chain checked) by repro/diverge.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from .._internal import jsonstrict
from ..errors import InputError

GENESIS = "0" * 64


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


def read(path: Path, data: bytes | None = None) -> list[dict]:
    """Parse a transcript (`data`, or the file's bytes) and check its hash chain. Raises InputError
    if unreadable or broken."""
    try:
        raw = (Path(path).read_bytes() if data is None else data).splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read transcript: {e.strerror}") from None
    prev, out = GENESIS, []
    for i, line in enumerate(raw, 1):
        try:
            rec = jsonstrict.loads(line)
        except ValueError as e:
            raise InputError(f"{path}:{i}: not a JSON line ({e})") from None
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
        if rec.get("prev") != prev:
            raise InputError(f"{path}:{i}: hash chain broken (prev {rec.get('prev')!r}, expected {prev})")
        prev = blake3.blake3(line).hexdigest()
        out.append(rec)
    return out
