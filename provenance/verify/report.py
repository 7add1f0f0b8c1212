"""The verifier's answer: named checks, each passed or failed with a one-line detail.

`CheckName` is the closed set of check names; its values are the names in `--json` output, a
contract documented in docs/formats.md ("verify-attestation --json"). `Checks` collects checks while
they run; `Result` is what a verification returns: immutable, its checks in the order they ran.
"""

from __future__ import annotations

import copy
from enum import Enum
from typing import Any, NamedTuple


class CheckName(str, Enum):
    """Every check the verifier and the reproduced question report, by its JSON name."""

    ENVELOPE = "envelope"
    BUNDLE = "bundle"
    PAYLOAD_TYPE = "payload-type"
    SIGNATURE = "signature"
    STATEMENT = "statement"
    STATEMENT_TYPE = "statement-type"
    PREDICATE_TYPE = "predicate-type"
    SLSA_FIELDS = "slsa-fields"
    BUILD_TYPE = "build-type"
    BUILDER_ID = "builder-id"
    RECIPE_EMBEDDED = "recipe-embedded"
    MODEL_FILES = "model-files"
    UNLISTED_FILES = "unlisted-files"
    SAFETENSORS = "safetensors"
    RECIPE = "recipe"
    AUDIT_ENVELOPE = "audit-envelope"
    AUDIT_PAYLOAD_TYPE = "audit-payload-type"
    AUDIT_SIGNATURE = "audit-signature"
    AUDIT_STATEMENT = "audit-statement"
    AUDIT_TYPE = "audit-type"
    AUDIT_SUBJECTS = "audit-subjects"
    AUDIT = "audit"
    LICENCE_COMPATIBILITY = "licence-compatibility"
    INPUTS = "inputs"
    POLICY = "policy"
    OMS_STATEMENT = "oms-statement"
    VSA = "vsa"
    VSA_RESULT = "vsa-result"
    MODEL_CARD = "model-card"
    REFERENCE_WEIGHTS = "reference-weights"
    RECITATION = "recitation"
    REPRODUCED = "reproduced"
    SOURCE_STATEMENT = "source-statement"
    SOURCE_SUBJECT = "source-subject"
    SOURCE_ARCHIVE = "source-archive"
    SOURCE_RECIPE = "source-recipe"
    SOURCE_INPUTS = "source-inputs"
    SOURCE_CODE = "source-code"
    SOURCE_LOCK = "source-lock"
    SOURCE_LICENCES = "source-licences"
    SOURCE_COMPLETE = "source-complete"
    CHAIN = "chain"

    def __str__(self) -> str:
        return self.value

    def of_audit(self) -> CheckName:
        """The name this envelope check has when it is made on the signed audit (`audit-signature`)."""
        return CheckName(f"audit-{self.value}")


class Check(NamedTuple):
    check: CheckName
    ok: bool
    detail: str
    # False when the check could not be made (a file that cannot be read, an input absent from the
    # store): not a finding against the files, so the exit code is 2, not 1 (docs/threat-model.md).
    checked: bool = True

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"check": self.check.value, "ok": self.ok, "detail": self.detail}
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


class Checks:
    """The checks of one verification while they run, in order (mutable; `result()` freezes them)."""

    def __init__(self, checks: tuple[Check, ...] = ()) -> None:
        self.checks: list[Check] = list(checks)

    def add(self, check: CheckName, ok: bool, detail: str) -> bool:
        self.checks.append(Check(CheckName(check), ok, detail))
        return ok

    def could_not_check(self, check: CheckName, detail: str) -> bool:
        """A check that could not be made: the result fails, with exit 2 unless another check failed."""
        self.checks.append(Check(CheckName(check), False, detail, checked=False))
        return False

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def result(self, **fields: Any) -> Result:
        return Result(tuple(self.checks), **fields)


class Result(NamedTuple):
    """One verification's answer, immutable. `question` is "verified" (exact) or "reproduced"
    (repro/'s question: are other weights a rebuild of the attested ones?), `verdict` its answer
    there. (A NamedTuple, not a dataclass: `dataclasses` costs the verifier's start-up about 13 ms.)"""

    checks: tuple[Check, ...]
    question: str = "verified"
    # whether a model dir was checked: without one, "verified" covers the attestation alone
    model_checked: bool = False
    payload: Any = None  # the signed payload as parsed JSON; read it through `statement` (a copy)
    parsed: Any = None  # the same, as attest.model.Statement (a NamedTuple), when it is an SLSA statement
    # the reproduced question's answer: "bitwise" | "within tolerance" | "diverged" | "not established"
    verdict: str | None = None
    divergence: Any = None
    lineage: Any = None  # with --chain: the model and its parents, verified (verify/chain.py's Links)

    @property
    def statement(self) -> Any:
        """The signed payload as parsed JSON: a copy of its own for each caller."""
        return copy.deepcopy(self.payload)

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

    def check(self, name: CheckName) -> Check | None:
        """The first check of that name, if it ran."""
        return next((c for c in self.checks if c.check is name), None)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.exit_code == 0, "exit_code": self.exit_code, "question": self.question,
                               "result": self.result,
               "model_checked": self.model_checked, "checks": [c.as_dict() for c in self.checks]}
        if self.verdict is not None:
            out["verdict"] = self.verdict
        if self.divergence:
            out["divergence"] = copy.deepcopy(self.divergence)
        if self.lineage is not None:
            out["lineage"] = [link.as_dict() for link in self.lineage]
        return out


def render(result: Result) -> str:
    width = max((len(c.check.value) for c in result.checks), default=5)
    lines = [f"{'PASS' if c.ok else 'FAIL' if c.checked else 'SKIP'}  {c.check.value:<{width}}  {printable(c.detail)}"
             for c in result.checks]
    if result.question == "reproduced":
        asked = "question: is this a rebuild of the attested model? (--reproduced)"
    elif result.model_checked:
        asked = "question: are these exactly the attested files?"
    else:
        asked = "question: is the attestation itself genuine? (no --model: no file was checked against it)"
    if result.lineage:
        lines.append(render_lineage(result.lineage))
    lines.append(asked)
    scope = "" if result.model_checked or result.question == "reproduced" or not result.ok else \
        " (the attestation only; add --model DIR to check the files)"
    lines.append(f"verdict: {result.result}{scope}")
    return "\n".join(lines)


def render_lineage(lineage: tuple[Any, ...]) -> str:
    """The lineage (verify/chain.py's Links) as a tree, the model first and its root last; every value
    from a statement is printed through `printable`."""
    lines = ["lineage:"]
    for depth, link in enumerate(lineage):
        via = f" (its input {link.via!r})" if link.via else ""
        line = (f"{link.recipe}{via}: weights blake3:{link.weights[:16]}…, licence {link.output_license}, "
                f"trained on {', '.join(link.input_licenses) or 'nothing'}")
        lines.append(f"{'  ' * depth}{'└─ ' if depth else ''}{printable(line)}")
    return "\n".join(lines)
