"""The verifier as a library: a configured `Verifier`, an immutable `Result`, check names from a
closed set whose values are the documented JSON names (docs/formats.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from provenance.errors import InputError
from provenance.verify import Verifier
from provenance.verify.report import CheckName, Checks

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "attestations" / "ptrace-0.9.9-debugger.intoto.jsonl"
REF_KEY = ROOT / "attestations" / "keys" / "ptrace-0.9.9-debugger.pub"


def documented_check_names() -> list[str]:
    text = (ROOT / "docs" / "formats.md").read_text()
    section = text.split("## `verify-attestation --json`", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return [name for row in rows for name in re.findall(r"`([a-z0-9-]+)`", row)]


def test_the_check_names_are_exactly_the_documented_ones():
    assert sorted(documented_check_names()) == sorted(c.value for c in CheckName)


def test_a_check_name_outside_the_set_is_refused():
    with pytest.raises(ValueError):
        Checks().add("signatures", True, "a typo must not become a new JSON name")  # type: ignore[arg-type]


def test_the_committed_reference_verifies_through_the_library():
    result = Verifier.configure(keys=[REF_KEY]).verify(REF)
    assert result.result == "verified" and result.exit_code == 0 and not result.model_checked
    assert [c.check for c in result.checks][:3] == [CheckName.ENVELOPE, CheckName.PAYLOAD_TYPE, CheckName.SIGNATURE]
    assert result.as_dict()["checks"][0]["check"] == "envelope"
    assert result.check(CheckName.BUILDER_ID).ok


def test_a_result_cannot_be_changed_by_its_reader():
    result = Verifier.configure(keys=[REF_KEY]).verify(REF)
    with pytest.raises(AttributeError):
        result.verdict = "bitwise"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        result.checks.append(result.checks[0])  # type: ignore[attr-defined]
    result.statement["subject"].clear()  # a copy of its own: the result keeps the signed payload
    assert result.statement["subject"] and result.parsed.subject


def test_one_verifier_answers_for_several_attestations_and_keeps_its_keys(tmp_path):
    verifier = Verifier.configure(keys=[REF_KEY])
    forged = tmp_path / "a.intoto.jsonl"
    forged.write_text(REF.read_text().replace('"sig":"', '"sig":"A', 1))
    assert verifier.verify(forged).result == "FAILED"
    assert verifier.verify(REF).result == "verified"


@pytest.mark.parametrize("kwargs, message", [
    ({"keys": [REF_KEY], "threshold": 0}, "--threshold must be at least 1"),
    ({"keys": [REF_KEY, REF_KEY], "threshold": 2}, "needs 2 distinct keys; 2 --key option(s) name 1 distinct"),
    ({"keys": [ROOT / "no-such.pub"]}, "no-such.pub"),
])
def test_a_bad_configuration_fails_before_any_file_is_read(kwargs, message):
    with pytest.raises(InputError, match=re.escape(message)):
        Verifier.configure(**kwargs)
