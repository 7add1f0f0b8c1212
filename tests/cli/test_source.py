"""The corresponding-source archive (issue 37): `provenance source` writes the same bytes for two builds
of one recipe (and for the recipe alone), `verify-attestation --source` holds an archive to the build's
provenance or to its own signed statement and names the part that is wrong, and `provenance rebuild
--from-source` rebuilds from the archive alone, with no network and no store, to the same bits."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import blake3
import pytest

from ..conftest import TINY, build_json, last_line, run_cli


def _pub() -> Path:
    return Path(os.environ["PROVENANCE_KEY"].removesuffix(".key") + ".pub")


def _no_network() -> list[str]:
    """A command prefix that runs in a network namespace of its own (nothing reachable), where possible."""
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True) if shutil.which("unshare") else None
    return ["unshare", "-rn"] if probe is not None and probe.returncode == 0 else []


@pytest.fixture(scope="module")
def made(tiny_build_copy, keys, store, tmp_path_factory):
    """The session's tiny build, its archive (signed with the module's key), and the rebuild from that
    archive alone (a second build of the recipe) with its own archive."""
    out, _ = tiny_build_copy("source")
    d = tmp_path_factory.mktemp("archives")
    p = run_cli("source", str(out), "--out", str(d / "a.tar"), "--key", str(keys / "k.key"), "--json", store=store)
    assert p.returncode == 0, p.stderr
    rebuilt = d / "rebuilt"
    env = {**os.environ, "PROVENANCE_STORE": str(d / "no-store"), "HOME": str(d / "home")}

    rb = subprocess.run([*_no_network(), sys.executable, "-m", "provenance", "rebuild",
                         str(out / "attestation.intoto.jsonl"), "--attestation-key", str(_pub()),
                         "--from-source", str(d / "a.tar"), "--out", str(rebuilt),
                         "--key", os.environ["PROVENANCE_KEY"]],
                        capture_output=True, text=True, env=env, cwd=d)
    return out, d, json.loads(p.stdout), rb, rebuilt


def test_rebuild_from_source_alone_is_bitwise(made):
    out, d, _, rb, rebuilt = made
    assert rb.returncode == 0, rb.stderr[-3000:]
    assert "verdict: reproduced (bitwise)" in rb.stdout
    assert not (d / "no-store").exists()  # the user's store was never touched
    assert "input ethtool: handed" in rb.stderr  # from the archive, into an empty store
    assert build_json(rebuilt)["weights"]["files"] == build_json(out)["weights"]["files"]


def test_two_builds_give_one_archive(made, store):
    out, d, summary, rb, rebuilt = made
    assert rb.returncode == 0, rb.stderr[-3000:]
    p = run_cli("source", str(rebuilt), "--out", str(d / "b.tar"), store=store)
    assert p.returncode == 0, p.stderr
    assert (d / "a.tar").read_bytes() == (d / "b.tar").read_bytes()
    assert summary["sha256"] == hashlib.sha256((d / "b.tar").read_bytes()).hexdigest()
    # a recipe and its inputs are enough: no build needed, the same bytes
    p = run_cli("source", "--recipe", str(TINY), "--out", str(d / "c.tar"), "--offline", store=store)
    assert p.returncode == 0, p.stderr
    assert (d / "c.tar").read_bytes() == (d / "a.tar").read_bytes()
    with tarfile.open(d / "a.tar") as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    assert names[-1] == "tiny-source/SOURCE.json"  # the table of contents last, the rest in byte order
    assert names[:-1] == sorted(names[:-1], key=str.encode)
    assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" and m.mode == 0o644 for m in members)
    assert {"tiny-source/recipe/tiny.toml", "tiny-source/inputs/ethtool/ethtool-0.15.tar.gz",
            "tiny-source/code/locks/dev.lock", "tiny-source/code/provenance/builder/fixed_gemm.c",
            "tiny-source/licenses/GPL-2.0-only.txt", "tiny-source/licenses/MIT.txt",
            "tiny-source/licenses/Apache-2.0.txt"} <= set(names)


def _verify(*args: str) -> tuple[int, dict[str, dict]]:
    p = run_cli("verify", *args, "--json")
    return p.returncode, {c["check"]: c for c in json.loads(p.stdout)["checks"]}


def test_verify_source_passes_against_both_statements(made, keys):
    out, d, *_ = made
    code, checks = _verify(str(out / "attestation.intoto.jsonl"), "--key", str(_pub()), "--source", str(d / "a.tar"))
    assert code == 0 and checks["source-code"]["ok"] and checks["source-complete"]["ok"], checks
    code, checks = _verify(str(d / "a.tar.intoto.jsonl"), "--key", str(keys / "k.pub"), "--source", str(d / "a.tar"),
                           "--model", str(out / "model"))
    assert code == 0, checks
    assert checks["source-subject"]["ok"] and checks["model-files"]["ok"]


def _rewrite(src: Path, dst: Path, edit, *, retable: bool = True) -> None:
    """Copy the archive with `edit(files)` applied to its {path: bytes}; SOURCE.json re-listed unless
    `retable` is false (a forger who updates the table of contents, and one who does not)."""
    with tarfile.open(src) as tf:
        root = tf.getmembers()[0].name.split("/")[0]
        files = {m.name.split("/", 1)[1]: tf.extractfile(m).read() for m in tf.getmembers()}
    edit(files)
    if retable:
        table = {p: {"size": len(b), "blake3": blake3.blake3(b).hexdigest()} for p, b in files.items() if
                 p != "SOURCE.json"}
        toc = json.loads(files["SOURCE.json"])
        toc["files"] = dict(sorted(table.items()))
        files["SOURCE.json"] = (json.dumps(toc, indent=1, sort_keys=True) + "\n").encode()
    with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tf:
        for path in sorted(files):
            info = tarfile.TarInfo(f"{root}/{path}")
            info.size = len(files[path])
            tf.addfile(info, io.BytesIO(files[path]))


def _flip(files: dict, path: str) -> None:
    files[path] = files[path][:-1] + bytes([files[path][-1] ^ 1])


TAMPER = {
    "input changed": (lambda f: _flip(f, "inputs/ethtool/ethtool-0.15.tar.gz"), True, "source-inputs", "ethtool"),
    "recipe changed, table not": (lambda f: _flip(f, "recipe/tiny.toml"), False, "source-archive", "recipe/tiny.toml"),
    "code of another version": (lambda f: _flip(f, "code/provenance/builder/train.py"), True, "source-code",
                                "another version"),
    "code file added": (lambda f: f.__setitem__("code/provenance/extra.py", b"x = 1\n"), True, "source-code",
                        "another version"),
    "file added": (lambda f: f.__setitem__("notes.txt", b"hello\n"), True, "source-complete", "notes.txt"),
    "input added": (lambda f: f.__setitem__("inputs/more/x.tar.gz", b"x"), True, "source-inputs", "'more'"),
    "file beside an input": (lambda f: f.__setitem__("inputs/ethtool/x.txt", b"x"), True, "source-complete",
                             "inputs/ethtool/x.txt"),
    "licence removed": (lambda f: f.pop("licenses/GPL-2.0-only.txt"), True, "source-licences", "GPL-2.0-only"),
    "lock removed": (lambda f: f.pop("code/locks/dev.lock"), True, "source-lock", "absent"),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tampered_archive_fails_naming_the_part(made, case, tmp_path):
    out, d, *_ = made
    edit, retable, check, words = TAMPER[case]
    bad = tmp_path / "bad.tar"
    _rewrite(d / "a.tar", bad, edit, retable=retable)
    code, checks = _verify(str(out / "attestation.intoto.jsonl"), "--key", str(_pub()), "--source", str(bad))
    assert code == 1, checks
    assert not checks[check]["ok"] and words in checks[check]["detail"], checks[check]


def test_signed_statement_names_the_archive_it_signs(made, keys, tmp_path):
    out, d, *_ = made
    other = tmp_path / "a.tar"
    _rewrite(d / "a.tar", other, lambda f: _flip(f, "README.md"))
    shutil.copy(d / "a.tar.intoto.jsonl", tmp_path)
    code, checks = _verify(str(tmp_path / "a.tar.intoto.jsonl"), "--key", str(keys / "k.pub"), "--source", str(other))
    assert code == 1 and not checks["source-subject"]["ok"], checks
    p = run_cli("verify", str(d / "a.tar.intoto.jsonl"), "--key", str(keys / "k.pub"))
    assert p.returncode == 2 and "--source ARCHIVE" in p.stderr


def test_rebuild_refuses_an_archive_of_other_code(made, tmp_path):
    out, d, *_ = made
    bad = tmp_path / "bad.tar"
    _rewrite(d / "a.tar", bad, lambda f: _flip(f, "code/provenance/builder/train.py"))
    p = run_cli("rebuild", str(out / "attestation.intoto.jsonl"), "--attestation-key", str(_pub()),
                "--from-source", str(bad), "--out", str(tmp_path / "rb"))
    assert p.returncode == 1 and "source-code" in p.stderr and "another version" in p.stderr, p.stderr
    assert not (tmp_path / "rb").exists()  # refused before anything was written


def test_source_refuses_other_code_and_unshippable_inputs(made, store, tmp_path):
    out, d, *_ = made
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    record = build_json(copy)
    record["training"]["code"] = "0" * 64
    (copy / "build.json").write_text(json.dumps(record))
    p = run_cli("source", str(copy), "--out", str(tmp_path / "x.tar"), store=store)
    assert p.returncode == 2 and "recorded code digest 0000000000000000" in last_line(p.stderr), p.stderr
    for change, words in ((('license = "MIT"', 'license = "MIT"\nsource_bundle = false'), "source_bundle = false"),
                          (('license = "GPL-2.0-only"', 'license = "LicenseRef-proprietary"'),
                           "input 'ethtool' is licensed 'LicenseRef-proprietary'")):
        recipe = tmp_path / "r.toml"
        recipe.write_text(TINY.read_text().replace(*change))
        p = run_cli("source", "--recipe", str(recipe), "--out", str(tmp_path / "x.tar"), "--offline", store=store)
        assert p.returncode == 2 and words in p.stderr, p.stderr
        assert not (tmp_path / "x.tar").exists()


def test_build_writes_the_same_archive_and_names_it(made):
    """The build's own source.tar is `provenance source`'s archive: signed as a byproduct, referenced by
    both SBOMs by digest, bound to the model by source.intoto.jsonl, named by the model card."""
    out, d, *_ = made
    assert (out / "source.tar").read_bytes() == (d / "a.tar").read_bytes()
    src = build_json(out)["source"]
    assert src["file"] == "source.tar" and src["sha256"] == hashlib.sha256((d / "a.tar").read_bytes()).hexdigest()
    cdx = json.loads((out / "sbom.cdx.json").read_text())
    refs = cdx["metadata"]["component"]["externalReferences"]
    assert [(r["type"], r["url"]) for r in refs] == [("source-distribution", "source.tar")]
    assert {"alg": "SHA-256", "content": src["sha256"]} in refs[0]["hashes"]
    graph = json.loads((out / "sbom.spdx3.json").read_text())["@graph"]
    pkg = next(o for o in graph if o.get("name") == "source.tar")
    assert any(h["hashValue"] == src["sha256"] for h in pkg["verifiedUsing"])
    assert any(o.get("relationshipType") == "generates" and o.get("from") == pkg["spdxId"] for o in graph)
    card = (out / "model" / "README.md").read_text()
    assert "## Corresponding source" in card and "GPL-2.0 §3" in card and "--from-source source.tar" in card
    code, checks = _verify(str(out / "source.intoto.jsonl"), "--key", str(_pub()), "--source", str(out / "source.tar"),
                           "--model", str(out / "model"))
    assert code == 0, checks


def test_publish_ships_the_source_or_its_signed_pointer(made, tmp_path):
    out, *_ = made
    p = run_cli("publish", str(out), "--out", str(tmp_path / "pub"), "--key", str(_pub()), "--json")
    assert p.returncode == 0, p.stderr
    done = json.loads(p.stdout)
    assert done["checks"]["corresponding source"]["result"] == "verified"
    assert (tmp_path / "pub" / ".provenance" / "source.tar").read_bytes() == (out / "source.tar").read_bytes()
    p = run_cli("publish", str(out), "--out", str(tmp_path / "small"), "--key", str(_pub()), "--source-max-bytes",
                "1000", "--json")
    assert p.returncode == 0, p.stderr
    assert "over --source-max-bytes 1,000" in json.loads(p.stdout)["source"]
    receipts = sorted(x.name for x in (tmp_path / "small" / ".provenance").iterdir())
    assert "source.intoto.jsonl" in receipts and "source.tar" not in receipts


def test_a_directory_input_is_shipped_as_its_files(keys, tmp_path):
    """A directory input goes into the archive as its files; the verifier recomputes its tree digest from
    them (no build needed: the signed statement of `provenance source --recipe` is enough)."""
    import re

    from provenance.inputs.store import tree_digest

    tree = tmp_path / "headers"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.h").write_text("/* SPDX-License-Identifier: MIT */\nint a;\n")
    (tree / "sub" / "b.h").write_text("int b;\n")
    digest = tree_digest(tree)["blake3"]
    text = re.sub(r"\[\[inputs\]\].*?(?=\n\[dataset\])",
                  f'[[inputs]]\nname = "hdrs"\nkind = "path"\npath = "headers"\nblake3 = "{digest}"\nlicense = "MIT"\n',
                  TINY.read_text(), count=1, flags=re.S)
    (tmp_path / "dir.toml").write_text(text)
    out = tmp_path / "dir.tar"
    p = run_cli("source", "--recipe", str(tmp_path / "dir.toml"), "--out", str(out), "--key", str(keys / "k.key"),
                store=tmp_path / "store")
    assert p.returncode == 0, p.stderr
    with tarfile.open(out) as tf:
        names = tf.getnames()
    assert "tiny-source/inputs/hdrs/a.h" in names and "tiny-source/inputs/hdrs/sub/b.h" in names
    code, checks = _verify(f"{out}.intoto.jsonl", "--key", str(keys / "k.pub"), "--source", str(out))
    assert code == 0 and "hdrs" in checks["source-inputs"]["detail"], checks
    bad = tmp_path / "bad.tar"
    _rewrite(out, bad, lambda f: _flip(f, "inputs/hdrs/sub/b.h"))
    shutil.copy(f"{out}.intoto.jsonl", f"{bad}.intoto.jsonl")
    code, checks = _verify(f"{bad}.intoto.jsonl", "--key", str(keys / "k.pub"), "--source", str(bad))
    assert code == 1 and not checks["source-subject"]["ok"], checks


def test_the_archive_goes_where_asked_or_is_refused_before_work(made, store, tmp_path):
    p = run_cli("source", "--recipe", str(TINY), "--out", str(tmp_path / "a" / "b" / "c.tar"), "--offline", store=store)
    assert p.returncode == 0 and (tmp_path / "a" / "b" / "c.tar").is_file(), p.stderr
    assert not [x for x in (tmp_path / "a" / "b").iterdir() if x.name != "c.tar"]  # no partial file left
    p = run_cli("source", "--recipe", str(TINY), "--out", "/proc/self/nope/c.tar", "--offline", store=store)
    assert p.returncode == 2 and last_line(p.stderr).startswith("error: --out /proc/self/nope/c.tar: "), p.stderr
    assert "Traceback" not in p.stderr
