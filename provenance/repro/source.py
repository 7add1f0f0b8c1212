"""The corresponding source on demand (`provenance source`), and the rebuild from an archive alone
(`provenance rebuild --from-source`). The archive is builder/source.py's; its layout and statement
attest/source.py's (docs/formats.md, "Corresponding source")."""

from __future__ import annotations

import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .._internal.atomic import atomic_write_bytes
from .._internal.hashing import hash_bytes
from ..attest.source import SourceClaims, input_prefix
from ..errors import InputError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..inputs.store import Store, StoredInput
    from ..recipe import LoadedRecipe


def make_source(recipe: LoadedRecipe, out: Path, store: Store, *, code: str | None, offline: bool,
                handed: dict[str, Path]) -> tuple[SourceClaims, dict[str, str]]:
    """Write the corresponding source of `recipe` at `out` and read it back against its claims: (the
    claims, the archive's digests). Refuses (InputError) a recipe whose source may not be shipped."""
    from ..builder.parent import discard_copies
    from ..builder.source import unshippable, write_source

    why = unshippable(recipe)
    if why:
        raise InputError(f"{recipe.path}: {why}")
    stored = stored_inputs(recipe, store, offline=offline, handed=handed)
    try:
        claims, digest = write_source(recipe, stored, out, code)
        _self_check(out, claims)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    finally:
        discard_copies(stored)
    return claims, digest


@dataclass(frozen=True)
class Written:
    """`provenance source`'s answer: the archive, what it claims, its digests, its signed statement if any."""

    archive: Path
    claims: SourceClaims
    digest: dict[str, str]
    statement: Path | None

    def summary(self) -> dict:
        return {"archive": str(self.archive), "bytes": self.archive.stat().st_size, "sha256": self.digest["sha256"],
                "blake3": self.digest["blake3"], "code": self.claims.code,
                "inputs": [i.name for i in self.claims.inputs], "licenses": sorted(self.claims.licences),
                "statement": str(self.statement) if self.statement else None}


def source_of(out: Path, store: Store, *, build_dir: Path | None = None, recipe_path: Path | None = None,
              offline: bool = False, handed=None, signers=None) -> Written:
    """The corresponding source of a finished build (`build_dir`: its recipe and code as it ran) or of a
    recipe, written at `out` (its folder made) and, with `signers`, its statement signed beside it as
    OUT.intoto.jsonl. `handed(recipe)`: the files handed over, by input name."""
    from ..attest.signing import sign_source
    from ..recipe import load_any_recipe

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {out}: cannot make the folder it goes in ({e.strerror})") from None
    with tempfile.TemporaryDirectory(prefix="provenance-source.") as work:
        recipe, code, files = of_build(build_dir, Path(work)) if build_dir else (load_any_recipe(recipe_path), None, {})
        claims, digest = make_source(recipe, out, store, code=code, offline=offline,
                                     handed=handed(recipe) if handed else {})
    signed = None
    if signers:
        signed = out.with_name(out.name + ".intoto.jsonl")
        sign_source(signed, claims, out.name, digest, files, signers)
    return Written(out, claims, digest, signed)


def _self_check(path: Path, claims: SourceClaims) -> None:
    from ..verify.source import archive_problems

    bad = archive_problems(path, claims)
    if bad:
        raise InputError("the archive written does not hold what it should (a file changed while it was "
                         "read?): " + "; ".join(bad))


def stored_inputs(recipe: LoadedRecipe, store: Store, *, offline: bool, handed: dict[str, Path]) -> list[StoredInput]:
    """Every input's bytes as pinned: handed over, from the store (re-hashed), or fetched unless offline."""
    from ..builder.parent import fetch_parent
    from ..inputs.store import StoredInput, check_pins, fetch_input, tree_digest

    out = []
    for inp in recipe.recipe.inputs:
        if inp.kind == "model":  # verified, as a build verifies it (builder/parent.py)
            out.append(fetch_parent(inp, store, recipe_dir=recipe.path.parent, handed=handed.get(inp.name)))
            continue
        tree = store.root / "trees" / (inp.blake3 or "-")
        if inp.name not in handed and inp.kind == "path" and tree.is_dir():
            digests = tree_digest(tree)
            check_pins(inp, digests, f"stored directory input {inp.name!r} ({tree})")
            out.append(StoredInput(inp, tree, digests, "store", is_dir=True))
            continue
        out.append(fetch_input(inp, store, recipe_dir=recipe.path.parent, offline=offline,
                               handed=handed.get(inp.name), limits=recipe.recipe.limits))
    return out


