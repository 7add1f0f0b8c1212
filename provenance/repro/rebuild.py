"""The pieces of a rebuild's judgement: the verified statement and its embedded recipe, the reproduced
question answered for a rebuilt model dir (bitwise on the reference's stack; otherwise bitwise or
within tolerance of its signed fingerprint), whether two builds ran on the same stack, the SLSA
Verification Summary, and the gate's JUnit report. `provenance rebuild` runs them in repro/judged.py,
`provenance gate` in repro/gate.py.
"""

from __future__ import annotations

import hashlib
import platform
import re
from datetime import datetime, timezone
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from ..attest.model import VSA_TYPE
from ..attest.statement import STATEMENT_TYPE
from ..errors import CheckFailed
from ..verify.report import CheckName

VERIFIER_ID = "https://provenance.invalid/verifiers/rebuild/v1"


def verified_statement(attestation: Path, keys: list[Path], policy: Path | None = None):
    """(payload dict, attest.model.Statement) of an attestation that verifies. Raises CheckFailed."""
    from ..verify import Verifier, render

    result = Verifier.configure(keys=keys, policy=policy).verify(attestation)
    if not result.ok:
        raise CheckFailed(f"{attestation}: the attestation does not verify:\n{render(result)}")
    return result.statement, result.parsed


def recipe_file_name(st) -> str:
    """The embedded recipe's file name if it is a plain `NAME.toml`, else `recipe.toml` (never a path)."""
    name = st.recipe.path
    return name if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\.toml", name) else "recipe.toml"


def embedded_recipe(st, dest: Path) -> Path:
    """Write the verified statement's embedded recipe (its digest already checked) into `dest`."""
    rec = st.recipe
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / recipe_file_name(st)
    from .._internal.atomic import atomic_write_bytes

    atomic_write_bytes(path, rec.content.encode())
    return path


def judge_build(st, model_dir: Path, *, bitwise: bool, bounds=None, store: Path | None = None):
    """Answer the reproduced question for a rebuilt model dir: a Result with its verdict.

    With `bitwise`, only an exact match counts (the same stack must give the same bits)."""
    from ..verify.model_dir import inspect, report_exact
    from ..verify.policy import Bounds
    from .reproduced import Judgement, check_reproduced

    report = Judgement()
    if bitwise:
        res = inspect(st, model_dir, sha256=False)
        report_exact(report, res, sha256=False)
        report.verdict = "bitwise" if report.ok else "diverged"
        report.add(CheckName.REPRODUCED, report.ok, "bitwise required (same stack as the reference): "
                   + ("every file is bitwise equal" if report.ok else "the files differ"))
    else:
        # The rebuild's inputs are in the store: recitation on windows drawn now is always available.
        check_reproduced(report, st, model_dir, bounds or Bounds(), inputs=True, store=store)
    return report.result(model_checked=True)


def vsa_statement(st: dict, attestation: Path, report, rebuild_record: dict | None, policy: str) -> dict:
    outputs = st["predicate"]["runDetails"].get("provenance_outputs", {})
    passed = report.ok
    return {
        "_type": STATEMENT_TYPE,
        "subject": st["subject"],
        "predicateType": VSA_TYPE,
        "predicate": {
            "verifier": {"id": VERIFIER_ID, "version": {"provenance": _version()}},
            "timeVerified": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "resourceUri": f"urn:provenance:weights:blake3-tensors-v1:{outputs.get('tensors', {}).get('digest', '')}",
            "policy": {"uri": f"{VERIFIER_ID}#{policy}"},
            "inputAttestations": [{"uri": Path(attestation).name,
                                   "digest": {"sha256": hashlib.sha256(Path(attestation).read_bytes()).hexdigest()}}],
            "verificationResult": "PASSED" if passed else "FAILED",
            # SLSA_BUILD_REPRODUCED only for bits equal to the attested ones from an independent
            # rebuild (rebuild never reads the stage cache or an earlier checkpoint).
            "verifiedLevels": (["SLSA_BUILD_LEVEL_1"]
                               + (["SLSA_BUILD_REPRODUCED"] if report.verdict == "bitwise" else [])
                               if passed else []),
            "dependencyLevels": {},
            "slsaVersion": "1.2",
            "provenance_verdict": {
                "verdict": report.verdict,
                "checks": [c.as_dict() for c in report.checks],
                "divergence": report.divergence or {},
                "rebuild": {"weights": (rebuild_record or {}).get("weights", {}).get("tensors"),
                            "cpu_capability": (rebuild_record or {}).get("determinism", {}).get("cpu_capability"),
                            "world_size": (rebuild_record or {}).get("distributed", {}).get("world_size"),
                            "machine": platform.machine()},
            },
        },
    }


