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
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..inputs.dataset import layout_texts, manifest_bytes, select_dataset
from .._internal.hashing import TENSOR_DIGEST, hash_bytes, hash_file, tensor_digest
from ..errors import InputError
from .._internal.progress import Reporter
from ..recipe import LoadedRecipe
from ..audit.memorization import summary_line
from .._internal.atomic import atomic_write_bytes
from ..inputs.store import Store, fetch_input
from .codedigest import code_digest

BUILD_FORMAT = "provenance-build-v1"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "README.md")
# Everything a build (and `rebuild`) writes at the top of its output dir; nothing else may be there.
OUTPUT_NAMES = frozenset({"model", "dataset-manifest.json", "transcript.jsonl", "build.json", "fingerprint.json",
                          "attestation.intoto.jsonl", "attestation.sigstore.json", "vsa.intoto.jsonl",
                          "audit.json", "audit.intoto.jsonl", "sbom.cdx.json", "sbom.spdx3.json", "model.sig",
                          "report.html",  # written by `provenance report`
                          "checkpoint",  # checkpoints live until the build they belong to completes
                          "replay"})  # scheduled checkpoints kept for `provenance replay`


def _leftover(name: str) -> bool:
    """A build's own temporary in its output dir, left by one that was killed: its staging dir, or an
    earlier output being replaced (`_install`)."""
    if name.startswith(".staging-"):
        return True
    base, _, tag = name.removeprefix(".old-").rpartition("-")
    return name.startswith(".old-") and base in OUTPUT_NAMES and len(tag) == 8 and all(c in "0123456789abcdef" for c in tag)


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


def parse_handed(values: list[str], recipe: LoadedRecipe) -> dict[str, Path]:
    names = {i.name for i in recipe.recipe.inputs}
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not path:
            raise InputError(f"--input {v!r}: expected NAME=PATH")
        if name not in names:
            raise InputError(f"--input {v!r}: the recipe has no input named {name!r} (inputs: {sorted(names)})")
        out[name] = Path(path)
    return out


def fetch_all(recipe: LoadedRecipe, store: Store, *, offline: bool, handed: dict[str, Path], reporter: Reporter):
    stored = []
    for inp in recipe.recipe.inputs:
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


def prepare_data(recipe: LoadedRecipe, stored, work: Path, *, reporter: Reporter | None = None,
                 timings: dict[str, float] | None = None) -> PreparedData:
    """Extract inputs into `work`, select and lay out files, train the tokenizer and encode."""
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
    tok = train_tokenizer(texts, r.tokenizer)
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
                        [f"{f.input}:{f.path}" for f in control], encode_all(tok, layout_texts(control, r.layout)))


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
        if st.cross_entropy == "chunked" and world_size > 1:
            problems.append(f"stages[{i}].cross_entropy: 'chunked' is not supported in a distributed build yet "
                            f"(world size {world_size}); use 'full'")
        if st.batch_size < world_size:
            problems.append(f"stages[{i}].batch_size: {st.batch_size} is smaller than the world size {world_size}")
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


@dataclass
class Signing:
    """How the attestation is signed: local securesystemslib signers, and optionally Sigstore."""

    signers: list
    sigstore_token: object | None = None
    sigstore_config: object | None = None


def write_oms(staging: Path, files: dict, signing, reporter) -> dict | None:
    """Write OUT/model.sig, an OMS v1.0 signature of the model directory (attest/oms.py): through
    Sigstore for a keyless (--sigstore) build, else with the build's first ECDSA key. None when the build is unsigned;
    a record saying why when no key can make one (ed25519: OMS accepts ECDSA keys only)."""
    if signing is None:
        return None
    from ..attest.oms import OMS_FILE, is_oms_key, key_bundle, oms_statement
    from ..attest.statement import canonical

    payload = canonical(oms_statement("model", files))
    ec_signers = [s for s in signing.signers if is_oms_key(s)]
    if signing.sigstore_token is not None:  # keyless: what `model_signing verify sigstore` checks
        from ..attest.sign import sign_sigstore

        data = sign_sigstore(payload, signing.sigstore_token, signing.sigstore_config).encode()
        how = "Sigstore, keyless"
    elif ec_signers:
        data = (json.dumps(key_bundle(payload, ec_signers[0]), indent=1) + "\n").encode()
        how = f"key {ec_signers[0].public_key.keyid[:16]}"
    else:
        why = "no OMS signature: OMS accepts ECDSA keys only and this build signs with ed25519 (keygen --type ecdsa)"
        reporter.log(why)
        return {"skipped": why}
    atomic_write_bytes(staging / OMS_FILE, data)
    reporter.log(f"OMS signature: {OMS_FILE} ({how})")
    return {"file": OMS_FILE, "format": "OMS v1.0 Sigstore bundle", **hash_bytes(data)}


