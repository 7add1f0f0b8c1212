"""The builder: recipe -> inputs -> dataset manifest -> tokenizer -> training -> model directory.

Everything is written into a staging directory and moved into place at the end, build.json
last, so an interrupted or failed build never leaves outputs that look complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from .._internal.atomic import atomic_write_bytes
from .._internal.codedigest import code_digest
from .._internal.hashing import TENSOR_DIGEST, hash_bytes, hash_file, tensor_digest
from .._internal.progress import Reporter
from ..attest.signing import Signing, attest_and_sign, sign_audit, write_oms
from ..audit.memorization import summary_line
from ..errors import InputError
from ..inputs.dataset import layout_texts, manifest_bytes, select_dataset
from ..inputs.store import Store, fetch_input
from ..recipe import LoadedRecipe
from .parent import inbound_licences
from .ranks import DEFAULT_TIMEOUT

BUILD_FORMAT = "provenance-build-v1"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "README.md")
# Everything a build (and `rebuild`) writes at the top of its output dir; nothing else may be there.
OUTPUT_NAMES = frozenset({"model", "dataset-manifest.json", "transcript.jsonl", "build.json", "fingerprint.json",
                          "attestation.intoto.jsonl", "attestation.sigstore.json", "vsa.intoto.jsonl",
                          "audit.json", "audit.intoto.jsonl", "sbom.cdx.json", "sbom.spdx3.json", "model.sig",
                          "source.tar", "source.intoto.jsonl",  # the corresponding source (builder/source.py)
                          "report.html",  # written by `provenance report`
                          "checkpoint",  # checkpoints live until the build they belong to completes
                          "replay"})  # scheduled checkpoints kept for `provenance replay`


def _leftover(name: str) -> bool:
    """A build's own temporary in its output dir, left by one that was killed: its staging dir, or an
    earlier output being replaced (`_install`)."""
    if name.startswith(".staging-"):
        return True
    base, _, tag = name.removeprefix(".old-").rpartition("-")
    return (name.startswith(".old-") and base in OUTPUT_NAMES and len(tag) == 8
            and all(c in "0123456789abcdef" for c in tag))


def check_out_dir(out: Path, store_root: Path | None = None) -> None:
    """Preflight: `out` is a directory this tool may write (new, empty, or holding only an earlier
    build's outputs, which the new build replaces), and not inside the input store `store_root`,
    whose entries are named by their content. Raises InputError before any work."""
    out = Path(out)
    if store_root is not None:
        here, store = out.resolve(), Path(store_root).resolve()
        if here == store or store in here.parents:
            raise InputError(f"--out {out}: inside the input store {store_root}, which holds only entries named by "
                             "their content; choose a directory outside it")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: {probe} is not writable")
    if out.is_dir():
        foreign = sorted(n for n in os.listdir(out) if n not in OUTPUT_NAMES and not _leftover(n)
                         and not (n.endswith(".toml") and (out / n).is_file()))
        if foreign:
            raise InputError(f"--out {out}: holds files this tool did not write ({', '.join(foreign[:5])}"
                             f"{', …' if len(foreign) > 5 else ''}); choose a new or empty directory")
        # Outputs are replaced only where they are a build's: its build.json, or what an unfinished
        # one leaves (checkpoints, staging). A directory of someone's own model/ is not replaced.
        names = set(os.listdir(out))
        ours = sorted(names & OUTPUT_NAMES)
        if ours and "build.json" not in names and "checkpoint" not in names and not any(map(_leftover, names)):
            raise InputError(f"--out {out}: holds {', '.join(ours[:5])}{', …' if len(ours) > 5 else ''} but no "
                             "build.json, so it is not the output of a build of this tool, which it would replace; "
                             "choose a new or empty directory (or remove them)")


def _refuse_schedule_conflict(found, every_steps) -> None:
    """A resume on another checkpoint schedule would make a transcript that is neither build's."""
    from .checkpoint import schedule_conflict

    why = schedule_conflict(found.transcript_lines, found.state.global_step, every_steps)
    if why:
        raise InputError(f"{found.path}: {why}, or start afresh with --no-resume")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fetch_all(recipe: LoadedRecipe, store: Store, *, offline: bool, handed: dict[str, Path], reporter: Reporter):
    stored = []
    for inp in recipe.recipe.inputs:
        if inp.kind == "model":  # a parent: verified before anything is built on it (builder/parent.py)
            from .parent import fetch_parent

            s = fetch_parent(inp, store, recipe_dir=recipe.path.parent, handed=handed.get(inp.name))
            reporter.log(s.parent.verified_line(inp.name))
            stored.append(s)
            continue
        with reporter.task(f"fetch {inp.name}", total=None) as advance:
            s = fetch_input(inp, store, recipe_dir=recipe.path.parent, offline=offline,
                            handed=handed.get(inp.name), progress=lambda n, total=None: advance(n, total_=total),
                            limits=recipe.recipe.limits)
        reporter.log(f"input {inp.name}: {s.source}, blake3:{s.digests['blake3']}")
        stored.append(s)
    return stored


def _write_model_dir(staging: Path, model, tok, recipe: LoadedRecipe, m: dict) -> dict:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from .tokenizer import save_hf_files

    d = staging / "model"
    d.mkdir()
    spec = recipe.recipe.model
    from .tensors import saved_state

    state = {k: v.contiguous() for k, v in saved_state(model).items()}
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(d)
    cfg = model.config
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                     pad_token_id=cfg.pad_token_id, do_sample=False).save_pretrained(d)
    save_hf_files(tok, spec, spec.max_position_embeddings, d)
    weights = tensor_digest(d / "model.safetensors")
    return {"tensors": {"algorithm": TENSOR_DIGEST, "digest": weights}}


def _seal_model_dir(d: Path, card: bytes) -> dict:
    """Write the model card (README.md), make the files shareable, and hash every file."""
    atomic_write_bytes(d / "README.md", card)
    mask = os.umask(0)
    os.umask(mask)
    for name in os.listdir(d):  # safetensors writes 0600; a model dir is for sharing
        os.chmod(d / name, 0o644 & ~mask)
    return {name: hash_file(d / name) for name in sorted(os.listdir(d))}


