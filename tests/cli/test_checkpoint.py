"""Checkpoints and resume: a build killed (SIGKILL) early or late, or interrupted (SIGINT,
SIGTERM), resumes to the same weights and the same transcript, byte for byte, as a build that was
never interrupted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from ..conftest import ROOT, TINY, build_json, run_cli


@pytest.fixture(scope="module")
def uninterrupted(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "whole"
    p = run_cli("build", str(TINY), "--out", str(out), "--checkpoint-every", "1", "--no-cache", store=store)
    assert p.returncode == 0, p.stderr
    return out


def _start(out, store, extra=()):
    env = {**os.environ, "PROVENANCE_STORE": str(store)}
    return subprocess.Popen([sys.executable, "-m", "provenance", "build", str(TINY), "--out", str(out),
                             "--checkpoint-every", "1", "--no-cache", *extra], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(out, step: int, proc, timeout=120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        files = list((out / "checkpoint").glob("step-*.safetensors")) if (out / "checkpoint").is_dir() else []
        if any(int(f.stem.split("-")[1]) >= step for f in files):
            return True
        time.sleep(0.01)
    return False


def _same_as_uninterrupted(out, whole):
    assert (out / "model" / "model.safetensors").read_bytes() == (whole / "model" / "model.safetensors").read_bytes()
    assert (out / "transcript.jsonl").read_bytes() == (whole / "transcript.jsonl").read_bytes()
    assert build_json(out)["weights"] == build_json(whole)["weights"]
    assert not (out / "checkpoint").exists() and not list(out.glob(".staging-*"))


def test_sigkill_late_then_resume_is_bitwise_equal(uninterrupted, store, tmp_path):
    """Killed late in the tiny recipe's 12 steps; the tests below kill it early (at steps 3, 4 and 5) and
    hold those resumes to the same bits too, so every resume here starts from a whole checkpoint."""
    kill_at = 10
    out = tmp_path / "b"
    proc = _start(out, store)
    reached = _wait_for_step(out, kill_at, proc)
    proc.send_signal(signal.SIGKILL) if proc.poll() is None else None
    proc.communicate(timeout=60)
    if not reached:
        pytest.fail(f"the build finished or stalled before step {kill_at}; it never wrote that checkpoint")
    assert (out / "checkpoint").is_dir() and not (out / "build.json").exists()
    p = run_cli("build", str(TINY), "--out", str(out), "--checkpoint-every", "1", "--no-cache", store=store)
    assert p.returncode == 0, p.stderr
    assert "resuming from" in p.stderr
    resumed = build_json(out)["training"]["resumed_after_step"]
    assert resumed is not None and resumed >= kill_at
    _same_as_uninterrupted(out, uninterrupted)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupt_writes_a_checkpoint_and_says_how_to_resume(uninterrupted, store, tmp_path, sig, code):
    out = tmp_path / "b"
    proc = _start(out, store)
    assert _wait_for_step(out, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the build finished before the signal arrived")
    assert proc.returncode == code and "run the same `provenance build` command again" in err, err
    assert "Traceback" not in err
    p = run_cli("build", str(TINY), "--out", str(out), "--checkpoint-every", "1", "--no-cache", "--resume", store=store)
    assert p.returncode == 0, p.stderr
    _same_as_uninterrupted(out, uninterrupted)


def test_resume_requires_a_checkpoint_and_ignores_another_builds(store, tmp_path):
    p = run_cli("build", str(TINY), "--out", str(tmp_path / "none"), "--resume", store=store)
    assert p.returncode == 2 and "--resume: no checkpoint of this build" in p.stderr
    # refused before the inputs are fetched or the data prepared, and nothing is written
    assert "input ethtool" not in p.stderr and "tokenizer:" not in p.stderr, p.stderr
    assert not (tmp_path / "none").exists()
    p = run_cli("build", str(TINY), "--out", str(tmp_path / "none"), "--resume", "--no-resume", store=store)
    assert p.returncode == 2 and "not allowed with argument" in p.stderr and "Traceback" not in p.stderr
    out = tmp_path / "b"
    proc = _start(out, store)
    assert _wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    other = tmp_path / "other.toml"
    other.write_text(TINY.read_text().replace("seed = 1234", "seed = 1235"))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    p = run_cli("build", str(other), "--out", str(out), "--resume", store=store)
    assert p.returncode == 2 and "--resume: no checkpoint of this build" in p.stderr, p.stderr
    # the checkpoints' identity is judged before the data is prepared, and nothing is touched
    assert "belongs to another recipe" in p.stderr and "tokenizer:" not in p.stderr, p.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    p = run_cli("build", str(other), "--out", str(out), store=store)
    assert p.returncode == 0 and "belongs to another recipe" in p.stderr, p.stderr
    assert build_json(out)["training"]["resumed_after_step"] is None


def test_resume_keeps_the_interrupted_schedule(uninterrupted, store, tmp_path):
    """Scheduled checkpoints are in the transcript: resumed on another --checkpoint-every, the transcript
    would match neither schedule's build (and replay would refuse it), so that is refused, nothing lost."""
    out = tmp_path / "b"
    proc = _start(out, store)  # a checkpoint every step
    assert _wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    kept = sorted((out / "checkpoint").glob("step-*.safetensors"))
    p = run_cli("build", str(TINY), "--out", str(out), "--checkpoint-every", "2", "--no-cache", store=store)
    assert p.returncode == 2 and "with a checkpoint every 1 steps" in p.stderr and "--checkpoint-every 1" in p.stderr
    assert "--no-resume" in p.stderr and "Traceback" not in p.stderr
    assert "tokenizer:" not in p.stderr, p.stderr  # refused before the data is prepared
    assert sorted((out / "checkpoint").glob("step-*.safetensors")) == kept
    p = run_cli("build", str(TINY), "--out", str(out), "--checkpoint-every", "1", "--no-cache", store=store)
    assert p.returncode == 0, p.stderr
    assert build_json(out)["training"]["resumed_after_step"] is not None
    _same_as_uninterrupted(out, uninterrupted)


