"""SPDX licence of one dataset file: its SPDX-License-Identifier line, else the input's, else NOASSERTION."""

from __future__ import annotations

import re

# The identifier runs to the end of the line, minus a closing comment marker.
_SPDX = re.compile(rb"SPDX-License-Identifier:[ \t]*([^\r\n]*?)[ \t]*(?:\*/|-->|\*\)|#\})?[ \t]*(?:\r?\n|$)")
_VALID = re.compile(r"^[A-Za-z0-9.+\-() :]+$")
HEAD_BYTES = 8192  # REUSE and the kernel put the tag in the first lines


def detect_licence(data: bytes, declared: str) -> tuple[str, str]:
    """Return (licence, source) where source is "spdx-tag", "input" or "none"."""
    m = _SPDX.search(data[:HEAD_BYTES])
    if m:
        value = m.group(1).decode("ascii", "replace").strip()
        if value and _VALID.match(value):
            return value, "spdx-tag"
    if declared and declared != "NOASSERTION":
        return declared, "input"
    return "NOASSERTION", "none"