def _install(staging: Path, out: Path) -> None:
    """Move staged outputs into `out`: drop the old build.json first, write the new one last, and
    remove every output of an earlier build that this one does not replace (a stale Sigstore
    bundle or VSA must not sit beside new weights). The staged outputs go in before anything is
    removed, the checkpoints included: killed in between, the build can still be resumed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "build.json").unlink(missing_ok=True)
    staged = set(os.listdir(staging))
    for name in sorted(staged):
        if name == "build.json":
            continue
        target = out / name
        if target.is_dir() and not target.is_symlink():
            old = out / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(staging / name, target)
            shutil.rmtree(old)
        else:
            os.replace(staging / name, target)
    for name in sorted(OUTPUT_NAMES - staged):
        stale = out / name
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            stale.unlink(missing_ok=True)
    os.replace(staging / "build.json", out / "build.json")


def _keep_for_replay(cdir: Path, dest: Path, every_steps: int) -> int:
    """Link (or copy) the scheduled checkpoints (step a multiple of every_steps) into `dest`, the
    staged replay dir. Returns how many. They stay in `cdir` too until the build is installed: a
    build that fails or is interrupted after training (its staging removed) can still be resumed."""
    dest.mkdir()
    n = 0
    for f in sorted(cdir.glob("step-*.safetensors")):
        step = int(f.stem.removeprefix("step-"))
        if step % every_steps == 0:
            try:
                os.link(f, dest / f.name)
            except OSError:  # a file system without hard links
                shutil.copyfile(f, dest / f.name)
            n += 1
    return n


def check_disk(r, out: Path, store_root: Path) -> None:
    """Preflight: room for the outputs (weights twice: staged and installed) and some for inputs."""
    from ..recipe.plan import parameter_count

    need = (256 << 20) + 8 * parameter_count(r)
    for where in (out, store_root):
        probe = next((p for p in [Path(where), *Path(where).parents] if p.exists()), Path("."))
        free = shutil.disk_usage(probe).free
        if free < need:
            raise InputError(f"{where}: {free >> 20} MiB free on its file system; this build needs at least "
                             f"{need >> 20} MiB")


def check_checkpoint_disk(out: Path, n_params: int, n_tensors: int, windows: int, total: int, done: int,
                          every: int | None, keep: int, replay: bool, free: int | None = None) -> None:
    """Preflight, once the steps are known: room on `out`'s file system for the checkpoints still to be
    written (checkpoint.bytes_needed). Raises InputError saying what to change."""
    from .checkpoint import bytes_needed

    need, kept, each = bytes_needed(n_params, n_tensors, windows, total, done, every, keep, replay)
    free = shutil.disk_usage(out).free if free is None else free
    if need <= free:
        return

    def mib(n: int) -> str:  # rounded up
        return f"{-(-n >> 20):,} MiB"

    if kept:
        raise InputError(f"--out {out}: {mib(free)} free on its file system, but this build's checkpoints need "
                         f"about {mib(need)}: {kept:,} kept for replay (one every {every} steps, up to {mib(each)} "
                         "each) and the newest few; free some space, keep them less often (--checkpoint-every), "
                         "or do not keep them for replay")
    raise InputError(f"--out {out}: {mib(free)} free on its file system, but this build's newest {keep + 1} "
                     f"checkpoints need about {mib(need)} (up to {mib(each)} each); free some space")


@dataclass
class PreparedData:
    """The dataset and tokenizer stages' outputs: everything training needs."""

    manifest: dict
    manifest_bytes: bytes
    tokenizer: object  # tokenizers.Tokenizer
    tokenizer_digest: dict[str, str]
    seqs: list[list[int]]
    special_ids: dict[str, int]
    paths: list[str] | None = None  # "input:path" of each training file, in the order of seqs
    control_paths: list[str] | None = None  # the audit's control files (not trained on)
    control_seqs: list[list[int]] | None = None
    parent: object = None  # a fine-tune's verified parent (builder/parent.py's Parent)
    # the parent's own training files for the audit: (seqs, paths), or why they could not be had
    parent_training: object = None


def prepare_data(recipe: LoadedRecipe, stored, work: Path, *, reporter: Reporter | None = None,
                 timings: dict[str, float] | None = None) -> PreparedData:
    """Extract inputs into `work`, select and lay out files, train the tokenizer and encode."""
    from .parent import parent_tokenizer
    from .tokenizer import encode_all, special_ids, tokenizer_json, train_tokenizer

    reporter = reporter or Reporter(enabled=False)
    timings = timings if timings is not None else {}
    r = recipe.recipe
    t0 = time.perf_counter()
    files, m = select_dataset(r.dataset, stored, work, recipe.path, r.limits)
    reporter.log(f"dataset: {m['totals']['files']} files, {m['totals']['bytes']} bytes, "
                 f"licences {m['licenses']}, root {m['merkle_root']['digest']}")
    texts = layout_texts(files, r.layout)
    t1 = time.perf_counter()
    timings["dataset"] = round(t1 - t0, 3)
    parent = next((s.parent for s in stored if s.parent is not None), None)
    tok = train_tokenizer(texts, r.tokenizer) if parent is None else parent_tokenizer(parent, r.model)
    tok_digest = hash_bytes(tokenizer_json(tok))
    seqs = encode_all(tok, texts)
    ids = special_ids(tok, r.model)
    reporter.log(f"tokenizer: vocab {tok.get_vocab_size()}, {sum(map(len, seqs))} tokens, "
                 f"blake3:{tok_digest['blake3']}")
    from ..inputs.dataset import select_control

    control = select_control(r.dataset, r.audit.control_include, r.audit.control_exclude, stored, work, files)
    if control:
        reporter.log(f"audit control: {len(control)} files not trained on")
    timings["tokenizer"] = round(time.perf_counter() - t1, 3)
    return PreparedData(m, manifest_bytes(m), tok, tok_digest, seqs, ids, [f"{f.input}:{f.path}" for f in files],
                        [f"{f.input}:{f.path}" for f in control], encode_all(tok, layout_texts(control, r.layout)),
                        parent)


