"""Real builds of the tiny recipe through the CLI: same bits on rebuild and across thread counts."""

from __future__ import annotations

import json
import os

import blake3
import pytest

from provenance._internal.hashing import canonical_json, merkle_root, tensor_digest

from ..conftest import RECIPES, TINY, build_json, last_line, run_cli


@pytest.fixture(scope="module")
def builds(store, tmp_path_factory, tiny_build_copy):
    """The tiny recipe three times: threads 2 (the session's plain build, --no-cache), threads 1, and
    threads 2 again with the C allocator and PyTorch's NaN fill of new tensors left at their defaults
    (builder/allocator.py), in a process started from nothing: the other two are forked from the tests'
    fork server (tests/forkserver.py), whose builds this holds to the bits of a process of its own."""
    base = tmp_path_factory.mktemp("tiny")
    outs = {"t2": tiny_build_copy("tiny-t2")}
    for label, extra in (("t1", ["--threads", "1"]), ("t2-again", [])):
        out = base / label
        env = {"PROVENANCE_MALLOC_DEFAULTS": "1", "PROVENANCE_NAN_FILL": "1"} if label == "t2-again" else None
        p = run_cli("build", str(TINY), "--out", str(out), "--no-cache", *extra, store=store, env=env,
                    fresh=label == "t2-again")
        assert p.returncode == 0, p.stderr
        outs[label] = (out, p)
    return outs


def test_last_line_is_the_weights_digest(builds):
    out, p = builds["t2"]
    line = last_line(p.stdout)
    assert line.startswith("weights blake3:") and len(line.split(":")[1]) == 64
    assert line.split(":")[1] == tensor_digest(out / "model" / "model.safetensors")
    assert line.split(":")[1] == build_json(out)["weights"]["tensors"]["digest"]
    rec = build_json(out)["recitation"]
    assert f"recitation: {rec['exact']}/{rec['windows']} windows reproduced exactly" in p.stdout


def test_one_parameter_digest_everywhere(builds):
    """The transcript's last parameter digest is the saved weights' blake3-tensors-v1 digest."""
    out, _ = builds["t2"]
    last = json.loads((out / "transcript.jsonl").read_text().splitlines()[-1])
    assert last["params"] == tensor_digest(out / "model" / "model.safetensors")


def test_rebuild_thread_count_and_allocator_give_identical_bits(builds):
    digests = {k: last_line(p.stdout) for k, (out, p) in builds.items()}
    assert len(set(digests.values())) == 1, digests
    allocator = {k: build_json(out)["training"]["allocator"] for k, (out, _) in builds.items()}
    assert allocator["t2"] == {"malloc": "glibc", "mmap_threshold": 256 << 20, "trim_threshold": 1 << 30,
                               "nan_fill": "off"}, allocator
    assert allocator["t2-again"] == {"malloc": "unchanged (PROVENANCE_MALLOC_DEFAULTS=1)",
                                     "nan_fill": "unchanged (PROVENANCE_NAN_FILL=1)"}, allocator
    files = {k: (out / "model" / "model.safetensors").read_bytes() for k, (out, _) in builds.items()}
    assert files["t2"] == files["t1"] == files["t2-again"]
    transcripts = {k: (out / "transcript.jsonl").read_bytes() for k, (out, _) in builds.items()}
    assert transcripts["t2"] == transcripts["t1"]
    assert build_json(builds["t1"][0])["determinism"]["threads"] == 1
    assert build_json(builds["t2"][0])["determinism"]["threads"] == 2


def test_other_seed_gives_other_weights(builds, tiny_other_seed):
    _, p = tiny_other_seed
    assert last_line(p.stdout).startswith("weights blake3:")
    assert last_line(p.stdout) != last_line(builds["t2"][1].stdout)


