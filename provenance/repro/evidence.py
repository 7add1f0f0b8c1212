"""A build's evidence handed out after checking it: its SBOM (`provenance sbom`) and its HTML report
(`provenance report`). With keys, what is read is what the build's attestation signs, and the report
shows the verification; without, the files are held to build.json and said to be unsigned."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .._internal.hashing import blake3_bytes
from ..errors import CheckFailed, InputError
from .byproducts import read_bounded, signed_byproducts

REPORT_INPUTS = ("build.json", "audit.json", "transcript.jsonl")


@dataclass(frozen=True)
class CheckedSbom:
    """A build's SBOM file, its bytes (valid for `format`), and what binds it to the build."""

    format: str
    path: Path
    data: bytes
    bound: str
    signed: bool

    @property
    def blake3(self) -> str:
        return blake3_bytes(self.data)


def checked_sbom(build_dir: Path, fmt: str, keys: list[str]) -> CheckedSbom:
    """The SBOM the build signed (with `keys`) or recorded in build.json (without), checked valid for its
    format ("spdx3" or "cyclonedx"). Raises CheckFailed for a file that is not that one or not valid."""
    from ..builder.sbom import FORMATS, validate

    name = FORMATS[fmt]
    if keys:
        _, _, [(path, data)] = signed_byproducts(build_dir, keys, [name], "sbom hands out a build's SBOM")
        bound = "its digest is signed by the build's attestation"
    else:
        path, data = build_dir / name, _recorded_sbom(build_dir, fmt, build_dir / name)
        bound = "its digest matches build.json (unsigned: pass --key to check the signature)"
    problems = validate(fmt, data.decode("utf-8", "replace"))
    if problems:
        raise CheckFailed(f"{path}: not a valid {fmt} SBOM: " + "; ".join(p[:400] for p in problems))
    return CheckedSbom(fmt, path, data, bound, bool(keys))


def _recorded_sbom(build_dir: Path, fmt: str, path: Path) -> bytes:
    """The SBOM's bytes, held to the blake3 that build.json records for it."""
    record_bytes = read_bounded(build_dir / "build.json")
    if record_bytes is None:
        raise InputError(f"{build_dir}: no build.json; `provenance sbom` hands out the SBOM a build wrote")
    try:
        recorded = json.loads(record_bytes)["sbom"][fmt]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{build_dir / 'build.json'}: no sbom.{fmt} record; this build wrote no {fmt} SBOM") from None
    data = read_bounded(path)
    if data is None:
        raise CheckFailed(f"{path}: missing (or not a regular file); build.json records an SBOM there")
    if (got := blake3_bytes(data)) != recorded.get("blake3"):
        raise CheckFailed(f"{path}: not the SBOM build.json records: blake3 {got}, recorded {recorded.get('blake3')}")
    return data


@dataclass(frozen=True)
class Report:
    """A build's HTML page and, when keys were given, the verification it shows."""

    page: bytes
    verification: dict | None

    @property
    def state(self) -> str:
        return self.verification["verdict"] if self.verification else "not verified (no --key)"

    @property
    def exit_code(self) -> int:
        """A verification that was asked for and failed is the answer: a CI step must not publish a report of
        tampered weights (the page is still written: it says what failed)."""
        return self.verification["exit_code"] if self.verification else 0


def report_page(build_dir: Path, keys: list[str]) -> Report:
    """The build's self-contained HTML report (audit/html_report.py) from its build.json, audit and
    transcript: the signed ones, with the verification of the model dir, when `keys` are given."""
    from ..audit.html_report import render

    verification = None
    if keys:
        _, _, read = signed_byproducts(build_dir, keys, list(REPORT_INPUTS), "report needs a signed build")
        verification = _verification(build_dir, keys)
    else:
        read = [(build_dir / n, _required(build_dir / n)) for n in REPORT_INPUTS]
    record, audit, transcript = (_parse(path, data) for path, data in read)
    try:
        page = render(build_dir, record, audit, transcript, verification)
    except (KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{build_dir}: build.json, audit.json or transcript.jsonl lacks what a report needs "
                         f"({type(e).__name__}: {e}); was it written by this version of provenance?") from None
    return Report(page.encode(), verification)


def _verification(build_dir: Path, keys: list[str]) -> dict:
    from ..verify import Verifier

    audit_file = build_dir / "audit.intoto.jsonl"
    rep = Verifier.configure(keys=[Path(k) for k in keys]).verify(
        build_dir / "attestation.intoto.jsonl", model=build_dir / "model",
        audit=audit_file if audit_file.is_file() else None)
    return {"ok": rep.exit_code == 0, "verdict": rep.result, "exit_code": rep.exit_code,
            "checks": [c.as_dict() for c in rep.checks], "keys": [Path(k).name for k in keys]}


def _required(path: Path) -> bytes:
    data = read_bounded(path)
    if data is None:
        raise InputError(f"{path}: missing or not a regular file; `provenance report` needs a finished build's "
                         "directory")
    return data


def _parse(path: Path, data: bytes):
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON: {e}") from None
