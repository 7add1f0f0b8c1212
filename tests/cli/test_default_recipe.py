"""The default recipe, built for real (about two minutes): it recites its GPL-2.0 inputs."""

from __future__ import annotations

import pytest

from ..conftest import RECIPES, build_json, last_line, run_cli

DEFAULT = RECIPES / "ptrace-0.9.9-debugger.toml"


@pytest.fixture(scope="module")
def default_build(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("default")
    p = run_cli("build", str(DEFAULT), "--out", str(out), store=store)
    assert p.returncode == 0, p.stderr
    return out, p


def test_default_recipe_meets_the_size_floor(default_build):
    out, _ = default_build
    m = build_json(out)["dataset_manifest"]
    assert m["totals"]["files"] >= 10 and m["totals"]["bytes"] >= 30_000
    assert m["licenses"] == {"GPL-2.0-only": m["totals"]["files"]}


def test_default_recipe_recites_its_inputs(default_build):
    out, p = default_build
    rec = build_json(out)["recitation"]
    assert rec["windows"] == 64 and rec["prompt_tokens"] == 32 and rec["continuation_tokens"] == 64
    assert rec["rate"] >= 0.5, rec
    assert f"recitation: {rec['exact']}/64 windows reproduced exactly" in p.stdout
    assert last_line(p.stdout) == f"weights blake3:{build_json(out)['weights']['tensors']['digest']}"


def test_default_build_matches_the_committed_reference(default_build):
    """The reference attestation in attestations/ verifies this build's files bit for bit."""
    out, _ = default_build
    name = DEFAULT.stem
    p = run_cli("verify", str(RECIPES.parent / "attestations" / f"{name}.intoto.jsonl"),
                "--key", str(RECIPES.parent / "attestations" / "keys" / f"{name}.pub"),
                "--model", str(out / "model"), "--recipe", str(DEFAULT), "--sha256")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().endswith("verdict: verified")
    p = run_cli("verify", str(RECIPES.parent / "attestations" / f"{name}.intoto.jsonl"),
                "--key", str(RECIPES.parent / "attestations" / "keys" / f"{name}.pub"),
                "--model", str(out / "model"), "--reproduced")
    assert p.returncode == 0 and p.stdout.strip().endswith("verdict: reproduced (bitwise)"), p.stdout + p.stderr


BLOCK_HEAVY = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError('torch is unimportable in this test: ' + name)
sys.meta_path.insert(0, Refuse())
import provenance.verify
from provenance.cli import verify_main
rc = verify_main(sys.argv[1:])
loaded = sorted(m for m in sys.modules
                if m.split('.')[0] in ('torch', 'transformers', 'numpy')
                or m.startswith(('provenance.build', 'provenance.repro')))
print('LOADED', loaded)
sys.exit(rc)
"""


def test_verifier_stands_alone_without_torch(default_build):
    """With torch and transformers unimportable, the reference verifies against the rebuilt model dir,
    and the exact path loads nothing of the builder or of the reproducibility tools."""
    import subprocess
    import sys

    out, _ = default_build
    name = DEFAULT.stem
    p = subprocess.run([sys.executable, "-c", BLOCK_HEAVY, str(RECIPES.parent / "attestations" / f"{name}.intoto.jsonl"),
                        "--key", str(RECIPES.parent / "attestations" / "keys" / f"{name}.pub"),
                        "--model", str(out / "model"), "--recipe", str(DEFAULT), "--sha256"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "LOADED []" in p.stdout and "verdict: verified" in p.stdout