def attest_and_sign(staging: Path, recipe: LoadedRecipe, record: dict, manifest_doc: dict, byproducts: dict,
                    signing: Signing, fingerprint: dict | None = None) -> dict:
    """Write attestation.intoto.jsonl (and attestation.sigstore.json) into `staging`."""
    from ..attest.statement import PAYLOAD_TYPE, canonical, statement
    from ..attest.sign import envelope_line, sign_envelope, sign_sigstore

    sizes = {name: (staging / "model" / name).stat().st_size for name in record["weights"]["files"]}
    st = statement(recipe=recipe, record=record, manifest=manifest_doc, model_files=record["weights"]["files"],
                   byproducts=byproducts, invocation_id=record["invocation_id"], fingerprint=fingerprint,
                   model_sizes=sizes)
    payload = canonical(st)
    atomic_write_bytes(staging / "attestation.intoto.jsonl",
                       envelope_line(sign_envelope(payload, PAYLOAD_TYPE, signing.signers)))
    if signing.sigstore_token is not None:
        bundle = sign_sigstore(payload, signing.sigstore_token, signing.sigstore_config)
        atomic_write_bytes(staging / "attestation.sigstore.json", bundle.encode() + b"\n")
    return st


def judge_licences(r, m: dict, mode: str, reporter: Reporter):
    """Start the licence compatibility verdict; the returned function waits for it (flict runs as
    a separate program, about 1.5 s a call, so it runs while the model is made) and, with mode
    "fail", stops the build when the declared licence is not compatible. The build calls it before
    its first training step."""
    if mode == "ignore":
        verdict = {"outbound": r.output.license, "verdict": "not judged", "inbound": []}
        return lambda: verdict
    from concurrent.futures import ThreadPoolExecutor

    from ..audit.licences import compatibility, describe
    from ..errors import CheckFailed

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flict")
    pending = pool.submit(compatibility, r.output.license, m["licenses"])
    pool.shutdown(wait=False)

    def finish() -> dict:
        c = pending.result()
        if mode == "fail" and c["verdict"] != "compatible":
            raise CheckFailed(describe(c) + " (--licence-compatibility fail; checked before training)")
        reporter.log(describe(c) + ("; warning" if c["verdict"] != "compatible" else ""))
        return c

    return finish


def run_audit(model_dir: Path, data: PreparedData, r) -> dict:
    """The memorization audit (provenance/audit/memorization.py) of the written model dir."""
    from ..audit.memorization import audit, texts_of
    from .fingerprint import load_model

    model = load_model(model_dir)
    end_header = data.tokenizer.token_to_id("<|end_header|>")
    train = texts_of(data.seqs, data.paths, end_header)
    control = texts_of(data.control_seqs or [], data.control_paths or [], end_header)
    return audit(model, train, control, r.audit, data.special_ids["pad_token_id"], r.model.max_position_embeddings)


def sign_audit(staging: Path, provenance_st: dict, audit_doc: dict, manifest_digest: dict, audit_digest: dict,
               signing: Signing) -> None:
    """Write audit.intoto.jsonl: the audit as its own Statement, signed with the build's keys."""
    from ..attest.audit import AUDIT_FILE, audit_statement
    from ..attest.sign import envelope_line, sign_envelope
    from ..attest.statement import PAYLOAD_TYPE, canonical

    st = audit_statement(provenance_st, audit_doc, manifest_digest=manifest_digest, audit_json_digest=audit_digest)
    atomic_write_bytes(staging / AUDIT_FILE, envelope_line(sign_envelope(canonical(st), PAYLOAD_TYPE, signing.signers)))


