"""Portable mode (builder/portable.py): the tiny recipe with `[determinism] portable = true` gives the
same weights and transcript under every ATen kernel level this CPU has, the ordinary tiny recipe
does not; a rounding log that does not fit the build is caught; rebuild follows the reference's log."""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import pytest
import torch

from ..conftest import ROOT, TINY, build_json, run_cli

PORTABLE = ROOT / "tests" / "recipes" / "tiny-portable.toml"
NATIVE = torch.backends.cpu.get_cpu_capability()
LEVELS = ["default", "avx2"] + (["avx512"] if NATIVE == "AVX512" else [])


@pytest.fixture(scope="module")
def builds(store, keys, tmp_path_factory, tiny_at_level):
    """The portable tiny recipe under every level (the first one makes the log, the others follow
    it), and the ordinary tiny recipe under the first two (the session's builds)."""
    base = tmp_path_factory.mktemp("portable")
    outs = {}
    for i, level in enumerate(LEVELS):
        out = base / f"portable-{level}"
        follow = ["--rounding-log", str(outs["portable-default"] / "transcript.jsonl")] if i else []
        p = run_cli("build", str(PORTABLE), "--out", str(out), "--key", str(keys / "k.key"), "--no-cache",
                    "--cpu-capability", level, *follow, store=store)
        assert p.returncode == 0, (level, p.stderr[-3000:])
        outs[f"portable-{level}"] = out
    for level in ("default", "avx2"):
        outs[f"ordinary-{level}"] = tiny_at_level(level)
    return outs


def weights(out: Path) -> str:
    return build_json(out)["weights"]["tensors"]["digest"]


