"""The toolchain: installed versions of the libraries that determine the bits, against the recipe's pins."""

from __future__ import annotations

import platform
from importlib import metadata

from ..errors import ToolchainMismatch
from ..recipe import Toolchain

LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors")


def installed() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in LIBRARIES + ("numpy", "blake3", "provenance"):
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


def _matches(pin: str, have: str, prefix: bool) -> bool:
    if prefix:
        return have == pin or have.startswith(pin + ".")
    return have == pin or have.split("+", 1)[0] == pin  # 2.13.0 matches the local build 2.13.0+cpu


def check(pins: Toolchain, recipe_path, *, allow: bool = False) -> dict:
    """Compare installed versions with the pins. Raises ToolchainMismatch unless allowed."""
    have = installed()
    wanted = {"python": pins.python, "torch": pins.torch, "transformers": pins.transformers,
              "tokenizers": pins.tokenizers, "safetensors": pins.safetensors}
    mismatches = {}
    for lib, pin in wanted.items():
        if pin is not None and not _matches(pin, have[lib], prefix=lib == "python"):
            mismatches[lib] = {"pinned": pin, "installed": have[lib]}
    allowed = allow or pins.allow_mismatch
    if mismatches and not allowed:
        lines = [f"{recipe_path}: toolchain does not match the recipe's pins:"]
        lines += [f"  toolchain.{lib}: pinned {m['pinned']}, installed {m['installed']}" for lib,
                  m in mismatches.items()]
        lines.append("  Install the pinned versions (make rebuild does), or pass --allow-toolchain-mismatch "
                     "to build anyway (recorded in build.json).")
        raise ToolchainMismatch("\n".join(lines))
    return {"installed": have, "mismatches": mismatches, "mismatch_allowed": bool(mismatches and allowed)}