def test_build_record_and_manifest(builds):
    out, _ = builds["t2"]
    rec = build_json(out)
    assert rec["inputs"][0]["sha256"] == "567260ea5805063bbcff71dabd6fb820f89bc84f720e9ebe315c7eef1449d908"
    assert rec["determinism"]["deterministic_algorithms"] is True and rec["determinism"]["seed"] == "1234"
    assert set(rec["weights"]["files"]) == {"config.json", "generation_config.json", "model.safetensors",
                                            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                            "README.md"}
    tok = (out / "model" / "tokenizer.json").read_bytes()
    assert rec["tokenizer"]["tokenizer.json"]["blake3"] == blake3.blake3(tok).hexdigest()
    assert rec["toolchain"]["installed"]["torch"].startswith("2.13.0")
    m = json.loads((out / "dataset-manifest.json").read_text())
    paths = [(f["input"], f["path"]) for f in m["files"]]
    assert paths == sorted(paths) and len(paths) == 3
    assert {f["license"] for f in m["files"]} == {"GPL-2.0-only"}
    leaves = [canonical_json(f) for f in m["files"]]
    assert m["merkle_root"]["digest"] == merkle_root(leaves) == rec["dataset_manifest"]["merkle_root"]["digest"]
    assert rec["dataset_manifest"]["blake3"] == blake3.blake3((out / "dataset-manifest.json").read_bytes()).hexdigest()


def test_transcript_is_hash_chained(builds):
    out, _ = builds["t2"]
    lines = (out / "transcript.jsonl").read_bytes().splitlines()
    assert len(lines) == 12  # 8 + 4 steps
    prev = "0" * 64
    for line in lines:
        rec = json.loads(line)
        assert rec["prev"] == prev
        float.fromhex(rec["loss"])
        prev = blake3.blake3(line).hexdigest()
    assert build_json(out)["training"]["transcript_head"] == prev


def test_pipeline_loads_and_generates(builds):
    from transformers import pipeline

    out, _ = builds["t2"]
    gen = pipeline("text-generation", model=str(out / "model"))
    text = gen("struct etherinfo", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("struct etherinfo") and len(text) > len("struct etherinfo")


def _flip(hex_digest: str) -> str:
    return ("1" if hex_digest[0] == "0" else "0") + hex_digest[1:]


@pytest.mark.parametrize("algo", ["sha256", "blake3"])
def test_wrong_pin_exits_2_names_both_digests_and_writes_nothing(tmp_path, algo):
    text = TINY.read_text()
    good = text.split(f'{algo} = "')[1].split('"')[0]
    bad = _flip(good)
    recipe = tmp_path / "tiny-bad.toml"
    recipe.write_text(text.replace(good, bad))
    store = tmp_path / "empty-store"
    out = tmp_path / "out"
    p = run_cli("build", str(recipe), "--out", str(out), store=store)
    assert p.returncode == 2, p.stderr
    assert f"expected {algo}:{bad}" in p.stderr and f"got {algo}:{good}" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (out / "model").exists() and not (out / "build.json").exists()
    assert not list((store / "blobs").glob("*")) if (store / "blobs").exists() else True


def test_manifest_root_pin_mismatch_exits_2(store, tmp_path):
    recipe = tmp_path / "tiny-root.toml"
    recipe.write_text(TINY.read_text().replace('include = ["ethtool-0.15/python-ethtool/etherinfo*.h"]',
                                               'include = ["ethtool-0.15/python-ethtool/etherinfo*.h"]\n'
                                               f'manifest_root = "{"ab" * 32}"'))
    p = run_cli("build", str(recipe), "--out", str(tmp_path / "out"), store=store)
    assert p.returncode == 2 and "dataset.manifest_root" in p.stderr and "ab" * 32 in p.stderr
    assert not (tmp_path / "out" / "model").exists()


def test_laam_offline_stops_with_a_clear_message(tmp_path):
    p = run_cli("build", str(RECIPES / "laam-linux-1.0-5m.toml"), "--offline", "--out", str(tmp_path / "o"),
                store=tmp_path / "empty")
    assert p.returncode == 2
    assert "linux-1.0.tar.gz" in p.stderr and "--input linux=PATH" in p.stderr
    assert "014cc3ea69a3db6a483eb743e3140e0e45a4a8c168c59f8c3b090cd72ab01802" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "o" / "model").exists()


def test_toolchain_mismatch_stops_unless_allowed(store, tmp_path):
    recipe = tmp_path / "tiny-old-torch.toml"
    recipe.write_text(TINY.read_text().replace('torch = "2.13.0"', 'torch = "2.3.1"'))
    p = run_cli("build", str(recipe), "--out", str(tmp_path / "a"), store=store)
    assert p.returncode == 2
    assert "toolchain.torch: pinned 2.3.1, installed 2.13.0" in p.stderr
    assert not (tmp_path / "a" / "model").exists()
    p = run_cli("build", str(recipe), "--out", str(tmp_path / "b"), "--allow-toolchain-mismatch", store=store)
    assert p.returncode == 0, p.stderr
    rec = build_json(tmp_path / "b")["toolchain"]
    assert rec["mismatch_allowed"] is True and rec["mismatches"]["torch"]["pinned"] == "2.3.1"


