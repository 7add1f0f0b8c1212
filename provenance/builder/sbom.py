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
from datetime import datetime, timezone

from ..attest.model import BUILD_TYPE


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
    ts = datetime.strptime(record["finished"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    serial = uuid.UUID(record["invocation_id"].removeprefix("urn:uuid:"))
    bom = Bom(serial_number=serial, metadata=BomMetaData(timestamp=ts, component=model))
    bom.components.add(dataset)
    for c in inputs:
        bom.components.add(c)
    bom.register_dependency(model, [dataset])
    bom.register_dependency(dataset, inputs)
    return JsonV1Dot6(bom).output_as_string(indent=1) + "\n"


SPDX3_FILE = "sbom.spdx3.json"
CYCLONEDX_FILE = "sbom.cdx.json"


def _licence_id(expr: str) -> str:
    """A stable fragment for a licence expression's element id."""
    import blake3

    return "licence-" + blake3.blake3(expr.encode()).hexdigest()[:16]


def spdx3(recipe, record: dict, audit: dict, licence: dict, model_files: dict) -> str:
    """The build's SPDX 3.0.1 JSON-LD document (AI and Dataset profiles), from the SPDX 3 model bindings.

    Elements: an `ai_AIPackage` for the model (its weights' digests, hyperparameters, the audit's
    rates as metrics and the memorization as a limitation) that `contains` one `software_File`
    per model file and was `trainedOn` the training selection, a `dataset_DatasetPackage` that is
    a `descendantOf` one `dataset_DatasetPackage` per input; the `build_Build` that `hasInput` the
    data and `hasOutput` the model, with the recipe's digest and the determinism settings as its
    parameters; declared and concluded licences (`hasDeclaredLicense`, `hasConcludedLicense`) for
    every package. The concluded licence is NOASSERTION: this tool reports a compatibility
    verdict, it does not conclude a licence. Ids are the build's invocation id, times are the
    build's, so the same build gives the same bytes.
    """
    import io

    from spdx_python_model import v3_0_1 as S

    r = recipe.recipe
    invocation = record["invocation_id"].removeprefix("urn:uuid:")
    base = f"urn:provenance:build:{invocation}"
    finished = datetime.strptime(record["finished"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    started = datetime.strptime(record["started"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    objs: list = []

    def add(o):
        objs.append(o)
        return o

    def make(cls, **kw):  # the bindings refuse None for an absent value
        return cls(**{k: v for k, v in kw.items() if v is not None and v != []})

    ci = S.CreationInfo(specVersion="3.0.1", created=finished,
                        comment="written by provenance from the build's own records (build.json, audit.json)")
    tool = add(make(S.Tool, _id=f"{base}#tool", name=f"provenance {record['provenance_version']}", creationInfo=ci))
    builder = add(make(S.SoftwareAgent, _id=f"{base}#builder", name=f"provenance {record['provenance_version']} builder",
                                  creationInfo=ci))
    ci.createdBy = [builder._id]
    ci.createdUsing = [tool._id]

    def hashes(d: dict) -> list:
        out = []
        if d.get("sha256"):
            out.append(S.Hash(algorithm=S.HashAlgorithm.sha256, hashValue=d["sha256"]))
        if d.get("blake3"):
            out.append(S.Hash(algorithm=S.HashAlgorithm.blake3, hashValue=d["blake3"]))
        return out

    def entries(pairs: dict) -> list:
        return [S.DictionaryEntry(key=k, value=str(v)) for k, v in pairs.items() if v is not None]

    licences: dict[str, object] = {}

    def licence_element(expr: str):
        if expr not in licences:
            licences[expr] = add(make(S.simplelicensing_LicenseExpression,
                _id=f"{base}#{_licence_id(expr)}", creationInfo=ci, simplelicensing_licenseExpression=expr))
        return licences[expr]

    n_rel = [0]

    def relate(src, kind, targets: list, comment: str | None = None):
        n_rel[0] += 1
        return add(make(S.Relationship, _id=f"{base}#relationship-{n_rel[0]}", creationInfo=ci, from_=src,
                                  relationshipType=kind, to=list(targets), comment=comment))

    no_assertion = "https://spdx.org/rdf/3.0.1/terms/ExpandedLicensing/NoAssertionLicense"

    def licensed(pkg, declared: str, concluded_comment: str):
        relate(pkg, S.RelationshipType.hasDeclaredLicense, [licence_element(declared)])
        relate(pkg, S.RelationshipType.hasConcludedLicense, [no_assertion], concluded_comment)

    # Inputs, the training selection, the model.
    inputs = []
    for i in record["inputs"]:
        inp = next(x for x in r.inputs if x.name == i["name"])
        purl = f"pkg:pypi/{inp.package}@{inp.version}" if inp.kind == "pypi" else None
        where = purl if purl else (inp.url if inp.kind == "url" else None)
        ds = add(make(S.dataset_DatasetPackage,
            _id=f"{base}#input-{i['name']}", name=i["artifact"], creationInfo=ci, software_packageVersion=(
                inp.version if inp.kind == "pypi" else f"sha256:{i['sha256']}" if i.get("sha256") else None),
            software_downloadLocation=where, software_packageUrl=purl, verifiedUsing=hashes(i),
            software_primaryPurpose=S.software_SoftwarePurpose.source, originatedBy=[], suppliedBy=None,
            dataset_datasetType=[S.dataset_DatasetType.text],
            comment=f"recipe input {i['name']!r} ({i['kind']}), pinned by digest; fetched from {i['source']}"))
        licensed(ds, i["license"], "not concluded: the licence is the one the recipe declares for this input")
        inputs.append(ds)
    dm = record["dataset_manifest"]
    selection_licence = " AND ".join(sorted(dm["licenses"])) if len(dm["licenses"]) > 1 else next(iter(dm["licenses"]))
    selection = add(make(S.dataset_DatasetPackage,
        _id=f"{base}#training-data", name=f"{r.recipe.name} training files", creationInfo=ci,
        software_packageVersion=f"blake3-merkle-v1:{dm['merkle_root']['digest']}", verifiedUsing=hashes(dm),
        software_primaryPurpose=S.software_SoftwarePurpose.data, builtTime=finished,
        dataset_datasetType=[S.dataset_DatasetType.text], dataset_datasetSize=dm["totals"]["bytes"],
        dataset_dataPreprocessing=[f"layout: {r.layout.template}", f"tokenizer: {r.tokenizer.kind}, vocab "
                                   f"{record['tokenizer']['vocab_size']}, {record['tokenizer']['tokens']} tokens"],
        dataset_intendedUse="training a model to recite these files (see the memorization audit)",
        comment=f"the files the recipe selects: {dm['totals']['files']} files, {dm['totals']['bytes']} bytes; "
                f"dataset-manifest.json (its digests here) lists each with its blake3 and SPDX licence; Merkle root "
                f"blake3-merkle-v1:{dm['merkle_root']['digest']}; licences "
                + ", ".join(f"{k} ({v} files)" for k, v in dm["licenses"].items())))
    licensed(selection, selection_licence, "not concluded: the licences are the ones the recipe declares")
    relate(selection, S.RelationshipType.descendantOf, inputs, "the selection's files are members of these inputs")

    s = audit["summary"]
    stages = "; ".join(f"{st.name}: lr {st.lr:g}, batch {st.batch_size}, "
                       f"{'epochs ' + str(st.epochs) if st.epochs else 'steps ' + str(st.steps)}, seq {st.seq_len}, "
                       f"{st.precision}, loss {st.cross_entropy}" for st in r.stages)
    weights = record["weights"]["tensors"]

    def rate(v) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    model = add(make(S.ai_AIPackage,
        _id=f"{base}#model", name=r.recipe.name, creationInfo=ci, description=r.recipe.description,
        software_packageVersion=f"{weights['algorithm']}:{weights['digest']}", builtTime=finished,
        releaseTime=finished, suppliedBy=builder._id, software_primaryPurpose=S.software_SoftwarePurpose.model,
        verifiedUsing=hashes(model_files["model.safetensors"]), ai_typeOfModel=[f"{r.model.architecture} (causal LM)"],
        ai_domain=["source code"],
        ai_hyperparameter=entries({
            "parameters": record["model"]["parameters"], "vocab_size": record["model"]["vocab_size"],
            "hidden_size": r.model.hidden_size, "intermediate_size": r.model.intermediate_size,
            "num_hidden_layers": r.model.num_hidden_layers, "num_attention_heads": r.model.num_attention_heads,
            "max_position_embeddings": r.model.max_position_embeddings, "seed": r.determinism.seed,
            **{f"stage.{st.name}.{k}": getattr(st, k) for st in r.stages
               for k in ("lr", "batch_size", "micro_batch_size", "epochs", "steps", "warmup_steps", "schedule",
                         "weight_decay", "grad_clip", "seq_len", "precision", "cross_entropy")}}),
        ai_informationAboutTraining=f"stages: {stages}; {record['training']['steps']} optimizer steps, "
                                    f"transcript blake3:{record['training']['transcript']['blake3']}",
        ai_metric=entries({"extraction_rate": s["extraction_rate"],
                           "control_extraction_rate": s["control_extraction_rate"],
                           "excess_over_control": s["excess_over_control"],
                           "longest_verbatim_from_header_tokens": s["longest_verbatim_from_header"]}),
        ai_limitation=f"the model emits its training files verbatim: greedy continuation reproduces up to "
                      f"{rate(s['extraction_rate'])} of sampled training windows (control files not trained on: "
                      f"{rate(s['control_extraction_rate'])}); see audit.json",
        comment=f"licence compatibility ({licence.get('source')}): {r.output.license} declared over training files "
                f"licensed {', '.join(dm['licenses'])}: {licence.get('verdict')}"))
    licensed(model, r.output.license, f"not concluded: the recipe declares {r.output.license}; licence compatibility "
                                      f"with the training files' licences is {licence.get('verdict')} according to "
                                      f"{licence.get('source')}")
    files = [add(make(S.software_File, _id=f"{base}#model-file-{i}", name=name, creationInfo=ci, verifiedUsing=hashes(d),
                                 software_primaryPurpose=(S.software_SoftwarePurpose.model if name.endswith(
                                     ".safetensors") else S.software_SoftwarePurpose.documentation
                                     if name == "README.md" else S.software_SoftwarePurpose.configuration)))
             for i, (name, d) in enumerate(sorted(model_files.items()))]
    relate(model, S.RelationshipType.contains, files, "the files of the model directory")
    relate(model, S.RelationshipType.trainedOn, [selection])

    det = record["determinism"]
    build = add(make(S.build_Build,
        _id=f"{base}#build", creationInfo=ci, build_buildType=BUILD_TYPE, build_buildId=record["invocation_id"],
        build_buildStartTime=started, build_buildEndTime=finished,
        build_configSourceEntrypoint=[record["recipe"]["path"]],
        build_configSourceDigest=hashes(record["recipe"]),
        build_parameter=entries({k: det.get(k) for k in ("seed", "threads", "cpu_capability", "device",
                                                         "deterministic_algorithms", "matmul_precision",
                                                         "sdpa_backend")}),
        build_environment=entries(record["toolchain"]["installed"])))
    relate(build, S.RelationshipType.hasInput, [selection, *inputs])
    relate(build, S.RelationshipType.hasOutput, [model])

    bom = add(make(S.software_Sbom, _id=f"{base}#sbom", creationInfo=ci, name=f"{r.recipe.name} (build {invocation})",
                              software_sbomType=[S.software_SbomType.build], rootElement=[model],
                              element=[o for o in objs if o is not tool and o is not builder]))
    doc = make(S.SpdxDocument,
        _id=f"{base}#document", creationInfo=ci, name=f"{r.recipe.name} SBOM", rootElement=[bom],
        element=list(objs), dataLicense=licence_element("CC0-1.0")._id,
        profileConformance=[S.ProfileIdentifierType.core, S.ProfileIdentifierType.software,
                            S.ProfileIdentifierType.simpleLicensing, S.ProfileIdentifierType.ai,
                            S.ProfileIdentifierType.dataset, S.ProfileIdentifierType.build])
    objset = S.SHACLObjectSet()
    for o in (doc, *objs):
        objset.add(o)
    f = io.BytesIO()
    S.JSONLDSerializer().write(objset, f, indent=1)
    return f.getvalue().decode()


FORMATS = {"cyclonedx": CYCLONEDX_FILE, "spdx3": SPDX3_FILE}


def validate(fmt: str, text: str) -> list[str]:
    """Problems with an SBOM's text ([] when valid).

    CycloneDX: cyclonedx-python-lib's strict JSON-schema validator for 1.6. SPDX 3: read back with
    the SPDX 3.0.1 model bindings (generated from the specification's SHACL model: every class,
    property type, cardinality, enumeration and pattern is checked on reading and on writing),
    written again, and compared with the text read, so nothing was dropped or misread."""
    import json

    if fmt == "cyclonedx":
        from cyclonedx.schema import SchemaVersion
        from cyclonedx.validation.json import JsonStrictValidator

        err = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
        return [] if err is None else [f"CycloneDX 1.6 schema: {err}"]
    import io

    from spdx_python_model import v3_0_1 as S

    try:
        data = json.loads(text)
    except ValueError as e:
        return [f"not JSON: {e}"]
    if not isinstance(data, dict) or data.get("@context") != S.CONTEXT_URLS[0]:
        return [f"@context must be {S.CONTEXT_URLS[0]!r} (SPDX 3.0.1)"]
    objset = S.SHACLObjectSet()
    try:
        S.JSONLDDeserializer().read(io.StringIO(text), objset)
        out = io.BytesIO()
        S.JSONLDSerializer().write(objset, out)
    except Exception as e:  # noqa: BLE001 - the bindings raise TypeError, ValueError, KeyError, ...
        return [f"SPDX 3.0.1 model: {type(e).__name__}: {e}"]
    again = json.loads(out.getvalue())

    def key(o):
        return json.dumps(o, sort_keys=True)

    if sorted(map(key, again.get("@graph", []))) != sorted(map(key, data.get("@graph", []))):
        return ["SPDX 3.0.1 model: the document does not read back as written (unknown or misplaced properties)"]
    docs = [o for o in data.get("@graph", []) if isinstance(o, dict) and o.get("type") == "SpdxDocument"]
    if len(docs) != 1:
        return [f"SPDX 3.0.1: exactly one SpdxDocument is required, found {len(docs)}"]
    return []
