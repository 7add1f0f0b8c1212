"""`provenance audit BUILD_DIR`: run a signed build's memorization audit again on its model dir, from
the recipe its attestation embeds and the inputs its pins name, and compare it with the signed one."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import CheckFailed
from ..recipe import LoadedRecipe, load_recipe

# The parts of audit.json a re-run must reproduce (the rest records when and where it ran).
COMPARED = ("method", "training", "control", "control_spec", "summary", "parent_training")


def rerun_audit(build_dir: Path, keys: list[str], *, store: str | None, offline: bool, threads: int | None,
                handed: Callable[[LoadedRecipe], dict], reporter) -> tuple[dict, list[str]]:
    """(the fresh audit, the parts in COMPARED where it differs from the signed audit.json). The
    model dir must be exactly the attested files (CheckFailed otherwise). `handed(recipe)`: the
    files handed over for the embedded recipe's inputs."""
    from ..builder import determinism
    from ..builder.parent import discard_copies
    from ..builder.pipeline import add_parent_training, fetch_all, prepare_data, run_audit
    from ..inputs.store import Store
    from ..verify.model_dir import inspect, report_exact
    from ..verify.report import Checks
    from .byproducts import signed_byproducts
    from .rebuild import embedded_recipe

    _, st, [(ajson, _)] = signed_byproducts(build_dir, keys, ["audit.json"], "re-runs a signed build's audit")
    exact = Checks()
    report_exact(exact, inspect(st, build_dir / "model", sha256=False), sha256=False)
    if not exact.ok:
        raise CheckFailed(f"{build_dir / 'model'}: not exactly the attested files; audit a verified model dir")
    with tempfile.TemporaryDirectory(prefix="provenance-audit-") as tmp:
        recipe = load_recipe(embedded_recipe(st, Path(tmp) / "recipe"))
        determinism.apply(recipe.recipe.determinism, threads=threads)
        stored = fetch_all(recipe, Store(store), offline=offline, handed=handed(recipe), reporter=reporter)
        try:
            data = prepare_data(recipe, stored, Path(tmp) / "work", reporter=reporter)
            add_parent_training(data, Store(store), offline=offline, work=Path(tmp) / "parent")
            fresh = run_audit(build_dir / "model", data, recipe.recipe)
        finally:
            discard_copies(stored)
    signed = json.loads(ajson.read_text())
    return fresh, [k for k in COMPARED if signed.get(k) != fresh.get(k)]
