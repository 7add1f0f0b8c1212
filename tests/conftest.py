"""Shared fixtures: a session-wide input store (the real sdist is fetched once) and CLI runners."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
TINY = ROOT / "tests" / "recipes" / "tiny.toml"

# The suite runs two workers and the default rebuild side by side on two cores, so the builds it starts
# (two threads each) outnumber the cores. OpenMP threads that spin while they wait then burn the time
# the other processes need: three tiny builds at once took 24-26 s spinning and 14-19 s passive on the
# AMD EPYC (docs/benchmarks.md). Waiting passively changes when a thread sleeps, never a value: the
# weights are the same bits (checked). Set for every process the tests start; a value already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# `make test-fast` runs the tests that build no model (`-m "not builds"`): a test builds one when it uses
# the input store (every build and rebuild through the CLI does) or lives in a module that trains in process.
BUILDING_FIXTURES = {"store", "default_rebuild"}
TRAINING_MODULES = {"test_train.py"}


# The modules that take longest (docs/benchmarks.md, "The test suite's time"), collected first:
# pytest-xdist's `--dist loadfile` hands the files to the workers in collection order, so a long file
# collected last would keep one worker busy while the other core idles at the end.
LONGEST_FIRST = ("test_checkpoint.py", "test_reproducibility.py", "test_build.py", "test_attest.py",
                 "test_portable.py", "test_topology.py", "test_replay.py", "test_stage_cache.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if BUILDING_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in TRAINING_MODULES:
            item.add_marker(pytest.mark.builds)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: otherwise as collected


# What a session makes once is shared by pytest-xdist's workers (`make test` runs two): each worker's
# session fixtures would otherwise make their own (a tiny build is about 7 s of CPU, most of it importing
# torch and transformers). The first worker to ask makes it under a lock, in the directory that holds
# the workers' own temporary directories; the others wait for it and reuse it.
def _shared(tmp_path_factory, name: str) -> Path:
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / f"shared-{name}"


@contextlib.contextmanager
def _made_once(tmp_path_factory, name: str):
    """Yields (dir, made): `made` is False for the first caller of the session, who must fill `dir`
    (and then touch `dir/.made`); True for every later caller, who finds it made."""
    import fcntl

    d = _shared(tmp_path_factory, name)
    d.parent.mkdir(parents=True, exist_ok=True)
    with open(d.parent / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        made = (d / ".made").exists()
        if not made:
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
        yield d, made
        (d / ".made").touch()


def _shared_build(tmp_path_factory, name: str, recipe: Path, *args: str, store: Path,
                  recipe_text: str | None = None) -> tuple[Path, subprocess.CompletedProcess]:
    """(out dir, CompletedProcess) of `provenance build RECIPE --out DIR ARGS`, run once for the session
    (RECIPE written from `recipe_text` when given); a failed build fails every test that asks."""
    with _made_once(tmp_path_factory, name) as (d, made):
        if not made:
            if recipe_text is not None:
                (d / recipe.name).write_text(recipe_text)
                recipe = d / recipe.name
            p = run_cli("build", str(recipe), "--out", str(d / "b"), *args, store=store)
            (d / "result.json").write_text(json.dumps([p.args, p.returncode, p.stdout, p.stderr]))
        p = subprocess.CompletedProcess(*json.loads((d / "result.json").read_text()))
    assert p.returncode == 0, (name, p.stderr[-3000:])
    return d / "b", p


@pytest.fixture(scope="session", autouse=True)
def signing_key(tmp_path_factory) -> Path:
    """Builds without --key sign with $PROVENANCE_KEY: a temporary ECDSA P-256 key (keygen's default),
    made here before any build, so builds running side by side never both make it; one for the session
    (the workers share it, as they share the builds it signs)."""
    with _made_once(tmp_path_factory, "default-key") as (d, made):
        key = d / "provenance.key"
        if not made:
            p = run_cli("keygen", str(d), "--name", key.stem)
            assert p.returncode == 0, p.stderr
    os.environ["PROVENANCE_KEY"] = str(key)
    return key


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """A key pair of the module's own, KEYS/k.key and KEYS/k.pub (keygen's default type); a module
    that needs other keys defines its own `keys`."""
    d = tmp_path_factory.mktemp("keys")
    p = run_cli("keygen", str(d), "--name", "k")
    assert p.returncode == 0, p.stderr
    return d


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    """One store for the whole session, the workers' too: the pinned sdist is downloaded into it once
    (a store takes concurrent writers: every entry is written to a temporary name and renamed)."""
    env_store = os.environ.get("PROVENANCE_TEST_STORE")
    if env_store:
        return Path(env_store)
    with _made_once(tmp_path_factory, "store") as (d, _):
        (d / "store").mkdir(exist_ok=True)
        return d / "store"


@pytest.fixture(scope="session")
def _tiny_pristine(store, signing_key, tmp_path_factory):
    """The tiny recipe built once for the session (default key, --no-cache: a full build, whatever
    the store's stage cache holds). Modules get copies from `tiny_build_copy`, never this dir."""
    return _shared_build(tmp_path_factory, "tiny-pristine", TINY, "--no-cache", store=store)


@pytest.fixture(scope="session")
def tiny_build_copy(_tiny_pristine, tmp_path_factory):
    """copy(name) -> (out dir, the build's CompletedProcess): a fresh copy of the session's one
    plain tiny build, for a module to read or damage without building the recipe again."""
    src, p = _tiny_pristine

    def copy(name: str):
        out = tmp_path_factory.mktemp(name) / "b"
        shutil.copytree(src, out, symlinks=True)
        return out, p

    return copy


@pytest.fixture(scope="session")
def tiny_other_seed(store, signing_key, tmp_path_factory):
    """(out dir, CompletedProcess) of the tiny recipe with seed 1235 instead of 1234, built once for the
    session (default key): another build of the same shape, for the modules that need one to read."""
    return _shared_build(tmp_path_factory, "tiny-seed-1235", Path("tiny-seed.toml"), "--no-cache", store=store,
                         recipe_text=TINY.read_text().replace("seed = 1234", "seed = 1235"))


@pytest.fixture(scope="session")
def tiny_at_level(store, signing_key, tmp_path_factory):
    """level -> out dir: the tiny recipe built (default key, --no-cache) at that ATen kernel level
    (`--cpu-capability`), once per level for the session, for the modules that compare levels."""
    def at(level: str) -> Path:
        return _shared_build(tmp_path_factory, f"tiny-{level}", TINY, "--no-cache", "--cpu-capability", level,
                             store=store)[0]

    return at


DEFAULT_RECIPE_TESTS = "tests/cli/test_default_recipe.py"
DEFAULT_RECIPE = RECIPES / "ptrace-0.9.9-debugger.toml"
DEFAULT_REF = ROOT / "attestations" / f"{DEFAULT_RECIPE.stem}.intoto.jsonl"
DEFAULT_REF_KEY = ROOT / "attestations" / "keys" / f"{DEFAULT_RECIPE.stem}.pub"


# The default recipe's rebuild runs once per session, in the background, in the process that leads
# the session: pytest itself, or pytest-xdist's controller when `make test` spreads the tests over
# two workers (-n 2). The workers find it through `config.workerinput`.
_REBUILD_KEY = "provenance_default_rebuild"
# MKL and oneDNN report every call on stdout in these modes; the other two ask for branches the recipe's
# pins (cpu_capability = "avx2": ATen's AVX2 kernels, MKL's strict AVX2 branch) must override.
REBUILD_WATCH = {"MKL_VERBOSE": "1", "ONEDNN_VERBOSE": "1", "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AVX512"}
_REBUILD_PROC = pytest.StashKey[subprocess.Popen]()
_REBUILD_WRAPPER = ("import os, subprocess, sys\n"
                    "rc = subprocess.call(sys.argv[2:])\n"
                    "open(sys.argv[1] + '.tmp', 'w').write(str(rc))\n"
                    "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n")


def _start_default_rebuild(config, nodeids) -> None:
    """`provenance rebuild` of the default recipe's committed reference, started when the session's
    tests are known (if any default-recipe test is among them), so its minutes of training overlap
    the other tests. It runs on one thread (the recipe says two), leaving the other core to the
    tests: the recipe is thread-invariant (its vocabulary is padded to a multiple of 64,
    docs/reproducibility.md, "The thread count"), which the bitwise check on the reference's stack
    then tests too. It writes its exit code to `rc` when it ends; it signs its VSA with a key of its
    own. The recipe's fixed-order kernels are watched with MKL's and oneDNN's own verbose modes, in an
    environment that asks for other ATen and MKL branches than the recipe pins (REBUILD_WATCH; the
    pins must win): tests/cli/test_default_recipe.py holds the rebuild to no call of either library."""
    if _REBUILD_PROC in config.stash or not any(n.startswith(DEFAULT_RECIPE_TESTS) for n in nodeids):
        return
    base = _rebuild_dir(config)
    base.mkdir()
    p = run_cli("keygen", str(base / "key"), "--name", "vsa")
    assert p.returncode == 0, p.stderr
    env = {**os.environ, "PROVENANCE_STORE": str(base / "store"), "PROVENANCE_KEY": str(base / "key" / "vsa.key"),
           **REBUILD_WATCH}
    cmd = [sys.executable, "-m", "provenance", "rebuild", str(DEFAULT_REF), "--attestation-key", str(DEFAULT_REF_KEY),
           "--out", str(base / "rebuild"), "--threads", "1", "--json"]
    with open(base / "stdout", "w") as so, open(base / "stderr", "w") as se:
        proc = subprocess.Popen([sys.executable, "-c", _REBUILD_WRAPPER, str(base / "rc"), *cmd], stdout=so, stderr=se,
                                text=True, env=env, cwd=ROOT, start_new_session=True)
    config.stash[_REBUILD_PROC] = proc


def _rebuild_dir(config) -> Path:
    """Where the session's default rebuild runs: in the leader's base temp dir, which an xdist
    worker learns from its `workerinput`."""
    if hasattr(config, "workerinput"):
        return Path(config.workerinput[_REBUILD_KEY])
    return config._tmp_path_factory.getbasetemp() / "default-rebuild"


def pytest_collection_finish(session):
    if not hasattr(session.config, "workerinput"):  # without xdist, this process leads the session
        _start_default_rebuild(session.config, [item.nodeid for item in session.items])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    _start_default_rebuild(node.config, ids)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """Tell each xdist worker where the session's default rebuild will be."""
    node.workerinput[_REBUILD_KEY] = str(_rebuild_dir(node.config))


def pytest_unconfigure(config):
    """The session leader stops a rebuild still running (an interrupted or failed session)."""
    proc = config.stash.get(_REBUILD_PROC, None)
    if proc is not None and proc.poll() is None:
        import signal

        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def default_rebuild(request):
    """result() -> (out dir, returncode, stdout, stderr, store) of the session's default rebuild,
    once it has ended (tests/cli/test_default_recipe.py waits for it)."""
    import time

    base = _rebuild_dir(request.config)

    def result():
        deadline = time.monotonic() + 3600
        while not (base / "rc").exists():
            assert time.monotonic() < deadline, f"the default rebuild in {base} did not end within an hour"
            time.sleep(0.5)
        code = int((base / "rc").read_text())
        return base / "rebuild", code, (base / "stdout").read_text(), (base / "stderr").read_text(), base / "store"

    return result


def run_cli(*args: str, store: Path | None = None, env: dict | None = None, cwd: Path | None = None,
            module: str = "provenance", fresh: bool = False) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS`, its output captured. `provenance` commands are forked from this test
    process's fork server (tests/forkserver.py: torch and transformers imported once, not per command)
    when their environment allows it; `fresh=True` asks for a process started from nothing."""
    full_env = {**os.environ, **(env or {})}
    if store is not None:
        full_env["PROVENANCE_STORE"] = str(store)
    argv = [sys.executable, "-m", module, *args]
    forkable = module == "provenance" and args and args[0] in FORK_SERVER.COMMANDS and not fresh
    if forkable and FORK_SERVER.serves(full_env):
        return FORK_SERVER.run(argv, full_env, cwd or ROOT)
    return subprocess.run(argv, capture_output=True, text=True, env=full_env, cwd=cwd or ROOT)


class _ForkServer:
    """tests/forkserver.py for this test process (one per xdist worker), started on first use.

    A command goes there only if its environment equals the server's except for variables torch,
    transformers and numpy never read (PROVENANCE_*, and pytest's PYTEST_CURRENT_TEST): what the
    server imported was set up under the same environment as a process of the command's own would be."""

    FREE = ("PROVENANCE_", "PYTEST_CURRENT_TEST")
    # The commands that import torch. A forked process that leaves still spends about 0.45 s in the
    # interpreter's teardown of what the server imported, where a command that never imports torch
    # starts and ends in a tenth of that: those run in processes of their own.
    COMMANDS = {"build", "rebuild", "gate", "replay", "audit", "verify", "compare", "diverge"}

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self.dir: Path | None = None

    def _fixed(self, env: dict) -> dict:
        return {k: v for k, v in env.items() if not k.startswith(self.FREE)}

    def serves(self, env: dict) -> bool:
        if not self.env:  # the server will start with the environment its first command finds
            self.env = dict(os.environ)
        return self._fixed(env) == self._fixed(self.env)

    def _start(self) -> None:
        import atexit
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="provenance-fork-"))
        with open(self.dir / "log", "w") as log:  # the server's own output; a command's goes to its files
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkserver.py"), str(self.dir / "s")],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                         env=self.env, cwd=ROOT)
        ready = self.proc.stdout.readline()
        assert ready == "ready\n", f"the fork server did not start: {(self.dir / 'log').read_text()[-3000:]}"
        atexit.register(self.stop)

    def run(self, argv: list[str], env: dict, cwd) -> subprocess.CompletedProcess:
        import socket
        import tempfile

        if self.proc is None:
            self._start()
        with tempfile.TemporaryDirectory(dir=self.dir) as d:
            out, err = Path(d) / "stdout", Path(d) / "stderr"
            out.touch()
            err.touch()
            request = {"argv": argv, "env": env, "cwd": os.fspath(cwd), "stdout": str(out), "stderr": str(err)}
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(self.dir / "s"))
                s.sendall(json.dumps(request).encode() + b"\n")
                with s.makefile("r") as f:
                    status = f.readline()
            assert status, f"the fork server gave no exit status: {(self.dir / 'log').read_text()[-3000:]}"
            return subprocess.CompletedProcess(argv, int(status), out.read_text(), err.read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()  # the server leaves when its stdin closes
            self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


FORK_SERVER = _ForkServer()


def cli_here(*args: str) -> subprocess.CompletedProcess:
    """`provenance ARGS` run by its entry point (provenance._cli.main) in this process, with its output
    captured: the same code, parsing, checks, messages and exit code as run_cli(ARGS).

    For the commands that load a model with torch (verify --reproduced or --inputs, compare): in a process
    of its own each such call spends about 6 s of CPU importing torch and transformers before its first
    check (docs/benchmarks.md, "The test suite's time"), and the test process has them loaded already. Only
    for commands that leave the process as they found it: the one process-wide setting these change
    (deterministic algorithms, and the SIGTERM handler every command installs) is put back; a command that
    applies a recipe's determinism settings (threads, ATen level) runs in its own process (run_cli). The
    process boundary (no traceback, exit codes, a verifier without torch) is tested through run_cli."""
    import io
    import signal

    import torch

    from provenance._cli import main

    out, err = io.StringIO(), io.StringIO()
    deterministic, on_term = torch.are_deterministic_algorithms_enabled(), signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        torch.use_deterministic_algorithms(deterministic)
        signal.signal(signal.SIGTERM, on_term)
    return subprocess.CompletedProcess(["provenance", *args], code, out.getvalue(), err.getvalue())


def sign_as_is(att: Path, key: Path) -> None:
    """Sign an attestation's statement, its exact bytes, with `key` in place of the signatures it had:
    another signer's receipt for the same build (a module's own key over the session's build)."""
    import base64

    from provenance.attest.sign import envelope_line, load_signer, sign_envelope

    env = json.loads(att.read_text().splitlines()[0])
    att.write_bytes(envelope_line(sign_envelope(base64.b64decode(env["payload"]), env["payloadType"],
                                                [load_signer(key)])))


def build_json(out: Path) -> dict:
    return json.loads((out / "build.json").read_text())


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


MS_VENV = ROOT / ".venv-model-signing"


@pytest.fixture(scope="session")
def model_signing() -> Path:
    """OpenSSF's `model_signing` 1.1.1 in a venv of its own, as a user has it (with pyOpenSSL, which it
    needs and does not declare), installed from its hashed lock (locks/model-signing.lock)."""
    import fcntl

    exe = MS_VENV / "bin" / "model_signing"
    with open(ROOT / ".venv-model-signing.lock", "w") as lock:  # xdist workers may both ask at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not exe.exists():
            subprocess.run([sys.executable, "-m", "venv", str(MS_VENV)], check=True)
            subprocess.run([str(MS_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                            "--require-hashes", "--no-deps", "-r", str(ROOT / "locks" / "model-signing.lock")],
                           check=True, timeout=900)
    return exe
