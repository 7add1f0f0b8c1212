"""Property tests (hypothesis) of the four readers of untrusted text: the recipe loader, the policy
loader, the attestation reader and diverge's transcript reader. Any input gives exit 0, 1 or 2,
never a traceback or an internal error. bench/fuzz.py runs 10,000 inputs per target."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings

from . import fuzz_targets as ft

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@SETTINGS
@given(ft.recipe_inputs())
def test_recipe_loader(text):
    with ft.scratch() as tmp:
        code, out = ft.check_recipe_target(text, tmp)
    assert ft.ok(code, out), out


def test_policy_loader(signed_tiny):
    out_dir, keys = signed_tiny

    @SETTINGS
    @given(ft.policy_inputs())
    def prop(text):
        with ft.scratch() as tmp:
            code, out = ft.policy_target(text, tmp, out_dir / "attestation.intoto.jsonl", keys / "signer.pub")
        assert ft.ok(code, out), out
    prop()


def test_attestation_reader(signed_tiny):
    out_dir, keys = signed_tiny
    env = json.loads((out_dir / "attestation.intoto.jsonl").read_text())

    @SETTINGS
    @given(ft.attestation_inputs(env))
    def prop(text):
        with ft.scratch() as tmp:
            code, out = ft.attestation_target(text, tmp, keys / "signer.pub")
        assert ft.ok(code, out) and code != 0, out
        json.loads(out.split("\nerror:")[0] if "\nerror:" in out else out.splitlines()[0])
    prop()


def test_transcript_reader(signed_tiny):
    out_dir, _ = signed_tiny
    good = out_dir / "transcript.jsonl"
    line = good.read_text().splitlines()[0]

    @SETTINGS
    @given(ft.transcript_inputs(line))
    def prop(text):
        with ft.scratch() as tmp:
            code, out = ft.diverge_target(text, tmp, good)
        assert ft.ok(code, out), out
    prop()
