"""`verify-attestation --reproduced`: are these weights a rebuild of the attested model?

Everything but the weights must still be exact (the same closed set of files, config and tokenizer
byte for byte, well-formed safetensors); `model.safetensors` may differ, and is then judged with the
verifier's bounds. The answer is `reproduced (bitwise)`, `reproduced (within tolerance)` or
`diverged`; never `verified`.

Three sources of evidence, from weakest to strongest (docs/threat-model.md):
- the signed fingerprint alone: estimates from public projections and public eval windows, which
  someone who reads the attestation can steer;
- `--inputs`: the verifier re-derives the training texts from the re-hashed inputs and measures the
  candidate's recitation on windows drawn with a seed of its own, kept secret until the answer;
- `--reference-model DIR`: the attested weights themselves (verified exactly first), so every
  distance is measured, not estimated.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..verify import Verifier
from ..verify.model_dir import inspect, report_exact
from ..verify.policy import Bounds
from ..verify.report import CheckName, Checks, Result
from .compare import BITWISE, DIVERGED, WITHIN, judge_against_fingerprint

WEIGHTS = "model.safetensors"
NOT_ESTABLISHED = "not established"


MODEL_CARD = "README.md"


class Judgement(Checks):
    """repro/'s report, on top of the verifier's result: the reproduced question's checks, its
    verdict and the measured divergence."""

    def __init__(self, checks=()) -> None:
        super().__init__(checks)
        self.verdict: str | None = None
        self.divergence: dict = {}

    def result(self, **fields) -> Result:
        return super().result(question="reproduced", verdict=self.verdict, divergence=self.divergence or None,
                              **fields)


def reproduced(verifier: Verifier, attestation: Path, model_dir: Path, *, reference: Path | None = None,
               recipe: Path | None = None, inputs: bool = False, audit: Path | None = None,
               published: bool = False, prefetch=None) -> Result:
    """`verify-attestation --reproduced`: the attestation verified (without its files), then the
    model dir judged as a rebuild of the attested model under the verifier's policy bounds."""
    base = verifier.verify(attestation, recipe=recipe, inputs=inputs, audit=audit, prefetch=prefetch,
                           needs_build=("--reproduced",))
    report = Judgement(base.checks)
    if base.ok:
        check_reproduced(report, base.parsed, model_dir, verifier.policy.reproduced, sha256=verifier.sha256,
                         prefetch=prefetch, reference=reference, store=verifier.store, inputs=inputs,
                         published=published)
    return report.result(model_checked=True, payload=base.payload, parsed=base.parsed)


