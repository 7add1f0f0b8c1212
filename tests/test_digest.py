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
