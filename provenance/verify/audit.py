"""The signed memorization audit beside an attestation (`audit.intoto.jsonl`): its signature (the
same keys and threshold as the attestation), its type, that its subjects are exactly the
provenance's, and the policy's `[audit]` bounds on the extraction rate."""

from __future__ import annotations

from pathlib import Path

from ..attest.audit import AUDIT_FILE, AUDIT_PREDICATE_TYPE
from .report import CheckName, Checks

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .._internal.jsonstrict import JSONObject
    from .keys import PublicKey
    from .policy import AuditPolicy


def audit_checks(report: Checks, attestation: Path, explicit: Path | None, keys: list[PublicKey], threshold: int,
                 provenance: JSONObject, policy: AuditPolicy, licence_policy: str = "ignore") -> None:
    from .envelope import read_attestation, verify_dsse

    path = explicit or Path(attestation).parent / AUDIT_FILE
    if not path.is_file():
        bounds = [f"{k} {v:g}" for k, v in (("max_extraction_rate", policy.max_extraction_rate),
                                            ("min_extraction_rate", policy.min_extraction_rate)) if v is not None]
        if explicit is not None or policy.require or bounds:
            report.add(CheckName.AUDIT, False, f"no signed memorization audit at {path}"
                       + (f": the policy's {' and '.join(bounds)} cannot be checked without it" if bounds else ""))
        if licence_policy == "fail":
            report.add(CheckName.LICENCE_COMPATIBILITY, False, f"no signed licence verdict: no audit at {path}")
        return
    kind, items = read_attestation(path)
    sub = Checks()
    payload = verify_dsse(sub, items, keys, threshold) if kind == "dsse" else None
    if kind != "dsse":
        sub.add(CheckName.ENVELOPE, False, "the audit must be a DSSE envelope")
    for c in sub.checks:
        report.add(c.check.of_audit(), c.ok, c.detail)
    if payload is None:
        return
    if not isinstance(payload, dict) or payload.get("predicateType") != AUDIT_PREDICATE_TYPE:
        got = payload.get("predicateType") if isinstance(payload, dict) else type(payload).__name__
        report.add(CheckName.AUDIT_TYPE, False, f"predicateType {got!r}, expected {AUDIT_PREDICATE_TYPE!r}")
        return
    mine = sorted((s.get("name"), (s.get("digest") or {}).get("sha256")) for s in payload.get("subject", [])
                  if isinstance(s, dict))
    theirs = sorted((s["name"], s["digest"].get("sha256")) for s in provenance["subject"])
    if not report.add(CheckName.AUDIT_SUBJECTS, mine == theirs,
                      "the audit's subjects are the provenance's" if mine == theirs else
                      "the audit's subjects differ from the provenance's: it is about other files"):
        return
    try:
        summary = payload["predicate"]["audit"]["summary"]
        rate = summary["extraction_rate"]
        ctrl = summary.get("control_extraction_rate")
        if rate is not None and not (isinstance(rate, (int, float)) and 0 <= rate <= 1):
            raise TypeError
    except (KeyError, TypeError):
        report.add(CheckName.AUDIT, False, "the audit's predicate has no readable summary.extraction_rate")
        return
    detail = (f"highest extraction rate {'n/a' if rate is None else f'{100 * rate:.1f}%'} of training windows"
              + (f", control {100 * ctrl:.1f}%" if isinstance(ctrl, (int, float)) else ", no control"))
    problems = []
    if policy.max_extraction_rate is not None and (rate is None or rate > policy.max_extraction_rate):
        problems.append(f"above the policy's max_extraction_rate {policy.max_extraction_rate:g}")
    if policy.min_extraction_rate is not None and (rate is None or rate < policy.min_extraction_rate):
        problems.append(f"below the policy's min_extraction_rate {policy.min_extraction_rate:g}")
    report.add(CheckName.AUDIT, not problems, detail + ("; " + "; ".join(problems) if problems else ""))
    if licence_policy != "ignore":
        _licence_check(report, payload["predicate"]["audit"].get("licence_compatibility"), rate, licence_policy)


def _licence_check(report: Checks, c: object, rate: float | None, mode: str) -> None:
    if not isinstance(c, dict) or c.get("verdict") not in ("compatible", "incompatible", "unknown"):
        report.add(CheckName.LICENCE_COMPATIBILITY, mode != "fail",
                   "the signed audit holds no licence verdict (the build ran "
                   "with --licence-compatibility ignore)")
        return
    inbound = c.get("inbound")
    rows = inbound if isinstance(inbound, list) else []
    bad = [f"{r.get('inbound')} ({r.get('files')} files)" for r in rows
           if isinstance(r, dict) and r.get("compatible") is not True]
    recites = "" if rate is None else \
        f"; the model completes up to {100 * rate:.1f}% of sampled training windows verbatim"
    if c["verdict"] == "compatible":
        report.add(CheckName.LICENCE_COMPATIBILITY, True,
                   f"{c.get('outbound')} is compatible with every training file's "
                   f"licence ({c.get('source')})")
        return
    detail = (f"{c.get('outbound')} declared for weights trained on {', '.join(bad) or 'unjudged licences'}: "
              f"{c['verdict']} according to {c.get('source')}{recites}")
    report.add(CheckName.LICENCE_COMPATIBILITY, mode != "fail", ("warning: " if mode == "warn" else "") + detail)