def topology_problems(r, st, world_size: int) -> list[str]:
    """What a stage cannot do at this world size under DistributedDataParallel's all-reduce (the
    canonical reduction runs any stage at any world size: a rank without a micro-batch waits)."""
    if world_size == 1 or r.determinism.reduction == "canonical":
        return []
    problems = []
    if st.cross_entropy == "chunked":
        problems.append(f"cross_entropy: 'chunked' is not supported with reduction 'all-reduce' at world size "
                        f"{world_size}; use 'full' or [determinism] reduction = 'canonical'")
    if st.batch_size < world_size:
        problems.append(f"batch_size: {st.batch_size} is smaller than the world size {world_size}")
    return problems


def check_data(recipe: LoadedRecipe, seqs: list[list[int]], world_size: int = 1) -> list[int]:
    """Preflight after tokenization, before the first step: everything that would otherwise fail
    after training. Returns the steps of each stage. Raises InputError naming the field."""
    from .train import stage_steps

    r, where = recipe.recipe, recipe.path
    problems, steps = [], []
    for i, st in enumerate(r.stages):
        n = stage_steps(st, seqs)
        steps.append(n)
        if n == 0:
            problems.append(f"stages[{i}] ({st.name!r}): no training windows in the data")
        if st.warmup_steps > n:
            problems.append(f"stages[{i}].warmup_steps: {st.warmup_steps} exceeds the stage's {n} steps")
        problems += [f"stages[{i}].{p}" for p in topology_problems(r, st, world_size)]
    longest = max((len(s) for s in seqs), default=0)
    rep = r.reproducibility
    if longest < rep.eval_tokens:
        problems.append(f"reproducibility.eval_tokens: {rep.eval_tokens} tokens, but the longest training file has "
                        f"{longest}; the fingerprint needs at least one window that long")
    if rep.prompt_tokens > rep.eval_tokens:
        problems.append(f"reproducibility.prompt_tokens: {rep.prompt_tokens} exceeds eval_tokens {rep.eval_tokens}")
    ev = r.evaluate
    if longest < ev.prompt_tokens + ev.continuation_tokens:
        problems.append(f"evaluate: prompt_tokens + continuation_tokens = {ev.prompt_tokens + ev.continuation_tokens} "
                        f"tokens, but the longest training file has {longest}")
    if problems:
        raise InputError(f"{where}: the recipe cannot be built on this data (checked before training):\n  "
                         + "\n  ".join(problems))
    return steps


def judge_licences(r, inbound: dict[str, int], mode: str, reporter: Reporter, cache: Path | None = None):
    """Start the licence compatibility verdict; the returned function waits for it (flict runs as
    a separate program, about 2.3 s of CPU a call, so it runs while the model is made, and its
    answers are kept in `cache`: audit/licences.py) and, with mode "fail", stops the build when the
    declared licence is not compatible. The build calls it before its first training step."""
    if mode == "ignore":
        verdict = {"outbound": r.output.license, "verdict": "not judged", "inbound": []}
        return lambda: verdict
    from concurrent.futures import ThreadPoolExecutor

    from ..audit.licences import compatibility, describe
    from ..errors import CheckFailed

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flict")
    pending = pool.submit(compatibility, r.output.license, inbound, cache)
    pool.shutdown(wait=False)

    def finish() -> dict:
        c = pending.result()
        if mode == "fail" and c["verdict"] != "compatible":
            raise CheckFailed(describe(c) + " (--licence-compatibility fail; checked before training)")
        reporter.log(describe(c) + ("; warning" if c["verdict"] != "compatible" else ""))
        return c

    return finish


def add_parent_training(data: PreparedData, store: Store, *, offline: bool, work: Path) -> None:
    """For a fine-tune, the parent's own training files (builder/parent.py), which the audit measures too."""
    if data.parent is not None:
        from .parent import parent_training

        data.parent_training = parent_training(data.parent, store, offline=offline, work=work,
                                               tokenizer=data.tokenizer)


def run_audit(model_dir: Path, data: PreparedData, r) -> dict:
    """The memorization audit (provenance/audit/memorization.py) of the written model dir; for a fine-tune
    also on its parent's training files (`parent_training`, with its rate in the summary)."""
    from ..audit.memorization import audit, measure, texts_of
    from .fingerprint import load_model

    model = load_model(model_dir)
    end_header = data.tokenizer.token_to_id("<|end_header|>")
    train = texts_of(data.seqs, data.paths, end_header)
    control = texts_of(data.control_seqs or [], data.control_paths or [], end_header)
    pad, positions = data.special_ids["pad_token_id"], r.model.max_position_embeddings
    out = audit(model, train, control, r.audit, pad, positions)
    got = data.parent_training
    if isinstance(got, str):
        out["parent_training"] = {"not_measured": got}
    elif got is not None:
        seqs, names, recipes, gaps = got
        out["parent_training"] = {**measure(model, texts_of(seqs, names, end_header), r.audit, pad, positions),
                                  "recipes": recipes, **({"not_measured_recipes": gaps} if gaps else {})}
        out["summary"]["parent_extraction_rate"] = out["parent_training"]["extraction_rate"]
    return out


def current_dist(device: str):
    """World size and rank from torchrun's environment; gloo on the CPU, NCCL on CUDA."""
    from .train import Dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(rank=int(os.environ["RANK"]), world_size=world, backend="nccl" if device == "cuda" else "gloo")


@dataclass
class BuildOptions:
    """How `build` was asked to run (the command line's choices; see `build`)."""

    threads: int | None = None
    offline: bool = False
    handed: dict[str, Path] = field(default_factory=dict)
    allow_toolchain_mismatch: bool = False
    cpu_capability: str | None = None
    resume: bool | None = None
    checkpoint_every: int | None = None
    use_cache: bool = True
    keep_checkpoints: bool | None = None
    licence_compatibility: str = "warn"
    collective_timeout: float = DEFAULT_TIMEOUT  # seconds (builder/ranks.py)


