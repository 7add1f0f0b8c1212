"""Verifying a SLSA Verification Summary Attestation (VSA, `https://slsa.dev/verification_summary/v1`).

A VSA is another verifier's signed verdict about the subjects: `provenance rebuild` signs one for
every rebuild (docs/build-type.md, "VSA"). Here its signature has been checked (envelope.py); this
checks the summary's fields as SLSA defines them, that its verdict is PASSED, and, with --model,
that the directory holds exactly its subjects (sha256, the only digest a VSA's subjects carry).
"""

from __future__ import annotations

from pathlib import Path

from ..attest.model import RFC3339_RE, STATEMENT_TYPE, subject_name_problem
from .report import CheckName, Checks

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .._internal.jsonstrict import JSONObject
    from .._internal.prefetch import Prefetch

RESULTS = ("PASSED", "FAILED")


def vsa_checks(report: Checks, st: JSONObject, model: Path | None, prefetch: Prefetch | None = None,
               published: bool = False) -> None:
    problems = []
    if st.get("_type") != STATEMENT_TYPE:
        problems.append(f"_type {st.get('_type')!r}")
    subjects = st.get("subject")
    names = []
    if not isinstance(subjects, list) or not subjects:
        problems.append("subject must be a non-empty list")
        subjects = []
    for i, s in enumerate(subjects):
        name = s.get("name") if isinstance(s, dict) else None
        why = subject_name_problem(name)
        digest = s.get("digest") if isinstance(s, dict) else None
        if why:
            problems.append(f"subject[{i}].name {why}")
        elif not isinstance(digest, dict) or not isinstance(digest.get("sha256"), str):
            problems.append(f"subject[{i}] {name!r} has no sha256")
        else:
            names.append(name)
    if len(set(names)) != len(names):
        problems.append("a subject name is listed twice")
    p = st.get("predicate")
    if not isinstance(p, dict):
        problems.append("predicate must be an object")
        p = {}
    verifier = p.get("verifier")
    if not isinstance(verifier, dict) or not isinstance(verifier.get("id"), str) or not verifier["id"]:
        problems.append("predicate.verifier.id is required")
    if not isinstance(p.get("timeVerified"), str) or not RFC3339_RE.match(p["timeVerified"]):
        problems.append("predicate.timeVerified must be an RFC 3339 time")
    if not isinstance(p.get("resourceUri"), str) or not p["resourceUri"]:
        problems.append("predicate.resourceUri is required")
    policy = p.get("policy")
    if not isinstance(policy, dict) or not (policy.get("uri") or policy.get("digest")):
        problems.append("predicate.policy needs a uri or a digest")
    inputs = p.get("inputAttestations", [])
    if not isinstance(inputs, list) or not all(isinstance(a, dict) and isinstance(a.get("digest"), dict)
                                               and a["digest"] for a in inputs):
        problems.append("predicate.inputAttestations must list attestations with their digests")
    if p.get("verificationResult") not in RESULTS:
        problems.append(f"predicate.verificationResult {p.get('verificationResult')!r}, expected PASSED or FAILED")
    levels = p.get("verifiedLevels")
    if not isinstance(levels, list) or not all(isinstance(x, str) for x in levels):
        problems.append("predicate.verifiedLevels must be a list of strings")
        levels = []
    if not isinstance(p.get("slsaVersion", ""), str):
        problems.append("predicate.slsaVersion must be a string")
    if problems or not isinstance(verifier, dict) or not isinstance(inputs, list):  # (narrowed by the checks above)
        report.add(CheckName.VSA, False, "; ".join(problems))
        return
    report.add(CheckName.VSA, True,
               f"verification summary by {verifier['id']} at {p['timeVerified']} over {len(names)} file(s), "
               f"SLSA {p.get('slsaVersion', '?')}; input attestations: "
               + (", ".join(f"{a.get('uri', '?')} sha256:{a['digest'].get('sha256', '?')[:16]}" for a in inputs)
                  or "none"))
    report.add(CheckName.VSA_RESULT, p["verificationResult"] == "PASSED",
               f"verificationResult {p['verificationResult']}; verifiedLevels {', '.join(levels) or 'none'}")
    if model is None:
        return
    from .model_dir import inspect_digests, report_exact

    expected = {s["name"]: {"sha256": s["digest"]["sha256"]} for s in subjects}
    report_exact(report, inspect_digests(expected, Path(model), prefetch=prefetch, published=published), sha256=True,
                 algos="sha256, as the VSA's subjects list them")
