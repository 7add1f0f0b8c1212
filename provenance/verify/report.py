"""The verifier's report: named checks, each passed or failed with a one-line detail."""

from __future__ import annotations

from typing import NamedTuple


class Check(NamedTuple):
    check: str
    ok: bool
    detail: str

    def as_dict(self) -> dict:
        return {"check": self.check, "ok": self.ok, "detail": self.detail}


class Report:
    """Checks in the order they ran. `question` is "verified" (exact) or "reproduced" (tolerance)."""

    def __init__(self) -> None:
        self.checks: list[Check] = []
        self.statement: dict | None = None  # the signed payload, as parsed JSON
        self.parsed: object | None = None  # the same, as attest.model.Statement
        self.question = "verified"
        # whether a model dir was checked: without one, "verified" covers the attestation alone
        self.model_checked = False
        # the reproduced question's answer: "bitwise" | "within tolerance" | "diverged" | "not established"
        self.verdict: str | None = None
        self.divergence: dict | None = None

    def __repr__(self) -> str:
        return f"Report(question={self.question!r}, result={self.result!r}, checks={self.checks!r})"

    def add(self, check: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(check, ok, detail))
        return ok

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def result(self) -> str:
        """The one line that answers the question asked (docs/threat-model.md)."""
        if self.question == "reproduced":
            if self.ok and self.verdict in ("bitwise", "within tolerance"):
                return f"reproduced ({self.verdict})"
            if self.verdict in ("diverged", "not established"):
                return self.verdict
            return "FAILED"
        return "verified" if self.ok else "FAILED"

    def as_dict(self) -> dict:
        out = {"ok": self.ok, "question": self.question, "result": self.result,
               "model_checked": self.model_checked, "checks": [c.as_dict() for c in self.checks]}
        if self.verdict is not None:
            out["verdict"] = self.verdict
        if self.divergence:
            out["divergence"] = self.divergence
        return out


def render(report: Report) -> str:
    width = max((len(c.check) for c in report.checks), default=5)
    lines = [f"{'PASS' if c.ok else 'FAIL'}  {c.check:<{width}}  {c.detail}" for c in report.checks]
    if report.question == "reproduced":
        asked = "question: is this a rebuild of the attested model? (--reproduced)"
    elif report.model_checked:
        asked = "question: are these exactly the attested files?"
    else:
        asked = "question: is the attestation itself genuine? (no --model: no file was checked against it)"
    lines.append(asked)
    scope = "" if report.model_checked or report.question == "reproduced" or not report.ok else \
        " (the attestation only; add --model DIR to check the files)"
    lines.append(f"verdict: {report.result}{scope}")
    return "\n".join(lines)