@dataclass
class BuildState:
    """What the phases of one build share. Each phase reads what the earlier ones set and fills in its own
    part, in the order of `build` (and of docs/formats.md's build.json)."""

    recipe: LoadedRecipe
    out: Path
    store: Store
    opts: BuildOptions
    reporter: Reporter
    signing: Signing | None
    log: object = None  # the rounding log this (portable) build follows
    every_steps: int | None = None
    keep_for_replay: bool = False
    started: str = ""
    t_start: float = 0.0
    timings: dict = field(default_factory=dict)
    dist: object = None
    toolchain: dict = field(default_factory=dict)
    kernel: object = None  # our attention kernel's module, if the recipe names one
    stored: list = field(default_factory=list)
    threads_per_rank: int = 1
    det_record: dict = field(default_factory=dict)
    ident: str = ""
    cdir: Path | None = None
    found: object = None  # the checkpoint this build resumes from
    read_cache: bool = False
    staging: Path | None = None
    data: PreparedData | None = None
    licence_verdict: object = None  # waits for the licence compatibility verdict
    licence: dict = field(default_factory=dict)
    model: object = None
    n_params: int = 0
    transcript: object = None
    rounder: object = None
    checkpointer: object = None
    cache: object = None
    start: object = None  # a checkpoint or a stage-cache entry
    stages: list = field(default_factory=list)
    trained: int | None = None  # optimizer steps, once training is done
    recite: object = None
    outputs: dict = field(default_factory=dict)  # file name -> its bytes, for build.json and the byproducts
    kept: int = 0  # checkpoints kept for replay
    totals: list = field(default_factory=list)  # optimizer steps of each stage
    weights: dict = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)
    audit_doc: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # build.json's "source": the archive written, or why not
    source_claims: object = None  # what the archive holds (attest/source.py's SourceClaims)

    def lap(self, name: str, t0: float) -> float:
        now = time.perf_counter()
        self.timings[name] = round(now - t0, 3)
        return now


def build(recipe: LoadedRecipe, *, out: Path, store: Store, threads: int | None = None, offline: bool = False,
          handed: dict[str, Path] | None = None, allow_toolchain_mismatch: bool = False,
          reporter: Reporter | None = None, signing: Signing | None = None,
          cpu_capability: str | None = None, resume: bool | None = None,
          checkpoint_every: int | None = None, use_cache: bool = True,
          keep_checkpoints: bool | None = None, licence_compatibility: str = "warn",
          rounding_log=None, collective_timeout: float = DEFAULT_TIMEOUT) -> dict | None:
    """Run the whole pipeline. Returns build.json's content (None on ranks other than 0).

    `resume`: None resumes from a checkpoint in `out` of the same identity if there is one, True
    requires one, False starts afresh. `checkpoint_every` overrides `[checkpoint] every_steps`.
    `use_cache` False ignores the stage cache (builder/stagecache.py) and trains every stage.
    `keep_checkpoints` overrides `[checkpoint] keep_for_replay`: the scheduled checkpoints stay in
    OUT/replay/ for `provenance replay`. `licence_compatibility` ("ignore", "warn", "fail"): whether
    the output licence is judged against the training files' (audit/licences.py) and whether an
    incompatible one stops the build before training (CheckFailed, exit 1). `rounding_log`: the
    transcript of an earlier build of this portable recipe whose rounding log this build follows
    (builder/portable.py); a log that does not fit stops the build (CheckFailed, exit 1).
    Raises ProvenanceError subclasses.

    The phases, in order: check everything that can be checked before work (_preflight), fetch the
    inputs and apply the determinism (_fetch_and_set_up), choose where training starts (_choose_start),
    prepare the data (_prepare), train (_train), evaluate and write the model dir, transcript and
    fingerprint (_write_outputs), the corresponding source (_source), audit (_audit), write build.json, the
    SBOMs and the signatures (_record, _sign), and move the staged outputs into place (_install)."""
    opts = BuildOptions(threads, offline, handed or {}, allow_toolchain_mismatch, cpu_capability, resume,
                        checkpoint_every, use_cache, keep_checkpoints, licence_compatibility, collective_timeout)
    b = BuildState(recipe, out, store, opts, reporter or Reporter(enabled=False), signing)
    _preflight(b, rounding_log)
    _fetch_and_set_up(b)
    _choose_start(b)
    _open_staging(b)
    try:
        _prepare(b)
        if not _train(b):
            return None  # rank 0 evaluates and writes the outputs
        _write_outputs(b)
        _source(b)
        _audit(b)
        record = _record(b)
        _sign(b, record)
        _install(b.staging, out)
        return record
    except BaseException:
        if b.trained is not None and b.dist.rank == 0:
            _say_what_is_kept(out, b.trained, b.dist.world_size == 1 and b.log is None, b.reporter)
        raise
    finally:
        shutil.rmtree(b.staging, ignore_errors=True)
        from .parent import discard_copies

        discard_copies(b.stored)


def check_request(recipe: LoadedRecipe, out: Path, store: Store, rounding_log: Path | None = None):
    """What the command line can refuse before a signing key is made or loaded: the output dir, the
    store, and the rounding log a portable build is to follow, which it returns read (None: none), so
    that `build`, which checks the rest again itself, need not read it again."""
    check_out_dir(out, store.root)
    store.check_writable()
    return check_rounding_log(recipe, rounding_log)


def check_rounding_log(recipe: LoadedRecipe, rounding_log):
    """The rounding log (a path or one already read) a portable build follows, read before anything
    expensive (InputError names the line); None when there is none."""
    if rounding_log is None:
        return None
    if not recipe.recipe.determinism.portable:
        raise InputError(f"--rounding-log {rounding_log}: {recipe.path} is not a portable recipe "
                         "([determinism] portable = true)")
    from .portable import RoundingLog, read_log

    return rounding_log if isinstance(rounding_log, RoundingLog) else read_log(Path(rounding_log))


