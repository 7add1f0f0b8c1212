"""An export: a deterministic transform of a verified parent's weights, built and attested like any build.

The recipe's one input is the parent (`kind = "model"`, verified as `verify-attestation` would before
anything is written: builder/parent.py); `[export] transform` says what is done to its weights. Both
transforms are exact functions of the parent's bytes, with no thread, vendor or library choice in them,
so a rebuild anywhere must give the same bits (docs/recipe.md, "Exports"):

- "bfloat16": every floating-point tensor cast to bfloat16, rounding to nearest, ties to even.
- "int8": every 2-D tensor (the weight matrices, embeddings included) quantized per row: scale =
  max|row| / 127 in float32, q = round-half-even(row / scale) as int8 (a zero row: scale 0, q 0), stored
  as `NAME` (I8) and `NAME.scale` (F32, one per row); other tensors stay float32. W ≈ q × scale.

The other files of the parent's model directory are carried over (config.json records the new dtype),
the model card is written afresh, and the output is signed as a build's: SLSA provenance with the parent
in resolvedDependencies, and an OMS signature.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .. import __version__
from .._internal.atomic import atomic_write_bytes
from .._internal.codedigest import code_digest
from .._internal.hashing import TENSOR_DIGEST, hash_file, tensor_digest
from .._internal.progress import Reporter
from ..attest.signing import Signing, write_oms, write_signed
from ..inputs.store import Store
from ..recipe import LoadedExport
from .parent import discard_copies, fetch_parent
from .pipeline import BUILD_FORMAT, _install, _now, _seal_model_dir, check_out_dir, input_record
from .source import sign_beside, write_beside

CARRIED_OVER = "README.md"  # the one parent file not carried: the card describes the export


def transform(name: str, tensors: dict[str, Any]) -> dict[str, Any]:
    """The parent's tensors (numpy, float32) through the named transform, as torch tensors to save."""
    import numpy as np
    import torch

    out: dict[str, Any] = {}
    for key in sorted(tensors):
        a = np.ascontiguousarray(tensors[key])
        if name == "bfloat16":
            out[key] = torch.from_numpy(a.copy()).to(torch.bfloat16)
        elif a.ndim == 2 and a.dtype == np.float32:
            scale = (np.max(np.abs(a), axis=1) / np.float32(127)).astype(np.float32)
            divisor = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
            q = np.clip(np.rint(a / divisor[:, None]), -127, 127).astype(np.int8)
            out[key], out[f"{key}.scale"] = torch.from_numpy(q), torch.from_numpy(scale)
        else:
            out[key] = torch.from_numpy(a.copy())
    return out


def export(recipe: LoadedExport, *, out: Path, store: Store, handed: dict[str, Path] | None = None,
           reporter: Reporter | None = None, signing: Signing | None = None,
           allow_toolchain_mismatch: bool = False) -> dict:
    """Build the export into `out`; returns its build.json. Raises ProvenanceError subclasses."""
    from . import toolchain

    reporter = reporter or Reporter(enabled=False)
    r = recipe.recipe
    check_out_dir(out, store.root)
    started, t0 = _now(), time.perf_counter()
    tc = toolchain.check(r.toolchain, recipe.path, allow=allow_toolchain_mismatch)
    (inp,) = r.inputs
    stored = fetch_parent(inp, store, recipe_dir=recipe.path.parent, handed=(handed or {}).get(inp.name))
    parent = stored.parent
    reporter.log(parent.verified_line(inp.name))
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    try:
        files = _write_model(staging / "model", recipe, parent)
        verdict = _licence(r.output.license, parent.input_licenses, store, reporter)
        record = {
            "format": BUILD_FORMAT, "provenance_version": __version__, "invocation_id": f"urn:uuid:{uuid.uuid4()}",
            "signing": {"keyids": [sg.public_key.keyid for sg in signing.signers] if signing else [],
                        "sigstore": False},
            "recipe": {"name": r.recipe.name, "path": str(recipe.path), **recipe.digests},
            "inputs": [input_record(stored)],
            "export": {"transform": r.export.transform, "from_weights": parent.weights},
            "code": code_digest(),  # the code that ran (a training build records it under "training")
            "weights": {"tensors": {"algorithm": TENSOR_DIGEST, "digest": tensor_digest(staging / "model" /
                                                                                        "model.safetensors")},
                        "files": files},
            "toolchain": tc, "licence_compatibility": verdict, "started": started, "finished": _now(),
            "timings": {"export": round(time.perf_counter() - t0, 3)},
        }
        record["source"], claims = write_beside(recipe, [stored], staging, reporter.log)
        byproducts = _sboms(staging, recipe, record)
        if signing is not None:
            _sign(staging, recipe, record, signing, reporter, byproducts, claims)
        else:
            atomic_write_bytes(staging / "build.json", _json(record))
        _install(staging, out)
        return record
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        discard_copies([stored])


