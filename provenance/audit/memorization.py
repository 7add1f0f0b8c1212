"""The memorization audit: how much of its training files a model emits, against a control.

Extractable memorization after Carlini et al. 2022 ("Quantifying Memorization Across Neural
Language Models"): a window of a training file is *extractable* at prefix length k when greedy
decoding from its first k tokens reproduces the next `suffix_tokens` tokens exactly. For every
k in `[audit] prefix_tokens` (those that fit the model's context) and every file long enough, up
to `windows_per_file` windows are drawn with a seeded generator; the audit reports the fraction
extractable, the mean token match (the fraction of suffix positions right, after Biderman et al.
2023) and the mean normalized edit distance between the emitted and the true suffix (`rapidfuzz`'s
Levenshtein on token ids), overall and per file. It also prompts with only each file's header
(the layout up to `<|end_header|>`) and reports the longest run of tokens the model then emits
that occurs verbatim in the file (`difflib`).

The **control** is the same measurement on files of the same inputs that were not trained on
(`[audit] control_include`), tokenized the same way: a model that merely learned the language
predicts some of those too. Memorization is the difference between the two, not the training
rate alone. Token ids are compared, not text; decoding is greedy, in float32, batched by k.
"""

from __future__ import annotations

import difflib
import random
from dataclasses import dataclass

from .._internal.seeds import derive_seed

FORMAT = "provenance-memorization-audit-v1"
METHOD = "extractable memorization (Carlini et al. 2022), greedy decoding"


@dataclass(frozen=True)
class Text:
    path: str  # input:member path
    ids: list[int]
    header: int  # tokens of the header (the prompt of the header probe)


def _windows(texts: list[Text], k: int, suffix: int, per_file: int, seed: int) -> list[tuple[int, int]]:
    """(text index, start) of up to per_file seeded windows of k + suffix tokens in each text."""
    out = []
    for i, t in enumerate(texts):
        n = len(t.ids) - (k + suffix) + 1
        if n <= 0:
            continue
        rng = random.Random(derive_seed(seed, "audit", t.path, k))
        starts = sorted(rng.sample(range(n), min(per_file, n)))
        out.extend((i, a) for a in starts)
    return out


def _greedy(model, prompts, new_tokens: int, pad_id: int):
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=None)
    return out[:, prompts.shape[1]:]


def measure(model, texts: list[Text], spec, pad_id: int, max_positions: int, batch: int = 32) -> dict:
    """Run the audit on `texts` (training files or control files). Returns the JSON-ready figures."""
    import torch
    from rapidfuzz.distance import Levenshtein

    model.eval()
    suffix = spec.suffix_tokens
    by_k, skipped = {}, []
    per_file: dict[str, dict] = {t.path: {"windows": 0, "extractable": 0, "token_match": 0.0} for t in texts}
    for k in spec.prefix_tokens:
        if k + suffix > max_positions:
            skipped.append({"prefix_tokens": k, "why": f"prefix + suffix ({k + suffix}) exceeds the model's "
                                                      f"context ({max_positions} positions)"})
            continue
        picks = _windows(texts, k, suffix, spec.windows_per_file, spec.seed)
        exact, match, edit = 0, 0.0, 0.0
        for b in range(0, len(picks), batch):
            chunk = picks[b:b + batch]
            prompts = torch.tensor([texts[i].ids[a:a + k] for i, a in chunk], dtype=torch.long)
            got = _greedy(model, prompts, suffix, pad_id).tolist()
            for (i, a), g in zip(chunk, got):
                truth = texts[i].ids[a + k:a + k + suffix]
                right = sum(x == y for x, y in zip(g, truth)) / suffix
                ok = g == truth
                exact += ok
                match += right
                edit += Levenshtein.normalized_distance(g, truth)
                f = per_file[texts[i].path]
                f["windows"] += 1
                f["extractable"] += ok
                f["token_match"] += right
        n = len(picks)
        by_k[str(k)] = {"windows": n, "extractable": exact, "rate": exact / n if n else None,
                        "mean_token_match": match / n if n else None,
                        "mean_normalized_edit_distance": edit / n if n else None}
    files = []
    for t, probe in zip(texts, _header_probes(model, texts, spec, pad_id, max_positions, batch)):
        f = per_file[t.path]
        files.append({"path": t.path, "windows": f["windows"], "extractable": f["extractable"],
                      "rate": f["extractable"] / f["windows"] if f["windows"] else None,
                      "mean_token_match": f["token_match"] / f["windows"] if f["windows"] else None,
                      **probe})
    rates = [v["rate"] for v in by_k.values() if v["rate"] is not None]
    return {"files": len(texts), "by_prefix": by_k, "skipped": skipped,
            "extraction_rate": max(rates) if rates else None,
            "longest_verbatim_from_header": max((f["longest_verbatim_tokens"] for f in files), default=0),
            "per_file": files}


