"""Exit codes are a contract: bad files under compare and diverge, unexpected exceptions, the plan
of the LaaM recipe, and recipes that try to write outside their directories through build."""

from __future__ import annotations

import json
import shutil

import pytest

from ..conftest import RECIPES, TINY, run_cli


@pytest.fixture(scope="module")
def tiny_build(tiny_build_copy):
    return tiny_build_copy("robust")[0]


def test_build_refuses_a_filename_that_escapes(store, tmp_path):
    recipe = tmp_path / "sub" / "r.toml"
    recipe.parent.mkdir()
    recipe.write_text(TINY.read_text().replace('license = "GPL-2.0-only"',
                                               'license = "GPL-2.0-only"\nfilename = "../../ESCAPED.txt"', 1))
    p = run_cli("build", str(recipe), "--out", str(tmp_path / "o"), store=store)
    assert p.returncode == 2 and "inputs[0]" in p.stderr and "filename" in p.stderr
    assert not list(tmp_path.rglob("ESCAPED.txt")) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["truncated-weights", "weights-not-safetensors", "negative-shape",
                                    "fingerprint-not-json", "fingerprint-a-list"])
def test_compare_on_damaged_builds_is_exit_2(tiny_build, tmp_path, damage):
    b = tmp_path / "b"
    shutil.copytree(tiny_build, b)
    if damage == "truncated-weights":
        w = b / "model" / "model.safetensors"
        w.write_bytes(w.read_bytes()[:100])
    elif damage == "weights-not-safetensors":
        (b / "model" / "model.safetensors").write_bytes(b"\xff" * 64)
    elif damage == "negative-shape":
        w = b / "model" / "model.safetensors"
        raw = w.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"] = [-1] + header[name]["shape"][1:]
        h = json.dumps(header).encode()
        w.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])
    elif damage == "fingerprint-not-json":
        (b / "fingerprint.json").write_text("{not json")
    else:
        (b / "fingerprint.json").write_text("[1, 2]")
    first, second = (b, tiny_build) if damage.startswith("fingerprint") else (tiny_build, b)
    p = run_cli("compare", str(first), str(second), "--json")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and json.loads(p.stdout)["ok"] is False


@pytest.mark.parametrize("content", ["[1, 2, 3]\n", "null\n", '"a string"\n', "{}\n{}\n"])
def test_diverge_on_lines_that_are_not_transcript_objects(tiny_build, tmp_path, content):
    t = tmp_path / "t.jsonl"
    t.write_text(content)
    p = run_cli("diverge", str(tiny_build / "transcript.jsonl"), str(t))
    assert p.returncode == 2 and "Traceback" not in p.stderr and str(t) in p.stderr, p.stderr


def test_two_empty_transcripts_are_not_identical(tmp_path):
    (tmp_path / "a").write_text("")
    (tmp_path / "b").write_text("")
    p = run_cli("diverge", str(tmp_path / "a"), str(tmp_path / "b"))
    assert p.returncode == 2 and "empty transcript" in p.stderr


def test_unexpected_exception_is_exit_2_internal_error(monkeypatch, capsys, tmp_path):
    from provenance import _cli as cli

    def boom(args):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(cli, "cmd_check", boom)
    code = cli.main(["check-recipe", str(TINY)])
    err = capsys.readouterr().err
    assert code == 2 and "internal error: RuntimeError: simulated bug; rerun with --debug" in err
    assert "Traceback" not in err
    code = cli.main(["check-recipe", str(TINY), "--json"])
    out = capsys.readouterr().out
    assert code == 2 and json.loads(out) == {"ok": False, "error": json.loads(out)["error"], "exit_code": 2}


def test_keygen_failure_leaves_no_orphan(monkeypatch, tmp_path):
    import os

    from provenance.attest import sign
    from provenance.errors import InputError

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "link", fail)
    with pytest.raises(InputError, match="cannot write the key pair"):
        sign.keygen(tmp_path / "keys", name="k")
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == []


