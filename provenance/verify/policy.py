"""The verifier's policy (TOML): which builders and build types it trusts, licence rules, and the
bounds of the `reproduced` question. Every field is optional; the defaults are this verifier's.

The bounds belong to the verifier: a policy file may tighten or loosen them; an attestation's own
(recipe) tolerances can only tighten them (see repro/judge.py).
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..attest.model import BUILD_TYPE, LOCAL_BUILDER_ID
from ..errors import InputError

MAX_POLICY_BYTES = 1 << 20
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
NonNeg = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Bounds(BaseModel):
    """[reproduced]: how far a rebuild may be from the attested weights and still count as reproduced.

    Defaults are measured in docs/reproducibility.md: cross-hardware rebuilds of the default recipe
    stay below about half of each bound; builds from another seed or learning rate exceed them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_rel_l2: NonNeg = 0.6
    max_tensor_rel_l2: NonNeg = 1.0
    min_cosine: Annotated[float, Field(ge=-1, le=1, allow_inf_nan=False)] = 0.8
    max_eval_loss_diff: NonNeg = 5e-3
    min_greedy_agreement: Fraction = 0.98
    max_recitation_rate_diff: Fraction = 0.1

    def tightened_by(self, attested: object) -> tuple[Bounds, list[str]]:
        """These bounds, tightened (never loosened) by an attestation's tolerances. Returns notes."""
        if not isinstance(attested, dict):
            return self, []
        values, notes = self.model_dump(), []
        for key, mine in self.model_dump().items():
            theirs = attested.get(key)
            if theirs is None:
                continue
            if isinstance(theirs, bool) or not isinstance(theirs, int | float) or not math.isfinite(theirs):
                notes.append(f"attested {key} {theirs!r} ignored (not a finite number)")
                continue
            tighter = min(mine, theirs) if key.startswith("max_") else max(mine, theirs)
            if tighter != mine:
                notes.append(f"{key} tightened by the attestation to {tighter:g}")
            elif theirs != mine:
                notes.append(f"attested {key} {theirs:g} is looser than the verifier's {mine:g}; not applied")
            values[key] = tighter
        return Bounds(**values), notes


class Policy(BaseModel):
    """[policy] in a policy file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_builders: list[str] = [LOCAL_BUILDER_ID]
    allowed_build_types: list[str] = [BUILD_TYPE]
    required_licenses: list[str] = []
    forbidden_licenses: list[str] = []
    allowed_output_licenses: list[str] | None = None
    require_clean_source: bool = False


class PolicyFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    policy: Policy = Policy()
    reproduced: Bounds = Bounds()


def load_policy(path: Path | None) -> PolicyFile:
    """Read and validate a policy file. Raises InputError naming the file and every bad field."""
    if path is None:
        return PolicyFile()
    from ..recipe import format_errors
    from .envelope import read_regular_file

    data = read_regular_file(Path(path), "policy", MAX_POLICY_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: policy is not UTF-8 text (byte {e.start})") from None
    try:
        obj = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML: {e}") from None
    try:
        return PolicyFile.model_validate(obj)
    except ValidationError as e:
        raise InputError(format_errors(Path(path), e).replace("in the recipe", "in the policy")
                         .replace("see docs/recipe.md", "see README.md, 'A policy file'")) from None