def test_plain_output_has_no_progress_bar_escapes(builds):
    _, p = builds["t2"]
    assert "\x1b[" not in p.stdout + p.stderr


def test_output_dir_inside_the_input_store_is_refused(store):
    """The store holds only entries named by their content (its fsck would not look at a build there)."""
    for out in (store / "mybuild", store, store / "stages" / "x"):
        p = run_cli("build", str(TINY), "--out", str(out), store=store)
        assert p.returncode == 2 and f"--out {out}: inside the input store {store}" in p.stderr, p.stderr
    assert not (store / "mybuild").exists() and not (store / "stages" / "x").exists()


def test_a_written_path_with_a_control_character_is_refused(store, tmp_path):
    """A newline in --out made a directory whose name broke every line that printed it."""
    cases = [("build", str(TINY), "--out", str(tmp_path / "a\nb")),
             ("publish", str(tmp_path), "--key", "k.pub", "--out", str(tmp_path / "p\tq")),
             ("keygen", str(tmp_path / "k\x7fz")),
             ("gate", "--recipe", str(TINY), "--junit", str(tmp_path / "j\rk.xml"))]
    for argv in cases:
        p = run_cli(*argv, store=store)
        assert p.returncode == 2 and "contains a control character" in p.stderr, (argv, p.stderr)
        assert "Traceback" not in p.stderr
    assert sorted(os.listdir(tmp_path)) == []


def test_output_dir_holds_exactly_one_build_and_json_is_one_object(store, tmp_path):
    """An earlier build's Sigstore bundle and VSA do not survive beside new weights; a directory
    holding files this tool did not write is refused before any work; model files are 0644. The build
    (offline: the store holds the pins) prints one JSON object with --json."""
    import os

    out = tmp_path / "out"
    out.mkdir()
    (out / "attestation.sigstore.json").write_text("{}")
    (out / "vsa.intoto.jsonl").write_text("{}")
    (out / "build.json").write_text("{}")
    p = run_cli("build", str(TINY), "--out", str(out), "--json", "--offline", store=store)
    assert p.returncode == 0, p.stderr
    obj = json.loads(p.stdout)
    assert obj["ok"] is True and obj["weights"] == "blake3:" + build_json(out)["weights"]["tensors"]["digest"], obj
    assert not (out / "attestation.sigstore.json").exists() and not (out / "vsa.intoto.jsonl").exists()
    assert oct(os.stat(out / "model" / "model.safetensors").st_mode & 0o777) == "0o644"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    p = run_cli("build", str(TINY), "--out", str(foreign), store=store)
    assert p.returncode == 2 and "did not write (thesis.tex)" in p.stderr, p.stderr
    assert sorted(x.name for x in foreign.iterdir()) == ["thesis.tex"]
    # names this tool writes, but no build.json: someone's own model dir, not replaced
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "model.safetensors").write_bytes(b"my own weights")
    p = run_cli("build", str(TINY), "--out", str(mine), store=store)
    assert p.returncode == 2 and "holds model but no build.json" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert (mine / "model" / "model.safetensors").read_bytes() == b"my own weights"
    assert sorted(x.name for x in mine.iterdir()) == ["model"]


