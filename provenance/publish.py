"""`provenance publish`: lay a verified build out as a Hugging Face model folder (nothing is uploaded)
and check that it verifies as published: the SLSA attestation and the OMS signature, each against
the folder (docs/receipts.md, "Publishing").

The folder is written beside its destination under a temporary name and renamed into place only
after both verifications ran, so an interrupted publish leaves no folder that looks complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckFailed, InputError
from .verify import Result, Verifier, render
from .verify.model_dir import RECEIPT_NAMES, RECEIPTS_DIR, scan

# The receipts a build may hold, copied under RECEIPTS_DIR/ when present.
RECEIPTS = ("attestation.intoto.jsonl", "attestation.sigstore.json", "audit.intoto.jsonl", "vsa.intoto.jsonl",
            "sbom.spdx3.json", "sbom.cdx.json", "source.intoto.jsonl", "source.tar")
SOURCE = "source.tar"  # shipped unless larger than publish's `source_max_bytes`: then its signed statement only
assert set(RECEIPTS) <= RECEIPT_NAMES


@dataclass(frozen=True)
class Published:
    out: Path
    files: list[str]  # the model files, relative to the folder
    receipts: list[str]  # under RECEIPTS_DIR/, signing-key.pub included
    oms: bool  # model.sig is there
    reports: list[tuple[str, Result]]  # ("SLSA provenance" | "OMS signature" | "corresponding source", as published)
    source: str  # what was done with the corresponding source, in a sentence

    @property
    def ok(self) -> bool:
        return all(r.exit_code == 0 for _, r in self.reports)


def publish(build_dir: Path, out: Path, key: Path, source_max_bytes: int | None = None) -> Published:
    """Verify the build with `key`, write the folder, verify it as published. Raises InputError for a
    bad destination or build dir (exit 2) and CheckFailed when the build does not verify (exit 1).
    The build's corresponding source (source.tar) goes under RECEIPTS_DIR/ with its signed statement, or,
    above `source_max_bytes`, the statement alone: a signed pointer that names the archive by digest."""
    _check_destination(out)
    att = build_dir / "attestation.intoto.jsonl"
    if not att.is_file():
        raise InputError(f"{build_dir}: no attestation.intoto.jsonl; publish lays out a signed build")
    verifier = Verifier.configure(keys=[key])
    shipped, said = _source_plan(build_dir, source_max_bytes)
    first = verifier.verify(att, model=build_dir / "model", source=build_dir / SOURCE if shipped else None)
    if not first.ok:
        raise CheckFailed(f"{build_dir}: the build does not verify, so it is not published:\n{render(first)}")
    receipts = [n for n in RECEIPTS if (build_dir / n).is_file() and (n != SOURCE or shipped)]
    staging = _staging_dir(out)
    try:
        files = _lay_out(build_dir, staging, receipts, key)
        oms = (staging / "model.sig").is_file()
        reports = [("SLSA provenance", verifier.verify(staging / RECEIPTS_DIR / "attestation.intoto.jsonl",
                                                        model=staging, published=True))]
        if oms:
            reports.append(("OMS signature", verifier.verify(staging / "model.sig", model=staging, published=True)))
        if shipped and "source.intoto.jsonl" in receipts:
            reports.append(("corresponding source", verifier.verify(
                staging / RECEIPTS_DIR / "source.intoto.jsonl", model=staging, published=True,
                source=staging / RECEIPTS_DIR / SOURCE)))
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Published(out, sorted(files), receipts + ["signing-key.pub"], oms, reports, said)


def _source_plan(build_dir: Path, limit: int | None) -> tuple[bool, str]:
    """(ship the archive?, the sentence that says what happens to the corresponding source)."""
    archive = build_dir / SOURCE
    if not archive.is_file():
        return False, "the build wrote no corresponding source (build.json's \"source\" says why)"
    size = archive.stat().st_size
    if limit is not None and size > limit:
        return False, (f"{SOURCE} is {size:,} bytes, over --source-max-bytes {limit:,}: only its signed statement "
                       f"(source.intoto.jsonl, which names it by digest) is shipped; publish the archive elsewhere")
    return True, f"{SOURCE} ({size:,} bytes) and its signed statement shipped under {RECEIPTS_DIR}/"


def _check_destination(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out}: exists and is not an empty directory; publish writes a new folder")
    probe = next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: {probe} is not a writable directory")


def _staging_dir(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise InputError(f"--out {out}: cannot write a folder there ({e.strerror})") from None


def _lay_out(build_dir: Path, staging: Path, receipts: list[str], key: Path) -> list[str]:
    """The model files at the top, model.sig beside them, the receipts and the public key under
    RECEIPTS_DIR/. Returns the model files' names."""
    from ._internal.atomic import atomic_write_bytes

    files, _ = scan(build_dir / "model")
    for rel, src in files.items():
        dest = staging / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    if (build_dir / "model.sig").is_file():
        shutil.copyfile(build_dir / "model.sig", staging / "model.sig")
    (staging / RECEIPTS_DIR).mkdir()
    for n in receipts:
        shutil.copyfile(build_dir / n, staging / RECEIPTS_DIR / n)
    atomic_write_bytes(staging / RECEIPTS_DIR / "signing-key.pub", key.read_bytes())
    return list(files)
