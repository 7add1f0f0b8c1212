"""Verifying an OpenSSF Model Signing (OMS) v1.0 signature with the same closed-set rules.

After the bundle and its signature (envelope.py), the signed statement must be an OMS statement
of exactly the shape attest/oms.py documents (one subject whose digest is the sha256 over the
resources' digests, `files` serialization with sha256, resources sorted, unique and safe as
names), and, with --model, the directory must hold exactly the listed files with those sha256s:
any other file, symlink or special file fails by name, as for a SLSA attestation. The one file
allowed to be there unlisted is the signature being verified, by its own path, when it lies
inside the directory (model_signing's own default); the predicate's `ignore_paths` otherwise excuse nothing, since
loaders read whatever is in the directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..attest.oms import parse_oms
from .report import CheckName, Checks

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .._internal.prefetch import Prefetch


def oms_checks(report: Checks, payload: object, model: Path | None, signature: Path, prefetch: Prefetch | None = None,
               published: bool = False) -> None:
    man, problems = parse_oms(payload)
    if isinstance(payload, dict):
        report.add(CheckName.STATEMENT_TYPE, payload.get("_type") == "https://in-toto.io/Statement/v1",
                   f"_type {payload.get('_type')!r}")
    if man is None:
        report.add(CheckName.OMS_STATEMENT, False, "not an OMS v1.0 statement: " + "; ".join(problems))
        return
    report.add(CheckName.PREDICATE_TYPE, True, "predicateType 'https://model_signing/signature/v1.0' (OMS v1.0)")
    report.add(CheckName.OMS_STATEMENT, True, f"model {man.model_name!r}: {len(man.resources)} file(s), {man.method} "
               f"serialization with {man.hash_type}; the subject digest covers every resource")
    if model is None:
        return
    from .model_dir import inspect_digests, report_exact

    expected = {name: {"sha256": digest} for name, digest in man.resources.items()}
    report_exact(report, inspect_digests(expected, Path(model), prefetch=prefetch,
                                         skip=signature_name(signature, Path(model)), published=published),
                 sha256=True, algos="sha256, as the OMS signature lists them")


def signature_name(signature: Path, model: Path) -> frozenset[str]:
    """The signature's own name inside the model dir, if it lies there: the one file left out of the
    closed set, by its path alone. Another name for the same bytes or the same inode (a hard link, or a
    hub cache blob shared by two names) is a file of the directory like any other, and must be signed."""
    sig = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(signature))), os.path.basename(signature))
    rel = os.path.relpath(sig, os.path.realpath(model))
    if rel.startswith(os.pardir) or os.path.isabs(rel) or rel == os.curdir:
        return frozenset()
    return frozenset({rel.replace(os.sep, "/")})