def _preflight(b: BuildState, rounding_log) -> None:
    """Everything that can be refused before any work: the out dir, the rounding log, the checkpoint
    schedule, a --resume with nothing to resume, the toolchain, memory, disk, and our C kernel."""
    from ..recipe.plan import memory_problem
    from . import attention, clib, toolchain

    r, recipe = b.recipe.recipe, b.recipe
    check_out_dir(b.out, b.store.root)
    b.log = check_rounding_log(recipe, rounding_log)
    b.every_steps = b.opts.checkpoint_every or r.checkpoint.every_steps
    b.keep_for_replay = r.checkpoint.keep_for_replay if b.opts.keep_checkpoints is None else b.opts.keep_checkpoints
    if b.keep_for_replay and not b.every_steps:
        raise InputError(f"{recipe.path}: keeping checkpoints for replay needs scheduled ones: set "
                         "[checkpoint] every_steps or --checkpoint-every")
    if b.opts.resume:
        from .checkpoint import DIRNAME

        # Before fetching and preparing anything: which of the checkpoints is this build's is checked
        # once its identity (inputs, toolchain) is known, but a dir with none at all fails here.
        if not any((b.out / DIRNAME).glob("step-*.safetensors")):
            raise InputError(f"--resume: no checkpoint of this build in {b.out / DIRNAME} (there is none at all; "
                             "a build writes them on its [checkpoint] schedule, --checkpoint-every, and when "
                             "interrupted)")
    b.started, b.t_start = _now(), time.perf_counter()
    b.dist = current_dist(r.determinism.device)
    if b.dist.rank != 0:
        b.reporter = Reporter(enabled=False)
    b.toolchain = toolchain.check(r.toolchain, recipe.path, allow=b.opts.allow_toolchain_mismatch)
    problem = memory_problem(r, world_size=b.dist.world_size) if b.dist.rank == 0 else None
    if problem:
        raise InputError(f"{recipe.path}: {problem}")
    check_disk(r, b.out, b.store.root)
    b.kernel = attention.attention_module(r.model.attn_implementation)
    if b.kernel is not None:
        clib.configure(b.store.root)
        b.kernel.load()  # compiled now: a missing compiler stops the build before any input is fetched


