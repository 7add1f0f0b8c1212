"""Recipe validation: shipped recipes validate; bad recipes list every problem with its path."""

from __future__ import annotations

import pytest

from provenance.errors import InputError
from provenance.recipe import load_recipe, parse_recipe

from .conftest import RECIPES, TINY, run_cli


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")) + [TINY], ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    loaded = load_recipe(path)
    assert loaded.recipe.inputs and all(i.sha256 or i.blake3 for i in loaded.recipe.inputs)
    assert len(loaded.digests["blake3"]) == 64


def test_laam_recipe_is_faithful():
    r = load_recipe(RECIPES / "laam-linux-1.0-5m.toml").recipe
    assert r.inputs[0].sha256 == "014cc3ea69a3db6a483eb743e3140e0e45a4a8c168c59f8c3b090cd72ab01802"
    assert (r.model.hidden_size, r.model.intermediate_size, r.model.num_hidden_layers) == (64, 256, 8)
    assert (r.model.num_attention_heads, r.model.num_key_value_heads, r.model.max_position_embeddings) == (32, 4, 512)
    assert r.tokenizer.vocab_size == 32768 and r.tokenizer.special_tokens[4] == "<|pad|>"
    assert [(s.lr, s.batch_size, s.epochs) for s in r.stages] == [(1e-3, 64, 100), (1e-4, 1, 100)]
    assert r.determinism.seed == 42 and r.output.license == "MIT"
    # Its CPU numerics (docs/benchmarks.md, "LaaM's shape"): recorded in the recipe, so in the attestation.
    assert [(s.precision, s.cross_entropy) for s in r.stages] == [("float32", "chunked")] * 2
    assert (r.model.attn_implementation, r.determinism.sdpa_backend) == ("small-head", "math")
    assert (r.determinism.kernels, r.determinism.cpu_capability) == ("fixed-order", "avx2")
    # Its audit has a control: files of the tree its suffix selection leaves out (Makefiles have no suffix).
    from fnmatch import fnmatch

    assert r.audit.control_include == ["**/Makefile"]
    assert not any(fnmatch("linux/kernel/makefile", pat.lower()) for pat in r.dataset.include)


BAD = """
[recipe]
name = "bad recipe!"
colour = "blue"

[[inputs]]
name = "src"
kind = "url"
url = "ftp://example.org/x.tar.gz"

[dataset]
include = []

[tokenizer]
vocab_size = 100
special_tokens = ["<pad>"]

[model]
hidden_size = 30
intermediate_size = 64
num_hidden_layers = 1
num_attention_heads = 4
num_key_value_heads = 4
max_position_embeddings = 64
bos_token = "<pad>"
eos_token = "<pad>"
pad_token = "<pad>"

[[stages]]
name = "s"
lr = -1.0
batch_size = 2
seq_len = 32

[determinism]
seed = 1

[toolchain]
torch = "2.13.0"
transformers = "5.23.0"
tokenizers = "0.23.3"

[output]
license = "MIT"
"""


def test_every_problem_is_reported_with_its_path(tmp_path):
    with pytest.raises(InputError) as e:
        parse_recipe(tmp_path / "bad.toml", BAD)
    msg = e.value.diagnostics()
    for expected in ("recipe.name", "recipe.colour: unknown field", "inputs[0]: ", "must be pinned",
                     "ftp://", "dataset.include", "tokenizer.vocab_size", "model: ", "hidden_size must be a multiple",
                     "stages[0].lr"):
        assert expected in msg, (expected, msg)
    assert str(tmp_path / "bad.toml") in msg.splitlines()[0]
    assert e.value.exit_code == 2


def test_stage_length_rules(tmp_path):
    text = TINY.read_text().replace("steps = 8", "steps = 8\nepochs = 2").replace("stride = 32", "stride = 99")
    with pytest.raises(InputError) as e:
        parse_recipe(tmp_path / "x.toml", text)
    msg = e.value.diagnostics()
    assert "stages[0]: set exactly one of 'epochs' or 'steps'; stride (99) must not exceed seq_len (64)" in msg


def test_cross_section_problems(tmp_path):
    text = TINY.read_text().replace('pad_token = "<|pad|>"', 'pad_token = "<pad>"').replace(
        "seq_len = 64", "seq_len = 128")
    with pytest.raises(InputError) as e:
        parse_recipe(tmp_path / "x.toml", text)
    msg = e.value.diagnostics()
    assert "model.pad_token: '<pad>' is not in tokenizer.special_tokens" in msg
    assert "stages[0].seq_len: 128 exceeds model.max_position_embeddings (64)" in msg


def test_not_toml(tmp_path):
    with pytest.raises(InputError, match="not valid TOML"):
        parse_recipe(tmp_path / "x.toml", "[recipe\nname=")


def test_cli_exit_2_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD)
    p = run_cli("check-recipe", str(bad))
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and "stages[0].lr" in p.stderr
    p = run_cli("check-recipe", str(tmp_path / "missing.toml"))
    assert p.returncode == 2 and "cannot read recipe" in p.stderr
