"""Verification policy (TOML): which builders and build types to trust, and licence rules."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from .attest import BUILDER_ID, KNOWN_BUILD_TYPES
from .errors import InputError
from .recipe import format_errors


class Policy(BaseModel):
    """[policy] in a policy file; every field is optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_builders: list[str] = [BUILDER_ID]
    allowed_build_types: list[str] = list(KNOWN_BUILD_TYPES)
    required_licenses: list[str] = []
    forbidden_licenses: list[str] = []
    allowed_output_licenses: list[str] | None = None
    require_clean_source: bool = False


class PolicyFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    policy: Policy = Policy()


def load_policy(path: Path | None) -> Policy:
    if path is None:
        return Policy()
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise InputError(f"{path}: cannot read policy: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML: {e}") from None
    try:
        return PolicyFile.model_validate(data).policy
    except ValidationError as e:
        raise InputError(format_errors(Path(path), e).replace("in the recipe", "in the policy")) from None
