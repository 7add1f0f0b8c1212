"""`check-recipe --plan`: what a build of a recipe will take before it starts: the memory estimate of
each stage (recipe/plan.py), its steps (when the inputs are in the store) and, from a timed probe of
every stage's step (builder/probe.py), the time of a step and of each stage, one-time costs apart.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import InputError, ProvenanceError
from ..recipe import LoadedRecipe
from ..recipe.plan import available_memory, memory_problem, parameter_count, peak_memory, stage_memory
from .probe import step_seconds
from .train import micro_batch_count


def plan_build(recipe: LoadedRecipe, *, store: str | None, probe: bool) -> dict:
    """The plan as one JSON-ready dict. Raises InputError when the probe cannot run."""
    r = recipe.recipe
    steps, note = _steps(recipe, store)
    problem = memory_problem(r)
    peak = peak_memory(r)
    measured = _probe(recipe, peak, store) if probe and problem is None else None
    stages = []
    for s in r.stages:
        est = stage_memory(r, s)
        n = steps.get(s.name) if s.steps is None else s.steps
        per_step = step_seconds(measured, s.name, micro_batch_count(s)) if measured else None
        stages.append({"name": s.name, "steps": n, "steps_note": note, "batch_size": s.batch_size,
                       "micro_batch": s.micro_batch_size or s.batch_size, "memory_bytes": est.total,
                       "memory_parts": est.parts, "seconds_per_step": per_step,
                       "hours": n * per_step / 3600 if per_step is not None and n is not None else None})
    return {"parameters": parameter_count(r), "stages": stages, "peak_bytes": peak.total,
            "available_bytes": available_memory(), "probe": measured, "fits": problem is None,
            "verdict": problem or "fits: the first step's estimate is within 90% of the available memory"}


def _steps(recipe: LoadedRecipe, store: str | None) -> tuple[dict[str, int], str]:
    """Each stage's steps, counted from the prepared data when the inputs are in the store."""
    from .._internal.progress import Reporter
    from ..inputs.store import Store
    from .pipeline import fetch_all, prepare_data
    from .train import stage_steps

    try:
        stored = fetch_all(recipe, Store(store), offline=True, handed={}, reporter=Reporter(enabled=False))
        with tempfile.TemporaryDirectory() as work:
            data = prepare_data(recipe, stored, Path(work))
    except ProvenanceError as e:
        return {}, ("the inputs are not in the store; `provenance fetch` them first"
                    if "not in the store" in e.diagnostics() else e.diagnostics().splitlines()[0])
    return {s.name: stage_steps(s, data.seqs) for s in recipe.recipe.stages}, ""


def _probe(recipe: LoadedRecipe, peak, store: str | None) -> dict:
    from ..inputs.store import Store
    from .probe import run_probe

    stage = next(s for s in recipe.recipe.stages if s.name == peak.stage)
    try:
        res = run_probe(str(recipe.path), peak.stage, str(Store(store).root))
    except RuntimeError as e:
        raise InputError(str(e)) from None
    res.update(stage=peak.stage, estimate_bytes=peak.total,
               seconds_per_step=step_seconds(res, stage.name, micro_batch_count(stage)),
               one_time_seconds=res["setup_seconds"] + res["warmup_seconds"])
    return res
