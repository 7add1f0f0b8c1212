"""Spot-check replay: a build kept for replay passes when its segments are re-executed, and each kind
of tampering a dishonest builder could try is caught: a checkpoint rewritten with other weights (its
own digest made consistent), a damaged checkpoint, a forged transcript line and a swapped data
order (both re-chained and signed again with the builder's own key, as a dishonest builder can)."""

from __future__ import annotations

import base64
import json
import shutil

import blake3
import pytest

from ..conftest import TINY, build_json, run_cli


@pytest.fixture(scope="module")
def kept(store, tmp_path_factory, signing_key):
    out = tmp_path_factory.mktemp("replay") / "b"
    p = run_cli("build", str(TINY), "--out", str(out), "--checkpoint-every", "2", "--keep-checkpoints", "--no-cache",
                store=store)
    assert p.returncode == 0, p.stderr
    return out


def _replay(build, store, *extra):
    import os

    pub = os.environ["PROVENANCE_KEY"].removesuffix(".key") + ".pub"
    p = run_cli("replay", str(build), "--key", pub, "--json", *extra, store=store)
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else None), p.stderr


def _copy(kept, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(kept, dst)
    return dst


def _resign(build, transcript: bytes):
    """What a dishonest builder can do: write a transcript of its choice and sign it with its own key."""
    import os

    from provenance.attest.sign import envelope_line, load_signer, sign_envelope
    from provenance.attest.statement import PAYLOAD_TYPE, canonical

    (build / "transcript.jsonl").write_bytes(transcript)
    env = json.loads((build / "attestation.intoto.jsonl").read_text().splitlines()[0])
    st = json.loads(base64.b64decode(env["payload"]))
    for b in st["predicate"]["runDetails"]["byproducts"]:
        if b["name"] == "transcript.jsonl":
            b["digest"] = {"blake3": blake3.blake3(transcript).hexdigest(),
                           "sha256": __import__("hashlib").sha256(transcript).hexdigest()}
    signer = load_signer(os.environ["PROVENANCE_KEY"])
    envelope = sign_envelope(canonical(st), PAYLOAD_TYPE, [signer])
    (build / "attestation.intoto.jsonl").write_bytes(envelope_line(envelope))


def _rechain(records: list[dict]) -> bytes:
    from provenance.builder.transcript import Transcript

    t = Transcript()
    for rec in records:
        t.append({k: v for k, v in rec.items() if k != "prev"})
    return t.to_bytes()


def test_an_honest_build_replays_bitwise(kept, store):
    code, rep, err = _replay(kept, store, "--segments", "6")
    assert code == 0, err
    assert rep["ok"] and [s["verdict"] for s in rep["segments"]] == ["bitwise"] * 6
    assert rep["points"] == [0, 2, 4, 6, 8, 10, 12] and rep["fraction_replayed"] == 1.0
    seeds = [rep["seed"]]
    code, rep, err = _replay(kept, store, "--segments", "2", "--seed", "7")
    assert code == 0 and rep["replayed_steps"] == 4 and rep["fraction_replayed"] == pytest.approx(4 / 12)
    assert rep["seed"] == 7
    # Without --seed the choice is drawn at verification time (a builder cannot know which segments will
    # be checked) and printed, so the same choice can be made again: the first replay drew one too.
    code, rep, err = _replay(kept, store, "--segments", "1")
    assert code == 0, err
    seeds.append(rep["seed"])
    assert all(isinstance(x, int) for x in seeds) and seeds[0] != seeds[1], seeds
    assert build_json(kept)["training"]["checkpoints_kept_for_replay"] == 6


def test_a_rewritten_checkpoint_is_caught(kept, store, tmp_path):
    from provenance.builder import checkpoint as ckpt
    from provenance.builder.transcript import Transcript

    b = _copy(kept, tmp_path)
    path = b / "replay" / "step-000000004.safetensors"
    c = ckpt.read_file(path, None)
    name = next(k for k in c.tensors if k.startswith("model/") and c.tensors[k].dtype.is_floating_point)
    c.tensors[name] = c.tensors[name] + 0.01
    t = Transcript(list(c.transcript_lines), c.transcript_prev)
    ckpt.write_file(path, c.tensors, c.state, t, ckpt.state_digest(c.tensors, c.state), "forged")
    code, rep, _ = _replay(b, store, "--segments", "6")
    assert code == 1 and not rep["ok"]
    bad = [s for s in rep["segments"] if s["verdict"] == "failed"]
    assert [s["start"] for s in bad] == [4]
    assert "is not the one the signed transcript records for step 4" in bad[0]["reasons"][0]


def test_a_damaged_checkpoint_is_caught(kept, store, tmp_path):
    b = _copy(kept, tmp_path)
    path = b / "replay" / "step-000000006.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    code, rep, _ = _replay(b, store, "--segments", "6")
    assert code == 1
    bad = [s for s in rep["segments"] if s["verdict"] == "failed"]
    assert [s["start"] for s in bad] == [6] and "step-000000006.safetensors" in bad[0]["reasons"][0]


def test_a_forged_transcript_line_is_caught(kept, store, tmp_path):
    b = _copy(kept, tmp_path)
    records = [json.loads(x) for x in (b / "transcript.jsonl").read_text().splitlines()]
    records[9]["loss"] = float.fromhex(records[9]["loss"]).__mul__(0.5).hex()  # step 9 claims a lower loss
    _resign(b, _rechain(records))
    code, rep, _ = _replay(b, store, "--segments", "6")
    assert code == 1
    seg = next(s for s in rep["segments"] if s["start"] == 8)
    assert seg["verdict"] == "failed" and "step 9" in seg["reasons"][0] and "loss" in seg["reasons"][0]


def test_a_swapped_data_order_is_caught(kept, store, tmp_path):
    b = _copy(kept, tmp_path)
    records = [json.loads(x) for x in (b / "transcript.jsonl").read_text().splitlines()]
    records[2]["samples"], records[3]["samples"] = records[3]["samples"], records[2]["samples"]
    _resign(b, _rechain(records))
    code, rep, _ = _replay(b, store, "--segments", "6")
    assert code == 1
    seg = next(s for s in rep["segments"] if s["start"] == 2)
    assert seg["verdict"] == "failed" and "samples" in seg["reasons"][0]


def test_an_unsigned_transcript_change_is_refused_before_replaying(kept, store, tmp_path):
    b = _copy(kept, tmp_path)
    with open(b / "transcript.jsonl", "ab") as f:
        f.write(b"\n")
    code, rep, err = _replay(b, store)
    assert code == 1 and "is not the one the attestation signs" in err


def test_a_build_without_kept_checkpoints_says_how_to_keep_them(store, tmp_path, tiny_build_copy):
    out, _ = tiny_build_copy("plain")  # a build without --keep-checkpoints
    code, _, err = _replay(out, store)
    assert code == 2 and "--keep-checkpoints" in err and "Traceback" not in err
    code, _, err = _replay(tmp_path / "nowhere", store)
    assert code == 2 and "not a build directory" in err


def test_a_build_whose_checkpoints_were_not_kept_says_so(kept, store, tmp_path):
    """Scheduled checkpoints in the transcript, none kept: only the first segment can be re-executed."""
    b = _copy(kept, tmp_path)
    shutil.rmtree(b / "replay")
    code, _, err = _replay(b, store, "--segments", "2")
    assert code == 2 and "were not kept for replay" in err and "--keep-checkpoints" in err and "Traceback" not in err
    code, rep, err = _replay(b, store, "--segments", "1")
    assert code == 0, err
    assert [s["start"] for s in rep["segments"]] == [0]


def test_scheduled_checkpoints_of_an_interrupted_run_are_kept_for_replay(tmp_path):
    """A resumed build keeps the scheduled checkpoints its killed predecessor wrote (the rehearsal
    lost 32 of 131 before this was fixed), and prunes only the others."""
    import torch

    from provenance.builder import checkpoint as ckpt
    from provenance.builder.transcript import Transcript

    d = tmp_path / "checkpoint"
    d.mkdir()
    for name in ("step-000000002.safetensors", "step-000000003.safetensors"):  # an earlier run's
        (d / name).write_bytes(b"x")
    cp = ckpt.Checkpointer(d, "id", every_steps=2, every_minutes=None, keep=1, keep_scheduled=True)
    state = ckpt.State(0, 5, 5, 1, 0, 1.0, 1.0, 0, 0, 0.0, [])
    cp.write({"t": torch.zeros(2)}, state, Transcript(), "digest")
    assert sorted(p.name for p in d.iterdir()) == ["step-000000002.safetensors", "step-000000005.safetensors"]
    cp.keep_scheduled = False
    cp.write({"t": torch.zeros(2)}, ckpt.State(0, 6, 6, 1, 0, 1.0, 1.0, 0, 0, 0.0, []), Transcript(), "digest")
    assert sorted(p.name for p in d.iterdir()) == ["step-000000006.safetensors"]


def test_checkpoint_disk_preflight_bounds_what_a_build_keeps(kept, tmp_path):
    """The disk a build's checkpoints will take is judged before its first step: the estimate covers
    the files a real build kept for replay (and not by much more), and too little room is refused
    with what to change."""
    from safetensors import safe_open

    from provenance.builder.checkpoint import bytes_needed
    from provenance.builder.pipeline import check_checkpoint_disk
    from provenance.errors import InputError

    files = sorted((kept / "replay").glob("step-*.safetensors"))
    record = build_json(kept)
    n_params, total = record["model"]["parameters"], record["training"]["steps"]
    with safe_open(str(files[-1]), "pt") as f:
        names = f.keys()
        n_tensors = sum(k.startswith("model/") for k in names)
        windows = max(f.get_slice("data/order").get_shape()[0], 1)
    need, n, each = bytes_needed(n_params, n_tensors, windows, total, 0, 2, keep=2, replay=True)
    rolling = 3 * each
    actual = sum(f.stat().st_size for f in files)
    assert n == len(files) == 6
    assert actual <= need - rolling <= 1.5 * actual, (actual, need - rolling)
    assert max(f.stat().st_size for f in files) <= each
    # resumed after step 7: only the scheduled ones after it (8, 10, 12) are still to come
    assert bytes_needed(n_params, n_tensors, windows, total, 7, 2, keep=2, replay=True)[1] == 3
    assert bytes_needed(n_params, n_tensors, windows, total, 0, 2, keep=2, replay=False)[1] == 0

    check_checkpoint_disk(tmp_path, n_params, n_tensors, windows, total, 0, 2, 2, True, free=need)
    with pytest.raises(InputError) as e:
        check_checkpoint_disk(tmp_path, n_params, n_tensors, windows, total, 0, 2, 2, True, free=need - 1)
    assert "6 kept for replay (one every 2 steps" in str(e.value) and "--checkpoint-every" in str(e.value)
    with pytest.raises(InputError) as e:
        check_checkpoint_disk(tmp_path, n_params, n_tensors, windows, total, 0, 2, 2, False, free=rolling - 1)
    assert "newest 3 checkpoints need about" in str(e.value) and "replay" not in str(e.value)


def test_across_stacks_the_segment_end_is_the_signed_one(kept, tmp_path):
    """On another stack replay measures the re-executed weights against the segment's end: that end must
    be what the signed transcript records (a kept checkpoint's digest, or the final weights' tensor digest
    as its last parameter digest), or the measurement is against files anyone could have put there
    (round three, 8). A rewritten ending checkpoint, its own digest made consistent, is refused."""
    from transformers import AutoModelForCausalLM

    from provenance.builder import checkpoint as ckpt
    from provenance.builder.transcript import Transcript, read
    from provenance.repro.replay import Segment, _judge_end
    from provenance.verify.policy import Bounds

    b = _copy(kept, tmp_path)
    lines = read(b / "transcript.jsonl")
    model = AutoModelForCausalLM.from_pretrained(b / "model")
    seg = Segment(len(lines) - 2, len(lines))
    verdict, reasons = _judge_end(seg, model, b / "replay", b, Bounds(), ckpt, lines)
    assert verdict == "within tolerance", reasons  # the signed end, measured against the final weights
    path = b / "replay" / f"step-{seg.end:09d}.safetensors"
    c = ckpt.read_file(path, None)
    name = next(k for k in c.tensors if k.startswith("model/") and c.tensors[k].dtype.is_floating_point)
    c.tensors[name] = c.tensors[name] + 0.01
    t = Transcript(list(c.transcript_lines), c.transcript_prev)
    ckpt.write_file(path, c.tensors, c.state, t, ckpt.state_digest(c.tensors, c.state), "forged")
    verdict, reasons = _judge_end(seg, model, b / "replay", b, Bounds(), ckpt, lines)
    assert verdict == "failed" and "is not the one the signed transcript records" in reasons[0], reasons