def test_laam_recipe_plan_fits_with_its_micro_batches():
    p = run_cli("check-recipe", "--plan", "--no-probe", str(RECIPES / "laam-linux-1.0-5m.toml"), "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    plan = json.loads(p.stdout)["plan"]
    s1 = plan["stages"][0]
    # Flash attention and the chunked loss: LaaM's batch of 64 in micro-batches of 16 within 2 GiB
    # (eager attention and full logits needed about 37 GiB at once, 5.4 GiB at micro-batches of 8).
    assert s1["batch_size"] == 64 and s1["micro_batch"] == 16 and s1["memory_bytes"] < 2 << 30
    assert plan["fits"] and plan["parameters"] == 4_662_336


def test_the_plan_times_a_step_as_the_build_runs_it_with_one_time_costs_apart(tmp_path):
    """The timed probe (builder/probe.py) runs each stage's micro-steps and the optimizer steps after a
    warm-up it reports apart; each stage's time is its steps times the step's (tiny: explicit steps)."""
    p = run_cli("check-recipe", "--plan", str(TINY), "--store", str(tmp_path / "store"), "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    plan = json.loads(p.stdout)["plan"]
    pr = plan["probe"]
    assert pr["stage"] == "one" and len(pr["optimizer_step_seconds"]) == 2
    assert {name: len(times) for name, times in pr["micro_step_seconds"].items()} == {"one": 3, "two": 3}
    assert pr["one_time_seconds"] == pytest.approx(pr["setup_seconds"] + pr["warmup_seconds"])
    one, two = plan["stages"]
    assert one["seconds_per_step"] == pytest.approx(pr["seconds_per_step"])  # the probe's own stage
    assert one["seconds_per_step"] == pytest.approx(4 * pr["seconds_per_micro_step"]["one"]  # 4 micro-batches of 1
                                                    + pr["seconds_per_optimizer_step"])
    assert one["hours"] == pytest.approx(8 * one["seconds_per_step"] / 3600)
    # stage two: two micro-batches of its own shape (1 x 32 tokens), timed itself, and the same optimizer step
    assert two["seconds_per_step"] == pytest.approx(2 * pr["seconds_per_micro_step"]["two"]
                                                    + pr["seconds_per_optimizer_step"])
    assert two["hours"] == pytest.approx(4 * two["seconds_per_step"] / 3600)


@pytest.mark.parametrize("command", ["build", "replay", "audit"])
@pytest.mark.parametrize("threads", ["0", "5000"])
def test_a_thread_count_out_of_range_is_refused_before_any_work(command, threads, tiny_build, tmp_path):
    target = [str(TINY), "--out", str(tmp_path / "o")] if command == "build" else [str(tiny_build), "--key",
                                                                                   str(tmp_path / "none.pub")]
    p = run_cli(command, *target, "--threads", threads)
    assert p.returncode == 2 and f"--threads must be between 1 and 4096, got {threads}" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "o").exists()


def test_a_named_output_file_that_is_not_a_regular_file_is_never_replaced(tiny_build, store, tmp_path):
    """A file is written by a rename, which replaces whatever has the name: run as root, `report --out
    /dev/full` had replaced the device with a regular file. A FIFO, a directory or a link is refused."""
    import os
    import stat

    fifo, d, target, link, afile = (tmp_path / n for n in ("fifo", "dir", "target.html", "link.html", "afile"))
    os.mkfifo(fifo)
    d.mkdir()
    target.write_text("mine")
    link.symlink_to(target)
    afile.write_text("x")
    cases = {fifo: "exists and is a device, FIFO or socket", d: "exists and is a directory",
             link: "exists and is a symbolic link", afile / "x.html": "a component of the path is a file"}
    for out, why in cases.items():
        for argv in (("report", str(tiny_build), "--out", str(out)),
                     ("sbom", str(tiny_build), "--format", "spdx3", "--out", str(out))):
            p = run_cli(*argv)
            assert p.returncode == 2 and f"--out {out}: {why}" in p.stderr, (argv, p.stderr)
            assert "Traceback" not in p.stderr and "internal error" not in p.stderr
    # refused before the rebuild, not after it
    p = run_cli("gate", "--recipe", str(TINY), "--junit", str(fifo), "--out", str(tmp_path / "g"), store=store)
    assert p.returncode == 2 and f"--junit {fifo}: exists and is a device, FIFO or socket" in p.stderr, p.stderr
    p = run_cli("publish", str(tiny_build), "--key", str(tmp_path / "k.pub"), "--out", str(afile / "pub"))
    assert p.returncode == 2 and f"--out {afile / 'pub'}: {afile} is not a writable directory" in p.stderr, p.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and d.is_dir() and not any(d.iterdir())
    assert link.is_symlink() and target.read_text() == "mine" and afile.read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["afile", "dir", "fifo", "link.html", "target.html"]
