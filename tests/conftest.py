"""Shared fixtures: a session-wide input store (the real sdist is fetched once) and CLI runners."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
TINY = ROOT / "tests" / "recipes" / "tiny.toml"


@pytest.fixture(scope="session", autouse=True)
def signing_key(tmp_path_factory) -> Path:
    """Builds without --key sign with $PROVENANCE_KEY: a temporary ECDSA P-256 key (keygen's default),
    made here before any build, so builds running side by side (tests/conftest.py default_rebuild)
    never both make it."""
    key = tmp_path_factory.mktemp("default-key") / "provenance.key"
    p = run_cli("keygen", str(key.parent), "--name", key.stem)
    assert p.returncode == 0, p.stderr
    os.environ["PROVENANCE_KEY"] = str(key)
    return key


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    """One store for the whole session: the pinned sdist is downloaded into it once."""
    env_store = os.environ.get("PROVENANCE_TEST_STORE")
    return Path(env_store) if env_store else tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def _tiny_pristine(store, signing_key, tmp_path_factory):
    """The tiny recipe built once for the session (default key, --no-cache: a full build, whatever
    the store's stage cache holds). Modules get copies from `tiny_build_copy`, never this dir."""
    out = tmp_path_factory.mktemp("tiny-pristine") / "b"
    p = run_cli("build", str(TINY), "--out", str(out), "--no-cache", store=store)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


@pytest.fixture(scope="session")
def tiny_build_copy(_tiny_pristine, tmp_path_factory):
    """copy(name) -> (out dir, the build's CompletedProcess): a fresh copy of the session's one
    plain tiny build, for a module to read or damage without building the recipe again."""
    import shutil

    src, p = _tiny_pristine

    def copy(name: str):
        out = tmp_path_factory.mktemp(name) / "b"
        shutil.copytree(src, out, symlinks=True)
        return out, p

    return copy


DEFAULT_RECIPE_TESTS = "tests/cli/test_default_recipe.py"
DEFAULT_RECIPE = RECIPES / "ptrace-0.9.9-debugger.toml"
DEFAULT_REF = ROOT / "attestations" / f"{DEFAULT_RECIPE.stem}.intoto.jsonl"
DEFAULT_REF_KEY = ROOT / "attestations" / "keys" / f"{DEFAULT_RECIPE.stem}.pub"


@pytest.fixture(scope="session", autouse=True)
def default_rebuild(request, store, signing_key, tmp_path_factory):
    """`provenance rebuild` of the default recipe's committed reference, started in the background
    when the session begins, so its minutes of training overlap the other tests (which keep about
    one of two cores busy). tests/cli/test_default_recipe.py waits for it. None when no
    default-recipe test was collected. It runs on one thread (the recipe says two), leaving the other
    core to the tests: the recipe is thread-invariant (its vocabulary is padded to a multiple of 64,
    docs/reproducibility.md, "The thread count"), which the bitwise check on the reference's stack
    then tests too."""
    if not any(item.nodeid.startswith(DEFAULT_RECIPE_TESTS) for item in request.session.items):
        yield None
        return
    base = tmp_path_factory.mktemp("default")
    out = base / "rebuild"
    with open(base / "stdout", "w") as so, open(base / "stderr", "w") as se:
        proc = subprocess.Popen([sys.executable, "-m", "provenance", "rebuild", str(DEFAULT_REF), "--attestation-key",
                                 str(DEFAULT_REF_KEY), "--out", str(out), "--threads", "1", "--json"], stdout=so, stderr=se,
                                text=True, env={**os.environ, "PROVENANCE_STORE": str(store)}, cwd=ROOT)

    def result():
        """(out dir, returncode, stdout, stderr) once the rebuild has ended."""
        code = proc.wait()
        return out, code, (base / "stdout").read_text(), (base / "stderr").read_text()

    yield result
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def run_cli(*args: str, store: Path | None = None, env: dict | None = None, cwd: Path | None = None,
            module: str = "provenance") -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    if store is not None:
        full_env["PROVENANCE_STORE"] = str(store)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or ROOT)


def build_json(out: Path) -> dict:
    return json.loads((out / "build.json").read_text())


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


MS_VENV = ROOT / ".venv-model-signing"


@pytest.fixture(scope="session")
def model_signing() -> Path:
    """OpenSSF's `model_signing` 1.1.1 in a venv of its own, as a user has it (with pyOpenSSL, which it
    needs and does not declare), pinned by constraints.txt."""
    exe = MS_VENV / "bin" / "model_signing"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(MS_VENV)], check=True)
        subprocess.run([str(MS_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "-c",
                        str(ROOT / "constraints.txt"), "model-signing==1.1.1", "pyOpenSSL"], check=True, timeout=900)
    return exe
