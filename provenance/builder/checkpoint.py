"""Checkpoints: a long build survives an interruption and resumes to the same bits.

A checkpoint is one safetensors file, written atomically into `OUT/checkpoint/`: the model's
tensors, AdamW's state, the torch and data-order RNG states, the current epoch's permutation,
the transcript so far (as bytes), and the counters (stage, step, epoch, cursor) in its metadata.
Nothing is pickled. A checkpoint is used only by a build with the same identity: the recipe,
the inputs, the toolchain and every determinism setting that changes the bits (not the thread
count, which does not).

Scheduled checkpoints (`[checkpoint] every_steps`) happen at the same steps in every run, so their
state digest is written into that step's transcript line: the transcript is a hash chain over
them too. Checkpoints by the clock (`every_minutes`) or on SIGINT/SIGTERM are not in the
transcript, which therefore stays identical whether or not a build was interrupted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .._internal.atomic import atomic_write_bytes
from .._internal.codedigest import code_digest
from .._internal.hashing import canonical_json, tensors_digest

FORMAT = "provenance-checkpoint-v1"
DIRNAME = "checkpoint"


# determinism record fields that do not change the bits (threads on the CPU) or only echo the environment
NOT_BIT_RELEVANT = ("threads", "interop_threads", "aten_cpu_capability_env", "pythonhashseed")


def bit_relevant(determinism: dict) -> dict:
    return {k: v for k, v in determinism.items() if k not in NOT_BIT_RELEVANT}


def identity(recipe_digest: str, input_digests: list[dict], toolchain: dict, determinism: dict,
             world_size: int) -> str:
    """What a checkpoint must match to be resumed (thread counts excluded: they do not change bits)."""
    import blake3

    det = bit_relevant(determinism)
    return blake3.blake3(canonical_json({"recipe": recipe_digest, "inputs": input_digests, "toolchain": toolchain,
                                         "determinism": det, "world_size": world_size})).hexdigest()


@dataclass
class State:
    """Where training stands after an optimizer step (what a checkpoint holds besides tensors)."""

    stage: int
    step: int  # optimizer steps done in this stage
    global_step: int
    epoch: int
    cursor: int
    first: float
    last: float
    tokens: int
    samples: int
    seconds: float  # of this stage so far (reporting only; not in the digest)
    results: list[dict]  # the finished stages' StageResult fields


def state_tensors(model, opt, gen, order) -> dict:
    """Every tensor a resumed build needs, by name."""
    import torch

    from .tensors import saved_state

    out = {f"model/{k}": v for k, v in saved_state(model).items()}
    params = list(model.parameters())
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for key in ("step", "exp_avg", "exp_avg_sq"):
            if key in st:
                v = st[key]
                out[f"opt/{i}/{key}"] = v if torch.is_tensor(v) else torch.tensor(float(v))
    out["rng/torch"] = torch.get_rng_state()
    out["rng/data"] = gen.get_state()
    out["data/order"] = order
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def boundary_tensors(model) -> dict:
    """What a stage boundary needs (a fresh optimizer and data order follow): model and torch RNG."""
    import torch

    from .tensors import saved_state

    out = {f"model/{k}": v for k, v in saved_state(model).items()}
    out["rng/torch"] = torch.get_rng_state()
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def state_digest(tensors: dict, state: State) -> str:
    """blake3-tensors-v1 over the state's tensors and its counters (timing excluded)."""
    counters = {k: v for k, v in state.__dict__.items() if k not in ("seconds", "results")}
    counters["first"], counters["last"] = float(state.first).hex(), float(state.last).hex()
    from .tensors import digest_item

    items = [digest_item(k, v) for k, v in tensors.items()]
    items.append(("counters", "U8", [], canonical_json(counters)))
    return tensors_digest(items)