def _version() -> str:
    from .. import __version__

    return __version__


def sign_vsa(vsa: dict, signers, path: Path) -> None:
    from ..attest.signing import write_signed

    write_signed(path, vsa, signers)


def _pins(these: dict | None, other: dict | None) -> str:
    """The numerics pins of `these` that differ from `other`, as sorted KEY=value pairs."""
    these, other = these or {}, other or {}
    keys = sorted(k for k in set(these) | set(other) if these.get(k) != other.get(k))
    return ", ".join(f"{k}={these.get(k, '(unset)')}" for k in keys) or "(none)"


def _threads_matter(st: dict, numerics: dict | None) -> str | None:
    """Why the thread count may change the reference's bits, or None where it was measured not to:
    MKL's COMPATIBLE branch (the `default` level anywhere; `avx2` on a CPU not Intel's) splits some
    products by it, and so does bfloat16 autocast on the CPU."""
    if str((numerics or {}).get("mkl_branch") or "").startswith("COMPATIBLE"):
        return "under MKL's COMPATIBLE branch some products' bits depend on the thread count"
    import tomllib

    content = st["predicate"]["buildDefinition"].get("externalParameters", {}).get("recipe", {}).get("content")
    try:
        stages = tomllib.loads(content).get("stages", []) if isinstance(content, str) else []
    except tomllib.TOMLDecodeError:
        stages = []
    if any(isinstance(x, dict) and x.get("precision") == "bf16-autocast" for x in stages):
        return "bf16 autocast's bits on the CPU depend on the thread count"
    return None


def _native_diffs(st: dict, ref_det: dict, ref_machine: dict, det: dict, mach: dict) -> list[str]:
    """How a native (not portable) rebuild's stack differs from the reference's, beyond the toolchain:
    CPU capability, MKL and oneDNN pins, the thread count where it changes bits, CPU vendor, and the
    MKL and oneDNN versions (stack_matches)."""
    diffs = []
    if ref_det.get("cpu_capability") != det.get("cpu_capability"):
        diffs.append(f"cpu capability {det.get('cpu_capability')} vs reference {ref_det.get('cpu_capability')}")
    if ref_det.get("kernels") == "fixed-order" and det.get("kernels") == "fixed-order":
        # Every product is our GEMM's (builder/fixed_gemm.c): MKL, oneDNN, their pins and the CPU's vendor
        # take no part in the bits, and neither does the thread count. Bitwise across vendors is demanded,
        # also from another version of the GEMM's source: its order is the algorithm's (tests/vectors/
        # fixed-gemm.json holds it), so a change that alters a bit is a bug to find, not a tolerance.
        return diffs
    ref_num, num = ref_det.get("numerics"), det.get("numerics")
    if ref_num is None:
        diffs.append("the reference does not record its MKL and oneDNN pins")
    elif ref_num != num:
        diffs.append(f"numerics libraries {_pins(num, ref_num)} vs reference {_pins(ref_num, num)}")
    why_threads = _threads_matter(st, ref_num)
    if why_threads and ref_det.get("threads") not in (None, det.get("threads")):
        diffs.append(f"threads {det.get('threads')} vs reference {ref_det.get('threads')} ({why_threads}, "
                     "docs/reproducibility.md)")
    if ref_machine.get("cpu_vendor") != mach.get("cpu_vendor"):
        diffs.append(f"CPU vendor {mach.get('cpu_vendor')} vs reference {ref_machine.get('cpu_vendor')} "
                     "(not measured to give the same bits)")
    for lib in ("mkl", "onednn"):
        if ref_machine.get(lib) != mach.get(lib):
            diffs.append(f"{lib} {mach.get(lib)} vs reference {ref_machine.get(lib)}")
    return diffs


