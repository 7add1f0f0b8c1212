"""The model card: `model/README.md` with YAML metadata that `huggingface_hub.ModelCard` parses.

Metadata: the licence (the Hub's lower-case identifier for a single SPDX licence, else `other`
with `license_name`), tags, and the memorization audit's figures as `model-index` metrics (built
with huggingface_hub's own `ModelCardData` and `EvalResult`). Sections: training data, procedure,
the audit, the licence verdict, and how to rebuild and verify.
"""

from __future__ import annotations

from .. import __version__
from ..recipe import parent_input


def hub_licence(spdx: str) -> dict:
    from license_expression import get_spdx_licensing

    try:
        keys = get_spdx_licensing().license_keys(spdx)
    except Exception:  # noqa: BLE001 - any unparsable expression is "other"
        keys = []
    if len(keys) == 1 and " " not in spdx.strip() and not spdx.strip().endswith("-or-later"):
        return {"license": spdx.strip().lower().removesuffix("-only")}  # the Hub's ids: mit, gpl-2.0, ...
    return {"license": "other", "license_name": spdx}


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _attention(r) -> str:
    """The attention the card states: ours where the recipe names one, else SDPA's backend."""
    name, backend = r.model.attn_implementation, r.determinism.sdpa_backend
    if name in ("small-head", "tiled"):
        return f"attention `{name}` (this project's kernel; SDPA's `{backend}` backend for masked calls)"
    return f"attention `{name}`" + (f" (SDPA's `{backend}` backend)" if name == "sdpa" else "")


def _products(det) -> str:
    return ("`fixed-order` (this project's GEMM: the same bits on every x86-64 CPU)" if det.kernels == "fixed-order"
            else "`vendor` (PyTorch's BLAS)")


def model_card(recipe, m: dict, audit: dict, licence: dict, record_hint: dict, no_source: str | None = None) -> str:
    """The card's text. `record_hint`: parameters, tokens, vocab size, weights digest. `no_source`: why the
    recipe's corresponding source may not be shipped (builder/source.py's `unshippable`), if it may not."""
    from huggingface_hub import ModelCard, ModelCardData

    r = recipe.recipe
    data = ModelCardData(model_name=r.recipe.name, library_name="transformers", pipeline_tag="text-generation",
                         tags=["provenance", "reproducible-build", "memorization-audit", "llama"],
                         eval_results=_eval_results(audit, m) or None, **hub_licence(r.output.license))
    body = "\n## ".join([_head(r, m, record_hint), _training(r, m), _audit(audit), _licence(r, licence),
                         _source(m, no_source, parent_input(r)), _REBUILD])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def _eval_results(audit: dict, m: dict) -> list:
    """The audit's rates as the Hub's eval results, one per prefix length, training and control."""
    from huggingface_hub import EvalResult

    dataset = f"manifest blake3-merkle-v1:{m['merkle_root']['digest'][:16]}…"
    evals = []
    for part, label in (("training", "training files"), ("control", "control files (not trained on)")):
        block = audit.get(part)
        if not block:
            continue
        for k, v in block["by_prefix"].items():
            if v["rate"] is None:
                continue
            evals.append(EvalResult(task_type="text-generation", task_name="verbatim recitation",
                                    dataset_type="custom", dataset_name=f"{label} ({dataset})",
                                    metric_type="extractable_memorization", metric_value=round(v["rate"], 6),
                                    metric_name=f"Extractable memorization, {k}-token prefix, "
                                                f"{audit['method']['suffix_tokens']}-token suffix ({part})"))
    return evals


def _head(r, m: dict, record_hint: dict) -> str:
    name = r.recipe.name
    return f"""
# {name}

{r.recipe.description}

Built by provenance {__version__}; {record_hint['parameters']:,} parameters, vocabulary {record_hint['vocab_size']:,},
{record_hint['tokens']:,} training tokens. Weights: blake3-tensors-v1 `{record_hint['weights']}`.
"""


def _training(r, m: dict) -> str:
    """The training data and procedure sections."""
    lic_rows = "\n".join(f"| {k} | {v} |" for k, v in m["licenses"].items())
    stage_rows = "\n".join(
        f"| {st.name} | {st.lr:g} | {st.batch_size} | {st.micro_batch_size or st.batch_size} | "
        f"{st.epochs if st.epochs is not None else '-'} | {st.steps if st.steps is not None else '-'} | "
        f"{st.seq_len} | {st.precision} | {st.cross_entropy} |" for st in r.stages)
    det = r.determinism
    return f"""Training data

{m['totals']['files']} files, {m['totals']['bytes']:,} bytes, listed with their digests and licences in
`dataset-manifest.json` under the Merkle root `blake3-merkle-v1:{m['merkle_root']['digest']}`.

| licence (SPDX) | files |
| --- | --- |
{lic_rows}

## Training procedure

| stage | lr | batch | micro-batch | epochs | steps | sequence | precision | loss |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{stage_rows}

Seed {det.seed}, {det.threads} threads, deterministic algorithms {str(det.deterministic_algorithms).lower()},
{_attention(r)}, CPU kernels `{det.cpu_capability}`, matrix products {_products(det)}. The recipe pins every
input by hash; the attestation (`attestation.intoto.jsonl`) records every setting and digest.
"""