class Checkpointer:
    """Writes checkpoints into `directory` on a schedule; keeps the newest `keep`."""

    def __init__(self, directory: Path, ident: str, *, every_steps: int | None, every_minutes: float | None,
                 keep: int = 2, enabled: bool = True, keep_scheduled: bool = False) -> None:
        self.dir, self.identity = Path(directory), ident
        self.every_steps, self.every_minutes, self.keep, self.enabled = every_steps, every_minutes, keep, enabled
        self.keep_scheduled = keep_scheduled
        self._last = time.monotonic()
        self.written: list[Path] = []

    def scheduled(self, global_step: int) -> bool:
        return self.enabled and bool(self.every_steps) and global_step % self.every_steps == 0

    def by_clock(self) -> bool:
        return self.enabled and self.every_minutes is not None and \
            time.monotonic() - self._last >= 60 * self.every_minutes

    def write(self, tensors: dict, state: State, transcript, digest: str) -> Path:
        """Write one checkpoint atomically. Returns its path."""
        path = self.dir / f"step-{state.global_step:09d}.safetensors"
        write_file(path, tensors, state, transcript, digest, self.identity,
                   kept_for_replay=bool(self.keep_scheduled and self.every_steps))
        self._last = time.monotonic()
        self.written.append(path)
        for old in sorted(self.dir.glob("step-*.safetensors"))[:-self.keep]:
            if not self.retained(old):
                old.unlink(missing_ok=True)
        return path

    def retained(self, path: Path) -> bool:
        """Whether a checkpoint is kept past `keep`: a scheduled one (this run's or an interrupted
        earlier run's), when scheduled checkpoints are kept for replay."""
        if not (self.keep_scheduled and self.every_steps):
            return False
        try:
            return int(path.stem.removeprefix("step-")) % self.every_steps == 0
        except ValueError:
            return False


def write_file(path: Path, tensors: dict, state: State, transcript, digest: str, ident: str,
               kept_for_replay: bool | None = None) -> None:
    """One checkpoint file, written atomically (also the stage cache's entry format). `kept_for_replay`:
    whether the writing build keeps its scheduled checkpoints for replay (None: not a build's checkpoint)."""
    import blake3
    import torch
    from safetensors.torch import save

    tbytes = transcript.to_bytes()
    meta = {"format": FORMAT, "identity": ident, "digest": digest,
            "transcript_blake3": blake3.blake3(tbytes).hexdigest(),
            "state": json.dumps({**state.__dict__, "first": float(state.first).hex(),
                                 "last": float(state.last).hex()}, sort_keys=True),
            # the writing build's own code: the identity leaves it out (an edit must not throw away
            # days of training), so a resume by other code is said and recorded instead
            "transcript_head": transcript.prev, "code": code_digest()}
    if kept_for_replay is not None:
        meta["kept_for_replay"] = "true" if kept_for_replay else "false"
    blob = {**tensors, "transcript": torch.frombuffer(bytearray(tbytes or b"\n"), dtype=torch.uint8)}
    atomic_write_bytes(path, save(blob, metadata=meta))


@dataclass
class Resume:
    path: Path
    state: State
    tensors: dict
    transcript_lines: list[bytes]
    transcript_prev: str
    digest: str = ""
    kept_for_replay: bool | None = None  # whether the build that wrote it kept its scheduled ones (None: not said)
    code: str | None = None  # the writing build's code digest (None: not recorded)


def read_file(path: Path, ident: str | None) -> Resume:
    """Read one checkpoint and check it: structure, format, identity (unless None), and that its
    digest matches its contents. Raises ValueError (or OSError) saying what is wrong."""
    from safetensors import safe_open

    from .._internal.safetensors import SafetensorsError, open_checked

    try:
        with open_checked(path):
            pass  # structure: tensors tile the file exactly
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError("not a provenance checkpoint")
            if ident is not None and meta.get("identity") != ident:
                raise IdentityMismatch("it belongs to another recipe, inputs or toolchain")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        raw = json.loads(meta["state"])
        raw["first"], raw["last"] = float.fromhex(raw["first"]), float.fromhex(raw["last"])
        state = State(**raw)
        transcript = tensors.pop("transcript").numpy().tobytes()
    except (KeyError, TypeError, SafetensorsError) as e:
        raise ValueError(f"unreadable checkpoint ({type(e).__name__}: {e})") from None
    import blake3

    from .transcript import GENESIS

    lines = [ln for ln in transcript.split(b"\n") if ln]
    if state_digest(tensors, state) != meta.get("digest"):
        raise ValueError("its digest does not match its contents")
    if blake3.blake3(b"".join(ln + b"\n" for ln in lines)).hexdigest() != meta.get("transcript_blake3"):
        raise ValueError("its transcript does not match its recorded digest")
    head = blake3.blake3(lines[-1]).hexdigest() if lines else GENESIS
    if head != meta.get("transcript_head"):
        raise ValueError("its transcript head does not match its transcript")
    kept = {"true": True, "false": False}.get(meta.get("kept_for_replay", ""))
    return Resume(Path(path), state, tensors, lines, meta["transcript_head"], meta["digest"], kept,
                  meta.get("code"))


class IdentityMismatch(ValueError):
    pass


def scheduled_steps(records):
    """The global steps after which scheduled checkpoints were written, from transcript records (dicts),
    lazily: a scheduled checkpoint's digest is in its step's line (`checkpoint`)."""
    return (i + 1 for i, rec in enumerate(records) if "checkpoint" in rec)