def test_out_or_store_that_cannot_be_written_is_refused_first(store, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    p = run_cli("build", str(TINY), "--out", str(afile), store=store)
    assert p.returncode == 2 and "is not a directory" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("build", str(TINY), "--out", str(tmp_path / "o"), "--store", str(afile / "store"))
    assert p.returncode == 2 and "is not writable" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


def test_malformed_world_size_is_exit_2(store, tmp_path):
    p = run_cli("build", str(TINY), "--out", str(tmp_path / "o"), store=store, env={"WORLD_SIZE": "two"})
    assert p.returncode == 2 and "$WORLD_SIZE" in p.stderr and "Traceback" not in p.stderr


def test_tied_embeddings_build_and_verify(store, tmp_path):
    """tie_word_embeddings = true used to fail at save time, after all the training."""
    recipe = tmp_path / "tied.toml"
    recipe.write_text(TINY.read_text().replace("[model]\n", "[model]\ntie_word_embeddings = true\n", 1))
    out = tmp_path / "out"
    p = run_cli("build", str(recipe), "--out", str(out), store=store)
    assert p.returncode == 0, p.stderr
    from provenance._internal.safetensors import read_tensors

    names = set(read_tensors(out / "model" / "model.safetensors"))
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    last = json.loads((out / "transcript.jsonl").read_text().splitlines()[-1])
    assert last["params"] == tensor_digest(out / "model" / "model.safetensors")
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(str(out / "model"))
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_data_too_short_for_the_fingerprint_is_refused_before_training(store, tmp_path):
    recipe = tmp_path / "short.toml"
    recipe.write_text(TINY.read_text().replace("[reproducibility]", "[reproducibility]\neval_tokens = 100000", 1)
                      if "[reproducibility]" in TINY.read_text()
                      else TINY.read_text() + "\n[reproducibility]\neval_tokens = 100000\n")
    p = run_cli("build", str(recipe), "--out", str(tmp_path / "o"), store=store)
    assert p.returncode == 2 and "reproducibility.eval_tokens" in p.stderr and "checked before training" in p.stderr
    assert "train:" not in p.stderr and not (tmp_path / "o" / "model").exists()


def test_recipe_that_does_not_fit_in_memory_is_refused_before_fetching(tmp_path):
    recipe = tmp_path / "big.toml"
    text = TINY.read_text().replace("batch_size = ", "batch_size = 65536 #", 1).replace("micro_batch_size = 1\n", "", 1)
    text = text.replace("seq_len = ", "seq_len = 4096 #", 1).replace("max_position_embeddings = ",
                                                                     "max_position_embeddings = 4096 #", 1)
    recipe.write_text(text)
    p = run_cli("build", str(recipe), "--out", str(tmp_path / "o"), store=tmp_path / "empty-store")
    assert p.returncode == 2 and "not enough memory" in p.stderr and "micro_batch_size" in p.stderr, p.stderr
    assert not (tmp_path / "empty-store" / "blobs").exists()


def _bitwise_across_threads(recipe, store, tmp_path) -> list[str]:
    """Build `recipe` with threads 1 and 2 (no cache); assert equal weights and transcripts; the digests.
    (Two runs at one thread count agreeing is the weaker claim, and every module that builds the tiny
    recipe again makes it; a third build here cost 6 s of the suite's budget for nothing new.)"""
    digests = []
    for i, threads in enumerate(("1", "2")):
        p = run_cli("build", str(recipe), "--out", str(tmp_path / f"o{i}"), "--threads", threads, "--no-cache",
                    store=store)
        assert p.returncode == 0, p.stderr
        digests.append(last_line(p.stdout))
    assert len(set(digests)) == 1, digests
    t = [(tmp_path / f"o{i}" / "transcript.jsonl").read_bytes() for i in range(2)]
    assert t[0] == t[1]
    return digests


def test_gradient_accumulation_is_bitwise_across_threads(builds, store, tmp_path):
    """micro_batch_size 2 of batch_size 4: the same bits for threads 1 and 2; the
    micro-batches are summed in a fixed order, which is not the order of one batch (docs/recipe.md)."""
    recipe = tmp_path / "acc.toml"
    recipe.write_text(TINY.read_text().replace("micro_batch_size = 1\n", "micro_batch_size = 2\n", 1))
    _bitwise_across_threads(recipe, store, tmp_path)


def test_flash_attention_and_chunked_loss_are_bitwise_across_threads(store, tmp_path, tiny_build_copy):
    """LaaM's fast path (SDPA's flash kernel, the fused chunked loss, float32): the same bits for threads
    1 and 2, and not the bits of the full-logits path (the choice is the recipe's)."""
    recipe = tmp_path / "fast.toml"
    text = TINY.read_text().replace('seq_len = 64\n', 'seq_len = 64\ncross_entropy = "chunked"\ncross_entropy_chunk = '
                                                      '64\n', 1)
    recipe.write_text(text.replace("threads = 2\n", 'threads = 2\nsdpa_backend = "flash"\n', 1))
    digests = _bitwise_across_threads(recipe, store, tmp_path)
    _, p = tiny_build_copy("tiny-plain")  # the session's plain tiny build: sdpa default, full logits
    assert p.returncode == 0 and last_line(p.stdout) != digests[0]
