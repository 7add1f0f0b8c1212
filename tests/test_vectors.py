"""Known-answer vectors (tests/vectors/) for the formats docs/formats.md specifies, reproduced twice:
by this project's code, and by a second implementation written here from the spec alone (plain
Python, struct, json, math and the blake3 package; nothing imported from provenance)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import blake3

VECTORS = Path(__file__).resolve().parent / "vectors"
V = json.loads((VECTORS / "vectors.json").read_text())


# ---- the second implementation, from docs/formats.md ------------------------------------------------

def spec_json(obj) -> bytes:
    # "JSON with sorted keys, no whitespace, UTF-8 (not ASCII-escaped)"
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def spec_merkle(leaves: list[bytes]) -> str:
    if not leaves:
        return blake3.blake3(b"").hexdigest()
    level = [blake3.blake3(b"\x00" + x).digest() for x in leaves]
    while len(level) > 1:
        nxt = []
        for i in range(0, len(level), 2):
            if i + 1 < len(level):
                nxt.append(blake3.blake3(b"\x01" + level[i] + level[i + 1]).digest())
            else:
                nxt.append(level[i])  # an odd node is promoted unchanged
        level = nxt
    return level[0].hex()


def spec_tensors_digest(raw: bytes) -> str:
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    h = blake3.blake3()
    for name in sorted(header):
        t = header[name]
        meta = spec_json({"dtype": t["dtype"], "name": name, "shape": t["shape"]})
        a, b = t["data_offsets"]
        h.update(struct.pack("<Q", len(meta)) + meta + struct.pack("<Q", b - a) + raw[base + a:base + b])
    return h.hexdigest()


def spec_signs(seed: int, name: str, k: int, n: int) -> list[list[int]]:
    raw = blake3.blake3(f"provenance-fingerprint:{seed}:{name}".encode()).digest(length=(k * n + 7) // 8)
    bits = [(byte >> (7 - j)) & 1 for byte in raw for j in range(8)]  # most significant bit first
    return [[2 * bits[r * n + c] - 1 for c in range(n)] for r in range(k)]


def spec_fingerprint(tensors: dict, seed: int, k: int) -> dict:
    out = {}
    for name in sorted(tensors):
        t = tensors[name]
        x = [struct.unpack("<f", struct.pack("<f", v))[0] for v in t["values"]]  # float32 widened to float64
        s = spec_signs(seed, name, k, len(x))
        out[name] = {"shape": t["shape"], "dtype": t["dtype"], "norm": math.sqrt(math.fsum(v * v for v in x)),
                     "sum": math.fsum(x), "projections": [math.fsum(si * v for si, v in zip(row, x)) for row in s]}
    return out


# ---- both implementations against the vectors -----------------------------------------------------------

def test_tensor_digest_vector():
    path = VECTORS / V["blake3-tensors-v1"]["file"]
    want = V["blake3-tensors-v1"]["digest"]
    assert spec_tensors_digest(path.read_bytes()) == want
    from provenance._internal.hashing import tensor_digest

    assert tensor_digest(path) == want


def test_merkle_vectors():
    from provenance._internal.hashing import merkle_root

    assert len(V["blake3-merkle-v1"]) == 6
    for v in V["blake3-merkle-v1"]:
        leaves = [bytes.fromhex(x) for x in v["leaves_hex"]]
        assert spec_merkle(leaves) == v["root"]
        assert merkle_root(leaves) == v["root"]


def test_dataset_manifest_root_vector():
    from provenance._internal.hashing import canonical_json, merkle_root
    from provenance.inputs.dataset import manifest

    v = V["dataset-manifest-root"]
    assert spec_merkle([spec_json(e) for e in v["entries"]]) == v["root"]
    assert merkle_root(canonical_json(e) for e in v["entries"]) == v["root"]
    assert manifest_root_via_module(manifest, v["entries"]) == v["root"]


def manifest_root_via_module(manifest, entries) -> str:
    from provenance.inputs.dataset import DataFile

    files = [DataFile(e["input"], e["path"], e["size"], e["blake3"], e["license"], e["license_source"], "")
             for e in entries]
    return manifest(files)["merkle_root"]["digest"]


def test_fingerprint_bytes_vector():
    import numpy as np

    from provenance.builder.fingerprint import tensor_fingerprint

    v = V["fingerprint-tensors"]
    spec = spec_fingerprint(v["tensors"], v["seed"], v["projections"])
    assert json.dumps(spec, sort_keys=True, separators=(",", ":")) + "\n" == v["bytes"]
    arrays = {n: np.array(t["values"], dtype=np.float32).reshape(t["shape"]) for n, t in v["tensors"].items()}
    ours = tensor_fingerprint(arrays, projections=v["projections"], seed=v["seed"])
    assert json.dumps(ours, sort_keys=True, separators=(",", ":")) + "\n" == v["bytes"]


def spec_code_digest(files: dict[str, str]) -> tuple[list[str], str]:
    # "sorted component by component ... each path and its bytes, both prefixed by their 8-byte
    # little-endian length, one blake3"
    order = sorted(files, key=lambda p: p.split("/"))
    h = blake3.blake3()
    for p in order:
        name, data = p.encode(), files[p].encode()
        h.update(struct.pack("<Q", len(name)) + name + struct.pack("<Q", len(data)) + data)
    return order, h.hexdigest()


def test_code_digest_vector():
    from provenance._internal.codedigest import digest_entries, sort_paths

    v = V["provenance-code-v1"]
    assert spec_code_digest(v["files"]) == (v["order"], v["digest"])
    assert v["order"].index("a/x.py") < v["order"].index("a-b/y.c")  # component order, not string order
    assert sort_paths(v["files"]) == v["order"]
    assert digest_entries((p, v["files"][p].encode()) for p in v["order"]) == v["digest"]


def test_corresponding_source_statement_vector():
    from provenance.attest.source import parse_predicate, source_statement

    st = V["corresponding-source-v1"]["statement"]
    claims, name, problems = parse_predicate(st["predicate"])
    assert problems == [] and name == "r-source.tar" and claims is not None
    assert claims.code == "66" * 32 and [i.artifact for i in claims.inputs] == ["src-1.0.tar.gz", ""]
    archive = st["subject"][0]["digest"]
    model = {s["name"].removeprefix("model/"): {"sha256": s["digest"]["sha256"]} for s in st["subject"][1:]}
    assert source_statement(claims, name, archive, model) == st
