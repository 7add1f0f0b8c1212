"""Regenerate the known-answer vectors from this project's implementation (run by hand, then review
the diff: a change here is a change of format, and docs/formats.md must say so)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write_safetensors() -> Path:
    """Two tensors, written by hand (not by the safetensors library) so the layout is exact."""
    a = struct.pack("<6f", 1.0, -2.5, 0.1, 3.0e-8, -0.0, 65504.0)
    b = struct.pack("<3q", 7, -1, 1 << 40)
    header = {"__metadata__": {"format": "pt"},
              "weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [len(b), len(b) + len(a)]},
              "ids": {"dtype": "I64", "shape": [3], "data_offsets": [0, len(b)]}}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path = HERE / "tensors.safetensors"
    path.write_bytes(struct.pack("<Q", len(h)) + h + b + a)
    return path


def main() -> None:
    import numpy as np

    from provenance._internal.codedigest import digest_entries, sort_paths
    from provenance._internal.hashing import canonical_json, merkle_root, tensor_digest
    from provenance._internal.safetensors import read_tensors
    from provenance.attest.source import SourceClaims, SourceInput, source_statement
    from provenance.builder.fingerprint import tensor_fingerprint

    path = write_safetensors()
    leaves = [b"", b"a", b"bc", b"def", b"\x00\x01"]
    manifest_entries = [
        {"input": "src", "path": "a/one.c", "size": 3, "blake3": "00" * 32, "license": "GPL-2.0-only",
         "license_source": "spdx-tag"},
        {"input": "src", "path": "b/twö.h", "size": 5, "blake3": "ff" * 32, "license": "MIT",
         "license_source": "input"},
    ]
    tensors = {"weight": read_tensors(path)["weight"], "bias": np.array([0.5, -0.25, 1e-3], dtype=np.float32)}
    fp = tensor_fingerprint(tensors, projections=4, seed=7)
    code = {"a/__init__.py": "", "a/x.py": "print(1)\n", "a-b/y.c": "int y;\n", "a/b/z.h": "#define Z 1\n"}
    claims = SourceClaims("r.toml", {"sha256": "11" * 32, "blake3": "22" * 32},
                          (SourceInput("src", "src-1.0.tar.gz", {"sha256": "33" * 32, "blake3": "44" * 32},
                                       "GPL-2.0-only"),
                           SourceInput("tree", "", {"blake3": "55" * 32}, "MIT")),
                          "66" * 32, {"sha256": "77" * 32, "blake3": "88" * 32},
                          frozenset({"Apache-2.0", "GPL-2.0-only", "MIT"}))
    statement = source_statement(claims, "r-source.tar", {"sha256": "99" * 32, "blake3": "aa" * 32},
                                 {"model.safetensors": {"sha256": "bb" * 32, "blake3": "cc" * 32}})
    out = {
        "provenance-code-v1": {"files": code, "order": sort_paths(code),
                               "digest": digest_entries((p, code[p].encode()) for p in sort_paths(code))},
        "corresponding-source-v1": {"statement": statement},
        "blake3-tensors-v1": {"file": path.name, "digest": tensor_digest(path)},
        "blake3-merkle-v1": [{"leaves_hex": [x.hex() for x in leaves[:n]], "root": merkle_root(leaves[:n])}
                             for n in range(len(leaves) + 1)],
        "dataset-manifest-root": {"entries": manifest_entries,
                                  "root": merkle_root(canonical_json(e) for e in manifest_entries)},
        "fingerprint-tensors": {"seed": 7, "projections": 4,
                                "tensors": {"weight": {"dtype": "float32", "shape": [2, 3],
                                                       "values": [float(v) for v in tensors["weight"].ravel()]},
                                            "bias": {"dtype": "float32", "shape": [3],
                                                     "values": [float(v) for v in tensors["bias"]]}},
                                "bytes": json.dumps(fp, sort_keys=True, separators=(",", ":")) + "\n"},
    }
    (HERE / "vectors.json").write_text(json.dumps(out, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