def _fetch_and_set_up(b: BuildState) -> None:
    """Fetch and check every pinned input, then apply the recipe's determinism (and join the process group)."""
    from . import determinism

    r = b.recipe.recipe
    t = time.perf_counter()
    b.stored = fetch_all(b.recipe, b.store, offline=b.opts.offline, handed=b.opts.handed, reporter=b.reporter)
    t = b.lap("fetch", t)
    b.threads_per_rank = max(1, (b.opts.threads or r.determinism.threads) // b.dist.world_size)
    b.det_record = determinism.apply(r.determinism, threads=b.threads_per_rank, cpu_capability=b.opts.cpu_capability)
    if r.determinism.reduction == "all-reduce":  # the topology decides the bits: part of the determinism
        b.det_record["world_size"] = b.dist.world_size
        b.det_record["backend"] = b.dist.backend
    if b.dist.world_size > 1:
        from . import ranks

        ranks.join(b.dist.backend, b.opts.collective_timeout)
    b.lap("setup", t)


def _choose_start(b: BuildState) -> None:
    """Which checkpoint this build resumes from, before the data is prepared (minutes for a large tree) and
    before anything is written: its identity needs only the recipe, the inputs, the toolchain and the
    determinism as applied."""
    from . import checkpoint as ckpt

    ident_det = b.det_record
    if b.log is not None:  # a build that follows a rounding log is another build than one that makes its own
        ident_det = {**b.det_record, "rounding_log": b.log.digest}
    b.ident = ckpt.identity(b.recipe.digests["blake3"], [s.digests for s in b.stored], b.toolchain["installed"],
                            ident_det, bit_world_size(b))
    b.cdir = b.out / ckpt.DIRNAME
    b.found = ckpt.latest(b.cdir, b.ident, b.reporter.log) if b.opts.resume is not False else None
    if b.opts.resume and b.found is None:
        raise InputError(f"--resume: no checkpoint of this build in {b.cdir}")
    if b.found is not None:  # before the stage cache, which would end the build and delete them too
        why, note = ckpt.replay_conflict(b.found, b.cdir, b.keep_for_replay)
        if why:
            raise InputError(f"{b.found.path}: {why}")
        if note:
            b.reporter.log(note)
    # The cache holds each stage's output, not the checkpoints between: a build that keeps them for
    # replay trains every stage (and still stores what it trained).
    b.read_cache = b.opts.use_cache and b.dist.world_size == 1 and b.log is None and not b.keep_for_replay
    if b.found is not None and not b.read_cache:  # else a stage cache hit may yet replace the checkpoint
        _refuse_schedule_conflict(b.found, b.every_steps)


def bit_world_size(b: BuildState) -> int:
    """The world size as far as the bits depend on it: 1 under the canonical reduction, which gives every
    world size the same bits (a checkpoint written by 2 ranks resumes in 1 or 4), else the world size."""
    return 1 if b.recipe.recipe.determinism.reduction == "canonical" else b.dist.world_size


def _open_staging(b: BuildState) -> None:
    """The directory every output is written into before `_install` moves them into OUT at once."""
    if b.dist.rank == 0:
        b.out.mkdir(parents=True, exist_ok=True)
        for old in [p for p in b.out.glob(".*") if _leftover(p.name)]:  # left by a build that was killed
            shutil.rmtree(old, ignore_errors=True)
        b.staging = Path(tempfile.mkdtemp(dir=b.out, prefix=".staging-"))
    else:
        b.staging = Path(tempfile.mkdtemp(prefix=f"provenance-rank{b.dist.rank}-"))


def _prepare(b: BuildState) -> None:
    """The dataset, tokenizer and token sequences; the data checks; the licence verdict started."""
    r = b.recipe.recipe
    b.data = prepare_data(b.recipe, b.stored, b.staging / "work", reporter=b.reporter, timings=b.timings)
    if b.dist.rank == 0:
        add_parent_training(b.data, b.store, offline=b.opts.offline, work=b.staging / "work" / "parent")
    check_data(b.recipe, b.data.seqs, b.dist.world_size)
    b.licence_verdict = (judge_licences(r, inbound_licences(b.data.manifest["licenses"], b.data.parent),
                                        b.opts.licence_compatibility, b.reporter, b.store.root / "licences")
                         if b.dist.rank == 0 else (lambda: None))
    atomic_write_bytes(b.staging / "dataset-manifest.json", b.data.manifest_bytes)


def _train(b: BuildState) -> bool:
    """Build the model and train every stage (from a checkpoint or the stage cache where there is one),
    then evaluate its recitation. False on ranks other than 0, which stop here."""
    from . import determinism
    from .evaluate import recitation

    r = b.recipe.recipe
    t = time.perf_counter()
    with determinism.sdpa_context(r.determinism):
        _make_model(b)
        _find_start(b)
        _agree(b)
        b.licence = b.licence_verdict()  # before the first step (--licence-compatibility fail stops here)
        _run_stages(b)
        if b.dist.world_size > 1:
            import torch.distributed as tdist

            from .ranks import collective

            with collective("waiting for every rank to finish training"):
                tdist.barrier()
            tdist.destroy_process_group()
            if b.dist.rank != 0:
                return False
        b.model = b.model.to("cpu")  # evaluation, fingerprint and saving run on the CPU everywhere
        t = b.lap("train", t)
        b.trained = len(b.transcript.lines)
        b.recite = recitation(b.model, b.data.seqs, r.evaluate, b.data.special_ids["pad_token_id"])
        b.lap("evaluate", t)
    return True


def _agree(b: BuildState) -> None:
    """Every rank builds the same thing from the same place, or none starts (builder/ranks.py)."""
    if b.dist.world_size == 1:
        return
    from .ranks import agree
    from .tensors import param_digest

    data = b.data
    agree({"recipe": b.recipe.digests["blake3"], "code": code_digest(), "manifest root": data.manifest["merkle_root"],
           "tokenizer": data.tokenizer_digest, "toolchain": b.toolchain["installed"],
           "start step": str(b.start.state.global_step if b.start is not None else 0),
           "initial weights": param_digest(b.model)}, b.dist.rank, b.dist.world_size)


def _make_model(b: BuildState) -> None:
    from . import checkpoint as ckpt
    from .train import build_model, stage_steps
    from .transcript import Transcript

    r, data = b.recipe.recipe, b.data
    b.model = build_model(r.model, data.tokenizer.get_vocab_size(), data.special_ids, r.determinism.seed,
                          portable=r.determinism.portable, parent=data.parent)
    if r.determinism.device == "cuda":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        b.model = b.model.to("cuda")
    b.n_params = sum(p.numel() for p in b.model.parameters())
    b.reporter.log(f"model: LlamaForCausalLM, {b.n_params} parameters")
    b.transcript = Transcript()
    b.totals = [stage_steps(s, data.seqs) for s in r.stages]
    if r.determinism.portable:
        from .portable import Rounder

        b.rounder = Rounder(r.determinism.portable_margin, b.log)
    b.checkpointer = ckpt.Checkpointer(b.cdir, b.ident, every_steps=b.every_steps,
                                       every_minutes=r.checkpoint.every_minutes, keep=r.checkpoint.keep,
                                       enabled=b.dist.rank == 0, keep_scheduled=b.keep_for_replay)


def _find_start(b: BuildState) -> None:
    """Where training starts: the stage cache's latest entry, a checkpoint of this build, or step 0."""
    from .stagecache import StageCache, stage_keys

    r, data = b.recipe.recipe, b.data
    if b.opts.use_cache and b.keep_for_replay:
        b.reporter.log("stage cache: not read, since this build keeps its checkpoints for replay "
                       "(--keep-checkpoints, [checkpoint] keep_for_replay): every stage is trained")
    b.cache = StageCache(b.store.root, stage_keys(
        r, inputs=[s.digests for s in b.stored], manifest_root=data.manifest["merkle_root"],
        tokenizer_digest=data.tokenizer_digest, seqs=data.seqs, special_ids=data.special_ids,
        determinism=b.det_record, toolchain=b.toolchain["installed"], world_size=bit_world_size(b),
        checkpoint_every=b.opts.checkpoint_every or r.checkpoint.every_steps),
        read=b.read_cache, log=b.reporter.log)
    cached = b.cache.lookup()
    if cached is not None and (b.found is None or cached.state.global_step >= b.found.state.global_step):
        b.found = None
        done = r.stages[cached.state.stage - 1].name
        b.reporter.log(f"stage cache: reusing the output of stages up to {done!r} "
                       f"(after optimizer step {cached.state.global_step})")
    else:
        b.cache.hits = [False] * len(b.cache.hits)
        cached = None
    if b.found is not None:
        _announce_resume(b)
    b.start = b.found or cached
    if b.dist.rank == 0:  # before the first step: a build of days must not stop for its checkpoints' disk
        from .train import count_windows

        windows = max(count_windows(data.seqs, s, p) for s in r.stages for p in range(s.phases))
        check_checkpoint_disk(b.out, b.n_params, len(list(b.model.parameters())), windows, sum(b.totals),
                              b.start.state.global_step if b.start else 0, b.every_steps, r.checkpoint.keep,
                              b.keep_for_replay)


def _announce_resume(b: BuildState) -> None:
    if b.read_cache:  # without the cache it was judged before the data was prepared
        _refuse_schedule_conflict(b.found, b.every_steps)
    b.reporter.log(f"resuming from {b.found.path} (after optimizer step {b.found.state.global_step})")
    if b.found.code != code_digest():
        b.reporter.log(f"warning: {b.found.path.name} was written by other code of this tool (code digest "
                       f"{(b.found.code or 'not recorded')[:16]}, this run's {code_digest()[:16]}): the "
                       "steps before and after the resume ran different code; build.json records both "
                       "(training.resumed_from_code)")


def _run_stages(b: BuildState) -> None:
    from .train import train

    r, data = b.recipe.recipe, b.data
    with b.reporter.task("train", total=sum(b.totals)) as advance:
        if b.start is not None:
            advance(b.start.state.global_step, "resumed" if b.found is not None else "cached")
        b.stages = train(b.model, r, data.seqs, data.special_ids["pad_token_id"], b.transcript,
                         progress=lambda name, step, total, loss: advance(1, f"{name} loss {loss:.4f}"),
                         dist=b.dist, checkpointer=b.checkpointer, resume=b.start,
                         on_stage_end=b.cache.store if b.dist.world_size == 1 and b.log is None else None,
                         rounder=b.rounder)
    earlier = len(b.start.state.results) if b.start is not None else 0  # stages done before this run
    origin = " (trained before the resume)" if b.found is not None else " (from the stage cache)"
    for i, s in enumerate(b.stages):
        b.reporter.log(f"stage {s.name}: {s.steps} steps, loss {s.first_loss:.4f} -> {s.final_loss:.4f} "
                       f"in {s.seconds:.1f} s{origin if i < earlier else ''}")


def _write_outputs(b: BuildState) -> None:
    """The transcript, the checkpoints kept for replay, the model dir and its fingerprint, into staging."""
    from .fingerprint import load_model, make_fingerprint

    r, data, staging = b.recipe.recipe, b.data, b.staging
    t = time.perf_counter()
    b.outputs["transcript.jsonl"] = b.transcript.to_bytes()
    atomic_write_bytes(staging / "transcript.jsonl", b.outputs["transcript.jsonl"])
    b.kept = _keep_for_replay(b.cdir, staging / "replay", b.every_steps) if b.keep_for_replay else 0
    b.weights = _write_model_dir(staging, b.model, data.tokenizer, b.recipe, data.manifest)
    t = b.lap("write", t)
    # Computed from the written model dir, through the same code path a verifier uses.
    b.fingerprint = make_fingerprint(load_model(staging / "model"), staging / "model", data.seqs, r.reproducibility,
                                     data.special_ids["pad_token_id"])
    b.outputs["fingerprint.json"] = (json.dumps(b.fingerprint, sort_keys=True, separators=(",", ":")) + "\n").encode()
    atomic_write_bytes(staging / "fingerprint.json", b.outputs["fingerprint.json"])
    b.lap("fingerprint", t)


def _source(b: BuildState) -> None:
    """The corresponding source (builder/source.py) as source.tar beside the model, where the recipe and its
    inputs' licences allow it and this installation carries its lock; else build.json says why not."""
    from .source import write_beside

    t = time.perf_counter()
    b.source, b.source_claims = write_beside(b.recipe, b.stored, b.staging, b.reporter.log)
    b.lap("source", t)


def _audit(b: BuildState) -> None:
    """The memorization audit of the written model, the licence verdict beside it, and the model card."""
    from .card import model_card
    from .source import unshippable

    r, data = b.recipe.recipe, b.data
    t = time.perf_counter()
    shutil.rmtree(b.staging / "work", ignore_errors=True)
    b.audit_doc = run_audit(b.staging / "model", data, r)
    b.audit_doc["licence_compatibility"] = b.licence
    b.reporter.log(summary_line(b.audit_doc))
    if b.licence["verdict"] != "not judged":
        from ..audit.licences import describe

        b.reporter.log(describe(b.licence, b.audit_doc["summary"]["extraction_rate"]))
    b.outputs["audit.json"] = (json.dumps(b.audit_doc, indent=1, sort_keys=True) + "\n").encode()
    atomic_write_bytes(b.staging / "audit.json", b.outputs["audit.json"])
    tok = data.tokenizer
    card = model_card(b.recipe, data.manifest, b.audit_doc, b.licence,
                      {"parameters": b.n_params, "vocab_size": tok.get_vocab_size(),
                       "tokens": sum(map(len, data.seqs)), "weights": b.weights["tensors"]["digest"]},
                      unshippable(b.recipe))
    b.weights["files"] = _seal_model_dir(b.staging / "model", card.encode())
    b.lap("audit", t)


def input_record(s) -> dict:
    """One input in build.json: what was pinned and where it came from; a parent model with what its
    attestation says (builder/parent.py)."""
    rec = {"name": s.input.name, "kind": s.input.kind, "artifact": s.input.artifact_name, "source": s.source,
           "license": s.input.license, **s.digests}
    return rec if s.parent is None else {**rec, "parent": s.parent.record()}


def _record(b: BuildState) -> dict:
    """build.json's content (docs/formats.md), without the SBOM and OMS entries `_sign` adds."""
    from . import determinism

    r, data, m, tok = b.recipe.recipe, b.data, b.data.manifest, b.data.tokenizer
    signing = b.signing
    return {
        "format": BUILD_FORMAT,
        "provenance_version": __version__,
        "invocation_id": f"urn:uuid:{uuid.uuid4()}",
        "signing": {"keyids": [sg.public_key.keyid for sg in signing.signers] if signing else [],
                    "sigstore": bool(signing and signing.sigstore_token is not None)},
        "recipe": {"name": r.recipe.name, "path": str(b.recipe.path), **b.recipe.digests},
        "inputs": [input_record(s) for s in b.stored],
        "dataset_manifest": {"merkle_root": m["merkle_root"], "totals": m["totals"], "licenses": m["licenses"],
                             **hash_bytes(data.manifest_bytes)},
        "tokenizer": {"vocab_size": tok.get_vocab_size(), "tokens": sum(map(len, data.seqs)),
                      "special_token_ids": data.special_ids, "tokenizer.json": data.tokenizer_digest},
        "model": {"parameters": b.n_params, "vocab_size": r.model.padded_vocab(tok.get_vocab_size())},
        "weights": b.weights,
        "training": _training_record(b),
        "recitation": b.recite.record(),
        "audit": {**{k: b.audit_doc["summary"][k] for k in ("extraction_rate", "control_extraction_rate",
                                                             "excess_over_control", "longest_verbatim_from_header")},
                  "licence_compatibility": b.licence["verdict"], "file": "audit.json",
                  **hash_bytes(b.outputs["audit.json"])},
        "fingerprint": {"format": b.fingerprint["format"], "eval_loss": b.fingerprint["eval"]["loss"],
                        **hash_bytes(b.outputs["fingerprint.json"])},
        "determinism": b.det_record,
        "machine": determinism.machine(),
        "distributed": _topology(b),
        "toolchain": b.toolchain,
        "output_license": r.output.license,
        "source": b.source,
        "started": b.started,
        "finished": _now(),
        "timings": {**b.timings, "total": round(time.perf_counter() - b.t_start, 3)},
    }


def _topology(b: BuildState) -> dict:
    """build.json's "distributed": how the build was spread (under the canonical reduction, a record of where it
    ran, not of what decides the bits: docs/formats.md)."""
    from .train import micro_batch_count

    r = b.recipe.recipe
    out = {"world_size": b.dist.world_size, "backend": b.dist.backend, "threads_per_rank": b.threads_per_rank}
    if r.determinism.reduction == "canonical":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", b.dist.world_size))
        micro = {s.name: micro_batch_count(s) for s in r.stages}
        out.update({"reduction": "canonical", "nnodes": max(1, b.dist.world_size // max(1, local)),
                    "micro_batches_per_rank": {name: [len(range(rank, m, b.dist.world_size))
                                                      for rank in range(b.dist.world_size)]
                                               for name, m in micro.items()}})
    return out


def _training_record(b: BuildState) -> dict:
    from . import allocator

    r, found, rounder = b.recipe.recipe, b.found, b.rounder
    tbytes = b.outputs["transcript.jsonl"]
    record = {"stages": [asdict(s) for s in b.stages], "transcript": hash_bytes(tbytes),
              "transcript_head": b.transcript.prev, "steps": len(b.transcript.lines),
              "resumed_after_step": found.state.global_step if found is not None else None,
              "code": code_digest()}
    if found is not None and found.code != code_digest():
        record["resumed_from_code"] = found.code
    record.update({"checkpoints_written": len(b.checkpointer.written), "checkpoint_every_steps": b.every_steps,
                   "checkpoints_kept_for_replay": b.kept,
                   "stage_cache": b.cache.record([s.name for s in r.stages], b.read_cache),
                   "allocator": allocator.tune()})
    if b.kernel is not None:
        record["attention"] = b.kernel.record()
    if rounder is not None:
        record["portable"] = {"margin": r.determinism.portable_margin, "values_logged": rounder.logged,
                              "rounded_as_logged_against_nearest": rounder.forced,
                              "rounding_log_from": {"blake3": b.log.digest} if b.log else None}
    return record


def _sign(b: BuildState, record: dict) -> None:
    """The SBOMs and the OMS signature (recorded in build.json), build.json itself, then the provenance
    attestation and the audit's, which sign them all."""
    from .sbom import CYCLONEDX_FILE, SPDX3_FILE, cyclonedx, spdx3
    from .source import sign_beside

    staging, files = b.staging, b.weights["files"]
    sboms = {CYCLONEDX_FILE: ("cyclonedx", "1.6", cyclonedx), SPDX3_FILE: ("spdx3", "3.0.1", spdx3)}
    made = {name: make(b.recipe, record, b.audit_doc, b.licence, files).encode()
            for name, (_, _, make) in sboms.items()}
    for name, data in made.items():
        atomic_write_bytes(staging / name, data)
    b.outputs.update(made)
    record["sbom"] = {key: {"file": name, "specVersion": version, **hash_bytes(made[name])}
                      for name, (key, version, _) in sboms.items()}
    oms = write_oms(staging, files, b.signing, b.reporter)
    if oms is not None:
        record["oms"] = oms
    b.outputs["build.json"] = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    atomic_write_bytes(staging / "build.json", b.outputs["build.json"])
    if b.signing is None:
        return
    byproducts = {"transcript.jsonl": hash_bytes(b.outputs["transcript.jsonl"]),
                  "build.json": hash_bytes(b.outputs["build.json"]),
                  "dataset-manifest.json": hash_bytes(b.data.manifest_bytes),
                  **{name: hash_bytes(b.outputs[name]) for name in ("fingerprint.json", "audit.json", *sboms)}}
    if oms is not None and "file" in oms:
        byproducts[oms["file"]] = {k: oms[k] for k in ("sha256", "blake3")}
    sign_beside(staging, b.source, b.source_claims, files, b.signing.signers, byproducts)
    st = attest_and_sign(staging, b.recipe, record, b.data.manifest, byproducts, b.signing,
                         fingerprint=b.fingerprint)
    sign_audit(staging, st, b.audit_doc, hash_bytes(b.data.manifest_bytes), hash_bytes(b.outputs["audit.json"]),
               b.signing)


def _say_what_is_kept(out: Path, trained: int, cached: bool, reporter: Reporter) -> None:
    """A build that failed or was interrupted after training: say where its training is kept
    (`cached`: its stages were written to the stage cache)."""
    from .checkpoint import DIRNAME

    newest = max((out / DIRNAME).glob("step-*.safetensors"), default=None)
    if newest is not None:
        step = newest.stem.removeprefix("step-").lstrip("0") or "0"
        reporter.log(f"the build stopped after training; its newest checkpoint, {newest} (after optimizer step "
                     f"{step} of {trained}), is kept: the same command resumes from it")
    elif cached:
        reporter.log("the build stopped after training; the same command takes its trained stages from the stage "
                     "cache (unless it is given --no-cache or keeps its checkpoints for replay)")