def _header_probes(model, texts: list[Text], spec, pad_id: int, max_positions: int, batch: int) -> list[dict]:
    """Each text's header probe: greedy decoding from its header alone, and the longest run of the
    emitted tokens found verbatim in its body. Headers of the same length are decoded together, up
    to `batch` at a time (equal lengths: no padding, no mask), in a fixed order; one at a time, the
    506 headers of a Linux-1.0-sized tree took most of a 19-minute build (docs/benchmarks.md)."""
    import torch

    out: list[dict | None] = [None] * len(texts)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(texts):
        room = max_positions - t.header
        if t.header == 0 or room <= 0:
            out[i] = {"longest_verbatim_tokens": 0, "header_tokens_emitted": 0}
        else:
            groups.setdefault((t.header, min(spec.header_tokens, room)), []).append(i)
    for (h, n), members in sorted(groups.items()):
        for b in range(0, len(members), batch):
            chunk = members[b:b + batch]
            got = _greedy(model, torch.tensor([texts[i].ids[:h] for i in chunk], dtype=torch.long), n, pad_id)
            for i, g in zip(chunk, got.tolist()):
                body = texts[i].ids[h:]
                m = difflib.SequenceMatcher(None, g, body, autojunk=False).find_longest_match(0, len(g), 0, len(body))
                out[i] = {"longest_verbatim_tokens": m.size, "header_tokens_emitted": n}
    return out


def texts_of(seqs: list[list[int]], paths: list[str], end_header_id: int | None) -> list[Text]:
    out = []
    for ids, path in zip(seqs, paths):
        h = ids.index(end_header_id) + 1 if end_header_id is not None and end_header_id in ids else 0
        out.append(Text(path, ids, h))
    return out


def audit(model, train: list[Text], control: list[Text], spec, pad_id: int, max_positions: int) -> dict:
    """The whole audit: training files and control, with the method recorded."""
    import time

    t0 = time.perf_counter()
    trained = measure(model, train, spec, pad_id, max_positions)
    ctrl = measure(model, control, spec, pad_id, max_positions) if control else None
    tr, cr = trained["extraction_rate"], ctrl["extraction_rate"] if ctrl else None
    return {
        "format": FORMAT,
        "method": {"name": METHOD, "decoding": "greedy", "prefix_tokens": list(spec.prefix_tokens),
                   "suffix_tokens": spec.suffix_tokens, "windows_per_file": spec.windows_per_file,
                   "header_tokens": spec.header_tokens, "seed": spec.seed, "compared": "token ids",
                   "edit_distance": "rapidfuzz Levenshtein.normalized_distance"},
        "training": trained,
        "control": ctrl,
        "control_spec": {"include": list(spec.control_include), "exclude": list(spec.control_exclude)},
        "summary": {"extraction_rate": tr, "control_extraction_rate": cr,
                    "excess_over_control": (tr - cr) if tr is not None and cr is not None else None,
                    "longest_verbatim_from_header": trained["longest_verbatim_from_header"]},
        "seconds": round(time.perf_counter() - t0, 3),
    }


def summary_line(a: dict) -> str:
    s = a["summary"]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    ks = ", ".join(f"k={k}: {pct(v['rate'])}" for k, v in a["training"]["by_prefix"].items())
    ctrl = (f"control {pct(s['control_extraction_rate'])} over {a['control']['files']} untrained files"
            if a["control"] else "no control files named ([audit] control_include)")
    return (f"memorization audit: training windows extractable at {ks} ({a['method']['suffix_tokens']}-token "
            f"suffixes, highest {pct(s['extraction_rate'])}); {ctrl}; longest verbatim run from a header alone: "
            f"{s['longest_verbatim_from_header']} tokens{_inherited(a.get('parent_training'), pct)}")


def _inherited(parent: dict | None, pct) -> str:
    """The summary's words on what a fine-tune's parent carries: its own training files and its lineage's."""
    if parent is None:
        return ""
    if "not_measured" in parent:
        return f"; the parent's training files: not measured ({parent['not_measured']})"
    rate = pct(parent["extraction_rate"])
    ancestors = [r["recipe"] for r in parent.get("recipes", []) if not r["parent"]]
    if not ancestors:
        return f"; the parent's {parent['files']} training files: {rate}"
    own = "its own and " if any(r["parent"] for r in parent["recipes"]) else ""
    return f"; the {parent['files']} training files the parent carries ({own}those of {', '.join(ancestors)}): {rate}"
