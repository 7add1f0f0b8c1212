"""The build's CycloneDX 1.6 SBOM (`sbom.cdx.json`), written with cyclonedx-python-lib.

The model is the BOM's subject: a `machine-learning-model` component with the weights file's
digests, the declared licence, and properties for the tensors digest, the hyperparameters, the
audit's rates and the licence verdict. It depends on one `data` component for the training
selection (the dataset manifest, its Merkle root and licences), which depends on one `data`
component per input (its artifact's digests, its licence and where it came from). The serial
number and timestamp come from the build, so the same build gives the same bytes. Its digest is a
signed byproduct of the attestation.
"""

from __future__ import annotations

import uuid
from datetime import datetime


def cyclonedx(recipe, record: dict, audit: dict, licence: dict, model_files: dict) -> str:
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.model.license import LicenseExpression
    from cyclonedx.output.json import JsonV1Dot6

    r = recipe.recipe

    def hashes(d: dict) -> list:
        out = []
        if d.get("sha256"):
            out.append(HashType(alg=HashAlgorithm.SHA_256, content=d["sha256"]))
        if d.get("blake3"):
            out.append(HashType(alg=HashAlgorithm.BLAKE3, content=d["blake3"]))
        return out

    def props(pairs: dict) -> list:
        return [Property(name=f"provenance:{k}", value=str(v)) for k, v in pairs.items() if v is not None]

    s = audit["summary"]
    stages = "; ".join(f"{st.name}: lr {st.lr:g}, batch {st.batch_size}, "
                       f"{'epochs ' + str(st.epochs) if st.epochs else 'steps ' + str(st.steps)}, seq {st.seq_len}, "
                       f"{st.precision}, loss {st.cross_entropy}" for st in r.stages)
    model = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL, name=r.recipe.name, bom_ref="model",
        version=f"blake3-tensors-v1:{record['weights']['tensors']['digest']}",
        description=r.recipe.description, hashes=hashes(model_files["model.safetensors"]),
        licenses=[LicenseExpression(r.output.license)],
        properties=props({
            "architecture": r.model.architecture, "parameters": record["model"]["parameters"],
            "vocab_size": record["model"]["vocab_size"], "hidden_size": r.model.hidden_size,
            "num_hidden_layers": r.model.num_hidden_layers, "num_attention_heads": r.model.num_attention_heads,
            "stages": stages, "seed": r.determinism.seed, "recipe_blake3": record["recipe"]["blake3"],
            "extraction_rate": s["extraction_rate"], "control_extraction_rate": s["control_extraction_rate"],
            "longest_verbatim_from_header": s["longest_verbatim_from_header"],
            "licence_compatibility": licence.get("verdict"),
        }))
    dm = record["dataset_manifest"]
    dataset = Component(
        type=ComponentType.DATA, name=f"{r.recipe.name} training files", bom_ref="dataset",
        version=f"blake3-merkle-v1:{dm['merkle_root']['digest']}", hashes=hashes(dm),
        licenses=[LicenseExpression(expr) for expr in dm["licenses"]][:1] if len(dm["licenses"]) == 1 else [],
        properties=props({"files": dm["totals"]["files"], "bytes": dm["totals"]["bytes"],
                          "licenses": ", ".join(f"{k} ({v} files)" for k, v in dm["licenses"].items()),
                          "manifest": "dataset-manifest.json"}))
    inputs = [Component(type=ComponentType.DATA, name=i["artifact"], bom_ref=f"input:{i['name']}",
                        hashes=hashes(i), licenses=[LicenseExpression(i["license"])],
                        properties=props({"input": i["name"], "kind": i["kind"], "source": i["source"]}))
              for i in record["inputs"]]
    ts = datetime.strptime(record["finished"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=__import__("datetime").timezone.utc)
    serial = uuid.UUID(record["invocation_id"].removeprefix("urn:uuid:"))
    bom = Bom(serial_number=serial, metadata=BomMetaData(timestamp=ts, component=model))
    bom.components.add(dataset)
    for c in inputs:
        bom.components.add(c)
    bom.register_dependency(model, [dataset])
    bom.register_dependency(dataset, inputs)
    return JsonV1Dot6(bom).output_as_string(indent=1) + "\n"
