"""Recipes and arguments that try to write outside their directories, smuggle options into pip,
or hold values the build cannot survive: each is refused at load time with exit 2, naming the field."""

from __future__ import annotations

import os

import pytest

from .conftest import TINY, run_cli

BASE = TINY.read_text()


def with_input_field(field: str, value: str) -> str:
    return BASE.replace('license = "GPL-2.0-only"', f'license = "GPL-2.0-only"\n{field} = {value}', 1)


CASES = {
    "filename-escapes-work-dir": (with_input_field("filename", '"../../ESCAPED.txt"'), "inputs[0]", "filename"),
    "filename-absolute": (with_input_field("filename", '"/tmp/ESCAPED.txt"'), "inputs[0]", "filename"),
    "filename-hidden": (with_input_field("filename", '".bashrc"'), "inputs[0]", "filename"),
    "package-is-a-pip-option": (BASE.replace('package = "ethtool"', 'package = "-r/etc/passwd#"'), "inputs[0]",
                                "package"),
    "package-with-space": (BASE.replace('package = "ethtool"', 'package = "ethtool --index-url http://x"'),
                           "inputs[0]", "package"),
    "version-trailing-newline": (BASE.replace('version = "0.15"', 'version = "0.15\\n"'), "inputs[0]", "version"),
    "lr-infinite": (BASE.replace("lr = ", "lr = inf #", 1), "stages[0].lr", "finite"),
    "dimension-huge": (BASE.replace("hidden_size = 16", "hidden_size = 1000000000000"), "model.hidden_size",
                       "less than or equal"),
    "integer-wider-than-64-bits": (BASE.replace("seed = 1234", "seed = 36893488147419103232"),
                                   "determinism.seed", "less than"),
    "evaluate-seed-beyond-2-53": (BASE.replace("[evaluate]", "[evaluate]\nseed = 9007199254740993", 1),
                                  "evaluate.seed", "less than or equal"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_recipe_is_refused_at_load(name, tmp_path):
    text, where, what = CASES[name]
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    p = run_cli("check-recipe", str(recipe))
    assert p.returncode == 2, p.stdout + p.stderr
    assert where in p.stderr and what in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_url_whose_name_is_dotdot_needs_a_filename(tmp_path):
    text = BASE.replace('kind = "pypi"\npackage = "ethtool"\nversion = "0.15"', 'kind = "url"\nurl = "https://example.org/a/.."')
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    p = run_cli("check-recipe", str(recipe))
    assert p.returncode == 2 and "not a plain file name; set 'filename'" in p.stderr, p.stderr


def test_warmup_longer_than_the_stage_is_refused(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(BASE.replace("warmup_steps = ", "warmup_steps = 100000 #", 1)
                      if "warmup_steps" in BASE else BASE.replace("lr = ", "warmup_steps = 100000\nlr = ", 1))
    p = run_cli("check-recipe", str(recipe))
    assert p.returncode == 2 and "warmup_steps" in p.stderr, p.stderr


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_recipe_that_is_not_a_regular_file(kind, tmp_path):
    path = tmp_path / "r.toml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", path)
    else:
        path.mkdir()
    p = run_cli("check-recipe", str(path))
    assert p.returncode == 2 and "not a regular file" in p.stderr, p.stderr


def test_keygen_name_cannot_leave_the_directory(tmp_path):
    p = run_cli("keygen", str(tmp_path / "keys"), "--name", "../outside")
    assert p.returncode == 2 and "--name" in p.stderr
    assert not (tmp_path / "outside.key").exists() and not (tmp_path / "outside.pub").exists()


def test_keygen_writes_the_public_key_first_and_never_half(tmp_path):
    d = tmp_path / "keys"
    p = run_cli("keygen", str(d), "--name", "k")
    assert p.returncode == 0
    assert sorted(x.name for x in d.iterdir()) == ["k.key", "k.pub"]
    assert oct(os.stat(d / "k.key").st_mode & 0o777) == "0o600"
    p = run_cli("keygen", str(d), "--name", "k")
    assert p.returncode == 2 and "already exists" in p.stderr