def check_reproduced(report: Judgement, st, model_dir: Path, bounds: Bounds, *, sha256: bool = False,
                     prefetch=None, reference: Path | None = None, store: Path | None = None,
                     inputs: bool = False, published: bool = False) -> None:
    """Add the model-dir checks and the `reproduced` check to `report` (st: attest.model.Statement);
    with `reference` and `inputs`, also the `reference-weights` and `recitation` checks. Every path
    out of here sets `report.verdict` or fails a check: a report that is ok has an answer."""
    res = inspect(st, Path(model_dir), sha256=sha256, prefetch=prefetch, published=published)
    weights_differ = WEIGHTS in res.differing and WEIGHTS not in {n.split(":")[0] for n in res.structure}
    tensors_equal = weights_differ and _same_tensors(st, Path(model_dir))
    # The model card (README.md) states the weights' tensor digest and their audit's rates: a rebuild
    # whose tensors differ has its own card, which the weights' judgement covers (model-card below
    # says what is and is not vouched for). Tensors bitwise equal leave the card nothing to differ in.
    judged = frozenset({WEIGHTS}) if tensors_equal else frozenset({WEIGHTS, MODEL_CARD}) if weights_differ \
        else frozenset()
    report_exact(report, res, sha256=sha256, judged_elsewhere=judged)
    if not report.ok:
        report.verdict = None  # a file beside the weights is not the attested one: FAILED, not a distance
        return
    if not weights_differ:
        report.verdict = BITWISE
        report.add(CheckName.REPRODUCED, True, "every file is bitwise equal to the attested one")
        return
    if tensors_equal:
        report.verdict = BITWISE
        report.add(CheckName.REPRODUCED, True, f"{WEIGHTS} differs from the attested file, but its tensors are bitwise "
                   "equal (blake3-tensors-v1): only the header or metadata differs; every other file is exact")
        return
    if MODEL_CARD in res.differing:
        _card_check(report, Path(model_dir), Path(reference) if reference is not None else None)
    if reference is not None:
        _against_reference(report, st, Path(model_dir), Path(reference), bounds)
    if inputs:
        secret_recitation(report, st, Path(model_dir), store, bounds)
    fp = st.runDetails.provenance_outputs.fingerprint
    v = judge_against_fingerprint(fp, Path(model_dir), bounds)
    report.divergence = {**v.metrics, **report.divergence}
    f = v.metrics.get("functional", {})
    fpm = v.metrics.get("fingerprint", {})
    nums = (f"rel_l2~{f['rel_l2']:.3g}, worst tensor~{fpm.get('max_tensor_rel_l2_est', float('nan')):.3g} "
            f"(from {fp.get('projections')} projections), eval loss diff {f['eval_loss_diff']:.3g}, "
            f"greedy agreement {f['greedy_agreement']:.4f}") if f else ""
    ok = v.verdict == WITHIN
    notes = list(v.metrics.get("bounds_notes") or [])
    detail = f"{WEIGHTS} is not bitwise equal; judged against the signed fingerprint: {v.verdict}"
    detail += (f": {nums}" if nums else "") + ("" if ok else f"; {'; '.join(v.reasons)}")
    if notes:
        detail += f" ({'; '.join(notes)})"
    if ok and reference is None and not inputs:
        # The projections' signs and the eval windows are public: weights can be moved far from the
        # attested ones while every estimate stays equal. Only evidence the signer could not foresee counts.
        report.add(CheckName.REPRODUCED, False, detail +
                   "; but the fingerprint alone can be steered by anyone who reads "
                   "the attestation, so this is not established: add --inputs (recitation on windows drawn now) "
                   "or --reference-model DIR (measured distances), docs/threat-model.md")
        report.verdict = NOT_ESTABLISHED
        return
    report.add(CheckName.REPRODUCED, ok, detail)
    report.verdict = v.verdict if report.ok else DIVERGED


def _same_tensors(st, model_dir: Path) -> bool:
    """Whether the candidate's tensors are bitwise the attested ones (blake3-tensors-v1)."""
    from .._internal.hashing import tensor_digest

    fp = st.runDetails.provenance_outputs.fingerprint
    want = fp.get("tensor_digest") if isinstance(fp, dict) else None
    try:
        return isinstance(want, str) and tensor_digest(model_dir / WEIGHTS) == want
    except (OSError, ValueError):
        return False


# What a rebuild's model card may differ in from the attested one: the figures that describe its own
# weights (their tensor digest, the audit's rates and token counts). Everything else is the recipe's.
_FIGURES = re.compile(r"[0-9a-f]{64}|\d+(?:[.,]\d+)*%?")


def card_skeleton(text: str) -> str:
    """The card with every figure replaced by `#`: what a rebuild's card shares with the attested one."""
    return _FIGURES.sub("#", text)


def _card_check(report: Judgement, model_dir: Path, reference: Path | None) -> None:
    """The candidate's model card, when the weights differ: with the attested model at hand
    (`--reference-model`, verified exactly before this is reported) it must be the attested card with
    only its figures changed; without it, it is reported as the rebuilder's own, vouched for by no one."""
    try:
        mine = (model_dir / MODEL_CARD).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        report.add(CheckName.MODEL_CARD, False, f"{MODEL_CARD} cannot be read as UTF-8 text: {e}")
        return
    if reference is None:
        report.add(CheckName.MODEL_CARD, True,
                   f"{MODEL_CARD} differs from the attested card, as a rebuild's does (it states "
                   "the rebuild's own weights digest and audit rates); its text is the rebuilder's and not "
                   "vouched for by the attestation: add --reference-model DIR to compare it with the attested card")
        return
    try:
        theirs = (reference / MODEL_CARD).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        theirs = ""
    same = card_skeleton(mine) == card_skeleton(theirs)
    report.add(CheckName.MODEL_CARD, same,
               f"{MODEL_CARD} is the attested card with only its figures changed" if same else
               f"{MODEL_CARD} differs from the attested card in more than its figures (weights digest, rates, counts)")


