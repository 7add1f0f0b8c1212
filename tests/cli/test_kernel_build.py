"""A build with our attention kernels, `attn_implementation = "small-head"` and `"tiled"`: the same bits
twice, the kernel recorded in build.json, stock transformers loads the result, and a missing compiler
stops the build before any input is fetched (exit 2, the compiler named)."""

from __future__ import annotations

import json

import pytest

from ..conftest import TINY, build_json, run_cli

# tiny.toml with heads of dimension 2 (16 / 8) sharing 2 key/value heads, as LaaM's; and with heads of
# dimension 16 (32 / 2) sharing one, for "tiled"
SHAPES = {"small-head": {"num_attention_heads = 2": "num_attention_heads = 8",
                         "num_key_value_heads = 1": "num_key_value_heads = 2"},
          "tiled": {"hidden_size = 16": "hidden_size = 32"}}
HEADS = {"small-head": 8, "tiled": 2}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def recipe(request, tmp_path_factory):
    text = TINY.read_text().replace('attn_implementation = "sdpa"', f'attn_implementation = "{request.param}"')
    for old, new in SHAPES[request.param].items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}.toml"
    path.write_text(text)
    return path


def test_builds_twice_to_the_same_bits(recipe, store, tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        p = run_cli("build", str(recipe), "--out", str(out), "--no-cache", store=store)
        assert p.returncode == 0, p.stderr
        outs.append(out)
    a, b = (build_json(o) for o in outs)
    assert a["weights"] == b["weights"]
    assert (outs[0] / "transcript.jsonl").read_bytes() == (outs[1] / "transcript.jsonl").read_bytes()
    name = recipe.stem.removeprefix("tiny-")
    att = a["training"]["attention"]
    assert att["implementation"] == name and "-ffp-contract=off" in att["flags"]
    assert len(att["source"]["sha256"]) == 64 and len(att["library"]["sha256"]) == 64 and att["compiler"]
    assert att["header"]["name"] == "kernel_exp.h" and len(att["header"]["sha256"]) == 64
    assert list((store / "kernels").glob(f"{name}-attention-*.so"))
    # the model dir is a stock Llama: transformers loads it with its own attention
    cfg = json.loads((outs[0] / "model" / "config.json").read_text())
    assert name not in json.dumps(cfg)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(outs[0] / "model"))
    assert model.config.num_attention_heads == HEADS[name]


def test_a_missing_compiler_stops_the_build_first(recipe, tmp_path):
    out, store = tmp_path / "out", tmp_path / "empty-store"
    p = run_cli("build", str(recipe), "--out", str(out), store=store, env={"CC": "/nonexistent/cc"})
    assert p.returncode == 2, p.stderr
    assert "no C compiler '/nonexistent/cc' was found" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists() and not (store / "blobs").exists()  # nothing fetched, nothing written