def b3(path: Path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


def test_portable_weights_and_transcripts_are_identical_across_kernel_levels(builds):
    ref = builds["portable-default"]
    for level in LEVELS:
        out = builds[f"portable-{level}"]
        rec = build_json(out)
        assert rec["determinism"]["cpu_capability"] == level.upper()
        assert rec["determinism"]["portable"] is True
        assert weights(out) == weights(ref), level
        assert b3(out / "model" / "model.safetensors") == b3(ref / "model" / "model.safetensors"), level
        assert b3(out / "transcript.jsonl") == b3(ref / "transcript.jsonl"), level
    made = build_json(ref)["training"]["portable"]
    followed = build_json(builds["portable-avx2"])["training"]["portable"]
    assert made["values_logged"] > 0 and made["rounding_log_from"] is None
    assert followed["values_logged"] == made["values_logged"]
    assert followed["rounding_log_from"] == {"blake3": b3(ref / "transcript.jsonl")}


def test_the_ordinary_recipe_differs_across_kernel_levels(builds):
    assert weights(builds["ordinary-default"]) != weights(builds["ordinary-avx2"])


def test_portable_weights_are_float32_and_the_log_is_in_the_signed_transcript(builds):
    from safetensors import safe_open

    out = builds["portable-default"]
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    lines = [json.loads(x) for x in (out / "transcript.jsonl").read_text().splitlines()]
    logged = sum(len(v) for rec in lines for part in rec.get("rounding", {}).values() for v in part.values())
    assert logged == build_json(out)["training"]["portable"]["values_logged"]
    st = json.loads(__import__("base64").b64decode(
        json.loads((out / "attestation.intoto.jsonl").read_text().splitlines()[0])["payload"]))
    signed = {b["name"]: b["digest"]["blake3"] for b in st["predicate"]["runDetails"]["byproducts"]}
    assert signed["transcript.jsonl"] == b3(out / "transcript.jsonl")
    assert st["predicate"]["buildDefinition"]["internalParameters"]["training"]["portable"]["values_logged"] == logged


def _rechained(lines: list[dict]) -> bytes:
    """Transcript bytes with the hash chain recomputed (a forger's log that parses)."""
    from provenance.builder.transcript import Transcript

    t = Transcript()
    for rec in lines:
        t.append({k: v for k, v in rec.items() if k != "prev"})
    return t.to_bytes()


def _forged(builds, tmp_path, edit) -> Path:
    lines = [json.loads(x) for x in (builds["portable-default"] / "transcript.jsonl").read_text().splitlines()]
    edit(lines)
    path = tmp_path / "forged.jsonl"
    path.write_bytes(_rechained(lines))
    return path


def _first_step_entry(lines):
    for rec in lines:
        step = rec.get("rounding", {}).get("step")
        if step:
            name = min(step)
            return step, name
    raise AssertionError("the tiny portable build logged no step entry")


def test_a_rounding_log_value_that_is_no_neighbour_fails_the_build(builds, store, tmp_path):
    def edit(lines):
        step, name = _first_step_entry(lines)
        step[name][0][1] = "3f800000"  # 1.0: not a float32 neighbour of what the build computes there
    p = run_cli("build", str(PORTABLE), "--out", str(tmp_path / "out"), "--no-cache", "--rounding-log",
                str(_forged(builds, tmp_path, edit)), store=store)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "the rounding log does not fit this build" in p.stderr and "forged.jsonl" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out" / "model").exists()


def test_a_rounding_log_value_at_an_index_far_from_a_boundary_fails_the_build(builds, store, tmp_path):
    """A key holder's log may decide only values that lie near a rounding boundary: one forced at any
    other index (even to a float32 neighbour) would steer a bit per element per step."""
    def edit(lines):
        step, name = _first_step_entry(lines)
        taken = {i for i, _ in step[name]}
        far = next(i for i in range(max(taken) + 1, max(taken) + 1000) if i not in taken)
        step[name] = sorted([*step[name], [far, step[name][0][1]]])
    p = run_cli("build", str(PORTABLE), "--out", str(tmp_path / "out"), "--no-cache", "--rounding-log",
                str(_forged(builds, tmp_path, edit)), store=store)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "farther than twice the margin" in p.stderr and "a log may only decide values near one" in p.stderr


def test_a_rounding_log_entry_never_reached_fails_the_build(builds, store, tmp_path):
    def edit(lines):
        lines[-1].setdefault("rounding", {}).setdefault("step", {})["no.such.tensor"] = [[0, "00000000"]]
    p = run_cli("build", str(PORTABLE), "--out", str(tmp_path / "out"), "--no-cache", "--rounding-log",
                str(_forged(builds, tmp_path, edit)), store=store)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "never reached" in p.stderr and "no.such.tensor" in p.stderr


def test_rounding_log_misuse_is_refused_before_training(builds, store, tmp_path):
    log = builds["portable-default"] / "transcript.jsonl"
    p = run_cli("build", str(TINY), "--out", str(tmp_path / "a"), "--rounding-log", str(log), store=store)
    assert p.returncode == 2 and "is not a portable recipe" in p.stderr and "--rounding-log" in p.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(log.read_bytes().replace(b'"stage":"one"', b'"stage":"One"', 1))
    p = run_cli("build", str(PORTABLE), "--out", str(tmp_path / "b"), "--rounding-log", str(broken), store=store)
    assert p.returncode == 2 and "hash chain broken" in p.stderr and str(broken) in p.stderr
    bad = _forged(builds, tmp_path, lambda lines: lines[0]["rounding"].__setitem__("later", {}))
    p = run_cli("build", str(PORTABLE), "--out", str(tmp_path / "c"), "--rounding-log", str(bad), store=store)
    assert p.returncode == 2 and "rounding keys are 'init' and 'step'" in p.stderr
    for out in ("a", "b", "c"):
        assert not (tmp_path / out).exists()


@pytest.mark.parametrize("edit, field", [
    (lambda t: t.replace('name = "two"\n', 'name = "two"\nprecision = "bf16-autocast"\n'), "stages[1].precision"),
    (lambda t: t.replace('attn_implementation = "sdpa"', 'attn_implementation = "eager"'), "model.attn_implementation"),
    (lambda t: t.replace("portable = true", 'portable = true\nsdpa_backend = "flash"'), "determinism.sdpa_backend"),
])
def test_a_portable_recipe_with_float32_only_parts_is_refused(tmp_path, edit, field):
    recipe = tmp_path / "r.toml"
    recipe.write_text(edit(PORTABLE.read_text()))
    p = run_cli("build", str(recipe), "--out", str(tmp_path / "out"))
    assert p.returncode == 2 and field in p.stderr and "portable mode" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_rebuild_of_a_portable_build_on_another_level_is_bitwise_and_follows_the_signed_log(builds, keys, store,
                                                                                           tmp_path):
    ref = builds["portable-default"]
    out = tmp_path / "rebuild"
    p = run_cli("rebuild", str(ref / "attestation.intoto.jsonl"), "--attestation-key", str(keys / "k.pub"),
                "--out", str(out), "--key", str(keys / "k.key"), "--cpu-capability", "avx2", "--json", store=store)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["result"] == "reproduced (bitwise)", res
    assert res["stack"].startswith("portable build"), res["stack"]
    assert build_json(out)["training"]["portable"]["rounding_log_from"] == {"blake3": b3(ref / "transcript.jsonl")}
    assert b3(out / "transcript.jsonl") == b3(ref / "transcript.jsonl")


def test_a_portable_build_with_checkpoints_replays_bitwise(store, keys, builds, tmp_path):
    # checkpoints hold the float64 training copy; a replayed segment follows the signed transcript's log
    out = tmp_path / "kept"
    p = run_cli("build", str(PORTABLE), "--out", str(out), "--key", str(keys / "k.key"), "--checkpoint-every", "2",
                "--keep-checkpoints", "--no-cache", "--cpu-capability", "avx2", store=store)
    assert p.returncode == 0, p.stderr[-2000:]
    assert weights(out) == weights(builds["portable-default"])
    p = run_cli("replay", str(out), "--key", str(keys / "k.pub"), "--segments", "2", "--json", store=store)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rep = json.loads(p.stdout)
    assert rep["ok"] and [s["verdict"] for s in rep["segments"]] == ["bitwise"] * 2


def test_a_rounding_log_index_outside_the_tensor_fails_the_build(builds, store, tmp_path):
    def edit(lines):
        lines[0].setdefault("rounding", {})["init"] = {"lm_head.weight": [[10 ** 9, "00000000"]]}
    p = run_cli("build", str(PORTABLE), "--out", str(tmp_path / "out"), "--no-cache", "--rounding-log",
                str(_forged(builds, tmp_path, edit)), store=store)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "lm_head.weight has" in p.stderr and "names index 1000000000" in p.stderr and "initial weights" in p.stderr


@pytest.mark.parametrize("level", ["default", "avx512"])
def test_the_committed_portable_reference_rebuilds_bitwise_on_this_machine(store, tmp_path, level):
    """attestations/tiny-portable.intoto.jsonl was built on another machine (docs/reproducibility.md
    names it; `make reference RECIPE=tests/recipes/tiny-portable.toml` regenerates it): every machine
    the suite runs on rebuilds it, following its signed rounding log, to the same bits. The rebuild runs
    at ATen's `default` level, so the stack differs from the reference's (AVX2) even on its own machine,
    and, where the CPU has AVX-512, at `avx512` too (ATen's and MKL's AVX-512 kernels, which the machine
    that made the reference lacks)."""
    if level not in (lv.lower() for lv in LEVELS):
        pytest.skip(f"this CPU offers no {level} (ATen's level here: {NATIVE})")
    ref = ROOT / "attestations" / "tiny-portable.intoto.jsonl"
    out = tmp_path / "rebuild"
    p = run_cli("rebuild", str(ref), "--attestation-key", str(ROOT / "attestations" / "keys" / "tiny-portable.pub"),
                "--out", str(out), "--cpu-capability", level, "--json", store=store)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["result"] == "reproduced (bitwise)", res
    signed = json.loads(__import__("base64").b64decode(json.loads(ref.read_text().splitlines()[0])["payload"]))
    logged = {b["name"]: b["digest"]["blake3"] for b in signed["predicate"]["runDetails"]["byproducts"]}
    assert b3(out / "transcript.jsonl") == logged["transcript.jsonl"]
    assert build_json(out)["training"]["portable"]["rounding_log_from"] == {"blake3": logged["transcript.jsonl"]}
    assert build_json(out)["determinism"]["cpu_capability"] == level.upper()
