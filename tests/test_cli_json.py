"""Every subcommand keeps the README's promise under --json: one JSON object on stdout, also when
the arguments are wrong (argparse's usage errors included)."""

from __future__ import annotations

import argparse
import json

import pytest

from provenance._cli import main, parser, verify_main


def _subcommands() -> list[list[str]]:
    out = []
    for action in parser()._subparsers._group_actions:  # noqa: SLF001 - argparse keeps no public list
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
                out += [[name, n] for a in nested for n in a.choices] if nested else [[name]]
    return out


def test_every_subcommand_is_listed():
    names = {c[0] for c in _subcommands()}
    assert {"build", "verify", "report", "publish", "sbom", "replay", "gate", "store", "diverge"} <= names


@pytest.mark.parametrize("cmd", _subcommands(), ids=" ".join)
@pytest.mark.parametrize("bad", [["--no-such-option"], []], ids=["unknown-option", "missing-arguments"])
def test_a_bad_argument_under_json_prints_one_json_object(cmd, bad, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a command might write lands in the repository
    if not bad:
        try:
            parser().parse_args([*cmd, "--json"])
            pytest.skip(f"{' '.join(cmd)} needs no argument")
        except SystemExit:
            capsys.readouterr()
    code = main([*cmd, *bad, "--json"])
    out, err = capsys.readouterr()
    assert code == 2, (cmd, out, err)
    obj = json.loads(out)  # exactly one object: json.loads refuses anything after it
    assert obj["ok"] is False and obj["exit_code"] == 2 and obj["error"], obj
    assert "Traceback" not in err


def test_verify_attestation_usage_error_under_json(capsys):
    assert verify_main(["--json", "--threshold", "x"]) == 2
    out, err = capsys.readouterr()
    assert "invalid int value" in json.loads(out)["error"] and err.startswith("usage: ")
