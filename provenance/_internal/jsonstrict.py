"""Strict JSON for everything signed or security-relevant (envelopes, statements, headers).

RFC 8259 leaves duplicate names and non-finite numbers to the parser; RFC 8785 (which signed
statements are canonicalized with) and I-JSON forbid them, and integers beyond 2^53-1 do not
survive a round trip through most JSON libraries. This reader refuses all of them, and very
deep nesting, with a ValueError naming the problem, instead of letting "which duplicate wins"
depend on the parser.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

# A JSON object as parsed: keys are strings, values anything JSON holds (checked where they are read).
JSONObject = dict[str, Any]

MAX_SAFE_INT = (1 << 53) - 1
MAX_DEPTH = 64


def _pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):  # a name given twice: report the first one repeated
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return out


def _int(text: str) -> int:
    if len(text.lstrip("-")) > 16:
        raise ValueError(f"integer {text[:20]}{'…' if len(text) > 20 else ''} is outside the interoperable range "
                         f"±(2^53-1)")
    v = int(text)
    if abs(v) > MAX_SAFE_INT:
        raise ValueError(f"integer {text} is outside the interoperable range ±(2^53-1)")
    return v


def _constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON (non-finite numbers are refused)")


def _float(text: str) -> float:
    v = float(text)
    if v in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} overflows a double")
    return v


def _depth(obj: object, limit: int) -> None:
    """Refuse a value nested deeper than `limit` (the top is level 1), a level at a time."""
    level, depth = [obj], 1
    while level:
        if depth > limit:
            raise ValueError(f"nested deeper than {limit} levels")
        inner: list[object] = []
        for o in level:
            if isinstance(o, dict):
                inner.extend(o.values())
            elif isinstance(o, list):
                inner.extend(o)
        level, depth = inner, depth + 1


def loads(data: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse strict JSON. Raises ValueError (never RecursionError) with a one-line reason."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"not UTF-8 at byte {e.start}") from None
    try:
        obj = json.loads(data, object_pairs_hook=_pairs, parse_int=_int, parse_constant=_constant,
                         parse_float=_float)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    _depth(obj, max_depth)
    return obj