def schedule_conflict(lines: list[bytes], global_step: int, every_steps: int | None) -> str | None:
    """Why a checkpoint whose transcript is `lines` (after `global_step` optimizer steps) cannot be
    resumed on the schedule `every_steps`, or None when it can. Scheduled checkpoints are in the
    transcript, so a resumed build must keep the interrupted one's schedule to give its bits; that
    schedule is read from the transcript: the step of its first scheduled checkpoint."""
    earlier = next(scheduled_steps(json.loads(line) for line in lines), None)
    asked = f"one every {every_steps} steps" if every_steps else "none"
    if earlier is not None and earlier != every_steps:
        return (f"written by a build with a checkpoint every {earlier} steps (its transcript records them), but "
                f"this build asks for {asked}; resume with --checkpoint-every {earlier} (the interrupted run's "
                f"schedule)")
    if earlier is None and every_steps is not None and every_steps <= global_step:
        return (f"written by a build with no scheduled checkpoint in its first {global_step} steps, but this build "
                f"asks for one every {every_steps} steps; resume with the interrupted command's --checkpoint-every")
    return None


def replay_conflict(found: Resume, directory: Path, keep_for_replay: bool) -> tuple[str | None, str | None]:
    """Resuming `found` (in `directory`) with or without keeping the scheduled checkpoints for replay:
    (why it is refused, what to tell), either None. A build that kept them and is resumed without
    keeping them would delete them, so that is refused; one that did not keep them and is resumed
    keeping them has lost the earlier ones, which replay then cannot start from: said."""
    files = {int(f.stem.removeprefix("step-")) for f in Path(directory).glob("step-*.safetensors")
             if f.stem.removeprefix("step-").isdigit()}
    steps = list(scheduled_steps(json.loads(line) for line in found.transcript_lines))
    if found.kept_for_replay and not keep_for_replay:
        here = sum(1 for s in steps if s in files)
        return (f"written by a build that keeps its scheduled checkpoints for replay ({here} of them in "
                f"{directory}), and resuming without keeping them would delete them; resume with "
                "--keep-checkpoints (or [checkpoint] keep_for_replay = true), or start afresh with --no-resume "
                "(which deletes them too)"), None
    gone = [s for s in steps if s not in files]
    if keep_for_replay and gone:
        first = min((s for s in steps if s in files), default=found.state.global_step)
        return None, (f"checkpoints: the interrupted run did not keep its scheduled checkpoints for replay: "
                      f"{len(gone)} of the {len(steps)} up to step {found.state.global_step} are gone, so replay "
                      f"can re-execute the first segment and those from step {first} on, not the ones between")
    return None, None


TRANSCRIPT_LINE_BYTES = 512  # a transcript line is about 400 bytes; a checkpoint holds the transcript so far
FIXED_BYTES = 64 << 10  # the two RNG states (5,056 bytes each), the header, the counters


def bytes_needed(n_params: int, n_tensors: int, windows: int, total: int, done: int, every: int | None,
                 keep: int, replay: bool) -> tuple[int, int, int]:
    """The disk a build's checkpoints will still take once it has done `done` of its `total` optimizer
    steps: the `keep` newest ones (one more while the next is written) and, when the scheduled ones are
    kept for replay, each of those from here on. A checkpoint holds the model and AdamW's two moments
    (float32: 12 bytes a parameter), the epoch's data order (8 bytes a window) and the transcript so far.
    Returns (bytes, how many will be kept for replay, the largest one's bytes)."""
    def size(step: int) -> int:
        return 12 * n_params + 3 * 128 * n_tensors + 8 * windows + FIXED_BYTES + TRANSCRIPT_LINE_BYTES * step

    need = (keep + 1) * size(total)
    if not (replay and every):
        return need, 0, size(total)
    first = (done // every + 1) * every
    n = max(0, (total - first) // every + 1)
    last = first + (n - 1) * every
    need += n * size(0) + TRANSCRIPT_LINE_BYTES * (first + last) * n // 2
    return need, n, size(total)


def latest(directory: Path, ident: str, log=None) -> Resume | None:
    """The newest readable checkpoint of this identity, or None (others are reported and skipped)."""
    for path in sorted(Path(directory).glob("step-*.safetensors"), reverse=True):
        try:
            return read_file(path, ident)
        except (OSError, ValueError) as e:
            if log:
                log(f"not resuming from {path.name}: {e}")
    return None


def remove(directory: Path) -> None:
    import shutil

    shutil.rmtree(directory, ignore_errors=True)
