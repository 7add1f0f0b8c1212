"""Spot-check replay (after Proof-of-Learning, Jia et al. 2021): check a long build by re-executing
a few seeded random segments of it instead of all of it.

A build kept for replay (`[checkpoint] keep_for_replay`, `build --keep-checkpoints`) holds its
scheduled checkpoints in OUT/replay/; each one's state digest is in the transcript line of its
step, and the transcript's digest is signed in the attestation. The points of the build are
0 (the seeded initial model), every scheduled checkpoint, and the end (the final weights). A
segment runs from one point to the next. For each chosen segment, replay:

1. loads the starting checkpoint (none for point 0), checks its own digest, that the digest equals
   the one the signed transcript records for that step, and that the transcript it carries equals
   the signed transcript's first lines;
2. re-executes the segment's optimizer steps with the recipe's code and settings;
3. compares the transcript lines it produced with the signed ones, byte for byte; they include
   the data order (`samples`), the exact loss, the gradient norm, the learning rate and, on the
   segment's last step, the ending checkpoint's digest (or, at the end, the parameter digest,
   which equals the weights' digest).

On the build's own stack the segment must be bitwise equal. On another stack (CPU capability or
library versions) the data order must still be equal and the ending weights within the
verifier's `[reproduced]` bounds, judged tensor by tensor as `compare` does.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckFailed, InputError
from .byproducts import is_signed, read_bounded, signed_digests


@dataclass
class Segment:
    start: int  # optimizer steps done at the segment's start (0: the initial model)
    end: int
    verdict: str = "not run"  # "bitwise", "within tolerance", "failed"
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return self.end - self.start

    def as_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "steps": self.steps, "verdict": self.verdict,
                "reasons": self.reasons, "seconds": round(self.seconds, 3)}


@dataclass
class ReplayReport:
    segments: list[Segment]
    total_steps: int
    points: list[int]
    stack: str
    same_stack: bool
    seconds: float = 0.0
    build_train_seconds: float | None = None
    seed: int | None = None  # the segment choice's seed (drawn at verification time unless given)

    @property
    def ok(self) -> bool:
        return bool(self.segments) and all(s.verdict in ("bitwise", "within tolerance") for s in self.segments)

    @property
    def replayed_steps(self) -> int:
        return sum(s.steps for s in self.segments)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "verdict": verdict_line(self), "segments": [s.as_dict() for s in self.segments],
                "replayed_steps": self.replayed_steps, "total_steps": self.total_steps,
                "fraction_replayed": self.replayed_steps / self.total_steps if self.total_steps else 0.0,
                "points": self.points, "seed": self.seed, "stack": self.stack, "same_stack": self.same_stack,
                "seconds": round(self.seconds, 3), "build_train_seconds": self.build_train_seconds}


def verdict_line(r: ReplayReport) -> str:
    failed = [s for s in r.segments if s.verdict not in ("bitwise", "within tolerance")]
    kinds = sorted({s.verdict for s in r.segments} - {"failed"})
    frac = 100.0 * r.replayed_steps / r.total_steps if r.total_steps else 0.0
    if failed:
        return (f"replay FAILED: {len(failed)} of {len(r.segments)} segments did not reproduce "
                f"({frac:.1f}% of the steps)")
    return (f"replay passed: {len(r.segments)} of {len(r.points) - 1} segments reproduced "
            f"({', '.join(kinds)}), {r.replayed_steps} of {r.total_steps} steps re-executed ({frac:.1f}%)")


def points_of(lines: list[dict], total: int) -> tuple[list[int], int | None]:
    """The replay points (0, every scheduled checkpoint, the end) and the checkpoint interval."""
    from ..builder.checkpoint import scheduled_steps

    marks = list(scheduled_steps(lines))
    every = marks[0] if marks else None
    if every is not None and marks != list(range(every, every * len(marks) + 1, every)):
        raise CheckFailed("the transcript's checkpoints are not on a regular schedule: "
                          f"{marks[:6]}{'…' if len(marks) > 6 else ''}")
    points = [0, *[m for m in marks if m < total], total]
    return points, every


def choose(points: list[int], k: int, seed: int, available: set[int]) -> list[tuple[int, int]]:
    """k seeded random segments among those whose start point can be loaded (0 always can)."""
    segs = [(a, b) for a, b in zip(points, points[1:]) if a == 0 or a in available]
    if k > len(segs) and not available:
        raise InputError(f"--segments {k}: this build's checkpoints were not kept for replay (its replay/ holds "
                         "none), so only its first segment, from step 0, can be re-executed; build it with "
                         "--keep-checkpoints (or [checkpoint] keep_for_replay = true), or ask for --segments 1")
    if k > len(segs):
        raise InputError(f"--segments {k}: this build has only {len(segs)} replayable "
                         f"segment{'' if len(segs) == 1 else 's'} ({len(points) - 1} in all)")
    return sorted(random.Random(seed).sample(segs, k))


def build_of(target: Path) -> tuple[Path, Path]:
    """(the build dir, its attestation) named by a build dir or by the attestation file in one."""
    build_dir, att = (target.parent, target) if target.is_file() else (target, target / "attestation.intoto.jsonl")
    if not build_dir.is_dir():
        raise InputError(f"{target}: not a build directory or an attestation in one")
    if not att.is_file():
        raise InputError(f"{att}: no attestation beside the build; replay checks the build against its signed "
                         "transcript")
    return build_dir, att


def replay(build_dir: Path, payload: dict, st, *, segments: int, seed: int, store, handed, offline: bool,
           threads: int | None, bounds, log=print) -> ReplayReport:
    """Replay `segments` seeded random segments of the build in `build_dir` whose verified statement is
    (`payload`, `st`); `handed(recipe)` gives the files handed over, by input name. Raises InputError /
    CheckFailed for what cannot be replayed at all."""

    from ..builder import determinism, toolchain
    from ..builder.pipeline import fetch_all, prepare_data
    from ..builder.transcript import read as read_transcript
    from ..recipe import load_recipe
    from .rebuild import embedded_recipe, stack_matches

    t_start = time.perf_counter()
    tpath = build_dir / "transcript.jsonl"
    raw = read_bounded(tpath, limit=1 << 30)
    if raw is None:
        raise InputError(f"{build_dir}: no transcript.jsonl")
    signed = signed_digests(payload)
    if not is_signed(raw, "transcript.jsonl", signed):
        want = signed.get("transcript.jsonl", {}).get("blake3")
        raise CheckFailed(f"{tpath}: its digest is not the one the attestation signs (blake3 {want})")
    lines = read_transcript(tpath, raw)  # the bytes whose digest was just checked, not a second read
    raw_lines = raw.splitlines()
    total = len(lines)
    points, every = points_of(lines, total)
    if every is None:
        raise InputError(f"{build_dir}: the build has no scheduled checkpoints; build it with "
                         "--checkpoint-every N --keep-checkpoints (or [checkpoint] every_steps, keep_for_replay)")
    rdir = build_dir / "replay"
    available = {int(p.stem.removeprefix("step-")) for p in rdir.glob("step-*.safetensors")} if rdir.is_dir() else set()
    chosen = choose(points, segments, seed, available)

    work = Path(tempfile.mkdtemp(prefix="provenance-replay-"))
    stored: list = []
    try:
        recipe = load_recipe(embedded_recipe(st, work / "recipe"))
        r = recipe.recipe
        tc = toolchain.check(r.toolchain, recipe.path, allow=True)
        det = determinism.apply(r.determinism, threads=threads)
        same, why = stack_matches(payload, {"determinism": det, "toolchain": tc, "machine": determinism.machine()})
        from .._internal.progress import Reporter

        stored = fetch_all(recipe, store, offline=offline, handed=handed(recipe) if handed else {},
                           reporter=Reporter(enabled=False))
        data = prepare_data(recipe, stored, work / "data")
        deps = {d.name: d for d in st.buildDefinition.resolvedDependencies}
        tok = deps.get("tokenizer")
        if tok is not None and dict(tok.digest or {}).get("blake3") != data.tokenizer_digest["blake3"]:
            raise CheckFailed("the tokenizer trained here differs from the signed one; the inputs or the "
                              "tokenizers library differ, so the build cannot be replayed on this stack")
        report = ReplayReport([Segment(a, b) for a, b in chosen], total, points, why, same, seed=seed)
        for seg in report.segments:
            t0 = time.perf_counter()
            log(f"segment {seg.start} -> {seg.end} ({seg.steps} steps)")
            _run_segment(seg, recipe, data, lines, raw_lines, rdir, every, work, same, bounds, build_dir)
            seg.seconds = time.perf_counter() - t0
            log(f"  {seg.verdict}" + ("".join(f"\n  {x}" for x in seg.reasons)))
        report.seconds = time.perf_counter() - t_start
        bj = build_dir / "build.json"
        if bj.is_file():
            import json

            try:
                report.build_train_seconds = json.loads(bj.read_text())["timings"]["train"]
            except (ValueError, KeyError, TypeError):
                pass
        return report
    finally:
        import shutil

        from ..builder.parent import discard_copies

        shutil.rmtree(work, ignore_errors=True)
        discard_copies(stored)  # a fine-tune's verified parent files


def _run_segment(seg, recipe, data, lines, raw_lines, rdir, every, work, same, bounds, build_dir) -> None:
    from ..builder import checkpoint as ckpt
    from ..builder import determinism
    from ..builder.train import StopAt, build_model, train
    from ..builder.transcript import Transcript

    r = recipe.recipe
    start = None
    if seg.start:
        path = rdir / f"step-{seg.start:09d}.safetensors"
        try:
            start = ckpt.read_file(path, None)
        except (OSError, ValueError) as e:
            seg.verdict, seg.reasons = "failed", [f"starting checkpoint {path.name}: {e}"]
            return
        recorded = lines[seg.start - 1].get("checkpoint")
        if start.digest != recorded:
            seg.verdict = "failed"
            seg.reasons = [f"starting checkpoint {path.name}: digest {start.digest[:16]}… is not the one the signed "
                           f"transcript records for step {seg.start} ({str(recorded)[:16]}…)"]
            return
        if start.transcript_lines != raw_lines[:seg.start]:
            seg.verdict = "failed"
            seg.reasons = [f"starting checkpoint {path.name}: the transcript it carries differs from the signed one"]
            return
    with determinism.sdpa_context(r.determinism):
        model = build_model(r.model, data.tokenizer.get_vocab_size(), data.special_ids, r.determinism.seed,
                            portable=r.determinism.portable, parent=data.parent)
        rounder = None
        if r.determinism.portable:  # the segment rounds the way the signed transcript's log says
            from ..builder.portable import Rounder, read_log

            rounder = Rounder(r.determinism.portable_margin,
                              read_log(build_dir / "transcript.jsonl", b"".join(x + b"\n" for x in raw_lines)))
        transcript = Transcript()
        cp = ckpt.Checkpointer(work / f"ckpt-{seg.start}", "replay", every_steps=every, every_minutes=None, keep=1)
        cp.dir.mkdir(parents=True, exist_ok=True)
        try:
            train(model, r, data.seqs, data.special_ids["pad_token_id"], transcript, checkpointer=cp,
                  resume=start, stop_after=seg.end, rounder=rounder)
        except StopAt:
            pass
    got = transcript.lines[seg.start:seg.end]
    want = raw_lines[seg.start:seg.end]
    if got == want:
        seg.verdict = "bitwise"
        return
    import json

    first = next(i for i, (g, w) in enumerate(zip(got + [b""] * len(want), want)) if g != w) + seg.start
    if same:
        seg.verdict = "failed"
        mine = got[first - seg.start] if first - seg.start < len(got) else b""
        seg.reasons = [f"step {first}: the re-executed transcript line differs from the signed one "
                       f"({_line_diff(mine, raw_lines[first])})"]
        return
    # Another stack: the data order must be the same, the weights at the end within the bounds.
    bad_order = [seg.start + i for i, (g, w) in enumerate(zip(got, want))
                 if json.loads(g).get("samples") != json.loads(w).get("samples")]
    if bad_order or len(got) != len(want):
        seg.verdict = "failed"
        seg.reasons = [f"step {bad_order[0] if bad_order else first}: the data order differs from the signed one"]
        return
    seg.verdict, seg.reasons = _judge_end(seg, model, rdir, build_dir, bounds, ckpt, lines)


def _line_diff(got: bytes, want: bytes) -> str:
    import json

    try:
        g, w = json.loads(got), json.loads(want)
    except ValueError:
        return "unreadable line"
    keys = sorted(k for k in set(g) | set(w) if g.get(k) != w.get(k) and k != "prev")
    return "fields " + ", ".join(keys) if keys else "only the chain (an earlier line differs)"


def _judge_end(seg, model, rdir, build_dir, bounds, ckpt, lines) -> tuple[str, list[str]]:
    """Another stack: the segment's end, as the signed transcript records it, against the re-executed
    weights. The end is a kept checkpoint (its digest must be the transcript's for that step) or the
    final weights (their tensor digest must be the transcript's last parameter digest): the weights
    measured against are the signed ones, not whatever lies in the build dir."""
    import numpy as np

    from .._internal.hashing import tensor_digest
    from ..builder.tensors import saved_state
    from .compare import judge, load_tensors, tensor_metrics

    mine = {k: v.detach().float().numpy() for k, v in saved_state(model).items()}
    end = rdir / f"step-{seg.end:09d}.safetensors"
    recorded = lines[seg.end - 1]
    if end.is_file():
        state = ckpt.read_file(end, None)
        if state.digest != recorded.get("checkpoint"):
            return "failed", [f"ending checkpoint {end.name}: digest {state.digest[:16]}… is not the one the signed "
                              f"transcript records for step {seg.end} ({str(recorded.get('checkpoint'))[:16]}…)"]
        ref = {k.removeprefix("model/"): v.float().numpy() for k, v in state.tensors.items() if k.startswith("model/")}
    else:
        weights = build_dir / "model" / "model.safetensors"
        try:
            got = tensor_digest(weights)
        except (OSError, ValueError) as e:
            return "failed", [f"the final weights {weights}: {e}"]
        if recorded.get("params") is None or got != recorded.get("params"):
            return "failed", [f"the final weights {weights}: tensor digest {got[:16]}… is not the signed transcript's "
                              f"last parameter digest ({str(recorded.get('params'))[:16]}…)"]
        ref = {k: np.asarray(v, dtype=np.float32) for k, v in load_tensors(weights).items()}
    m = tensor_metrics(ref, mine)
    if m["problems"]:
        return "failed", m["problems"]
    reasons = judge({"rel_l2": m["overall"]["rel_l2"], "cosine": m["overall"]["cosine"]}, bounds,
                    {t["name"]: t["rel_l2"] for t in m["tensors"]})
    return ("failed", reasons) if reasons else ("within tolerance", [f"rel L2 {m['overall']['rel_l2']:.3g}"])
