"""Rebuilding from an attestation, judging the result, and the SLSA Verification Summary.

`rebuild` takes the recipe embedded in a verified attestation, builds it with inputs fetched or
taken from the store by their pins, judges the new weights against the attestation (bitwise, or
within tolerance from its signed fingerprint) and signs a VSA recording the verdict.
`gate` does the same from a recipe file against a committed reference, for CI.
"""

from __future__ import annotations

import hashlib
import platform
from datetime import datetime, timezone
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from .attest import PAYLOAD_TYPE, STATEMENT_TYPE, canonical
from .errors import CheckFailed, InputError

VSA_TYPE = "https://slsa.dev/verification_summary/v1"
VERIFIER_ID = "https://provenance.invalid/verifiers/rebuild/v1"


def verified_statement(attestation: Path, keys: list[Path]) -> dict:
    """The statement of an attestation whose signature and statement checks pass. Raises CheckFailed."""
    from .verify import render, verify

    report = verify(attestation, keys=keys)
    if not report.ok:
        raise CheckFailed(f"{attestation}: the attestation does not verify:\n{render(report)}")
    return report.statement


def embedded_recipe(st: dict, dest: Path) -> Path:
    rec = st["predicate"]["buildDefinition"]["externalParameters"].get("recipe", {})
    text = rec.get("content")
    if not isinstance(text, str):
        raise InputError("the attestation embeds no recipe content (externalParameters.recipe.content)")
    data = text.encode()
    if rec.get("digest", {}).get("sha256") not in (None, hashlib.sha256(data).hexdigest()):
        raise CheckFailed("the embedded recipe does not match its recorded sha256")
    dest.parent.mkdir(parents=True, exist_ok=True)
    path = dest / Path(rec.get("path", "recipe.toml")).name if dest.is_dir() else dest
    path.write_bytes(data)
    return path


def judge_build(st: dict, model_dir: Path, *, bitwise: bool):
    """Judge a model dir against a statement: (Report with verdict, ok)."""
    from .verify import Report, check_model_dir

    report = Report(statement=st)
    check_model_dir(report, st, model_dir, sha256=False, bitwise=bitwise)
    return report


def vsa_statement(st: dict, attestation: Path, report, rebuild_record: dict | None, policy: str) -> dict:
    outputs = st["predicate"]["runDetails"].get("provenance_outputs", {})
    passed = report.ok
    return {
        "_type": STATEMENT_TYPE,
        "subject": st["subject"],
        "predicateType": VSA_TYPE,
        "predicate": {
            "verifier": {"id": VERIFIER_ID, "version": {"provenance": _version()}},
            "timeVerified": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "resourceUri": f"urn:provenance:weights:blake3-tensors-v1:{outputs.get('tensors', {}).get('digest', '')}",
            "policy": {"uri": f"{VERIFIER_ID}#{policy}"},
            "inputAttestations": [{"uri": Path(attestation).name,
                                   "digest": {"sha256": hashlib.sha256(Path(attestation).read_bytes()).hexdigest()}}],
            "verificationResult": "PASSED" if passed else "FAILED",
            "verifiedLevels": ["SLSA_BUILD_LEVEL_1"] if passed else [],
            "slsaVersion": "1.0",
            "provenance_verdict": {
                "verdict": report.verdict,
                "checks": [c.as_dict() for c in report.checks],
                "divergence": report.divergence or {},
                "rebuild": {"weights": (rebuild_record or {}).get("weights", {}).get("tensors"),
                            "cpu_capability": (rebuild_record or {}).get("determinism", {}).get("cpu_capability"),
                            "world_size": (rebuild_record or {}).get("distributed", {}).get("world_size"),
                            "machine": platform.machine()},
            },
        },
    }


def _version() -> str:
    from . import __version__

    return __version__


def sign_vsa(vsa: dict, signers, path: Path) -> None:
    from .sign import envelope_line, sign_envelope
    from .store import atomic_write_bytes

    atomic_write_bytes(path, envelope_line(sign_envelope(canonical(vsa), PAYLOAD_TYPE, signers)))


def stack_matches(st: dict, record: dict) -> tuple[bool, str]:
    """Whether a rebuild ran on the reference's stack: same CPU capability and toolchain versions."""
    ref_det = st["predicate"]["buildDefinition"]["internalParameters"].get("determinism", {})
    diffs = []
    if ref_det.get("cpu_capability") != record["determinism"].get("cpu_capability"):
        diffs.append(f"cpu capability {record['determinism'].get('cpu_capability')} vs reference "
                     f"{ref_det.get('cpu_capability')}")
    versions = {d["name"].removeprefix("toolchain:"): d.get("uri", "").rsplit("@", 1)[-1]
                for d in st["predicate"]["buildDefinition"].get("resolvedDependencies", [])
                if str(d.get("name", "")).startswith("toolchain:")}
    installed = record["toolchain"]["installed"]
    for lib, ver in versions.items():
        if lib in installed and installed[lib] != ver:
            diffs.append(f"{lib} {installed[lib]} vs reference {ver}")
    return not diffs, "; ".join(diffs) or "same CPU capability and toolchain as the reference"


def junit(path: Path, suite: str, cases: list[tuple[str, bool, str]], seconds: float) -> None:
    from .store import atomic_write_bytes

    failures = sum(1 for _, ok, _ in cases if not ok)
    parts = [f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuites>\n<testsuite name={quoteattr(suite)} '
             f'tests="{len(cases)}" failures="{failures}" errors="0" time="{seconds:.3f}">']
    for name, ok, detail in cases:
        parts.append(f"  <testcase classname={quoteattr(suite)} name={quoteattr(name)}>")
        if not ok:
            parts.append(f"    <failure message={quoteattr(detail[:200])}>{escape(detail)}</failure>")
        else:
            parts.append(f"    <system-out>{escape(detail)}</system-out>")
        parts.append("  </testcase>")
    parts.append("</testsuite>\n</testsuites>\n")
    atomic_write_bytes(Path(path), "\n".join(parts).encode())
