"""A build's signed byproducts (transcript.jsonl, audit.json, the SBOMs, ...): read each one once,
bounded and without following symlinks, and hand back the bytes whose blake3 the attestation signs, so
that what a command goes on to use is exactly what it checked."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckFailed, InputError


def signed_digests(payload: dict) -> dict[str, dict]:
    """Byproduct name -> the digests the provenance statement signs for it."""
    return {b["name"]: b["digest"] for b in payload["predicate"]["runDetails"].get("byproducts", [])}


def read_bounded(path: Path, limit: int = 256 << 20) -> bytes | None:
    """A regular file's bytes, symlinks not followed (None when it is missing, a symlink, not regular, or
    over `limit`): _internal/reading.py's reader, with "absent" as an answer."""
    from .._internal.reading import read_regular_file

    if path.is_symlink():
        return None
    try:
        return read_regular_file(path, "file", limit)
    except InputError:
        return None


def is_signed(data: bytes | None, name: str, signed: dict[str, dict]) -> bool:
    import blake3

    return data is not None and name in signed and blake3.blake3(data).hexdigest() == signed[name].get("blake3")


def read_signed(path: Path, name: str, payload: dict, limit: int = 256 << 20) -> bytes:
    """The bytes of `path`, which must be the byproduct `name` the statement signs; CheckFailed otherwise."""
    data = read_bounded(path, limit)
    if not is_signed(data, name, signed_digests(payload)):
        raise CheckFailed(f"{path}: missing, or not the {name} the attestation signs")
    return data


def signed_byproducts(build_dir: Path, keys: list[str], names: list[str], what: str):
    """Verify BUILD_DIR's attestation with `keys` and read the byproducts `names` whose digests it
    signs: (payload, statement, [(path, bytes)...]). Raises InputError or CheckFailed."""
    from .rebuild import verified_statement

    att = build_dir / "attestation.intoto.jsonl"
    if not att.is_file():
        raise InputError(f"{build_dir}: no attestation.intoto.jsonl; `provenance {what}`")
    payload, st = verified_statement(att, [Path(k) for k in keys], None)
    return payload, st, [(build_dir / name, read_signed(build_dir / name, name, payload)) for name in names]


def reference_rounding_log(attestation: Path, payload: dict, reporter):
    """A portable recipe's rebuild follows the reference's rounding log: the signed transcript beside the
    attestation, NAME.transcript.jsonl for NAME.intoto.jsonl (as `make reference` commits it) or else a
    build directory's transcript.jsonl (its blake3 must be the one the attestation signs). None, said
    aloud, when there is none; CheckFailed when it is there but not the signed one."""
    from ..builder.portable import read_log

    named = attestation.parent / (attestation.name.removesuffix(".intoto.jsonl") + ".transcript.jsonl")
    path = named if attestation.name.endswith(".intoto.jsonl") and named.is_file() else \
        attestation.parent / "transcript.jsonl"
    signed = signed_digests(payload)
    data = read_bounded(path, limit=1 << 30)
    if data is None or "transcript.jsonl" not in signed:
        reporter.log(f"portable recipe, but no signed transcript at {path}: rebuilding without the reference's "
                     "rounding log (a value near a float32 rounding boundary may round the other way)")
        return None
    if not is_signed(data, "transcript.jsonl", signed):
        raise CheckFailed(f"{path}: not the transcript.jsonl the attestation signs; its rounding log cannot be used")
    log = read_log(path, data)
    reporter.log(f"portable recipe: following the reference's rounding log ({sum(map(len, log.entries.values()))} "
                 f"values, {path})")
    return log
