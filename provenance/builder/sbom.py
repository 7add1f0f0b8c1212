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
        licenses=[LicenseExpression(r.output.license)], external_references=_cdx_source(record, hashes),
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
              for i in record["inputs"] if "parent" not in i]
    parents = [_cdx_parent(i, ref, hashes, props) for i in record["inputs"] if "parent" in i
               for ref in (f"input:{i['name']}", f"ancestor:{i['name']}")]
    if parents:  # a fine-tune: its parent model, a dependency and (a copy) the model's pedigree
        from cyclonedx.model.component import Pedigree

        model.pedigree = Pedigree(ancestors=parents[1::2])
    ts = datetime.strptime(record["finished"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    serial = uuid.UUID(record["invocation_id"].removeprefix("urn:uuid:"))
    bom = Bom(serial_number=serial, metadata=BomMetaData(timestamp=ts, component=model))
    bom.components.add(dataset)
    for c in [*inputs, *parents[0::2]]:
        bom.components.add(c)
    bom.register_dependency(model, [dataset, *parents[0::2]])
    bom.register_dependency(dataset, inputs)
    return JsonV1Dot6(bom).output_as_string(indent=1) + "\n"


def export_cyclonedx(recipe, record: dict, model_files: dict) -> str:
    """An export's CycloneDX 1.6 document: the model (the transform as properties) depending on its parent,
    which is also its pedigree."""
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentType, Pedigree
    from cyclonedx.model.license import LicenseExpression
    from cyclonedx.output.json import JsonV1Dot6

    r = recipe.recipe

    def hashes(d: dict) -> list:
        return [HashType(alg=alg, content=d[k]) for k, alg in (("sha256", HashAlgorithm.SHA_256),
                                                               ("blake3", HashAlgorithm.BLAKE3)) if d.get(k)]

    def props(pairs: dict) -> list:
        return [Property(name=f"provenance:{k}", value=str(v)) for k, v in pairs.items() if v is not None]

    (i,) = record["inputs"]
    parent, ancestor = (_cdx_parent(i, ref, hashes, props) for ref in (f"input:{i['name']}", f"ancestor:{i['name']}"))
    model = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL, name=r.recipe.name, bom_ref="model",
        version=f"blake3-tensors-v1:{record['weights']['tensors']['digest']}", description=r.recipe.description,
        hashes=hashes(model_files["model.safetensors"]), licenses=[LicenseExpression(r.output.license)],
        pedigree=Pedigree(ancestors=[ancestor]), external_references=_cdx_source(record, hashes),
        properties=props({**record["export"], "recipe_blake3": record["recipe"]["blake3"],
                          "licence_compatibility": record["licence_compatibility"]}))
    ts = datetime.strptime(record["finished"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    bom = Bom(serial_number=uuid.UUID(record["invocation_id"].removeprefix("urn:uuid:")),
              metadata=BomMetaData(timestamp=ts, component=model))
    bom.components.add(parent)
    bom.register_dependency(model, [parent])
    bom.register_dependency(parent, [])
    return JsonV1Dot6(bom).output_as_string(indent=1) + "\n"


def _cdx_source(record: dict, hashes) -> list:
    """The corresponding-source archive, where the build wrote one, as the model's external reference."""
    from cyclonedx.model import ExternalReference, ExternalReferenceType, XsUri

    src = record.get("source", {})
    return [ExternalReference(type=ExternalReferenceType.SOURCE_DISTRIBUTION, url=XsUri(src["file"]),
                              hashes=hashes(src), comment=SOURCE_COMMENT)] if src.get("file") else []


def _cdx_parent(i: dict, ref: str, hashes, props):
    """A fine-tune's parent model as a CycloneDX component (docs/recipe.md, "Fine-tuning")."""
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.model.license import LicenseExpression

    p = i["parent"]
    return Component(type=ComponentType.MACHINE_LEARNING_MODEL, name=p["recipe_name"] or i["name"], bom_ref=ref,
                     version=f"blake3-tensors-v1:{p['weights']}",
                     hashes=hashes({"sha256": p["files"].get("model.safetensors")}),
                     licenses=[LicenseExpression(p["output_license"])],
                     properties=props({"input": i["name"], "kind": "model", "attestation_sha256":
                                       p["attestation"]["sha256"], "recipe_blake3": p["recipe"].get("blake3"),
                                       "trained_on": ", ".join(f"{k} ({v} files)" for k, v in
                                                               sorted(p["input_licenses"].items()))}))


SOURCE_COMMENT = ("the complete corresponding source (recipe, inputs as pinned, the builder's code and lock, licence "
                  "texts) that rebuilds this model: `provenance rebuild --from-source`, docs/formats.md")
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
    parameters; the corresponding-source archive, where the build wrote one, a package that `generates`
    the model; declared and concluded licences (`hasDeclaredLicense`, `hasConcludedLicense`) for
    every package. The concluded licence is NOASSERTION: this tool reports a compatibility
    verdict, it does not conclude a licence. Ids are the build's invocation id, times are the
    build's, so the same build gives the same bytes.
    """

    from spdx_python_model import v3_0_1 as S

    w = _Spdx3(S, recipe, record)
    inputs = w.inputs()
    selection = w.selection(inputs)
    model = w.model(selection, audit, licence, model_files)
    parents = w.parents(model)
    w.build(selection, [*inputs, *parents], model)
    w.source(model)
    return w.serialized(model)


def export_spdx3(recipe, record: dict, model_files: dict) -> str:
    """An export's SPDX 3.0.1 document: its `ai_AIPackage` (files, transform) a `descendantOf` the parent's,
    and the `build_Build` that `hasInput` the parent and `hasOutput` it."""
    from spdx_python_model import v3_0_1 as S

    w = _Spdx3(S, recipe, record)
    model = w.export_model(model_files)
    w.export_build(w.parents(model), model)
    w.source(model)
    return w.serialized(model)


NO_ASSERTION = "https://spdx.org/rdf/3.0.1/terms/ExpandedLicensing/NoAssertionLicense"


class _Spdx3:
    """The SPDX 3 elements of one build, made in a fixed order (ids and relationship numbers follow it)."""

    def __init__(self, S, recipe, record: dict) -> None:
        self.S, self.r, self.record = S, recipe.recipe, record
        self.invocation = record["invocation_id"].removeprefix("urn:uuid:")
        self.base = f"urn:provenance:build:{self.invocation}"
        self.finished = datetime.strptime(record["finished"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        self.started = datetime.strptime(record["started"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        self.objs: list = []
        self.licences: dict[str, object] = {}
        self.n_rel = 0
        self.ci = S.CreationInfo(specVersion="3.0.1", created=self.finished,
                                 comment="written by provenance from the build's own records (build.json, audit.json)")
        version = record["provenance_version"]
        self.tool = self.add(self.make(S.Tool, _id=f"{self.base}#tool", name=f"provenance {version}",
                                       creationInfo=self.ci))
        self.builder = self.add(self.make(S.SoftwareAgent, _id=f"{self.base}#builder",
                                          name=f"provenance {version} builder", creationInfo=self.ci))
        self.ci.createdBy = [self.builder._id]
        self.ci.createdUsing = [self.tool._id]

    def add(self, o):
        self.objs.append(o)
        return o

    @staticmethod
    def make(cls, **kw):  # the bindings refuse None for an absent value
        return cls(**{k: v for k, v in kw.items() if v is not None and v != []})

    def hashes(self, d: dict) -> list:
        S, out = self.S, []
        if d.get("sha256"):
            out.append(S.Hash(algorithm=S.HashAlgorithm.sha256, hashValue=d["sha256"]))
        if d.get("blake3"):
            out.append(S.Hash(algorithm=S.HashAlgorithm.blake3, hashValue=d["blake3"]))
        return out

    def entries(self, pairs: dict) -> list:
        return [self.S.DictionaryEntry(key=k, value=str(v)) for k, v in pairs.items() if v is not None]

    def licence_element(self, expr: str):
        if expr not in self.licences:
            self.licences[expr] = self.add(self.make(
                self.S.simplelicensing_LicenseExpression, _id=f"{self.base}#{_licence_id(expr)}", creationInfo=self.ci,
                simplelicensing_licenseExpression=expr))
        return self.licences[expr]

    def relate(self, src, kind, targets: list, comment: str | None = None):
        self.n_rel += 1
        return self.add(self.make(self.S.Relationship, _id=f"{self.base}#relationship-{self.n_rel}",
                                  creationInfo=self.ci, from_=src, relationshipType=kind, to=list(targets),
                                  comment=comment))

    def licensed(self, pkg, declared: str, concluded_comment: str) -> None:
        self.relate(pkg, self.S.RelationshipType.hasDeclaredLicense, [self.licence_element(declared)])
        self.relate(pkg, self.S.RelationshipType.hasConcludedLicense, [NO_ASSERTION], concluded_comment)

    def inputs(self) -> list:
        """One dataset package per recipe input, pinned by its digests."""
        S, ci, base, out = self.S, self.ci, self.base, []
        for i in self.record["inputs"]:
            if "parent" in i:  # a fine-tune's parent model: an AI package of its own (parents())
                continue
            inp = next(x for x in self.r.inputs if x.name == i["name"])
            purl = f"pkg:pypi/{inp.package}@{inp.version}" if inp.kind == "pypi" else None
            where = purl if purl else (inp.url if inp.kind == "url" else None)
            ds = self.add(self.make(S.dataset_DatasetPackage,
                _id=f"{base}#input-{i['name']}", name=i["artifact"], creationInfo=ci, software_packageVersion=(
                    inp.version if inp.kind == "pypi" else f"sha256:{i['sha256']}" if i.get("sha256") else None),
                software_downloadLocation=where, software_packageUrl=purl, verifiedUsing=self.hashes(i),
                software_primaryPurpose=S.software_SoftwarePurpose.source, originatedBy=[], suppliedBy=None,
                dataset_datasetType=[S.dataset_DatasetType.text],
                comment=f"recipe input {i['name']!r} ({i['kind']}), pinned by digest; fetched from {i['source']}"))
            self.licensed(ds, i["license"], "not concluded: the licence is the one the recipe declares for this input")
            out.append(ds)
        return out

    def selection(self, inputs: list):
        """The training selection: the files the recipe selects, a descendant of the inputs."""
        S, r, record, dm = self.S, self.r, self.record, self.record["dataset_manifest"]
        selection_licence = " AND ".join(sorted(dm["licenses"])) if len(dm["licenses"]) > 1 else \
            next(iter(dm["licenses"]))
        selection = self.add(self.make(S.dataset_DatasetPackage,
            _id=f"{self.base}#training-data", name=f"{r.recipe.name} training files", creationInfo=self.ci,
            software_packageVersion=f"blake3-merkle-v1:{dm['merkle_root']['digest']}", verifiedUsing=self.hashes(dm),
            software_primaryPurpose=S.software_SoftwarePurpose.data, builtTime=self.finished,
            dataset_datasetType=[S.dataset_DatasetType.text], dataset_datasetSize=dm["totals"]["bytes"],
            dataset_dataPreprocessing=[f"layout: {r.layout.template}", f"tokenizer: {r.tokenizer.kind}, vocab "
                                       f"{record['tokenizer']['vocab_size']}, {record['tokenizer']['tokens']} tokens"],
            dataset_intendedUse="training a model to recite these files (see the memorization audit)",
            comment=f"the files the recipe selects: {dm['totals']['files']} files, {dm['totals']['bytes']} bytes; "
                    f"dataset-manifest.json (its digests here) lists each with its blake3 and SPDX licence; Merkle "
                    f"root blake3-merkle-v1:{dm['merkle_root']['digest']}; licences "
                    + ", ".join(f"{k} ({v} files)" for k, v in dm["licenses"].items())))
        self.licensed(selection, selection_licence, "not concluded: the licences are the ones the recipe declares")
        self.relate(selection, S.RelationshipType.descendantOf, inputs,
                    "the selection's files are members of these inputs")
        return selection

    def model_package(self, model_files: dict, **extra):
        """The model's `ai_AIPackage`: its name, weights' digests and times, and `extra` properties."""
        S, r, weights = self.S, self.r, self.record["weights"]["tensors"]
        return self.add(self.make(S.ai_AIPackage,
            _id=f"{self.base}#model", name=r.recipe.name, creationInfo=self.ci, description=r.recipe.description,
            software_packageVersion=f"{weights['algorithm']}:{weights['digest']}", builtTime=self.finished,
            releaseTime=self.finished, suppliedBy=self.builder._id,
            software_primaryPurpose=S.software_SoftwarePurpose.model,
            verifiedUsing=self.hashes(model_files["model.safetensors"]), **extra))

    def model(self, selection, audit: dict, licence: dict, model_files: dict):
        """The AI package: weights' digests, hyperparameters, the audit's rates; its files; trained on the selection."""
        S, r, record, dm = self.S, self.r, self.record, self.record["dataset_manifest"]
        s = audit["summary"]
        model = self.model_package(model_files,
            ai_typeOfModel=[f"{r.model.architecture} (causal LM)"], ai_domain=["source code"],
            ai_hyperparameter=self.entries(_hyperparameters(r, record)),
            ai_informationAboutTraining=f"stages: {_stages_text(r)}; {record['training']['steps']} optimizer steps, "
                                        f"transcript blake3:{record['training']['transcript']['blake3']}",
            ai_metric=self.entries({"extraction_rate": s["extraction_rate"],
                                    "control_extraction_rate": s["control_extraction_rate"],
                                    "excess_over_control": s["excess_over_control"],
                                    "longest_verbatim_from_header_tokens": s["longest_verbatim_from_header"]}),
            ai_limitation=f"the model emits its training files verbatim: greedy continuation reproduces up to "
                          f"{_rate(s['extraction_rate'])} of sampled training windows (control files not trained on: "
                          f"{_rate(s['control_extraction_rate'])}); see audit.json",
            comment=f"licence compatibility ({licence.get('source')}): {r.output.license} declared over training "
                    f"files licensed {', '.join(dm['licenses'])}: {licence.get('verdict')}")
        self.licensed(model, r.output.license, f"not concluded: the recipe declares {r.output.license}; licence "
                                               f"compatibility with the training files' licences is "
                                               f"{licence.get('verdict')} according to {licence.get('source')}")
        self.files(model, model_files)
        self.relate(model, S.RelationshipType.trainedOn, [selection])
        return model

    def files(self, model, model_files: dict) -> None:
        """One `software_File` per file of the model directory, which the model `contains`."""
        S = self.S
        files = [self.add(self.make(S.software_File, _id=f"{self.base}#model-file-{i}", name=name,
                                    creationInfo=self.ci, verifiedUsing=self.hashes(d),
                                    software_primaryPurpose=_file_purpose(S, name)))
                 for i, (name, d) in enumerate(sorted(model_files.items()))]
        self.relate(model, S.RelationshipType.contains, files, "the files of the model directory")

    def export_model(self, model_files: dict):
        """An export's AI package (builder/export.py): its weights' digests, the transform, its files."""
        r, record = self.r, self.record
        model = self.model_package(model_files,
            ai_informationAboutTraining=f"not trained: an export ({record['export']['transform']}) of the weights "
                                        f"blake3-tensors-v1:{record['export']['from_weights']}",
            comment=f"licence compatibility: {r.output.license} declared; {record['licence_compatibility']} with the "
                    "parent's training files' licences")
        self.licensed(model, r.output.license, f"not concluded: the recipe declares {r.output.license}")
        self.files(model, model_files)
        return model

    def export_build(self, parents: list, model) -> None:
        """The export as a build: its recipe's digest, the transform and toolchain; the parent in, the model out."""
        S, record = self.S, self.record
        build = self.add(self.make(S.build_Build,
            _id=f"{self.base}#build", creationInfo=self.ci, build_buildType=BUILD_TYPE,
            build_buildId=record["invocation_id"], build_buildStartTime=self.started,
            build_buildEndTime=self.finished, build_configSourceEntrypoint=[record["recipe"]["path"]],
            build_configSourceDigest=self.hashes(record["recipe"]),
            build_parameter=self.entries(record["export"]),
            build_environment=self.entries(record["toolchain"]["installed"])))
        self.relate(build, S.RelationshipType.hasInput, parents)
        self.relate(build, S.RelationshipType.hasOutput, [model])

    def parents(self, model) -> list:
        """A fine-tune's parent (docs/recipe.md, "Fine-tuning"): an AI package pinned by its weights, of which
        the model is a `descendantOf`."""
        S, out = self.S, []
        for i in [x for x in self.record["inputs"] if "parent" in x]:
            p = i["parent"]
            pkg = self.add(self.make(S.ai_AIPackage,
                _id=f"{self.base}#parent-{i['name']}", name=p["recipe_name"] or i["name"], creationInfo=self.ci,
                software_packageVersion=f"blake3-tensors-v1:{p['weights']}",
                software_primaryPurpose=S.software_SoftwarePurpose.model,
                verifiedUsing=self.hashes({"sha256": p["files"].get("model.safetensors")}),
                comment=f"recipe input {i['name']!r}: the parent model, verified against its attestation "
                        f"(sha256:{p['attestation']['sha256']}; recipe blake3:{p['recipe'].get('blake3')}) before "
                        "the build; trained on files licensed "
                        + ", ".join(f"{k} ({v} files)" for k, v in sorted(p["input_licenses"].items()))))
            self.licensed(pkg, p["output_license"], "not concluded: the licence the parent's recipe declares")
            out.append(pkg)
        if out:
            self.relate(model, S.RelationshipType.descendantOf, out, "fine-tuned from the parent's weights")
        return out

    def build(self, selection, inputs: list, model) -> None:
        """The build: its recipe's digest, its determinism settings and toolchain; inputs in, the model out."""
        S, record = self.S, self.record
        det = record["determinism"]
        build = self.add(self.make(S.build_Build,
            _id=f"{self.base}#build", creationInfo=self.ci, build_buildType=BUILD_TYPE,
            build_buildId=record["invocation_id"], build_buildStartTime=self.started,
            build_buildEndTime=self.finished, build_configSourceEntrypoint=[record["recipe"]["path"]],
            build_configSourceDigest=self.hashes(record["recipe"]),
            build_parameter=self.entries({k: det.get(k) for k in ("seed", "threads", "cpu_capability", "device",
                                                                  "deterministic_algorithms", "matmul_precision",
                                                                  "sdpa_backend")}),
            build_environment=self.entries(record["toolchain"]["installed"])))
        self.relate(build, S.RelationshipType.hasInput, [selection, *inputs])
        self.relate(build, S.RelationshipType.hasOutput, [model])

    def source(self, model) -> None:
        """The corresponding-source archive (source.tar), by its digests, which `generates` the model."""
        S, src = self.S, self.record.get("source", {})
        if not src.get("file"):
            return
        pkg = self.add(self.make(S.software_Package,
            _id=f"{self.base}#source", name=src["file"], creationInfo=self.ci, suppliedBy=self.builder._id,
            software_packageVersion=f"sha256:{src['sha256']}", verifiedUsing=self.hashes(src),
            software_primaryPurpose=S.software_SoftwarePurpose.source, builtTime=self.finished,
            comment=SOURCE_COMMENT))
        licences = sorted({i["license"] for i in self.record["inputs"]} | {"Apache-2.0"})
        self.licensed(pkg, " AND ".join(f"({x})" if " " in x else x for x in licences),
                      "not concluded: the licences of the inputs and of the builder's code it carries")
        self.relate(pkg, S.RelationshipType.generates, [model], "`provenance rebuild --from-source` rebuilds the "
                                                               "model from this archive alone")

    def serialized(self, model) -> str:
        """The document around every element made, as JSON-LD text."""
        import io

        objset = self.S.SHACLObjectSet()
        for o in (self.document(model), *self.objs):
            objset.add(o)
        f = io.BytesIO()
        self.S.JSONLDSerializer().write(objset, f, indent=1)
        return f.getvalue().decode()

    def document(self, model):
        """The SBOM (every element but the tool and the builder) and the document around it."""
        S, name = self.S, self.r.recipe.name
        bom = self.add(self.make(S.software_Sbom, _id=f"{self.base}#sbom", creationInfo=self.ci,
                                 name=f"{name} (build {self.invocation})",
                                 software_sbomType=[S.software_SbomType.build],
                                 rootElement=[model],
                                 element=[o for o in self.objs if o is not self.tool and o is not self.builder]))
        return self.make(S.SpdxDocument,
            _id=f"{self.base}#document", creationInfo=self.ci, name=f"{name} SBOM", rootElement=[bom],
            element=list(self.objs), dataLicense=self.licence_element("CC0-1.0")._id,
            profileConformance=[S.ProfileIdentifierType.core, S.ProfileIdentifierType.software,
                                S.ProfileIdentifierType.simpleLicensing, S.ProfileIdentifierType.ai,
                                S.ProfileIdentifierType.dataset, S.ProfileIdentifierType.build])


def _hyperparameters(r, record: dict) -> dict:
    return {"parameters": record["model"]["parameters"], "vocab_size": record["model"]["vocab_size"],
            "hidden_size": r.model.hidden_size, "intermediate_size": r.model.intermediate_size,
            "num_hidden_layers": r.model.num_hidden_layers, "num_attention_heads": r.model.num_attention_heads,
            "max_position_embeddings": r.model.max_position_embeddings, "seed": r.determinism.seed,
            **{f"stage.{st.name}.{k}": getattr(st, k) for st in r.stages
               for k in ("lr", "batch_size", "micro_batch_size", "epochs", "steps", "warmup_steps", "schedule",
                         "weight_decay", "grad_clip", "seq_len", "precision", "cross_entropy")}}


def _stages_text(r) -> str:
    return "; ".join(f"{st.name}: lr {st.lr:g}, batch {st.batch_size}, "
                     f"{'epochs ' + str(st.epochs) if st.epochs else 'steps ' + str(st.steps)}, seq {st.seq_len}, "
                     f"{st.precision}, loss {st.cross_entropy}" for st in r.stages)


def _rate(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _file_purpose(S, name: str):
    if name.endswith(".safetensors"):
        return S.software_SoftwarePurpose.model
    return S.software_SoftwarePurpose.documentation if name == "README.md" else S.software_SoftwarePurpose.configuration


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
