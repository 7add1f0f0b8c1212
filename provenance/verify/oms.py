"""Verifying an OpenSSF Model Signing (OMS) v1.0 signature with the same closed-set rules.

After the bundle and its signature (envelope.py), the signed statement must be an OMS statement
of exactly the shape attest/oms.py documents (one subject whose digest is the sha256 over the
resources' digests, `files` serialization with sha256, resources sorted, unique and safe as
names), and, with --model, the directory must hold exactly the listed files with those sha256s:
any other file, symlink or special file fails by name, as for a SLSA attestation. The one file
allowed to be there unlisted is the signature being verified, when it lies inside the directory
(model_signing's own default); the predicate's `ignore_paths` otherwise excuse nothing, since
loaders read whatever is in the directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..attest.oms import parse_oms
from .report import Report


def oms_checks(report: Report, payload: object, model: Path | None, signature: Path, prefetch=None, published: bool = False) -> None:
    man, problems = parse_oms(payload)
    if isinstance(payload, dict):
        report.add("statement-type", payload.get("_type") == "https://in-toto.io/Statement/v1",
                   f"_type {payload.get('_type')!r}")
    if man is None:
        report.add("oms-statement", False, "not an OMS v1.0 statement: " + "; ".join(problems))
        return
    report.add("predicate-type", True, "predicateType 'https://model_signing/signature/v1.0' (OMS v1.0)")
    report.add("oms-statement", True, f"model {man.model_name!r}: {len(man.resources)} file(s), {man.method} "
               f"serialization with {man.hash_type}; the subject digest covers every resource")
    if model is None:
        return
    from .model_dir import inspect_digests, report_exact

    skip = frozenset()
    try:
        sig = os.stat(signature)
        skip = frozenset({(sig.st_dev, sig.st_ino)})
    except OSError:
        pass
    expected = {name: {"sha256": digest} for name, digest in man.resources.items()}
    report_exact(report, inspect_digests(expected, Path(model), prefetch=prefetch, skip=skip,
                                                 published=published), sha256=True,
                 algos="sha256, as the OMS signature lists them")
