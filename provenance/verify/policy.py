"""The verifier's policy (TOML): which builders and build types it trusts, licence rules, and the
bounds of the `reproduced` question. Every field is optional; the defaults are this verifier's.

The bounds belong to the verifier: a policy file may tighten or loosen them; an attestation's own
(recipe) tolerances can only tighten them. The defaults are plain named tuples, so the verifier's
exact path imports no validation framework; a policy file is validated with pydantic.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

from ..attest.model import BUILD_TYPE, LOCAL_BUILDER_ID
from ..errors import InputError

MAX_POLICY_BYTES = 1 << 20


class Bounds(NamedTuple):
    """[reproduced]: how far a rebuild may be from the attested weights and still count as reproduced.

    Defaults are measured in docs/reproducibility.md: cross-hardware rebuilds of the default recipe
    stay below about half of each bound; builds from another seed or learning rate exceed them."""

    max_rel_l2: float = 0.6
    max_tensor_rel_l2: float = 1.0
    min_cosine: float = 0.8
    max_eval_loss_diff: float = 5e-3
    min_greedy_agreement: float = 0.98
    max_recitation_rate_diff: float = 0.1

    def as_dict(self) -> dict[str, float]:
        return self._asdict()

    def tightened_by(self, attested: object) -> tuple[Bounds, list[str]]:
        """These bounds, tightened (never loosened) by an attestation's tolerances. Returns notes."""
        if not isinstance(attested, dict):
            return self, []
        values, notes = self.as_dict(), []
        for key, mine in self.as_dict().items():
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
        return self._replace(**values), notes


class Policy(NamedTuple):
    """[policy] in a policy file."""

    allowed_builders: tuple[str, ...] = (LOCAL_BUILDER_ID,)
    allowed_build_types: tuple[str, ...] = (BUILD_TYPE,)
    required_licenses: tuple[str, ...] = ()
    forbidden_licenses: tuple[str, ...] = ()
    allowed_output_licenses: tuple[str, ...] | None = None
    require_clean_source: bool = False
    # The signed audit's licence verdict (flict, OSADL matrix): ignore it, report it, or fail unless compatible.
    licence_compatibility: str = "ignore"


class AuditPolicy(NamedTuple):
    """[audit] in a policy file: what the signed memorization audit beside the attestation must show."""

    require: bool = False  # fail when there is no audit
    max_extraction_rate: float | None = None
    min_extraction_rate: float | None = None


class PolicyFile(NamedTuple):
    policy: Policy = Policy()
    reproduced: Bounds = Bounds()
    audit: AuditPolicy = AuditPolicy()


def _schema() -> Any:  # a pydantic model class, built here so pydantic loads only with a policy
    """The pydantic models that validate a policy file (imported only when one is given)."""
    from typing import Annotated, Literal

    from pydantic import BaseModel, ConfigDict, Field

    nonneg = Annotated[float, Field(ge=0, allow_inf_nan=False)]
    fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
    d, b = Policy(), Bounds()

    class Strict(BaseModel):
        # strict: TOML has real booleans and numbers, so `require = "false"` or `max_rel_l2 = "1e308"` is a
        # mistake to name, not a string to convert (an int is still a float)
        model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    class PolicyModel(Strict):
        allowed_builders: list[str] = list(d.allowed_builders)
        allowed_build_types: list[str] = list(d.allowed_build_types)
        required_licenses: list[str] = []
        forbidden_licenses: list[str] = []
        allowed_output_licenses: list[str] | None = None
        require_clean_source: bool = False
        licence_compatibility: Literal["ignore", "warn", "fail"] = "ignore"

    class BoundsModel(Strict):
        max_rel_l2: nonneg = b.max_rel_l2
        max_tensor_rel_l2: nonneg = b.max_tensor_rel_l2
        min_cosine: Annotated[float, Field(ge=-1, le=1, allow_inf_nan=False)] = b.min_cosine
        max_eval_loss_diff: nonneg = b.max_eval_loss_diff
        min_greedy_agreement: fraction = b.min_greedy_agreement
        max_recitation_rate_diff: fraction = b.max_recitation_rate_diff

    class AuditModel(Strict):
        require: bool = False
        max_extraction_rate: fraction | None = None
        min_extraction_rate: fraction | None = None

    class FileModel(Strict):
        policy: PolicyModel = PolicyModel()
        reproduced: BoundsModel = BoundsModel()
        audit: AuditModel = AuditModel()

    return FileModel


def load_policy(path: Path | None) -> PolicyFile:
    """Read and validate a policy file. Raises InputError naming the file and every bad field."""
    if path is None:
        return PolicyFile()
    import tomllib

    from pydantic import ValidationError

    from .._internal.reading import read_regular_file
    from ..recipe import format_errors

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
        m = _schema().model_validate(obj)
    except ValidationError as e:
        raise InputError(format_errors(Path(path), e, what="policy", doc="docs/policy.md")) from None
    p = m.policy
    return PolicyFile(
        Policy(tuple(p.allowed_builders), tuple(p.allowed_build_types), tuple(p.required_licenses),
               tuple(p.forbidden_licenses),
               None if p.allowed_output_licenses is None else tuple(p.allowed_output_licenses),
               p.require_clean_source, p.licence_compatibility),
        Bounds(**m.reproduced.model_dump()),
        AuditPolicy(**m.audit.model_dump()))
