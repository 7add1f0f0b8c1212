"""An auditor installs only the verifier. `pip install provenance` (no extras) in a fresh venv gives
`verify-attestation` and pulls neither torch nor transformers; it verifies the committed reference;
and `provenance build` there names the extra to install (exit 2) before any work."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from .conftest import DEFAULT_RECIPE, DEFAULT_REF, DEFAULT_REF_KEY, ROOT, TINY


@pytest.mark.builds  # not a build, but minutes of pip (a fresh venv): left out of `make test-fast`
def test_the_verifier_installs_and_runs_without_the_builder(tmp_path):
    src = tmp_path / "src"  # a copy, so that building the wheel writes nothing into the repository
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "provenance", src / "provenance", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
    # The verifier's dependencies from their hashed lock, then the package (built with the locked setuptools).
    p = subprocess.run([*pip, "--require-hashes", "--no-deps", "-r", str(ROOT / "locks" / "verifier.lock")],
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([*pip, "--no-deps", "--no-build-isolation", str(src)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([str(venv / "bin" / "pip"), "check"], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout  # the lock holds everything the verifier needs
    probe = "import importlib.util as u; print([m for m in ('torch', 'transformers', 'tokenizers', 'matplotlib') " \
            "if u.find_spec(m)])"
    p = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]", p.stdout

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PROVENANCE_STORE"] = str(tmp_path / "store")
    p = subprocess.run([str(venv / "bin" / "verify-attestation"), str(DEFAULT_REF), "--key", str(DEFAULT_REF_KEY),
                        "--recipe", str(DEFAULT_RECIPE)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stdout.splitlines()[-1].startswith("verdict: verified")

    p = subprocess.run([str(venv / "bin" / "provenance"), "build", str(TINY), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "pip install 'provenance[build]'" in p.stderr and "'torch'" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()