def _topology_diffs(ref_det: dict, det: dict, ref_dist: dict, dist: dict) -> list[str]:
    """The world size, where it decides the bits: under DistributedDataParallel's all-reduce, not under
    the canonical reduction (builder/train.py), whose bits are the same on any number of ranks and nodes."""
    if ref_det.get("reduction") == "canonical" and det.get("reduction") == "canonical":
        return []
    ref_world, world = ref_dist.get("world_size", 1), dist.get("world_size", 1)
    if ref_world == world:
        return []
    return [f"world size {world} vs reference {ref_world} (reduction 'all-reduce': the bits follow the topology; "
            "[determinism] reduction = 'canonical' makes them independent of it)"]


def stack_matches(st: dict, record: dict) -> tuple[bool, str]:
    """Whether a rebuild ran on the reference's stack: same CPU capability, the same MKL and oneDNN
    pins, the same CPU vendor (MKL's code paths are chosen by vendor as well as by ISA) and the same
    toolchain versions, and, where the thread count was measured to change bits (MKL's COMPATIBLE
    branch, bf16 autocast: _threads_matter), the same thread count. Bitwise equality is required only
    then (docs/reproducibility.md).

    A portable build (both the reference's and this one, builder/portable.py) is bitwise by design
    across CPU capabilities, vendors and numerics libraries: only the toolchain must match."""
    internal = st["predicate"]["buildDefinition"].get("internalParameters", {})
    ref_det, ref_machine = internal.get("determinism", {}), internal.get("machine", {})
    det, mach = record["determinism"], record.get("machine", {})
    portable = bool(ref_det.get("portable")) and bool(det.get("portable"))
    # The CPU, its numerics libraries and the thread count do not decide a portable build's bits.
    diffs = [] if portable else _native_diffs(st, ref_det, ref_machine, det, mach)
    diffs += _topology_diffs(ref_det, det, internal.get("distributed", {}), record.get("distributed", {}))
    versions = {d["name"].removeprefix("toolchain:"): d.get("uri", "").rsplit("@", 1)[-1]
                for d in st["predicate"]["buildDefinition"].get("resolvedDependencies", [])
                if str(d.get("name", "")).startswith("toolchain:")}
    installed = record["toolchain"]["installed"]
    for lib, ver in versions.items():
        if lib in installed and installed[lib] != ver:
            diffs.append(f"{lib} {installed[lib]} vs reference {ver}")
    fixed = ref_det.get("kernels") == "fixed-order" and det.get("kernels") == "fixed-order"
    same = ("portable build: the same toolchain as the reference (CPU and numerics libraries need not match)"
            if portable else "fixed-order kernels: the same capability and toolchain as the reference (the CPU's "
            "vendor, its numerics libraries and the thread count need not match)" if fixed
            else "same CPU vendor, capability, numerics libraries and toolchain as the reference")
    return not diffs, "; ".join(diffs) or same


def junit(path: Path, suite: str, cases: list[tuple[str, bool, str]], seconds: float) -> None:
    from .._internal.atomic import atomic_write_bytes

    failures = sum(1 for _, ok, _ in cases if not ok)
    parts = [f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuites>\n<testsuite name={quoteattr(suite)} '
             f'tests="{len(cases)}" failures="{failures}" errors="0" time="{seconds:.3f}">']
    for name, ok, detail in cases:
        parts.append(f"  <testcase classname={quoteattr(suite)} name={quoteattr(name)}>")
        if not ok:
            parts.append(f"    <failure message={quoteattr(detail[:200])}>{escape(detail)}</failure>")
        else:
            parts.append(f"    <system-out>{escape(detail)}</system-out>")
        parts.append("  </testcase>")
    parts.append("</testsuite>\n</testsuites>\n")
    atomic_write_bytes(Path(path), "\n".join(parts).encode())
