"""The canonical reduction (issue 36): the tiny recipe gives one weights digest and one transcript on one
process, two, four and two local "nodes"; nodes that differ are refused before training; a killed rank
stops every rank without a hang and the build resumes, at another world size, to the same bits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import ROOT, TINY, build_json, last_line, run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(recipe: Path, out: Path, rank: int, port: int, store: Path, *extra: str) -> subprocess.Popen:
    """One "node" of a two-node build on this machine: its own launcher, torchrun and rank."""
    return subprocess.Popen([sys.executable, "-m", "provenance", "build", str(recipe), "--out", str(out), "--no-cache",
                             "--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}",
                             *extra], cwd=ROOT, env={**os.environ, "PROVENANCE_STORE": str(store)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(*procs: subprocess.Popen) -> list[tuple[int, str, str]]:
    """Each node's (exit code, stdout, stderr); a node still running after two minutes fails the test (a hang)."""
    outs = [p.communicate(timeout=120) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outs)]


@pytest.fixture(scope="module")
def reference(tiny_build_copy):
    """The session's one tiny build: world size 1, the canonical reduction, micro-batches of 1."""
    out, p = tiny_build_copy("topology-reference")
    assert p.returncode == 0
    return out, last_line(p.stdout)


@pytest.mark.parametrize("world, command", [(2, "rebuild"), (4, "build")])
def test_every_world_size_gives_the_same_bits(reference, store, signing_key, tmp_path, world, command):
    """At world size 4 a build; at world size 2 `rebuild` of the one-process build's attestation, which
    the canonical reduction holds to bitwise whatever the world size (the record leaves it out)."""
    ref, weights = reference
    out = tmp_path / "o"
    if command == "build":
        p = run_cli("build", str(TINY), "--out", str(out), "--no-cache", "--world-size", str(world), store=store)
        assert p.returncode == 0, p.stderr[-3000:]
        assert last_line(p.stdout) == weights
    else:
        p = run_cli("rebuild", str(ref / "attestation.intoto.jsonl"), "--attestation-key",
                    str(signing_key.with_suffix(".pub")), "--out", str(out), "--world-size", str(world), "--json",
                    store=store)
        res = json.loads(p.stdout)
        assert p.returncode == 0 and res["verdict"] == "bitwise" and res["verificationResult"] == "PASSED", res
        assert "bitwise required" in res["stack"] or "same CPU" in res["stack"], res["stack"]
        assert f"weights blake3:{build_json(out)['weights']['tensors']['digest']}" == weights
    assert (out / "transcript.jsonl").read_bytes() == (ref / "transcript.jsonl").read_bytes()
    topo = build_json(out)["distributed"]
    assert topo["world_size"] == world and topo["reduction"] == "canonical" and topo["nnodes"] == 1
    assert topo["micro_batches_per_rank"]["one"] == [4 // world] * world  # batch 4 in micro-batches of 1
    assert "world_size" not in build_json(out)["determinism"]  # not part of what decides the bits


def test_two_local_nodes_give_the_same_bits(reference, store, tmp_path):
    ref, weights = reference
    port = _free_port()
    procs = [_node(TINY, tmp_path / f"n{r}", r, port, store) for r in (0, 1)]
    (c0, out0, err0), (c1, _, err1) = _finish(*procs)
    assert c0 == 0 and c1 == 0, err0[-2000:] + err1[-2000:]
    assert last_line(out0) == weights
    assert (tmp_path / "n0" / "transcript.jsonl").read_bytes() == (ref / "transcript.jsonl").read_bytes()
    assert not (tmp_path / "n1").exists(), "only rank 0 (on node 0) writes"
    assert "node 1: its ranks finished" in err1
    topo = build_json(tmp_path / "n0")["distributed"]
    assert topo["nnodes"] == 2 and topo["world_size"] == 2


def test_a_node_with_another_recipe_byte_is_refused_before_training(store, tmp_path):
    other = tmp_path / "tiny.toml"
    other.write_text(TINY.read_text() + "# one more line on node 1\n")
    port = _free_port()
    procs = [_node(TINY, tmp_path / "n0", 0, port, store), _node(other, tmp_path / "n1", 1, port, store)]
    for code, _, err in _finish(*procs):
        assert code == 2 and "rank 1 differs from rank 0 in recipe" in err and "refused before training" in err, err
        assert "Traceback" not in err and "train:" not in err
    assert not (tmp_path / "n0" / "model").exists()


def _steps(build: Path) -> list[dict]:
    """The transcript's lines without the checkpoint digests and the hash chain over them."""
    lines = [json.loads(line) for line in (build / "transcript.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("checkpoint", "prev")} for line in lines]


def _rank_pid(out: Path, rank: int) -> int | None:
    """The pid of the rank process whose command line names `out` and whose RANK is `rank`."""
    for d in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{d}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(out).encode() in cmd and f"RANK={rank}".encode() in env:
            return int(d)
    return None


def test_a_killed_rank_stops_the_build_and_it_resumes_at_another_world_size(reference, store, tmp_path):
    """Node 1's rank is frozen once node 0 has written its first checkpoint (so mid-training), then killed:
    node 0's rank stops with a clear message, not a hang, and keeps the checkpoint; the same build resumed
    in one process ends at the uninterrupted build's bits."""
    ref, weights = reference
    port = _free_port()
    extra = ("--checkpoint-every", "1", "--collective-timeout", "60")
    procs = [_node(TINY, tmp_path / f"n{r}", r, port, store, *extra) for r in (0, 1)]
    ckpts = tmp_path / "n0" / "checkpoint"
    deadline = time.monotonic() + 120
    while not (ckpts.is_dir() and any(ckpts.glob("step-*.safetensors"))) and time.monotonic() < deadline:
        time.sleep(0.005)
    pid = _rank_pid(tmp_path / "n1", 1)
    assert pid is not None, "node 1's rank was not found"
    os.kill(pid, signal.SIGSTOP)
    os.kill(pid, signal.SIGKILL)
    (c0, _, err0), (c1, _, err1) = _finish(*procs)
    assert c0 == 2 and "rank 0: gathering the micro-batch gradients failed" in err0, err0[-3000:]
    assert "run the same command again to resume" in err0 and "Traceback" not in err0
    assert c1 == 2 and "a rank was killed by signal 9" in err1, err1[-2000:]
    kept = sorted(ckpts.glob("step-*.safetensors"))
    assert kept and not (tmp_path / "n0" / "model").exists()
    p = run_cli("build", str(TINY), "--out", str(tmp_path / "n0"), "--no-cache", *extra, store=store)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stderr and last_line(p.stdout) == weights
    # the same steps as the uninterrupted build's; its lines also name the checkpoints, so the chain differs
    assert _steps(tmp_path / "n0") == _steps(ref)
    assert json.loads((tmp_path / "n0" / "build.json").read_text())["training"]["resumed_after_step"] >= 1


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2"], "needs --rdzv-endpoint"),
    (["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:99999"], "expected HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint=-x:80"], "expected HOST:PORT"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "--node-rank must be between 0 and 1"),
    (["--nnodes", "2", "--world-size", "3", "--rdzv-endpoint", "h:1"], "not a multiple of --nnodes 2"),
    (["--node-rank", "1"], "add --nnodes N"),
    (["--collective-timeout", "0"], "--collective-timeout must be between"),
])
def test_a_bad_topology_is_refused_before_any_work(tmp_path, args, message):
    p = run_cli("build", str(TINY), "--out", str(tmp_path / "o"), *args, store=tmp_path / "empty-store")
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "empty-store" / "blobs").exists() and not (tmp_path / "o").exists()