def _against_reference(report: Judgement, st, model_dir: Path, reference: Path, bounds: Bounds) -> None:
    """Exact distances to the attested weights, after checking that they are the attested weights."""
    from .compare import judge, load_tensors, tensor_metrics

    ref = inspect(st, reference, sha256=False)
    if not ref.exact:
        bad = ref.missing + ref.unlisted + ref.structure + [f"{n}: {ref.files[n].detail}" for n in ref.differing]
        report.add(CheckName.REFERENCE_WEIGHTS, False,
                   f"--reference-model {reference} is not exactly the attested model: "
                   + "; ".join(bad[:3]))
        return
    tm = tensor_metrics(load_tensors(reference / WEIGHTS), load_tensors(model_dir / WEIGHTS))
    o = tm["overall"]
    reasons = tm["problems"] + judge({"rel_l2": o["rel_l2"], "cosine": o["cosine"]}, bounds,
                                     {r["name"]: r["rel_l2"] for r in tm["tensors"]})
    report.divergence = {**report.divergence, "reference": o}
    report.add(CheckName.REFERENCE_WEIGHTS, not reasons,
               f"measured against the attested weights (verified exactly): rel L2 {o['rel_l2']:.3g}, worst tensor "
               f"{o['max_tensor_rel_l2']:.3g}, cosine {o['cosine']:.6f}"
               + (f"; {'; '.join(reasons)}" if reasons else ""))


def secret_recitation(report: Checks, st, model_dir: Path, store: Path | None, bounds: Bounds,
                      windows: int = 256) -> None:
    """Recitation of the candidate on windows of the whole training set, drawn with a seed chosen
    now (so no one could tune the weights to them), against the attested recitation rate."""
    import secrets
    import tempfile

    from tokenizers import Tokenizer

    from ..builder.evaluate import recitation
    from ..builder.fingerprint import load_model
    from ..builder.tokenizer import encode_all
    from ..errors import ProvenanceError
    from ..inputs.dataset import layout_texts, select_dataset
    from ..inputs.store import Store, fetch_input
    from ..recipe import Evaluate, parse_recipe

    attested = st.runDetails.provenance_outputs.recitation or {}
    try:
        rec = st.recipe
        recipe = parse_recipe(Path(Path(rec.path).name or "recipe.toml"), rec.content)
        s = Store(store)
        stored = [fetch_input(i, s, recipe_dir=Path("."), offline=True, limits=recipe.limits) for i in recipe.inputs]
        with tempfile.TemporaryDirectory() as work:
            files, _ = select_dataset(recipe.dataset, stored, Path(work), Path(rec.path), recipe.limits)
            texts = layout_texts(files, recipe.layout)
    except ProvenanceError as e:
        report.add(CheckName.RECITATION, False,
                   f"cannot re-derive the training texts: {e.diagnostics().splitlines()[0]}")
        return
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))  # exact: checked against its subject
    seqs = encode_all(tok, texts)
    pad = tok.token_to_id(recipe.model.pad_token)
    seed = secrets.randbits(53)
    ev = recipe.evaluate
    spec = Evaluate(prompt_tokens=ev.prompt_tokens, continuation_tokens=ev.continuation_tokens, windows=windows,
                    seed=seed)
    got = recitation(load_model(model_dir), seqs, spec, pad)
    want = attested.get("rate") if isinstance(attested, dict) else None
    if not isinstance(want, int | float):
        report.add(CheckName.RECITATION, False, "the attestation records no recitation rate to compare with")
        return
    diff = abs(got.rate - float(want))
    ok = diff <= bounds.max_recitation_rate_diff
    report.add(CheckName.RECITATION, ok,
               f"{got.exact}/{got.windows} windows of the whole training set recited exactly (seed {seed}, drawn "
               f"now), rate {got.rate:.3f} vs attested {float(want):.3f}: diff {diff:.3f}"
               + ("" if ok else f" outside max_recitation_rate_diff {bounds.max_recitation_rate_diff:g}"))
