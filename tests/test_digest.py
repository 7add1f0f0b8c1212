"""Digests: the tensor digest ignores file layout; the Merkle root depends on every leaf and its order."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from provenance._internal.hashing import hash_file, merkle_root, tensor_digest
from provenance.inputs.licences import detect_licence


def test_tensor_digest_is_layout_independent_and_value_sensitive(tmp_path):
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}
    save_file(a, tmp_path / "a.safetensors", metadata={"format": "pt"})
    save_file(dict(reversed(list(a.items()))), tmp_path / "b.safetensors", metadata={"note": "other metadata"})
    assert hash_file(tmp_path / "a.safetensors") != hash_file(tmp_path / "b.safetensors")
    assert tensor_digest(tmp_path / "a.safetensors") == tensor_digest(tmp_path / "b.safetensors")
    c = dict(a)
    c["b"] = torch.ones(4).clone()
    c["b"][2] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    save_file(c, tmp_path / "c.safetensors")
    assert tensor_digest(tmp_path / "c.safetensors") != tensor_digest(tmp_path / "a.safetensors")
    reshaped = {"w": a["w"].reshape(3, 2), "b": a["b"]}
    save_file(reshaped, tmp_path / "d.safetensors")
    assert tensor_digest(tmp_path / "d.safetensors") != tensor_digest(tmp_path / "a.safetensors")


def test_merkle_root():
    leaves = [b"a", b"b", b"c"]
    root = merkle_root(leaves)
    assert root == merkle_root(list(leaves)) and len(root) == 64
    assert root != merkle_root([b"b", b"a", b"c"])
    assert root != merkle_root([b"a", b"b", b"c", b"c"])
    assert merkle_root([]) != merkle_root([b""])


def test_licence_detection():
    assert detect_licence(b"/* SPDX-License-Identifier: GPL-2.0 */\nint x;", "MIT") == ("GPL-2.0", "spdx-tag")
    assert detect_licence(b"// SPDX-License-Identifier: GPL-2.0-or-later OR BSD-2-Clause\n", "") == (
        "GPL-2.0-or-later OR BSD-2-Clause", "spdx-tag")
    assert detect_licence(b"# SPDX-License-Identifier: MIT\n", "GPL-2.0-only") == ("MIT", "spdx-tag")
    assert detect_licence(b"int x;\n", "GPL-2.0-only") == ("GPL-2.0-only", "input")
    assert detect_licence(b"int x;\n", "NOASSERTION") == ("NOASSERTION", "none")


def _big_file(path, size):
    import os

    path.write_bytes(os.urandom(1 << 20) * (size >> 20))
    return path


def test_a_large_file_is_hashed_through_a_mapping_to_the_same_digests(tmp_path, monkeypatch):
    """Files of MAP_MIN bytes or more go to the mapping child: the digests are those of the bytes,
    with and without sha256, and equal what the reading path gives when no child can start."""
    import hashlib
    import os

    import blake3

    from provenance._internal import hashing

    path = _big_file(tmp_path / "big.bin", hashing.MAP_MIN + (3 << 20))
    data = path.read_bytes()
    want = {"blake3": blake3.blake3(data).hexdigest(), "sha256": hashlib.sha256(data).hexdigest()}
    steps = []
    with open(path, "rb") as f:
        assert hashing._hash_mapped(f.fileno(), len(data), True, steps.append) == want
        assert steps == [hashing._STEP, 3 << 20]
        assert hashing.hash_fd(f.fileno(), sha256=False) == {"blake3": want["blake3"]}
        monkeypatch.setattr("sys.executable", "")
        assert hashing._hash_mapped(f.fileno(), len(data), True, None) is None
        assert hashing.hash_fd(f.fileno()) == want
    assert os.path.getsize(path) == len(data)


def test_stopping_a_mapped_hash_kills_its_child(tmp_path, monkeypatch):
    import os

    import pytest

    from provenance._internal import hashing

    class Stop(Exception):
        pass

    def stop(_n):
        raise Stop

    pids = []
    spawn = os.posix_spawn
    monkeypatch.setattr(os, "posix_spawn", lambda *a, **k: pids.append(spawn(*a, **k)) or pids[-1])
    path = _big_file(tmp_path / "big.bin", 4 * hashing._STEP)
    with open(path, "rb") as f, pytest.raises(Stop):
        hashing.hash_fd(f.fileno(), progress=stop)
    assert len(pids) == 1
    with pytest.raises(ChildProcessError):  # reaped: the child is neither running nor left unwaited
        os.waitpid(pids[0], os.WNOHANG)
