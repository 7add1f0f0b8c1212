"""The input store: pins are checked on fetch and on use; a mismatch stores nothing."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import blake3
import pytest

from provenance.errors import DigestMismatch, FetchError
from provenance.recipe import Input
from provenance.inputs.store import Store, fetch_input, tree_digest


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
    got = fetch_input(Input(name="t", kind="path", path="tree", blake3=digest), Store(tmp_path / "s"), recipe_dir=tmp_path)
    assert got.is_dir
    (d / "a.c").write_text("int a = 1;\n")
    with pytest.raises(DigestMismatch):
        fetch_input(Input(name="t", kind="path", path="tree", blake3=digest), Store(tmp_path / "s"), recipe_dir=tmp_path)
