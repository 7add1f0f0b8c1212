"""A rebuild judged against a verified attestation: `provenance rebuild` (and the build at the heart of
`provenance gate`). The embedded recipe is built again, with every step trained (no stage cache, no
checkpoint of an earlier run), on one process or on several, or from a corresponding-source archive
alone; then the reproduced question is answered against the attestation, bitwise on the reference's
stack, and `rebuild` signs a Verification Summary Attestation recording the verdict."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..inputs.store import Store
from ..recipe import load_any_recipe
from .rebuild import (
    embedded_recipe,
    judge_build,
    recipe_file_name,
    sign_vsa,
    stack_matches,
    verified_statement,
    vsa_statement,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .._internal.progress import Reporter
    from ..attest.signing import Signing
    from ..verify import Result


@dataclass(frozen=True)
class Settings:
    """How a rebuild runs: the command line's choices that `rebuild` and `gate` share."""

    store: str | None = None
    offline: bool = False
    handed: Callable[[object], dict[str, Path]] | None = None  # a recipe's files handed over (--input), by name
    keys: tuple[Path, ...] = ()  # the private keys a rebuild in other processes signs with (none: the default)
    threads: int | None = None
    cpu_capability: str | None = None
    world_size: int = 1
    policy: Path | None = None

    @property
    def store_path(self) -> Path | None:
        return Path(self.store) if self.store else None

    def stack_args(self) -> list[str]:
        """--threads and --cpu-capability, as given, for a build in another process."""
        return [*([f"--threads={self.threads}"] if self.threads else []),
                *([f"--cpu-capability={self.cpu_capability}"] if self.cpu_capability else [])]

    def handed_for(self, recipe) -> dict[str, Path]:
        return self.handed(recipe) if self.handed is not None else {}

    def bounds(self):
        from ..verify.policy import load_policy

        return load_policy(self.policy).reproduced


@dataclass(frozen=True)
class Judged:
    """A rebuild and its verdict: its build.json, the reproduced Result, whether bitwise was required
    (the rebuild ran on the reference's stack) and why."""

    record: dict
    report: Result
    same_stack: bool
    why: str


@dataclass(frozen=True)
class Rebuilt:
    """`rebuild`'s answer: the judged build and the VSA signed into `vsa`."""

    judged: Judged
    vsa: Path
    verification_result: str


def rebuild(attestation: Path, keys: list[Path], settings: Settings, signing: Callable[[], Signing],
            reporter: Reporter, *, out: Path | None = None, bitwise: bool = False,
            from_source: Path | None = None, keyless: bool = False) -> Rebuilt:
    """Verify `attestation` with `keys`, rebuild its embedded recipe into `out` (default
    build/rebuild-<recipe>) and judge it, then sign the VSA with `signing()` (called once the output dir is
    known to be usable, before the build). `from_source`: rebuild from that corresponding-source archive alone
(`keyless`: Sigstore signing was asked for, which such a rebuild cannot do). Raises CheckFailed when the
attestation does not verify or the archive is not its corresponding source."""
    from ..builder.pipeline import check_out_dir

    payload, st = verified_statement(attestation, keys, settings.policy)
    source = check_from_source(from_source, st, settings, keyless=keyless) if from_source else None
    out = out or Path("build") / f"rebuild-{Path(recipe_file_name(st)).stem}"
    # Before the recipe is written into it: the output dir and the key that signs the VSA.
    check_out_dir(out, Store(settings.store).root)
    signer = signing()
    recipe = load_any_recipe(embedded_recipe(st, out))
    judged = judged_build(recipe, out, attestation, payload, st, settings, signer, reporter,
                          bitwise=bitwise or None, source=source)
    vsa = vsa_statement(payload, attestation, judged.report, judged.record,
                        "bitwise" if (bitwise or judged.same_stack) else "tolerance")
    sign_vsa(vsa, signer.signers, out / "vsa.intoto.jsonl")
    return Rebuilt(judged, out / "vsa.intoto.jsonl", vsa["predicate"]["verificationResult"])