def _audit(audit: dict) -> str:
    s = audit["summary"]
    audit_rows = "\n".join(
        f"| {k} | {_pct(v['rate'])} | {_pct((audit['control'] or {}).get('by_prefix', {}).get(k, {}).get('rate'))} | "
        f"{v['mean_token_match'] if v['mean_token_match'] is None else round(v['mean_token_match'], 3)} |"
        for k, v in audit["training"]["by_prefix"].items())
    return f"""Memorization audit

Extractable memorization (Carlini et al. 2022): the fraction of sampled windows whose
{audit['method']['suffix_tokens']}-token continuation greedy decoding reproduces exactly from a k-token prefix,
on the training files and on control files of the same inputs that were not trained on.

| prefix k | training | control | mean token match (training) |
| --- | --- | --- | --- |
{audit_rows}

Highest rate {_pct(s['extraction_rate'])} (control {_pct(s['control_extraction_rate'])}). Prompted with only a
file's path, the model emits up to {s['longest_verbatim_from_header']} tokens that occur verbatim in that file.
The signed audit is `audit.intoto.jsonl`.
"""


def _licence(r, licence: dict) -> str:
    verdict = licence.get("verdict", "not judged")
    bad = ", ".join(f"{x['inbound']} ({x['files']} files)" for x in licence.get("inbound", [])
                    if x.get("compatible") is not True)
    return f"""Licence

Declared: **{r.output.license}**. Compatibility with the training files' licences according to
{licence.get('source', 'flict')}: **{verdict}**{f' (not compatible: {bad})' if bad else ''}. The weights
can reproduce their training files verbatim at the rates above; a licence reviewer should read both together.
"""


# What each family of licences asks of whoever distributes a work in object form, in brief (a reviewer reads
# the licence itself; the archive carries every text).
_DUTIES = (
    ("AGPL-3.0", "AGPL-3.0 §6 and §13: convey the Corresponding Source with the object code (or by one of §6's "
                 "other means), and offer it to users who interact with a modified version over a network"),
    ("LGPL-", "the LGPL: provide the source of the library's portion and what is needed to relink or rebuild "
              "with a modified version of it"),
    ("GPL-2.0", "GPL-2.0 §3: accompany the object code with the complete corresponding source (the preferred "
                "form for making modifications, with the scripts that control compilation and installation), or "
                "with a written offer of it"),
    ("GPL-3.0", "GPL-3.0 §6: convey the Corresponding Source with the object code, or by one of §6's other means"),
)


def _duties(licences) -> list[str]:
    found = []
    for lic in sorted(licences):
        duty = next((d for prefix, d in _DUTIES if lic.startswith(prefix)), None)
        found.append(f"- `{lic}`: " + (duty or "keep its copyright and licence notices with every copy"))
    return found


def _source(m: dict, no_source: str | None, parent) -> str:
    """What the inputs' licences ask of a distributor, and where the corresponding source is. The same
    text wherever the build ran: it depends on the recipe alone (the card is one of the model's files)."""
    duties = "\n".join(_duties(m["licenses"]))
    head = f"""Corresponding source

If these weights are object code of their training files, distributing them carries what those files'
licences ask of a distributor of object code:

{duties}
"""
    if no_source:
        return head + f"\nNo corresponding-source archive is written for this recipe: {no_source}.\n"
    nested = "" if parent is None else (
        f" The parent model `{parent.name}` is in it as `inputs/{parent.name}/`: its files, attestation and key, "
        f"and its own corresponding source, `inputs/{parent.name}/source.tar`, so the archive holds the source of "
        "the whole lineage.")
    return head + f"""
The build writes that source as `source.tar` beside the model (`provenance source BUILD_DIR --out FILE`
writes the same bytes on demand): the recipe, every input as pinned, the code of the builder that trained
it with its toolchain lock, and the text of every licence involved. The attestation signs its digests (a
byproduct), `source.intoto.jsonl` binds it to these files, and `provenance publish` ships both under
`.provenance/`.{nested} Check it and rebuild from it alone, offline:

```sh
verify-attestation attestation.intoto.jsonl --key PUBLIC_KEY --source source.tar
provenance rebuild attestation.intoto.jsonl --attestation-key PUBLIC_KEY --from-source source.tar
```
"""


_REBUILD = """Rebuild and verify

In the build's output directory:

```sh
verify-attestation attestation.intoto.jsonl --key PUBLIC_KEY --model model/
provenance rebuild attestation.intoto.jsonl --attestation-key PUBLIC_KEY
```

In a folder laid out by `provenance publish`: as published, as `hf download REPO --local-dir DIR`
brings it back, or where `from_pretrained` finds it in huggingface_hub's cache
(`DIR` = `~/.cache/huggingface/hub/models--ORG--NAME/snapshots/REV`):

```sh
verify-attestation DIR/.provenance/attestation.intoto.jsonl --key PUBLIC_KEY --model DIR --published
provenance rebuild DIR/.provenance/attestation.intoto.jsonl --attestation-key PUBLIC_KEY
```

`PUBLIC_KEY` is the publisher's key as the publisher announces it. The copy in
`.provenance/signing-key.pub` travels with the files, so whoever can change the files can change
it too: compare the key id the verifier prints with the announced one.
"""
