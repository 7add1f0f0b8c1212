"""The package's layering, read from the source with `ast` (no imports, well under a second): the
order the README describes ("Architecture"), no import cycles between modules, and the heavy libraries imported
only inside the functions that need them where a module sits below the builder. `make test` runs this
file first, and `make test-fast` includes it."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "provenance"

# Each part of the package and the parts it may import (directly or inside a function). Lower layers
# first: a part may import only from the parts listed for it.
ALLOWED = {
    "errors": set(),
    "__init__": set(),
    "_internal": {"errors", "__init__"},
    "recipe": {"_internal", "errors"},
    "attest": {"_internal", "errors", "recipe", "__init__"},
    "inputs": {"_internal", "errors", "recipe"},
    "verify": {"_internal", "errors", "attest", "inputs", "recipe"},
    "audit": {"_internal", "errors", "recipe", "inputs", "attest"},
    "builder": {"_internal", "errors", "recipe", "inputs", "attest", "audit", "verify", "__init__"},
    "repro": {"_internal", "errors", "recipe", "inputs", "attest", "verify", "audit", "builder", "__init__"},
    "publish": {"_internal", "errors", "verify"},
    "_cli": {"_internal", "errors", "recipe", "inputs", "attest", "verify", "audit", "builder", "repro", "publish"},
    "_entry": {"_internal", "_cli"},
    "__main__": {"_cli"},
}
# Libraries whose import costs seconds (torch, transformers) or pulls a plotting stack: a module
# outside the builder imports them inside the function that needs them, so `verify-attestation` and
# the CLI's argument parsing never pay for them.
HEAVY = {"torch", "transformers", "tokenizers", "matplotlib", "numpy", "safetensors.torch"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, at module level?, line) for every import of the package and of HEAVY."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, ast.If) for n in s.body}
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{mod}.{a.name}" for a in node.names] if node.module is None else [mod]
            elif node.module:
                targets = [node.module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        found += [(t, id(node) in top_level, node.lineno) for t in targets]
    return found


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


MODULES = _modules()
IMPORTS = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_part_is_placed():
    assert {_part(m) for m in MODULES} <= set(ALLOWED), {_part(m) for m in MODULES} - set(ALLOWED)


def _resolve(target: str) -> str | None:
    """The module of the package an import names (`from .x import f` names x, or x.f when f is a module)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def test_each_part_imports_only_the_layers_below_it():
    wrong = []
    for m, found in IMPORTS.items():
        for t, _, line in found:
            target = _resolve(t) if t.startswith("provenance") else None
            if target and _part(target) != _part(m) and _part(target) not in ALLOWED[_part(m)]:
                wrong.append(f"{MODULES[m].relative_to(PKG.parent)}:{line} imports {t}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_modules():
    graph = defaultdict(set)
    for m, found in IMPORTS.items():
        for t, _, _ in found:
            r = _resolve(t) if t.startswith("provenance") else None
            if r and r != m and not m.startswith(r + ".") and r != "provenance":
                graph[m].add(r)
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in sorted(graph[m]):
            visit(n)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("part", ["_internal", "recipe", "attest", "inputs", "verify", "audit", "_cli", "_entry"])
def test_heavy_libraries_are_imported_lazily_outside_the_builder(part):
    eager = [f"{MODULES[m].relative_to(PKG.parent)}:{line} imports {t} at module level"
             for m, found in IMPORTS.items() if _part(m) == part
             for t, top, line in found if top and t.split(".")[0] in {h.split(".")[0] for h in HEAVY}]
    assert not eager, "\n".join(eager)
