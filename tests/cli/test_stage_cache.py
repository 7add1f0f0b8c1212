"""The stage cache: a recipe that changes only its last stage reuses the earlier stages' outputs and
gives the same bits as a full build; hits are recorded in build.json and the signed statement; a
damaged entry is never served; --no-cache trains everything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ..conftest import TINY, build_json, run_cli


def _payload(out):
    import base64

    env = json.loads((out / "attestation.intoto.jsonl").read_text().splitlines()[0])
    return json.loads(base64.b64decode(env["payload"]))


@pytest.fixture(scope="module")
def cache_store(tmp_path_factory, store):
    """A store of its own (the inputs copied from the session's), so hits come from this module only."""
    import shutil

    own = tmp_path_factory.mktemp("cache-store") / "store"
    if store.is_dir():
        shutil.copytree(store, own, ignore=shutil.ignore_patterns("stages", "tmp"))
    return own


@pytest.fixture(scope="module")
def variants(tmp_path_factory, cache_store):
    base = tmp_path_factory.mktemp("stage-cache")
    last_changed = base / "tiny-last.toml"  # only stage "two" differs
    last_changed.write_text(TINY.read_text().replace("lr = 1e-3", "lr = 2e-3"))
    outs = {}
    for label, recipe, extra in (("first", TINY, []), ("last-changed", last_changed, []),
                                 ("last-changed-full", last_changed, ["--no-cache"]),
                                 ("again", TINY, [])):
        out = base / label
        p = run_cli("build", str(recipe), "--out", str(out), *extra, store=cache_store)
        assert p.returncode == 0, (label, p.stderr[-3000:])
        outs[label] = (out, p)
    return outs


def _hits(out):
    return [s["hit"] for s in build_json(out)["training"]["stage_cache"]["stages"]]


def test_changing_the_last_stage_reuses_the_first_and_equals_a_full_build(variants):
    cached, p = variants["last-changed"]
    full, _ = variants["last-changed-full"]
    assert _hits(cached) == [True, False] and "stage cache: reusing the output of stages up to 'one'" in p.stderr
    said = {line.split(":")[0]: line for line in p.stderr.splitlines() if line.startswith("stage ")}
    assert said["stage one"].endswith("(from the stage cache)") and "cache" not in said["stage two"], said
    assert _hits(full) == [False, False]
    for name in ("model/model.safetensors", "transcript.jsonl", "fingerprint.json"):
        assert (cached / name).read_bytes() == (full / name).read_bytes(), name
    first = variants["first"][0]
    assert (cached / "model/model.safetensors").read_bytes() != (first / "model/model.safetensors").read_bytes()
    # The first stage's key is the same in both recipes, the second's is not.
    k_first = [s["key"] for s in build_json(first)["training"]["stage_cache"]["stages"]]
    k_cached = [s["key"] for s in build_json(cached)["training"]["stage_cache"]["stages"]]
    assert k_first[0] == k_cached[0] and k_first[1] != k_cached[1]


def test_a_full_hit_is_recorded_in_the_signed_statement(variants):
    first, again = variants["first"][0], variants["again"][0]
    assert _hits(first) == [False, False] and _hits(again) == [True, True]
    assert (again / "model/model.safetensors").read_bytes() == (first / "model/model.safetensors").read_bytes()
    assert (again / "transcript.jsonl").read_bytes() == (first / "transcript.jsonl").read_bytes()
    training = _payload(again)["predicate"]["buildDefinition"]["internalParameters"]["training"]
    assert [s["hit"] for s in training["stage_cache"]["stages"]] == [True, True]


def test_the_statement_with_cache_hits_verifies(variants, signing_key):
    again = variants["again"][0]
    pub = signing_key.with_suffix(".pub")
    p = run_cli("verify", str(again / "attestation.intoto.jsonl"), "--model", str(again / "model"),
                "--key", str(pub))
    assert p.returncode == 0, p.stdout + p.stderr


def test_a_damaged_entry_is_removed_and_rebuilt_not_served(variants, cache_store, tmp_path):
    first = variants["first"][0]
    keys = [s["key"] for s in build_json(first)["training"]["stage_cache"]["stages"]]
    entries = [cache_store / "stages" / f"{k}.safetensors" for k in keys]
    assert all(e.is_file() for e in entries)
    data = bytearray(entries[1].read_bytes())
    data[-3] ^= 0x01  # one bit of the transcript at the end of the file
    entries[1].write_bytes(bytes(data))
    out = tmp_path / "o"
    p = run_cli("build", str(TINY), "--out", str(out), store=cache_store)
    assert p.returncode == 0, p.stderr
    assert f"stage cache: removing {entries[1].name}" in p.stderr
    assert _hits(out) == [True, False]  # stage one from the cache, stage two trained again
    assert (out / "model/model.safetensors").read_bytes() == (first / "model/model.safetensors").read_bytes()
    assert entries[1].is_file()  # rewritten by the build


def test_a_build_kept_for_replay_trains_every_stage(cache_store, tmp_path):
    """The cache holds each stage's output, not the checkpoints between: a build asked to keep them for
    replay trains every stage (one that came from the cache kept none, silently)."""
    first = tmp_path / "first"
    p = run_cli("build", str(TINY), "--out", str(first), "--checkpoint-every", "2", store=cache_store)
    assert p.returncode == 0, p.stderr
    kept = tmp_path / "kept"
    p = run_cli("build", str(TINY), "--out", str(kept), "--checkpoint-every", "2", "--keep-checkpoints",
                store=cache_store)
    assert p.returncode == 0, p.stderr
    assert "stage cache: not read" in p.stderr
    rec = build_json(kept)["training"]
    assert rec["stage_cache"]["read"] is False and _hits(kept) == [False, False]
    assert rec["checkpoints_kept_for_replay"] == len(list((kept / "replay").glob("step-*.safetensors"))) == 6
    assert (kept / "model/model.safetensors").read_bytes() == (first / "model/model.safetensors").read_bytes()
    again = tmp_path / "again"  # the entries are there: a build that does not keep checkpoints reads them
    p = run_cli("build", str(TINY), "--out", str(again), "--checkpoint-every", "2", store=cache_store)
    assert p.returncode == 0, p.stderr
    assert _hits(again) == [True, True] and build_json(again)["training"]["stage_cache"]["read"] is True


def test_the_code_digest_covers_the_c_kernel(tmp_path):
    """Our kernels' C sources are a recipe's numerics: an edit to one, or to the header they share,
    must miss the cache, as an edit to any Python source does (before, only *.py files were hashed)."""
    import shutil

    from provenance._internal import codedigest

    pkg = Path(codedigest.__file__).resolve().parent.parent
    copy = tmp_path / "provenance"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert codedigest.tree_digest(copy) == codedigest.code_digest()
    kernel = copy / "builder" / "small_head_attention.c"
    kernel.write_text(kernel.read_text().replace("#define W 16 ", "#define W 8 "))
    edited = codedigest.tree_digest(copy)
    assert edited != codedigest.code_digest()
    # and the header both kernels include (their exponential)
    header = copy / "builder" / "kernel_exp.h"
    header.write_text(header.read_text().replace("splat(-87.0f)", "splat(-88.0f)"))
    assert codedigest.tree_digest(copy) != edited