def recorded_code(record: dict) -> str | None:
    """The code digest a build's build.json records: under "training", or at the top for an export."""
    code = (record.get("training") or record).get("code")
    return code if isinstance(code, str) else None


def of_build(build_dir: Path, work: Path) -> tuple[LoadedRecipe, str, dict[str, dict[str, str]]]:
    """A finished build's recipe (from its attestation, checked against build.json's digest, written into
    `work`), the code digest it recorded and its model files' digests."""
    from .._internal import jsonstrict
    from ..recipe import load_any_recipe
    from .byproducts import read_bounded

    record_bytes = read_bounded(build_dir / "build.json")
    env_bytes = read_bounded(build_dir / "attestation.intoto.jsonl")
    if record_bytes is None or env_bytes is None:
        raise InputError(f"{build_dir}: no build.json or attestation.intoto.jsonl there; `provenance source` takes a "
                         "finished build's folder, or a recipe with --recipe RECIPE")
    from ..attest.model import parse_statement
    from ..verify.envelope import parse_envelope
    try:
        record = jsonstrict.loads(record_bytes)
        st, problems = parse_statement(jsonstrict.loads(parse_envelope(jsonstrict.loads(env_bytes)).payload))
        if st is None:
            raise ValueError("; ".join(problems[:3]))
        text, name = st.recipe.content.encode(), Path(st.recipe.path).name
        code, files, want = recorded_code(record), record["weights"]["files"], record["recipe"]["blake3"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{build_dir}: its build.json or attestation.intoto.jsonl is not one this version wrote "
                         f"({type(e).__name__}: {e})") from None
    if hash_bytes(text)["blake3"] != want or not name.endswith(".toml") or "/" in name:
        raise InputError(f"{build_dir}: the attestation's embedded recipe is not the one build.json records")
    atomic_write_bytes(work / name, text)
    return load_any_recipe(work / name), code, files


def check_against(archive: Path, st) -> SourceClaims:
    """Hold the archive to the build's provenance before anything of it is used. Raises CheckFailed."""
    from ..errors import CheckFailed
    from ..verify.source import archive_problems, claims_from_provenance

    claims = claims_from_provenance(st)
    bad = archive_problems(archive, claims)
    if bad:
        raise CheckFailed(f"{archive} is not the corresponding source of this attestation: " + "; ".join(bad))
    return claims


def rebuild_from_source(archive: Path, claims: SourceClaims, out: Path, *, keys: list[Path],
                        extra: list[str], export: bool = False) -> dict:
    """Unpack the (checked) archive into a fresh temporary folder and build its recipe there with the
    archive's own code, offline, from an empty store: every input handed over from the archive. The
    ranks' output goes to stderr. Returns the build's build.json; refuses one that ran other code."""
    import subprocess
    import sys

    from .._internal import jsonstrict

    with tempfile.TemporaryDirectory(prefix="provenance-from-source.") as tmp:
        with tarfile.open(archive, mode="r:") as tf:
            tf.extractall(tmp, filter="data")
        root = next(Path(tmp).iterdir())
        handed = [f"--input={i.name}={root / input_prefix(i.name) / i.artifact}" for i in claims.inputs]
        recipe = root / "recipe" / claims.recipe_path
        fresh = [] if export else ["--no-cache", "--no-resume"]  # an export trains nothing
        argv = [sys.executable, "-m", "provenance", "build", str(recipe), "--out", str(out.resolve()),
                "--store", str(Path(tmp) / "store"), "--offline", *fresh, *handed,
                *[f"--key={k.resolve()}" for k in keys], *extra]
        env = {**os.environ, "PYTHONPATH": str(root / "code"), "PROVENANCE_STORE": str(Path(tmp) / "store")}
        sys.stdout.flush()
        code = subprocess.run(argv, cwd=root / "code", env=env, stdout=sys.stderr.fileno()).returncode
    if code != 0:
        raise InputError(f"the build from {archive} failed (exit {code}); its messages are above")
    record = jsonstrict.loads((out / "build.json").read_bytes())
    ran = str(recorded_code(record))
    if ran != claims.code:
        raise InputError(f"the build from {archive} did not run the archive's code (code digest {ran[:16]}…, the "
                         f"archive's {str(claims.code)[:16]}…)")
    return record