def judged_build(recipe, out: Path, attestation: Path, payload: dict, st, settings: Settings, signing: Signing,
                 reporter: Reporter, *, bitwise: bool | None, source=None) -> Judged:
    """Build `recipe` into `out` and answer the reproduced question against the verified statement:
    bitwise required on the reference's stack (or whatever `bitwise` says when it is not None)."""
    from ..builder.pipeline import build
    from .byproducts import reference_rounding_log

    if not hasattr(recipe.recipe, "determinism"):  # an export: an exact function of its parent, bitwise anywhere
        return _judged_export(recipe, out, st, settings, signing, reporter, source)
    log = reference_rounding_log(attestation, payload, reporter) if recipe.recipe.determinism.portable else None
    if source is not None:
        record = _from_source_build(out, source, settings)
    elif settings.world_size > 1:
        if log is not None:
            raise InputError("--world-size: a portable recipe's rebuild follows the reference's rounding log in one "
                             "process; rebuild it without --world-size")
        record = _ranks_rebuild(recipe, out, settings, reporter)
    else:  # an independent rebuild trains every step: no stage cache, no checkpoint from an earlier run
        record = build(recipe, out=out, store=Store(settings.store), offline=settings.offline,
                       handed=settings.handed_for(recipe), reporter=reporter, signing=signing, resume=False,
                       use_cache=False, cpu_capability=settings.cpu_capability, threads=settings.threads,
                       rounding_log=log)
    match, why = stack_matches(payload, record)
    report = judge_build(st, out / "model", bitwise=match if bitwise is None else bitwise, bounds=settings.bounds(),
                         store=settings.store_path)
    return Judged(record, report, match, why)


def _judged_export(recipe, out: Path, st, settings: Settings, signing: Signing, reporter: Reporter,
                   source) -> Judged:
    """The rebuild of an export: the transform again, held to bitwise (it has no CPU- or thread-dependent
    step: builder/export.py)."""
    from ..builder.export import export

    if settings.world_size > 1:
        raise InputError("an export is rebuilt from its parent on one process: --world-size does not apply")
    if source is not None:  # the parent, its source and the export recipe from the archive alone
        record = _from_source_build(out, source, settings, export=True)
    else:
        record = export(recipe, out=out, store=Store(settings.store), handed=settings.handed_for(recipe),
                        reporter=reporter, signing=signing)
    report = judge_build(st, out / "model", bitwise=True, store=settings.store_path)
    return Judged(record, report, True, "an export: the same transform of the same parent is the same bits anywhere")


def check_from_source(archive: Path, st, settings: Settings, *, keyless: bool = False):
    """A rebuild from a corresponding-source archive: what it cannot be combined with, then the archive
    held to the attestation (CheckFailed when it is not its corresponding source), before anything is
    built. Returns (archive, the source claims) for `judged_build`."""
    import tomllib

    from ..recipe import parse_recipe
    from .source import check_against

    clash = [flag for flag, given in (("--world-size", settings.world_size > 1),
                                      ("--input", settings.handed is not None), ("--sigstore", keyless))
             if given]
    if clash:
        raise InputError(f"--from-source: {', '.join(clash)} cannot be combined with it (the archive's build runs "
                         "in one process, from the archive's inputs, signed with local keys)")
    if "export" not in tomllib.loads(st.recipe.content) and \
            parse_recipe(Path(st.recipe.path), st.recipe.content).determinism.portable:
        raise InputError("--from-source: a portable recipe's rebuild follows the reference's signed rounding log, "
                         "which the archive does not carry; rebuild it without --from-source")
    return archive, check_against(archive, st)


def _from_source_build(out: Path, source, settings: Settings, *, export: bool = False) -> dict:
    """The rebuild from a corresponding-source archive alone: its code, its inputs, offline."""
    from ..attest.sign import default_key_path
    from .source import rebuild_from_source

    archive, claims = source
    keys = list(settings.keys) or [default_key_path()]
    return rebuild_from_source(archive, claims, out, keys=keys, extra=settings.stack_args(), export=export)


def _ranks_rebuild(recipe, out: Path, settings: Settings, reporter: Reporter) -> dict:
    """The recipe built on `settings.world_size` ranks (torchrun, as `build --world-size` runs it), every step
    trained; its build.json. The ranks' stdout goes to stderr: the command's own output (with --json, one
    object) stays the only thing on stdout."""
    from .._internal import jsonstrict
    from ..builder.launch import launch_node, topology

    handed = settings.handed_for(recipe)
    build_args = ["build", str(recipe.path), "--out", str(out), "--world-size", str(settings.world_size),
                  "--no-cache", "--no-resume", *(["--store", settings.store] if settings.store else []),
                  *[f"--input={name}={path}" for name, path in handed.items()],
                  *[f"--key={k}" for k in settings.keys], *settings.stack_args()]
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        code = launch_node(recipe, topology(settings.world_size), build_args, store=Store(settings.store),
                           offline=settings.offline, handed=handed, reporter=reporter)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    if code != 0:
        raise InputError(f"the rebuild on {settings.world_size} ranks failed (exit {code}); its messages are above")
    return jsonstrict.loads((out / "build.json").read_bytes())
