"""verify-attestation: check a signed attestation, and optionally a model dir, recipe and inputs.

Every check is reported by name. Exit 0 when all pass, 1 when any fails, 2 when the check
could not be made (unreadable file, malformed key or policy). Imports neither torch nor
transformers: model files are streamed through blake3 (and sha256 with --sha256).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from .attest import BUILDER_ID, KNOWN_BUILD_TYPES, PAYLOAD_TYPE, PREDICATE_TYPE, STATEMENT_TYPE
from .errors import InputError

if TYPE_CHECKING:
    from .policy import Policy


@dataclass(frozen=True)
class DefaultPolicy:
    """The policy without --policy (same defaults as policy.Policy, without importing pydantic)."""

    allowed_builders: tuple[str, ...] = (BUILDER_ID,)
    allowed_build_types: tuple[str, ...] = KNOWN_BUILD_TYPES
    required_licenses: tuple[str, ...] = ()
    forbidden_licenses: tuple[str, ...] = ()
    allowed_output_licenses: tuple[str, ...] | None = None
    require_clean_source: bool = False

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".ggml", ".onnx", ".h5", ".msgpack",
                   ".npz", ".pkl", ".pickle", ".tflite", ".mlmodel")
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
WINDOW = 64 << 20  # a multiple of mmap.ALLOCATIONGRANULARITY


@dataclass
class Check:
    check: str
    ok: bool
    detail: str

    def as_dict(self) -> dict:
        return {"check": self.check, "ok": self.ok, "detail": self.detail}


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    statement: dict | None = None
    verdict: str | None = None  # with --model: "bitwise" | "within-tolerance" | "diverged"
    divergence: dict | None = None

    def add(self, check: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(check, ok, detail))
        return ok

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def as_dict(self) -> dict:
        out = {"ok": self.ok, "checks": [c.as_dict() for c in self.checks]}
        if self.verdict is not None:
            out["verdict"] = self.verdict
        if self.divergence:
            out["divergence"] = self.divergence
        return out


def stream_digests(path: Path, *, sha256: bool) -> dict[str, str]:
    """blake3 (multi-threaded) and optionally sha256 of a file.

    The file is mapped WINDOW bytes at a time and each window unmapped after hashing, so memory
    stays bounded by the window whatever the file size, with no copy into Python buffers.
    """
    b3 = blake3.blake3(max_threads=blake3.blake3.AUTO)
    sha = hashlib.sha256() if sha256 else None
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        offset = 0
        while offset < size:
            n = min(WINDOW, size - offset)
            with mmap.mmap(f.fileno(), n, access=mmap.ACCESS_READ, offset=offset) as window:
                b3.update(window)
                if sha is not None:
                    sha.update(window)
            offset += n
    out = {"blake3": b3.hexdigest()}
    if sha is not None:
        out["sha256"] = sha.hexdigest()
    return out


# ---- reading the attestation ---------------------------------------------------------------------

def read_attestation(path: Path) -> tuple[str, list]:
    """("dsse", [envelope dicts]) or ("sigstore", [bundle text]). Raises InputError if unreadable."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InputError(f"{path}: cannot read attestation: {e.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: attestation is not UTF-8 text") from None
    stripped = text.strip()
    try:
        whole = json.loads(stripped) if stripped else None
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and str(whole.get("mediaType", "")).startswith("application/vnd.dev.sigstore.bundle"):
        return "sigstore", [stripped]
    lines = [line for line in text.splitlines() if line.strip()]
    return "dsse", lines


def _verify_dsse(report: Report, lines: list[str], keys, threshold: int) -> dict | None:
    from securesystemslib.exceptions import VerificationError

    from .sign import parse_envelope

    envelopes = []
    for i, line in enumerate(lines):
        try:
            envelopes.append(parse_envelope(json.loads(line)))
        except (json.JSONDecodeError, ValueError) as e:
            report.add("envelope", False, f"line {i + 1}: not a DSSE envelope: {e}")
            return None
    if not envelopes:
        report.add("envelope", False, "the attestation file holds no envelope")
        return None
    report.add("envelope", True, f"{len(envelopes)} DSSE envelope(s)")
    env = envelopes[0]
    report.add("payload-type", env.payload_type == PAYLOAD_TYPE,
               f"payloadType {env.payload_type!r}" + ("" if env.payload_type == PAYLOAD_TYPE else f", expected {PAYLOAD_TYPE!r}"))
    try:
        accepted = env.verify(keys, threshold)
    except VerificationError as e:
        report.add("signature", False, f"{e} (tried {len(keys)} key(s): {', '.join(k.keyid[:16] for k in keys)})")
        return None
    except ValueError as e:
        raise InputError(f"--threshold: {e}") from None
    report.add("signature", True, f"{len(accepted)} of {len(keys)} key(s) verified (threshold {threshold}): "
               + ", ".join(f"{k.keytype} {kid[:16]}" for kid, k in accepted.items()))
    try:
        return json.loads(env.payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        report.add("statement", False, f"payload is not JSON: {e}")
        return None


def _verify_bundle(report: Report, text: str, *, identity: str | None, issuer: str | None,
                   trust_config_path: Path | None, trusted_root_path: Path | None, staging: bool) -> dict | None:
    from sigstore.errors import VerificationError
    from sigstore.models import Bundle
    from sigstore.verify import Verifier
    from sigstore.verify.policy import Identity

    if not identity or not issuer:
        raise InputError("a Sigstore bundle is verified against an identity: pass --identity and --issuer")
    try:
        bundle = Bundle.from_json(text)
    except Exception as e:  # sigstore raises several types for malformed bundles
        report.add("envelope", False, f"not a Sigstore bundle: {e}")
        return None
    report.add("envelope", True, "Sigstore bundle with a DSSE envelope")
    if trust_config_path is not None:
        from .sign import trust_config

        verifier = Verifier(trusted_root=trust_config(trust_config_path).trusted_root)
    elif trusted_root_path is not None:
        from sigstore.models import TrustedRoot

        try:
            verifier = Verifier(trusted_root=TrustedRoot.from_file(str(trusted_root_path)))
        except Exception as e:
            raise InputError(f"{trusted_root_path}: not a Sigstore trusted root ({e})") from None
    else:
        verifier = Verifier.staging(offline=True) if staging else Verifier.production(offline=True)
    try:
        payload_type, payload = verifier.verify_dsse(bundle, Identity(identity=identity, issuer=issuer))
    except VerificationError as e:
        report.add("signature", False, f"Sigstore verification failed for identity {identity!r} / issuer {issuer!r}: {e}")
        return None
    report.add("payload-type", payload_type == PAYLOAD_TYPE, f"payloadType {payload_type!r}")
    report.add("signature", True, f"Sigstore certificate for {identity!r} from {issuer!r}, in the transparency log")
    try:
        return json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        report.add("statement", False, f"payload is not JSON: {e}")
        return None


# ---- statement checks ----------------------------------------------------------------------------

def slsa_problems(st: dict) -> list[str]:
    """Field rules of in-toto Statement v1 and SLSA Provenance v1 that a statement breaks."""
    p = []
    subjects = st.get("subject")
    if not isinstance(subjects, list) or not subjects:
        p.append("subject must be a non-empty array")
    else:
        for i, s in enumerate(subjects):
            if not isinstance(s, dict) or not any(k in s for k in ("uri", "digest", "content")):
                p.append(f"subject[{i}] needs one of uri, digest, content")
            elif not isinstance(s.get("digest", {}), dict) or not all(
                    isinstance(v, str) and re.fullmatch(r"[0-9a-f]+", v) for v in s.get("digest", {}).values()):
                p.append(f"subject[{i}].digest must map algorithm names to lowercase hex")
    pred = st.get("predicate")
    if not isinstance(pred, dict):
        return p + ["predicate must be an object"]
    bd, rd = pred.get("buildDefinition"), pred.get("runDetails")
    if not isinstance(bd, dict):
        p.append("predicate.buildDefinition is required")
    else:
        if not isinstance(bd.get("buildType"), str):
            p.append("buildDefinition.buildType is required")
        if not isinstance(bd.get("externalParameters"), dict):
            p.append("buildDefinition.externalParameters must be an object")
        deps = bd.get("resolvedDependencies", [])
        if not isinstance(deps, list) or any(
                not isinstance(d, dict) or not any(k in d for k in ("uri", "digest", "content")) for d in deps):
            p.append("buildDefinition.resolvedDependencies must be ResourceDescriptors with uri, digest or content")
    if not isinstance(rd, dict) or not isinstance(rd.get("builder"), dict) or not isinstance(rd["builder"].get("id"), str):
        p.append("runDetails.builder.id is required")
    else:
        meta = rd.get("metadata", {})
        for k in ("startedOn", "finishedOn"):
            if k in meta and not RFC3339.match(str(meta[k])):
                p.append(f"runDetails.metadata.{k} must be an RFC 3339 timestamp")
    return p


def _statement_checks(report: Report, st: dict, policy: Policy) -> bool:
    ok = report.add("statement-type", st.get("_type") == STATEMENT_TYPE,
                    f"_type {st.get('_type')!r}" + ("" if st.get("_type") == STATEMENT_TYPE else f", expected {STATEMENT_TYPE!r}"))
    ok &= report.add("predicate-type", st.get("predicateType") == PREDICATE_TYPE,
                     f"predicateType {st.get('predicateType')!r}")
    problems = slsa_problems(st)
    ok &= report.add("slsa-fields", not problems, "; ".join(problems) or "in-toto Statement v1 and SLSA v1 field rules hold")
    if problems:
        return False
    bt = st["predicate"]["buildDefinition"]["buildType"]
    ok &= report.add("build-type", bt in policy.allowed_build_types,
                     f"{bt}" + ("" if bt in policy.allowed_build_types else " is not a known build type"))
    bid = st["predicate"]["runDetails"]["builder"]["id"]
    ok &= report.add("builder-id", bid in policy.allowed_builders,
                     f"{bid}" + ("" if bid in policy.allowed_builders else f" is not allowed (allowed: {policy.allowed_builders})"))
    return ok


def _outputs(st: dict) -> dict:
    return st["predicate"]["runDetails"].get("provenance_outputs", {}) or {}


def check_model_dir(report: Report, st: dict, model_dir: Path, *, sha256: bool, bitwise: bool = False) -> None:
    """Every subject must match. Weight files that differ are judged against the signed
    fingerprint (within tolerance or diverged) unless `bitwise`; other files must match exactly."""
    if not model_dir.is_dir():
        raise InputError(f"--model {model_dir}: not a directory")
    subjects = {s.get("name"): s.get("digest", {}) for s in st["subject"]}
    b3 = {k: v.get("blake3") for k, v in _outputs(st).get("files", {}).items()}
    names = set(subjects)
    if b3 and set(b3) != names:
        report.add("model-files", False, f"subjects and predicate list different files: {sorted(names ^ set(b3))}")
        return
    bad, differing, checked = [], [], 0
    for name in sorted(names):
        path = model_dir / name
        if not path.is_file():
            bad.append(f"{name}: missing")
            continue
        want_sha = subjects[name].get("sha256")
        use_sha = sha256 or not b3.get(name)
        if use_sha and not want_sha:
            bad.append(f"{name}: no sha256 or blake3 digest to check")
            continue
        got = stream_digests(path, sha256=use_sha)
        checked += 1
        if b3.get(name) and got["blake3"] != b3[name]:
            differing.append(name)
            bad.append(f"{name}: blake3 expected {b3[name]}, got {got['blake3']}")
        elif use_sha and got["sha256"] != want_sha:
            differing.append(name)
            bad.append(f"{name}: sha256 expected {want_sha}, got {got['sha256']}")
    algos = "blake3 and sha256" if sha256 else "blake3"
    fingerprint = _outputs(st).get("fingerprint")
    only_weights = bad and len(differing) == len(bad) and all(n.endswith(".safetensors") for n in differing)
    if not bad:
        report.verdict = "bitwise"
        report.add("model-files", True, f"{checked} file(s) match ({algos}): bitwise")
    elif only_weights and fingerprint and not bitwise:
        from .compare import judge_against_fingerprint

        v = judge_against_fingerprint(fingerprint, model_dir)
        report.verdict = v.verdict
        report.divergence = v.metrics
        f = v.metrics.get("functional", {})
        nums = (f"rel_l2~{f.get('rel_l2', float('nan')):.3g} (from {fingerprint['projections']} projections), "
                f"eval loss diff {f.get('eval_loss_diff', float('nan')):.3g}, greedy agreement "
                f"{f.get('greedy_agreement', float('nan')):.4f}") if f else "; ".join(v.reasons)
        ok = v.verdict in ("bitwise", "within-tolerance")
        report.add("model-files", ok, f"{', '.join(differing)} not bitwise; judged against the signed fingerprint: "
                   f"{v.verdict}: {nums}" + ("" if ok else f"; {'; '.join(v.reasons)}"))
    else:
        report.verdict = "diverged" if bad else report.verdict
        report.add("model-files", False, "; ".join(bad) + ("; --bitwise demands exact equality" if bitwise and only_weights else ""))
    present = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
    extra = [p for p in present if p not in names]
    weights = [p for p in extra if p.lower().endswith(WEIGHT_SUFFIXES)]
    detail = (f"unlisted weight file(s): {weights}" if weights else "no unlisted weight file") + (
        f"; other unlisted files: {[p for p in extra if p not in weights]}" if len(extra) > len(weights) else "")
    report.add("unlisted-files", not weights, detail)


def check_recipe(report: Report, st: dict, recipe_path: Path) -> None:
    try:
        data = Path(recipe_path).read_bytes()
    except OSError as e:
        raise InputError(f"--recipe {recipe_path}: cannot read: {e.strerror}") from None
    want = st["predicate"]["buildDefinition"]["externalParameters"].get("recipe", {}).get("digest", {})
    got = {"blake3": blake3.blake3(data).hexdigest(), "sha256": hashlib.sha256(data).hexdigest()}
    mism = [f"{a} expected {want[a]}, got {got[a]}" for a in ("blake3", "sha256") if a in want and want[a] != got[a]]
    if not want:
        mism = ["the attestation records no recipe digest"]
    report.add("recipe", not mism, "; ".join(mism) or f"{recipe_path} matches externalParameters.recipe")


def check_inputs(report: Report, st: dict, store_root: Path | None) -> None:
    """Re-hash the stored inputs and rebuild the dataset manifest root from the embedded recipe."""
    import tempfile

    from .build import select_dataset
    from .errors import ProvenanceError
    from .recipe import LoadedRecipe, parse_recipe
    from .store import Store, fetch_input

    bd = st["predicate"]["buildDefinition"]
    rec = bd["externalParameters"].get("recipe", {})
    text = rec.get("content")
    if not isinstance(text, str):
        report.add("inputs", False, "the attestation embeds no recipe content")
        return
    path = Path(rec.get("path", "embedded-recipe.toml"))
    recipe = parse_recipe(path, text)
    want_root = next((d["annotations"]["merkle_root"]["digest"] for d in bd.get("resolvedDependencies", [])
                      if d.get("name") == "dataset-manifest"), None)
    store = Store(store_root)
    attested = {d["name"].removeprefix("input:"): d.get("digest", {}) for d in bd.get("resolvedDependencies", [])
                if str(d.get("name", "")).startswith("input:")}
    try:
        stored = []
        for inp in recipe.inputs:
            if attested.get(inp.name, {}).get("blake3") not in (None, inp.blake3) and inp.blake3:
                report.add("inputs", False, f"input {inp.name!r}: recipe pin and attested digest differ")
                return
            stored.append(fetch_input(inp, store, recipe_dir=Path("."), offline=True))
        for s in stored:
            want = attested.get(s.input.name, {})
            for algo, hexd in want.items():
                if s.digests.get(algo) not in (None, hexd):
                    report.add("inputs", False, f"input {s.input.name!r}: {algo} expected {hexd}, got {s.digests[algo]}")
                    return
        with tempfile.TemporaryDirectory() as work:
            _, m = select_dataset(LoadedRecipe(path, text, recipe, {}), stored, Path(work))
    except ProvenanceError as e:
        report.add("inputs", False, e.diagnostics())
        return
    root = m["merkle_root"]["digest"]
    report.add("inputs", root == want_root,
               f"{len(stored)} input(s) re-hashed from {store.root}; manifest root {root}"
               + ("" if root == want_root else f", attested {want_root}"))


def check_policy(report: Report, st: dict, policy: Policy) -> None:
    bd = st["predicate"]["buildDefinition"]
    licences = set()
    for d in bd.get("resolvedDependencies", []):
        ann = d.get("annotations", {}) or {}
        if str(d.get("name", "")).startswith("input:"):
            licences.add(ann.get("license", "NOASSERTION"))
            licences.update(ann.get("file_licenses", []))
    problems = []
    missing = [lic for lic in policy.required_licenses if lic not in licences]
    if missing:
        problems.append(f"required licence(s) absent from the inputs: {missing}")
    forbidden = sorted(licences & set(policy.forbidden_licenses))
    if forbidden:
        problems.append(f"forbidden licence(s) among the inputs: {forbidden}")
    out_lic = _outputs(st).get("output_license")
    if policy.allowed_output_licenses is not None and out_lic not in policy.allowed_output_licenses:
        problems.append(f"output licence {out_lic!r} not in {policy.allowed_output_licenses}")
    if policy.require_clean_source:
        src = next((d for d in bd.get("resolvedDependencies", []) if d.get("name") == "builder-source:provenance"), {})
        if src.get("annotations", {}).get("dirty", True):
            problems.append("the builder's source tree was dirty or unknown")
    report.add("policy", not problems, "; ".join(problems) or f"input licences {sorted(licences)}, output licence {out_lic!r}")


def verify(attestation: Path, *, keys: list[Path], threshold: int = 1, model: Path | None = None,
           recipe: Path | None = None, inputs: bool = False, store: Path | None = None,
           policy_path: Path | None = None, sha256: bool = False, bitwise: bool = False, identity: str | None = None,
           issuer: str | None = None, trust_config: Path | None = None, trusted_root: Path | None = None,
           staging: bool = False) -> Report:
    """Run every applicable check. Raises InputError when a check cannot be made (exit 2)."""
    if policy_path is not None:
        from .policy import load_policy

        policy = load_policy(policy_path)
    else:
        policy = DefaultPolicy()
    kind, items = read_attestation(attestation)
    report = Report()
    if kind == "dsse":
        from .sign import load_public_key

        if not keys:
            raise InputError("a DSSE attestation is verified with public keys: pass --key PUBLIC_KEY")
        pubs = [load_public_key(k) for k in keys]
        st = _verify_dsse(report, items, pubs, threshold)
    else:
        st = _verify_bundle(report, items[0], identity=identity, issuer=issuer, trust_config_path=trust_config,
                            trusted_root_path=trusted_root, staging=staging)
    if st is None:
        return report
    if not isinstance(st, dict):
        report.add("statement", False, "payload is not a JSON object")
        return report
    report.statement = st
    if not _statement_checks(report, st, policy):
        return report
    if model is not None:
        check_model_dir(report, st, Path(model), sha256=sha256, bitwise=bitwise)
    if recipe is not None:
        check_recipe(report, st, Path(recipe))
    if inputs:
        check_inputs(report, st, store)
    if policy_path is not None:
        check_policy(report, st, policy)
    return report


def render(report: Report) -> str:
    width = max((len(c.check) for c in report.checks), default=5)
    lines = [f"{'PASS' if c.ok else 'FAIL'}  {c.check:<{width}}  {c.detail}" for c in report.checks]
    weights = f" ({report.verdict})" if report.verdict else ""
    lines.append(f"verdict: {'verified' if report.ok else 'FAILED'}{weights}")
    return "\n".join(lines)
