"""The input store: pins are checked on fetch and on use; a mismatch stores nothing."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import blake3
import pytest

from provenance.errors import DigestMismatch, FetchError
from provenance.inputs.store import Store, fetch_input, tree_digest
from provenance.recipe import Input


def pinned_file(tmp_path: Path, data: bytes = b"/* SPDX-License-Identifier: GPL-2.0 */\nint x;\n"):
    f = tmp_path / "src.c"
    f.write_bytes(data)
    return f, blake3.blake3(data).hexdigest(), hashlib.sha256(data).hexdigest()


def blobs(store: Store) -> list[Path]:
    return sorted((store.root / "blobs").glob("*")) if (store.root / "blobs").exists() else []


def test_path_input_enters_store_and_is_found_offline(tmp_path):
    f, b3, sha = pinned_file(tmp_path)
    store = Store(tmp_path / "store")
    inp = Input(name="src", kind="path", path=str(f), sha256=sha)
    got = fetch_input(inp, store, recipe_dir=tmp_path)
    assert got.digests == {"blake3": b3, "sha256": sha}
    assert [p.name for p in blobs(store)] == [b3]
    url_inp = Input(name="src", kind="url", url="https://unreachable.invalid/src.c", sha256=sha)
    again = fetch_input(url_inp, store, recipe_dir=tmp_path, offline=True)
    assert again.source == "store" and again.path.read_bytes() == f.read_bytes()


def test_wrong_pin_names_both_digests_and_stores_nothing(tmp_path):
    f, b3, sha = pinned_file(tmp_path)
    wrong = ("0" if sha[0] != "0" else "1") + sha[1:]
    store = Store(tmp_path / "store")
    with pytest.raises(DigestMismatch) as e:
        fetch_input(Input(name="src", kind="path", path=str(f), sha256=wrong), store, recipe_dir=tmp_path)
    assert wrong in str(e.value) and sha in str(e.value) and e.value.exit_code == 2
    assert blobs(store) == [] and not (store.root / "sha256").exists()


def test_corrupt_store_entry_is_removed_not_served(tmp_path):
    f, b3, sha = pinned_file(tmp_path)
    store = Store(tmp_path / "store")
    inp = Input(name="src", kind="path", path=str(f), blake3=b3)
    fetch_input(inp, store, recipe_dir=tmp_path)
    blob = store.root / "blobs" / b3
    os.chmod(blob, 0o644)
    blob.write_bytes(b"tampered")
    offline = Input(name="src", kind="url", url="https://unreachable.invalid/src.c", blake3=b3)
    with pytest.raises(FetchError, match="not in the store"):
        fetch_input(offline, store, recipe_dir=tmp_path, offline=True)
    assert not blob.exists()


def test_handed_file_accepted_only_if_it_matches(tmp_path):
    f, b3, sha = pinned_file(tmp_path)
    store = Store(tmp_path / "store")
    inp = Input(name="linux", kind="url", url="https://unreachable.invalid/linux.tar.gz", sha256=sha)
    other = tmp_path / "other.c"
    other.write_bytes(b"something else")
    with pytest.raises(DigestMismatch):
        fetch_input(inp, store, recipe_dir=tmp_path, handed=other)
    assert blobs(store) == []
    got = fetch_input(inp, store, recipe_dir=tmp_path, handed=f)
    assert got.source == "handed" and got.digests["blake3"] == b3


def test_offline_missing_input_says_how_to_hand_it_over(tmp_path):
    inp = Input(name="linux", kind="url", url="https://cdn.kernel.org/linux-1.0.tar.gz", sha256="a" * 64)
    with pytest.raises(FetchError) as e:
        fetch_input(inp, Store(tmp_path / "store"), recipe_dir=tmp_path, offline=True)
    msg = str(e.value)
    assert "--offline" in msg and "--input linux=PATH" in msg and "sha256:" + "a" * 64 in msg
    assert e.value.exit_code == 2


def test_unreachable_url_is_a_clear_fetch_error(tmp_path):
    inp = Input(name="x", kind="url", url="http://127.0.0.1:9/x.tar.gz", sha256="a" * 64)
    store = Store(tmp_path / "store")
    with pytest.raises(FetchError, match=r"cannot fetch http://127.0.0.1:9/x.tar.gz"):
        fetch_input(inp, store, recipe_dir=tmp_path)
    assert blobs(store) == [] and not any((store.root / "tmp").iterdir())


def test_directory_input_pinned_by_tree_digest(tmp_path):
    d = tmp_path / "tree"
    (d / "sub").mkdir(parents=True)
    (d / "a.c").write_text("int a;\n")
    (d / "sub" / "b.h").write_text("#define B\n")
    digest = tree_digest(d)["blake3"]
    got = fetch_input(Input(name="t", kind="path", path="tree", blake3=digest), Store(tmp_path / "s"),
                      recipe_dir=tmp_path)
    assert got.is_dir
    (d / "a.c").write_text("int a = 1;\n")
    with pytest.raises(DigestMismatch):
        fetch_input(Input(name="t", kind="path", path="tree", blake3=digest), Store(tmp_path / "s"),
                    recipe_dir=tmp_path)


def test_one_wrong_pin_keeps_the_good_blob_and_says_mismatch(tmp_path):
    """The blob stored under its blake3 stays; a recipe whose sha256 pin is wrong gets a mismatch,
    not "not in the store"."""
    f, b3, sha = pinned_file(tmp_path)
    store = Store(tmp_path / "store")
    fetch_input(Input(name="src", kind="path", path=str(f), blake3=b3), store, recipe_dir=tmp_path)
    wrong = ("0" if sha[0] != "0" else "1") + sha[1:]
    offline = Input(name="src", kind="url", url="https://unreachable.invalid/src.c", blake3=b3, sha256=wrong)
    with pytest.raises(DigestMismatch) as e:
        fetch_input(offline, store, recipe_dir=tmp_path, offline=True)
    assert wrong in str(e.value) and sha in str(e.value)
    assert (store.root / "blobs" / b3).is_file()


def test_directory_input_is_snapshotted(tmp_path):
    """What is trained on is what was hashed: later edits to the source dir do not reach the build."""
    from provenance.inputs.dataset import materialize

    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "a.c").write_text("int a;\n")
    (src / "sub" / "b.h").write_text("int b;\n")
    b3 = tree_digest(src)["blake3"]
    store = Store(tmp_path / "store")
    got = fetch_input(Input(name="t", kind="path", path=str(src), blake3=b3), store, recipe_dir=tmp_path)
    (src / "a.c").write_text("int evil;\n")
    root = materialize(got, tmp_path / "work")
    assert (root / "a.c").read_text() == "int a;\n" and got.path.parent == store.root / "trees"
    assert tree_digest(root)["blake3"] == b3


def test_fsck_finds_and_repairs_bad_entries(tmp_path):
    from .conftest import run_cli

    f, b3, sha = pinned_file(tmp_path)
    store = Store(tmp_path / "store")
    fetch_input(Input(name="src", kind="path", path=str(f), blake3=b3), store, recipe_dir=tmp_path)
    p = run_cli("store", "fsck", "--store", str(store.root))
    assert p.returncode == 0 and "every entry matches" in p.stdout
    assert "1 blob(s), 1 sha256 index entry and 0 directory snapshot(s) re-hashed" in p.stdout, p.stdout
    blob = store.root / "blobs" / b3
    os.chmod(blob, 0o644)
    blob.write_bytes(b"tampered")
    (store.root / "tmp" / "fetch-x.123").mkdir(parents=True)
    p = run_cli("store", "fsck", "--store", str(store.root))
    assert p.returncode == 1 and "does not match its blake3 name" in p.stdout and "left over" in p.stdout
    assert blob.exists()
    p = run_cli("store", "fsck", "--store", str(store.root), "--repair")
    assert p.returncode == 0 and not blob.exists()
    p = run_cli("store", "fsck", "--store", str(store.root))
    assert p.returncode == 0, p.stdout


def test_two_concurrent_fetches_share_one_store(tmp_path):
    import subprocess
    import sys

    from .conftest import ROOT

    f, b3, sha = pinned_file(tmp_path, data=os.urandom(8 << 20))
    recipe = tmp_path / "r.toml"
    recipe.write_text((ROOT / "tests" / "recipes" / "tiny.toml").read_text().split("[[inputs]]")[0]
                      + f'[[inputs]]\nname = "src"\nkind = "path"\npath = "{f}"\nblake3 = "{b3}"\n'
                      + "[dataset]" + (ROOT / "tests" / "recipes" / "tiny.toml").read_text().split("[dataset]")[1])
    env = {**os.environ, "PROVENANCE_STORE": str(tmp_path / "store")}
    procs = [subprocess.Popen([sys.executable, "-m", "provenance", "fetch", str(recipe)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [x.name for x in blobs(Store(tmp_path / "store"))] == [b3]
    assert Store(tmp_path / "store").fsck() == []


def test_sigterm_during_fetch_leaves_nothing_in_the_store(tmp_path):
    """A download interrupted by SIGTERM exits 143 and removes its temporary files (a local server
    on 127.0.0.1 sends the body slowly)."""
    import http.server
    import signal
    import subprocess
    import sys
    import threading
    import time

    from .conftest import ROOT

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 20))
            self.end_headers()
            try:
                for _ in range(200):
                    self.wfile.write(b"x" * 1024)
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tiny = (ROOT / "tests" / "recipes" / "tiny.toml").read_text()
        recipe = tmp_path / "r.toml"
        recipe.write_text(tiny.split("[[inputs]]")[0]
                          +
                          f'[[inputs]]\nname = "src"\nkind = "url"\nurl = "http://127.0.0.1:{server.server_port}/x.c"\n'
                          + f'blake3 = "{"0" * 64}"\n[dataset]' + tiny.split("[dataset]")[1])
        store = tmp_path / "store"
        p = subprocess.Popen([sys.executable, "-m", "provenance", "fetch", str(recipe)],
                             env={**os.environ, "PROVENANCE_STORE": str(store)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not list((store / "tmp").glob("fetch-*/download")) and time.monotonic() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 143, err
        assert "Traceback" not in err and list((store / "tmp").iterdir()) == []
    finally:
        server.shutdown()


def test_a_symlink_loop_is_named_as_such(tmp_path):
    loop = tmp_path / "loop.c"
    os.symlink(loop, loop)
    with pytest.raises(FetchError, match="symlink whose target does not exist or loops"):
        fetch_input(Input(name="src", kind="path", path=str(loop), blake3="0" * 64), Store(tmp_path / "store"),
                    recipe_dir=tmp_path)


def test_fsck_says_when_there_is_no_store_to_check(tmp_path):
    """A mistyped --store said "every entry matches its name" of a directory it had not looked into."""
    from .conftest import run_cli

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    for root, why in ((tmp_path / "missing", "no such directory"), (tmp_path / "notes" / "a.txt", "not a directory"),
                      (tmp_path / "notes", "not an input store (it holds 1 other name(s)")):
        p = run_cli("store", "fsck", "--store", str(root))
        assert p.returncode == 2 and why in p.stderr and "every entry matches" not in p.stdout, (root, p.stderr)
        assert "Traceback" not in p.stderr
    p = run_cli("store", "fsck", "--store", str(tmp_path / "notes"), "--repair")
    assert p.returncode == 2 and (tmp_path / "notes" / "a.txt").read_text() == "mine"
    assert not (tmp_path / "missing").exists()
