"""The verifier's report: named checks, each passed or failed with a one-line detail."""

from __future__ import annotations

from typing import NamedTuple


class Check(NamedTuple):
    check: str
    ok: bool
    detail: str
    # False when the check could not be made (a file that cannot be read, an input absent from the
    # store): not a finding against the files, so the exit code is 2, not 1 (docs/threat-model.md).
    checked: bool = True

    def as_dict(self) -> dict:
        out = {"check": self.check, "ok": self.ok, "detail": self.detail}
        if not self.checked:
            out["checked"] = False
        return out


# The answers that exit 0; any other result exits 1 (a check failed) or 2 (one could not be made).
ACCEPTED = ("verified", "reproduced (bitwise)", "reproduced (within tolerance)")
NOT_CHECKED = "NOT CHECKED"


def printable(text: str) -> str:
    """`text` with every control or otherwise unprintable character escaped (\\n, \\x1b, \\u202e):
    a file name is attacker-chosen, and printed raw it could forge a verdict line or hide the real
    one behind a terminal escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] if c in "\t\n\r" else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") for c in text)


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

    def could_not_check(self, check: str, detail: str) -> bool:
        """A check that could not be made: the report fails, with exit 2 unless another check failed."""
        self.checks.append(Check(check, False, detail, checked=False))
        return False

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def incomplete(self) -> bool:
        """Nothing failed, but some check could not be made."""
        return any(not c.checked for c in self.checks) and all(c.ok or not c.checked for c in self.checks)

    @property
    def exit_code(self) -> int:
        """0 only for an accepted answer (ACCEPTED), 2 when a check could not be made and none failed, else 1."""
        if self.result in ACCEPTED:
            return 0
        return 2 if self.incomplete else 1

    @property
    def result(self) -> str:
        """The one line that answers the question asked (docs/threat-model.md)."""
        if self.incomplete:
            return NOT_CHECKED
        if self.question == "reproduced":
            if self.ok and self.verdict in ("bitwise", "within tolerance"):
                return f"reproduced ({self.verdict})"
            if self.verdict in ("diverged", "not established"):
                return self.verdict
            return "FAILED"
        return "verified" if self.ok else "FAILED"

    def as_dict(self) -> dict:
        out = {"ok": self.exit_code == 0, "exit_code": self.exit_code, "question": self.question, "result": self.result,
               "model_checked": self.model_checked, "checks": [c.as_dict() for c in self.checks]}
        if self.verdict is not None:
            out["verdict"] = self.verdict
        if self.divergence:
            out["divergence"] = self.divergence
        return out


def render(report: Report) -> str:
    width = max((len(c.check) for c in report.checks), default=5)
    lines = [f"{'PASS' if c.ok else 'FAIL' if c.checked else 'SKIP'}  {c.check:<{width}}  {printable(c.detail)}"
             for c in report.checks]
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
