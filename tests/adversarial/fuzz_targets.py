"""Fuzz targets shared by the suite (a few hundred inputs each) and bench/fuzz.py (10,000 each).

Each target feeds one generated input to the real command, in process, and returns the exit code
and what it printed; the property is that the exit code is 0, 1 or 2 and nothing is a traceback or
an internal error."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

from hypothesis import strategies as st

from provenance._cli import main, verify_main

ROOT = Path(__file__).resolve().parents[2]
TINY = (ROOT / "tests" / "recipes" / "tiny.toml").read_text()
POLICY = '[policy]\nforbidden_licenses = ["GPL-2.0-only OR MIT"]\nallowed_output_licenses = ["MIT"]\n' \
         '[reproduced]\nmax_rel_l2 = 0.5\n'


def run(fn, argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = fn(argv)
    return code, out.getvalue() + err.getvalue()


def ok(code: int, text: str) -> bool:
    return code in (0, 1, 2) and "Traceback" not in text and "internal error" not in text


def mutate(text: str):
    """A strategy of texts derived from `text` by a few byte-level edits."""
    def apply(edits):
        s = text
        for pos, kind, chunk in edits:
            i = pos % (len(s) + 1)
            if kind == 0:
                s = s[:i] + chunk + s[i:]
            elif kind == 1:
                s = s[:i] + s[i + len(chunk) + 1:]
            else:
                s = s[:i] + chunk + s[i + len(chunk):]
        return s
    chunk = st.one_of(st.text(alphabet='0123456789.-_"[]{}=\n #abcxyz\\\'+e', max_size=6),
                      st.sampled_from(["inf", "nan", "true", "1e999", "-1", "99999999999999999999", "\x00", "\ud800"]))
    edit = st.tuples(st.integers(0, 1 << 16), st.integers(0, 2), chunk)
    return st.lists(edit, min_size=1, max_size=4).map(apply)


VALUE = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
                     max_leaves=12)


def recipe_inputs():
    return st.one_of(mutate(TINY), st.binary(max_size=400).map(lambda b: b.decode("latin-1")))


def check_recipe_target(text: str, tmp: Path) -> tuple[int, str]:
    p = tmp / "r.toml"
    p.write_bytes(text.encode("utf-8", "surrogatepass"))
    return run(main, ["check-recipe", str(p)])


def policy_inputs():
    return st.one_of(mutate(POLICY), st.binary(max_size=300).map(lambda b: b.decode("latin-1")))


def policy_target(text: str, tmp: Path, att: Path, pub: Path) -> tuple[int, str]:
    p = tmp / "policy.toml"
    p.write_bytes(text.encode("utf-8", "surrogatepass"))
    return run(verify_main, [str(att), "--key", str(pub), "--policy", str(p)])


def attestation_inputs(envelope: dict):
    """Whole-file bytes, envelopes with a field replaced by any JSON value, and statements with one
    key replaced (unsigned: the signature check must fail cleanly)."""
    payload = json.loads(base64.b64decode(envelope["payload"]))
    field = st.sampled_from(["payload", "payloadType", "signatures", "extra"])
    env_edit = st.tuples(field, VALUE).map(lambda kv: json.dumps({**envelope, kv[0]: kv[1]}))
    st_key = st.sampled_from(sorted(payload) + ["subject", "predicate"])
    st_edit = st.tuples(st_key, VALUE).map(lambda kv: json.dumps(
        {**envelope, "payload": base64.b64encode(json.dumps({**payload, kv[0]: kv[1]}).encode()).decode()}))
    return st.one_of(st.binary(max_size=300).map(lambda b: b.decode("latin-1")), env_edit, st_edit,
                     mutate(json.dumps(envelope)[:400]))


def attestation_target(text: str, tmp: Path, pub: Path) -> tuple[int, str]:
    p = tmp / "att.jsonl"
    p.write_bytes(text.encode("utf-8", "surrogatepass"))
    return run(verify_main, [str(p), "--key", str(pub), "--json"])


def _chain(records: list[dict]) -> str:
    """Well-chained transcript lines holding arbitrary values, so diverge compares them."""
    from provenance.builder.transcript import Transcript

    t = Transcript()
    for r in records:
        t.append(r)
    return t.to_bytes().decode()


def transcript_inputs(line: str):
    fields = st.sampled_from(["samples", "lr", "loss", "grad_norm", "params", "step", "global_step", "stage"])
    chained = st.lists(st.dictionaries(fields, VALUE, max_size=5), min_size=1, max_size=4).map(_chain)
    return st.one_of(st.binary(max_size=300).map(lambda b: b.decode("latin-1")), mutate(line + "\n" + line + "\n"),
                     st.lists(VALUE, max_size=3).map(lambda vs: "\n".join(json.dumps(v) for v in vs)), chained)


def diverge_target(text: str, tmp: Path, good: Path) -> tuple[int, str]:
    p = tmp / "t.jsonl"
    p.write_bytes(text.encode("utf-8", "surrogatepass"))
    return run(main, ["diverge", str(good), str(p)])


@contextlib.contextmanager
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