def _write_model(d: Path, recipe: LoadedExport, parent) -> dict[str, dict[str, str]]:
    """The transformed weights, the parent's other files (config.json with the new dtype) and the card."""
    from safetensors.torch import save_file

    from .._internal.safetensors import read_tensors

    t = recipe.recipe.export.transform
    d.mkdir()
    for name in sorted(os.listdir(parent.files)):
        if name not in ("model.safetensors", CARRIED_OVER):
            shutil.copyfile(parent.files / name, d / name)
    save_file(transform(t, read_tensors(parent.files / "model.safetensors")), str(d / "model.safetensors"),
              metadata={"format": "pt"})
    if (d / "config.json").is_file():
        config = json.loads((d / "config.json").read_text())
        config["dtype"] = "bfloat16" if t == "bfloat16" else "float32"
        if t == "int8":
            config["provenance_export"] = {"transform": "int8", "scheme": "per-row absmax, symmetric",
                                           "dequantize": "W = NAME (int8) * NAME.scale (float32, one per row)"}
        atomic_write_bytes(d / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return _seal_model_dir(d, card(recipe, parent).encode())


def card(recipe: LoadedExport, parent) -> str:
    """The export's model card: what it is made from and how, its licences, how to check it. It depends on
    the recipe and the (pinned) parent alone, so a rebuild writes the same bytes."""
    r = recipe.recipe
    how = {"bfloat16": "every floating-point tensor cast to bfloat16 (round to nearest, ties to even)",
           "int8": "every weight matrix quantized to int8 per row (symmetric, absmax scale; `NAME.scale` holds "
                   "the float32 scales: W = q × scale)"}[r.export.transform]
    carried = ", ".join(f"{k} ({v} files)" for k, v in sorted(parent.input_licenses.items())) or "none recorded"
    return (f"---\nlicense: {r.output.license.lower()}\n---\n\n# {r.recipe.name}\n\n{r.recipe.description}\n\n"
            f"An export of the model `{parent.recipe_name}` (weights `blake3-tensors-v1:{parent.weights}`), built by "
            f"`provenance build {Path(recipe.path).name}`: {how}.\n\n"
            f"## Licences\n\nDeclared licence: {r.output.license}. The parent's weights were trained on files "
            f"licensed {carried}; an export carries what its parent carries.\n\n"
            f"## Checking it\n\n```\nverify-attestation attestation.intoto.jsonl --key KEY --model model "
            f"--chain PARENT_BUILD_DIR\nprovenance rebuild attestation.intoto.jsonl --attestation-key KEY\n```\n"
            + _source_note(recipe))


def _source_note(recipe: LoadedExport) -> str:
    """Where the export's corresponding source is, or why there is none (from the recipe alone)."""
    from .source import unshippable

    why = unshippable(recipe)
    if why:
        return f"\n## Corresponding source\n\nNo corresponding-source archive is written for this recipe: {why}.\n"
    name = recipe.recipe.inputs[0].name
    return ("\n## Corresponding source\n\n`source.tar` beside the model holds this recipe, the parent model as "
            f"`inputs/{name}/` (its files, attestation and key) with the parent's own corresponding source "
            f"(`inputs/{name}/source.tar`), the builder's code and lock, and every licence text; "
            "`source.intoto.jsonl` binds it to these files.\n\n```\nverify-attestation attestation.intoto.jsonl "
            "--key KEY --source source.tar\nprovenance rebuild attestation.intoto.jsonl --attestation-key KEY "
            "--from-source source.tar\n```\n")


def _licence(outbound: str, inbound: dict[str, int], store: Store, reporter: Reporter) -> str:
    from ..audit.licences import compatibility, describe

    c = compatibility(outbound, inbound, store.root / "licences")
    reporter.log(describe(c) + ("; warning" if c["verdict"] != "compatible" else ""))
    return str(c["verdict"])


def _json(record: dict) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def _sboms(staging: Path, recipe: LoadedExport, record: dict) -> dict[str, dict[str, str]]:
    """The export's CycloneDX and SPDX 3 documents (builder/sbom.py), recorded in build.json; their digests."""
    from .sbom import CYCLONEDX_FILE, SPDX3_FILE, export_cyclonedx, export_spdx3

    files = record["weights"]["files"]
    made = {CYCLONEDX_FILE: ("cyclonedx", "1.6", export_cyclonedx(recipe, record, files)),
            SPDX3_FILE: ("spdx3", "3.0.1", export_spdx3(recipe, record, files))}
    for name, (_, _, text) in made.items():
        atomic_write_bytes(staging / name, text.encode())
    digests = {name: hash_file(staging / name) for name in made}
    record["sbom"] = {key: {"file": name, "specVersion": version, **digests[name]}
                      for name, (key, version, _) in made.items()}
    return digests


def _sign(staging: Path, recipe: LoadedExport, record: dict, signing: Signing, reporter: Reporter,
          byproducts: dict[str, dict[str, str]], claims) -> None:
    """The OMS signature, build.json, the corresponding source's statement, then the provenance, which signs
    them and the SBOMs as byproducts."""
    from ..attest.statement import export_statement

    files = record["weights"]["files"]
    sign_beside(staging, record["source"], claims, files, signing.signers, byproducts)
    oms = write_oms(staging, files, signing, reporter)
    if oms is not None:
        record["oms"] = oms
        if "file" in oms:
            byproducts[oms["file"]] = {k: oms[k] for k in ("sha256", "blake3")}
    atomic_write_bytes(staging / "build.json", _json(record))
    byproducts["build.json"] = hash_file(staging / "build.json")
    sizes = {name: (staging / "model" / name).stat().st_size for name in files}
    write_signed(staging / "attestation.intoto.jsonl",
                 export_statement(recipe=recipe, record=record, model_files=files, model_sizes=sizes,
                                  byproducts=byproducts), signing.signers)