def current_dist(device: str):
    """World size and rank from torchrun's environment; gloo on the CPU, NCCL on CUDA."""
    from .train import Dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(rank=int(os.environ["RANK"]), world_size=world, backend="nccl" if device == "cuda" else "gloo")


def build(recipe: LoadedRecipe, *, out: Path, store: Store, threads: int | None = None, offline: bool = False,
          handed: dict[str, Path] | None = None, allow_toolchain_mismatch: bool = False,
          reporter: Reporter | None = None, signing: Signing | None = None,
          cpu_capability: str | None = None, resume: bool | None = None,
          checkpoint_every: int | None = None, use_cache: bool = True,
          keep_checkpoints: bool | None = None, licence_compatibility: str = "warn",
          rounding_log=None) -> dict:
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
    Raises ProvenanceError subclasses."""
    from . import toolchain

    reporter = reporter or Reporter(enabled=False)
    r = recipe.recipe
    check_out_dir(out, store.root)
    log = None
    if rounding_log is not None:
        if not r.determinism.portable:
            raise InputError(f"--rounding-log {rounding_log}: {recipe.path} is not a portable recipe "
                             "([determinism] portable = true)")
        from .portable import RoundingLog, read_log

        # read before anything expensive; InputError names the line
        log = rounding_log if isinstance(rounding_log, RoundingLog) else read_log(Path(rounding_log))
    every_steps = checkpoint_every or r.checkpoint.every_steps
    keep_for_replay = r.checkpoint.keep_for_replay if keep_checkpoints is None else keep_checkpoints
    if keep_for_replay and not every_steps:
        raise InputError(f"{recipe.path}: keeping checkpoints for replay needs scheduled ones: set "
                         "[checkpoint] every_steps or --checkpoint-every")
    if resume:
        from .checkpoint import DIRNAME

        # Before fetching and preparing anything: which of the checkpoints is this build's is checked
        # once its identity (inputs, toolchain) is known, but a dir with none at all fails here.
        if not any((out / DIRNAME).glob("step-*.safetensors")):
            raise InputError(f"--resume: no checkpoint of this build in {out / DIRNAME} (there is none at all; "
                             "a build writes them on its [checkpoint] schedule, --checkpoint-every, and when "
                             "interrupted)")
    started = _now()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - t0, 3)
        return now

    dist = current_dist(r.determinism.device)
    if dist.rank != 0:
        reporter = Reporter(enabled=False)
    tc = toolchain.check(r.toolchain, recipe.path, allow=allow_toolchain_mismatch)
    from ..recipe.plan import memory_problem

    problem = memory_problem(r, world_size=dist.world_size) if dist.rank == 0 else None
    if problem:
        raise InputError(f"{recipe.path}: {problem}")
    check_disk(r, out, store.root)
    from . import attention, clib

    kernel = attention.attention_module(r.model.attn_implementation)
    if kernel is not None:
        clib.configure(store.root)
        kernel.load()  # compiled now: a missing compiler stops the build before any input is fetched
    t = time.perf_counter()
    stored = fetch_all(recipe, store, offline=offline, handed=handed or {}, reporter=reporter)
    t = lap("fetch", t)

    from . import allocator, determinism

    per_rank_threads = max(1, (threads or r.determinism.threads) // dist.world_size)
    det_record = determinism.apply(r.determinism, threads=per_rank_threads, cpu_capability=cpu_capability)
    det_record["world_size"] = dist.world_size
    det_record["backend"] = dist.backend
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.init_process_group(backend=dist.backend)
    t = lap("setup", t)
    # Which checkpoint this build resumes from, before the data is prepared (minutes for a large tree) and
    # before anything is written: its identity needs only the recipe, the inputs, the toolchain and the
    # determinism as applied.
    from . import checkpoint as ckpt

    ident_det = det_record
    if log is not None:  # a build that follows a rounding log is another build than one that makes its own
        ident_det = {**det_record, "rounding_log": log.digest}
    ident = ckpt.identity(recipe.digests["blake3"], [s.digests for s in stored], tc["installed"], ident_det,
                          dist.world_size)
    cdir = out / ckpt.DIRNAME
    found = ckpt.latest(cdir, ident, reporter.log) if resume is not False else None
    if resume and found is None:
        raise InputError(f"--resume: no checkpoint of this build in {cdir}")
    if found is not None:  # before the stage cache, which would end the build and delete them too
        why, note = ckpt.replay_conflict(found, cdir, keep_for_replay)
        if why:
            raise InputError(f"{found.path}: {why}")
        if note:
            reporter.log(note)
    # The cache holds each stage's output, not the checkpoints between: a build that keeps them for
    # replay trains every stage (and still stores what it trained).
    read_cache = use_cache and dist.world_size == 1 and log is None and not keep_for_replay
    if found is not None and not read_cache:  # else a stage cache hit may yet replace the checkpoint
        _refuse_schedule_conflict(found, every_steps)
    if dist.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for old in [p for p in out.glob(".*") if _leftover(p.name)]:  # left by a build that was killed
            shutil.rmtree(old, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    else:
        staging = Path(tempfile.mkdtemp(prefix=f"provenance-rank{dist.rank}-"))
    trained: int | None = None  # optimizer steps, once training is done
    try:
        work = staging / "work"
        data = prepare_data(recipe, stored, work, reporter=reporter, timings=timings)
        m, tok, seqs, ids = data.manifest, data.tokenizer, data.seqs, data.special_ids
        check_data(recipe, seqs, dist.world_size)
        licence_verdict = judge_licences(r, m, licence_compatibility, reporter) if dist.rank == 0 else (lambda: None)
        atomic_write_bytes(staging / "dataset-manifest.json", data.manifest_bytes)
        t = time.perf_counter()

        from .evaluate import recitation
        from .train import build_model, stage_steps, train
        from .transcript import Transcript

        with determinism.sdpa_context(r.determinism):
            model = build_model(r.model, tok.get_vocab_size(), ids, r.determinism.seed,
                                portable=r.determinism.portable)
            if r.determinism.device == "cuda":
                import torch

                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
                model = model.to("cuda")
            n_params = sum(p.numel() for p in model.parameters())
            reporter.log(f"model: LlamaForCausalLM, {n_params} parameters")
            transcript = Transcript()
            totals = [stage_steps(s, seqs) for s in r.stages]
            rounder = None
            if r.determinism.portable:
                from .portable import Rounder

                rounder = Rounder(r.determinism.portable_margin, log)
            checkpointer = ckpt.Checkpointer(cdir, ident, every_steps=every_steps,
                                             every_minutes=r.checkpoint.every_minutes, keep=r.checkpoint.keep,
                                             enabled=dist.rank == 0, keep_scheduled=keep_for_replay)
            from .stagecache import StageCache, stage_keys

            if use_cache and keep_for_replay:
                reporter.log("stage cache: not read, since this build keeps its checkpoints for replay "
                             "(--keep-checkpoints, [checkpoint] keep_for_replay): every stage is trained")
            cache = StageCache(store.root, stage_keys(
                r, inputs=[s.digests for s in stored], manifest_root=m["merkle_root"],
                tokenizer_digest=data.tokenizer_digest, seqs=seqs, special_ids=ids, determinism=det_record,
                toolchain=tc["installed"], world_size=dist.world_size,
                checkpoint_every=checkpoint_every or r.checkpoint.every_steps),
                read=read_cache, log=reporter.log)
            cached = cache.lookup()
            if cached is not None and (found is None or cached.state.global_step >= found.state.global_step):
                found = None
                done = r.stages[cached.state.stage - 1].name
                reporter.log(f"stage cache: reusing the output of stages up to {done!r} "
                             f"(after optimizer step {cached.state.global_step})")
            else:
                cache.hits = [False] * len(cache.hits)
                cached = None
            if found is not None:
                if read_cache:  # without the cache it was judged before the data was prepared
                    _refuse_schedule_conflict(found, every_steps)
                reporter.log(f"resuming from {found.path} (after optimizer step {found.state.global_step})")
                if found.code != code_digest():
                    reporter.log(f"warning: {found.path.name} was written by other code of this tool (code digest "
                                 f"{(found.code or 'not recorded')[:16]}, this run's {code_digest()[:16]}): the "
                                 "steps before and after the resume ran different code; build.json records both "
                                 "(training.resumed_from_code)")
            start = found or cached
            if dist.rank == 0:  # before the first step: a build of days must not stop for its checkpoints' disk
                from .train import count_windows

                check_checkpoint_disk(out, n_params, len(list(model.parameters())),
                                      max(count_windows(seqs, s, p) for s in r.stages for p in range(s.phases)),
                                      sum(totals), start.state.global_step if start else 0, every_steps,
                                      r.checkpoint.keep, keep_for_replay)
            licence = licence_verdict()  # the verdict, before the first step (--licence-compatibility fail stops here)
            with reporter.task("train", total=sum(totals)) as advance:
                if start is not None:
                    advance(start.state.global_step, "resumed" if found is not None else "cached")
                stages = train(model, r, seqs, ids["pad_token_id"], transcript,
                               progress=lambda name, step, total, loss: advance(1, f"{name} loss {loss:.4f}"),
                               dist=dist, checkpointer=checkpointer, resume=start,
                               on_stage_end=cache.store if dist.world_size == 1 and log is None else None,
                               rounder=rounder)
            if dist.world_size > 1:
                import torch.distributed as tdist

                tdist.barrier()
                tdist.destroy_process_group()
                if dist.rank != 0:
                    return None  # rank 0 evaluates and writes the outputs
            model = model.to("cpu")  # evaluation, fingerprint and saving run on the CPU everywhere
            earlier = len(start.state.results) if start is not None else 0  # stages done before this run
            origin = " (trained before the resume)" if found is not None else " (from the stage cache)"
            for i, s in enumerate(stages):
                reporter.log(f"stage {s.name}: {s.steps} steps, loss {s.first_loss:.4f} -> {s.final_loss:.4f} "
                             f"in {s.seconds:.1f} s{origin if i < earlier else ''}")
            t = lap("train", t)
            trained = len(transcript.lines)
            recite = recitation(model, seqs, r.evaluate, ids["pad_token_id"])
            t = lap("evaluate", t)

        tbytes = transcript.to_bytes()
        atomic_write_bytes(staging / "transcript.jsonl", tbytes)
        kept = _keep_for_replay(cdir, staging / "replay", every_steps) if keep_for_replay else 0
        weights = _write_model_dir(staging, model, tok, recipe, m)
        t = lap("write", t)
        from .fingerprint import load_model, make_fingerprint

        # Computed from the written model dir, through the same code path a verifier uses.
        fingerprint = make_fingerprint(load_model(staging / "model"), staging / "model", seqs, r.reproducibility,
                                       ids["pad_token_id"])
        fbytes = (json.dumps(fingerprint, sort_keys=True, separators=(",", ":")) + "\n").encode()
        atomic_write_bytes(staging / "fingerprint.json", fbytes)
        t = lap("fingerprint", t)
        shutil.rmtree(work, ignore_errors=True)
        audit_doc = run_audit(staging / "model", data, r)
        audit_doc["licence_compatibility"] = licence
        reporter.log(summary_line(audit_doc))
        if licence["verdict"] != "not judged":
            from ..audit.licences import describe

            reporter.log(describe(licence, audit_doc["summary"]["extraction_rate"]))
        abytes = (json.dumps(audit_doc, indent=1, sort_keys=True) + "\n").encode()
        atomic_write_bytes(staging / "audit.json", abytes)
        from .card import model_card

        card = model_card(recipe, m, audit_doc, licence, {"parameters": n_params, "vocab_size": tok.get_vocab_size(),
                                                          "tokens": sum(map(len, seqs)),
                                                          "weights": weights["tensors"]["digest"]})
        weights["files"] = _seal_model_dir(staging / "model", card.encode())
        t = lap("audit", t)

        record = {
            "format": BUILD_FORMAT,
            "provenance_version": __version__,
            "invocation_id": f"urn:uuid:{uuid.uuid4()}",
            "signing": {"keyids": [sg.public_key.keyid for sg in signing.signers] if signing else [],
                        "sigstore": bool(signing and signing.sigstore_token is not None)},
            "recipe": {"name": r.recipe.name, "path": str(recipe.path), **recipe.digests},
            "inputs": [{"name": s.input.name, "kind": s.input.kind, "artifact": s.input.artifact_name,
                        "source": s.source, "license": s.input.license, **s.digests} for s in stored],
            "dataset_manifest": {"merkle_root": m["merkle_root"], "totals": m["totals"], "licenses": m["licenses"],
                                 **hash_bytes(data.manifest_bytes)},
            "tokenizer": {"vocab_size": tok.get_vocab_size(), "tokens": sum(map(len, seqs)),
                          "special_token_ids": ids, "tokenizer.json": data.tokenizer_digest},
            "model": {"parameters": n_params, "vocab_size": r.model.padded_vocab(tok.get_vocab_size())},
            "weights": weights,
            "training": {"stages": [asdict(s) for s in stages], "transcript": hash_bytes(tbytes),
                         "transcript_head": transcript.prev, "steps": len(transcript.lines),
                         "resumed_after_step": found.state.global_step if found is not None else None,
                         "code": code_digest(),
                         **({"resumed_from_code": found.code} if found is not None and found.code != code_digest()
                            else {}),
                         "checkpoints_written": len(checkpointer.written),
                         "checkpoint_every_steps": every_steps, "checkpoints_kept_for_replay": kept,
                         "stage_cache": cache.record([s.name for s in r.stages], read_cache),
                         "allocator": allocator.tune(),
                         **({"attention": kernel.record()} if kernel is not None else {}),
                         **({"portable": {"margin": r.determinism.portable_margin, "values_logged": rounder.logged,
                                          "rounded_as_logged_against_nearest": rounder.forced,
                                          "rounding_log_from": {"blake3": log.digest} if log else None}}
                            if rounder is not None else {})},
            "recitation": recite.record(),
            "audit": {**{k: audit_doc["summary"][k] for k in ("extraction_rate", "control_extraction_rate",
                                                               "excess_over_control",
                                                               "longest_verbatim_from_header")},
                      "licence_compatibility": licence["verdict"],
                      "file": "audit.json", **hash_bytes(abytes)},
            "fingerprint": {"format": fingerprint["format"], "eval_loss": fingerprint["eval"]["loss"],
                            **hash_bytes(fbytes)},
            "determinism": det_record,
            "machine": determinism.machine(),
            "distributed": {"world_size": dist.world_size, "backend": dist.backend,
                            "threads_per_rank": per_rank_threads},
            "toolchain": tc,
            "output_license": r.output.license,
            "started": started,
            "finished": _now(),
            "timings": {**timings, "total": round(time.perf_counter() - t_start, 3)},
        }
        from .sbom import CYCLONEDX_FILE, SPDX3_FILE, cyclonedx, spdx3

        sbom = cyclonedx(recipe, record, audit_doc, licence, weights["files"]).encode()
        atomic_write_bytes(staging / CYCLONEDX_FILE, sbom)
        sbom_spdx = spdx3(recipe, record, audit_doc, licence, weights["files"]).encode()
        atomic_write_bytes(staging / SPDX3_FILE, sbom_spdx)
        record["sbom"] = {"cyclonedx": {"file": CYCLONEDX_FILE, "specVersion": "1.6", **hash_bytes(sbom)},
                          "spdx3": {"file": SPDX3_FILE, "specVersion": "3.0.1", **hash_bytes(sbom_spdx)}}
        oms = write_oms(staging, weights["files"], signing, reporter)
        if oms is not None:
            record["oms"] = oms
        record_bytes = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
        atomic_write_bytes(staging / "build.json", record_bytes)
        if signing is not None:
            byproducts = {"transcript.jsonl": hash_bytes(tbytes), "build.json": hash_bytes(record_bytes),
                          "dataset-manifest.json": hash_bytes(data.manifest_bytes),
                          "fingerprint.json": hash_bytes(fbytes), "audit.json": hash_bytes(abytes),
                          CYCLONEDX_FILE: hash_bytes(sbom), SPDX3_FILE: hash_bytes(sbom_spdx)}
            if oms is not None and "file" in oms:
                byproducts[oms["file"]] = {k: oms[k] for k in ("sha256", "blake3")}
            st = attest_and_sign(staging, recipe, record, m, byproducts, signing, fingerprint=fingerprint)
            sign_audit(staging, st, audit_doc, hash_bytes(data.manifest_bytes), hash_bytes(abytes), signing)
        _install(staging, out)
        return record
    except BaseException:
        if trained is not None and dist.rank == 0:
            _say_what_is_kept(out, trained, dist.world_size == 1 and log is None, reporter)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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