def test_schedule_conflict_cases():
    from provenance.builder.checkpoint import schedule_conflict

    every2 = [b'{"step":0}', b'{"checkpoint":"ab","step":1}', b'{"step":2}', b'{"checkpoint":"cd","step":3}']
    assert schedule_conflict(every2, 4, 2) is None
    conflict = schedule_conflict(every2, 4, 3)
    assert "every 2 steps" in conflict and "--checkpoint-every 2" in conflict
    assert "asks for none" in schedule_conflict(every2, 4, None)
    plain = [b'{"step":0}', b'{"step":1}', b'{"step":2}']  # no schedule (or one longer than 3 steps)
    assert schedule_conflict(plain, 3, None) is None and schedule_conflict(plain, 3, 10) is None
    assert "no scheduled checkpoint in its first 3 steps" in schedule_conflict(plain, 3, 3)
    assert schedule_conflict([], 0, 5) is None


@pytest.fixture(scope="module")
def unscheduled(tiny_build_copy):
    """The tiny recipe built with no checkpoint schedule (it has no [checkpoint]): the session's build."""
    return tiny_build_copy("ckpt-plain")[0]


def test_checkpoints_never_change_the_bits(uninterrupted, unscheduled):
    a = (unscheduled / "model" / "model.safetensors").read_bytes()
    assert a == (uninterrupted / "model" / "model.safetensors").read_bytes()
    import json

    lines = [json.loads(x) for x in (uninterrupted / "transcript.jsonl").read_text().splitlines()]
    assert all("checkpoint" in x for x in lines)  # every scheduled checkpoint is in the hash chain
    lines = [json.loads(x) for x in (unscheduled / "transcript.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and not any("checkpoint" in x for x in lines)  # the last step's is not
    assert build_json(unscheduled)["training"]["checkpoints_written"] == 1  # after the last step


def test_interrupted_after_training_resumes_after_the_last_step(uninterrupted, unscheduled, store, tmp_path):
    """With no schedule and no stage cache read (--no-cache), a build interrupted after training still
    resumes after its last step: every build checkpoints that step (not in the transcript)."""
    out = tmp_path / "b"
    env = {**os.environ, "PROVENANCE_STORE": str(store)}
    cmd = [sys.executable, "-m", "provenance", "build", str(TINY), "--out", str(out), "--no-cache"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not any(out.glob(".staging-*/transcript.jsonl")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the build finished before the signal arrived")
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert "its newest checkpoint" in err and "(after optimizer step 12 of 12)" in err, err
    assert [f.name for f in (out / "checkpoint").glob("step-*.safetensors")] == ["step-000000012.safetensors"]
    p = run_cli("build", str(TINY), "--out", str(out), "--no-cache", store=store)
    assert p.returncode == 0, p.stderr
    assert "resuming from" in p.stderr and build_json(out)["training"]["resumed_after_step"] == 12
    assert re.search(r"^stage one: 8 steps, .* \(trained before the resume\)$", p.stderr, re.MULTILINE), p.stderr
    assert "written by other code" not in p.stderr and "resumed_from_code" not in build_json(out)["training"]
    weights = "model/model.safetensors"
    assert (out / weights).read_bytes() == (uninterrupted / weights).read_bytes()
    assert (out / "transcript.jsonl").read_bytes() == (unscheduled / "transcript.jsonl").read_bytes()
    assert not (out / "checkpoint").exists()


def test_resume_keeps_what_was_kept_for_replay(uninterrupted, store, tmp_path):
    """A build that keeps its scheduled checkpoints for replay, resumed without keeping them, would delete
    them: refused, nothing deleted. One that did not keep them, resumed keeping them, says which are gone."""
    out = tmp_path / "kept"
    proc = _start(out, store, ["--keep-checkpoints"])
    assert _wait_for_step(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    kept = sorted((out / "checkpoint").glob("step-*.safetensors"))
    assert len(kept) >= 3
    p = run_cli("build", str(TINY), "--out", str(out), "--checkpoint-every", "1", "--no-cache", store=store)
    assert p.returncode == 2 and "keeps its scheduled checkpoints for replay" in p.stderr, p.stderr
    assert "would delete them" in p.stderr and "--keep-checkpoints" in p.stderr and "Traceback" not in p.stderr
    assert sorted((out / "checkpoint").glob("step-*.safetensors")) == kept
    p = run_cli("build", str(TINY), "--out", str(out), "--checkpoint-every", "1", "--no-cache", "--keep-checkpoints",
                store=store)
    assert p.returncode == 0, p.stderr
    assert len(list((out / "replay").glob("step-*.safetensors"))) == 12
    assert build_json(out)["training"]["checkpoints_kept_for_replay"] == 12
    _same_as_uninterrupted(out, uninterrupted)

    out = tmp_path / "not-kept"
    proc = _start(out, store)
    assert _wait_for_step(out, 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    p = run_cli("build", str(TINY), "--out", str(out), "--checkpoint-every", "1", "--no-cache", "--keep-checkpoints",
                store=store)
    assert p.returncode == 0, p.stderr
    assert "did not keep its scheduled checkpoints for replay" in p.stderr and "are gone" in p.stderr, p.stderr
    n = build_json(out)["training"]["checkpoints_kept_for_replay"]
    # killed at step k >= 5: the keep=2 newest survive (3 if the kill came between a write and the pruning
    # of the oldest), then the resume keeps steps k+1..12
    assert 2 <= n <= 3 + 12 - 5 and len(list((out / "replay").glob("step-*.safetensors"))) == n
    _same_as_uninterrupted(out, uninterrupted)


def test_interrupted_after_training_loses_no_checkpoint(uninterrupted, store, tmp_path):
    """The scheduled checkpoints kept for replay stay in OUT/checkpoint/ until the build is installed:
    interrupted while it evaluates, audits or signs (its staging removed), the build resumes after its
    last step, not from the start. A build killed inside the install leaves `.old-*` outputs, which the
    next build removes (they are not 'files this tool did not write')."""
    out = tmp_path / "b"
    proc = _start(out, store, ["--keep-checkpoints"])
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not any(out.glob(".staging-*/replay")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the build finished before the signal arrived")
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert "the build stopped after training; its newest checkpoint" in err and "(after optimizer step 12 of 12)" in err
    assert not list(out.glob(".staging-*")) and not (out / "build.json").exists()
    assert len(list((out / "checkpoint").glob("step-*.safetensors"))) == 12
    (out / ".old-model-0123abcd").mkdir()
    (out / ".old-model-0123abcd" / "model.safetensors").write_bytes(b"left by a killed install")
    p = run_cli("build", str(TINY), "--out", str(out), "--checkpoint-every", "1", "--no-cache", "--keep-checkpoints",
                store=store)
    assert p.returncode == 0, p.stderr
    assert build_json(out)["training"]["resumed_after_step"] == 12
    assert build_json(out)["training"]["checkpoints_kept_for_replay"] == 12
    assert len(list((out / "replay").glob("step-*.safetensors"))) == 12
    assert not (out / ".old-model-0123abcd").exists()
    _same_as_uninterrupted(out, uninterrupted)


def test_a_resume_by_other_code_is_said_and_recorded(uninterrupted, store, tmp_path):
    """The resume identity leaves out this tool's own code (an edit must not throw away days of
    training), so a checkpoint written by other code is resumed, with a warning, and build.json
    (signed by the attestation) records both code digests. The other code is simulated by
    rewriting the checkpoint's recorded code digest; its tensors and state are untouched."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    code = build_json(uninterrupted)["training"]["code"]
    assert len(code) == 64 and "resumed_from_code" not in build_json(uninterrupted)["training"]
    out = tmp_path / "b"
    proc = _start(out, store)
    reached = _wait_for_step(out, 4, proc)
    proc.send_signal(signal.SIGKILL) if proc.poll() is None else None
    proc.communicate(timeout=60)
    if not reached or (out / "build.json").exists():
        pytest.fail("the build finished or stalled before step 4")
    newest = max((out / "checkpoint").glob("step-*.safetensors"))
    with safe_open(str(newest), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["code"] == code
    save_file(tensors, str(newest), metadata={**meta, "code": "0" * 64})
    p = run_cli("build", str(TINY), "--out", str(out), "--checkpoint-every", "1", "--no-cache", store=store)
    assert p.returncode == 0, p.stderr
    assert f"{newest.name} was written by other code of this tool (code digest {'0' * 16}" in p.stderr, p.stderr
    rec = build_json(out)["training"]
    assert rec["resumed_from_code"] == "0" * 64 and rec["code"] == code and rec["resumed_after_step"] is not None
    _same_as_uninterrupted(out, uninterrupted)
