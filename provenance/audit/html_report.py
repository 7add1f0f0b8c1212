"""`provenance report BUILD_DIR`: one self-contained HTML page of a build's evidence.

The page holds the loss curve, each file's memorization against the control files, the licence
table and verdict, the digests, and the verification state (the exact question, asked with the
keys given; "not verified" without them). Plots are inline SVG drawn by matplotlib; there is no
script from elsewhere, no font, image or style sheet fetched: a Content-Security-Policy forbids
every network load, so the page renders the same offline. A short inline script only counts the
plots that were laid out (`data-plots-rendered` on the root element), so a headless browser can
tell that the page rendered.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2330;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ccd}
table{border-collapse:collapse;margin:.5rem 0;width:100%} td,th{border:1px solid #ccd;padding:.25rem .5rem;
text-align:left;vertical-align:top} th{background:#eef0f6} code{font:12px ui-monospace,monospace;word-break:break-all}
.verdict{font-weight:600;padding:.5rem .8rem;border-radius:4px;display:inline-block;margin:.3rem 0}
.ok{background:#dff3e3;color:#135c25} .bad{background:#fbe0e0;color:#7c1616} .none{background:#eee;color:#444}
.plot svg{max-width:100%;height:auto} .muted{color:#666}
#lineage-tree{font:13px system-ui,sans-serif} #lineage-tree .node{fill:#eef0f6;stroke:#8890a8}
#lineage-tree .edge{stroke:#8890a8;stroke-width:2} #lineage-tree .small{font-size:11px;fill:#444}
"""
SCRIPT = """
(function(){var n=0;document.querySelectorAll('.plot svg').forEach(function(s){var b=s.getBoundingClientRect();
if(b.width>50&&b.height>50){n++;}});document.documentElement.setAttribute('data-plots-rendered',String(n));})();
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _svg(fig) -> str:
    """A figure as inline SVG with text kept as text and no date or random ids (same build, same bytes)."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _plots(transcript: list[dict], audit: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "provenance-report", "font.size": 10})
    out = []

    fig, ax = plt.subplots(figsize=(9, 3.4))
    steps = [line["global_step"] for line in transcript]
    losses = [float.fromhex(line["loss"]) for line in transcript]
    ax.plot(steps, losses, color="#2454a6", linewidth=1)
    stages = {}
    for line in transcript:
        stages.setdefault(line["stage"], line["global_step"])
    for name, at in stages.items():
        ax.axvline(at, color="#999", linewidth=0.6, linestyle="--")
        ax.text(at, max(losses) if losses else 1, f" {name}", va="top", fontsize=8, color="#555")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (log)")
    ax.set_title("Loss per step (transcript.jsonl)")
    out.append(("loss", _svg(fig)))

    train, control = audit.get("training") or {}, audit.get("control") or {}
    rows = [(f["path"].split("/")[-1], f["rate"], "training") for f in train.get("per_file", [])]
    rows += [(f["path"].split("/")[-1], f["rate"], "control") for f in control.get("per_file", [])]
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.28 * len(rows) + 1)))
    colours = {"training": "#c0392b", "control": "#2e8b57"}
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [r[1] or 0 for r in rows], color=[colours[r[2]] for r in rows])
    ax.set_yticks(ys, [f"{r[0]} ({r[2]})" for r in rows], fontsize=8)
    for y, r in zip(ys, rows):
        ax.text((r[1] or 0) + 0.01, y, _pct(r[1]), va="center", fontsize=7)
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("extractable windows (all prefix lengths)")
    ax.set_title("Memorization per file: training files against control files not trained on")
    out.append(("per-file", _svg(fig)))

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for block, label, colour in ((train, "training", "#c0392b"), (control, "control", "#2e8b57")):
        pts = [(int(k), v["rate"]) for k, v in (block.get("by_prefix") or {}).items() if v.get("rate") is not None]
        if pts:
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour, label=label)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("prefix length (tokens)")
    ax.set_ylabel("extraction rate")
    ax.set_title(f"Extractable memorization, {audit['method']['suffix_tokens']}-token suffix")
    ax.legend()
    out.append(("by-prefix", _svg(fig)))
    return out


def _table(head: list[str], rows: list[list]) -> str:
    h = "".join(f"<th>{_e(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _verification(verification: dict | None) -> str:
    if verification is None:
        return ('<p class="verdict none">not verified: no public key was given '
                '(<code>provenance report BUILD_DIR --key PUB</code>)</p>')
    cls = "ok" if verification["ok"] else "bad"
    return (f'<p class="verdict {cls}">verdict: {_e(verification["verdict"])}</p>'
            f'<p class="muted">question: are these exactly the files the attestation names? Keys: '
            f'{_e(", ".join(verification["keys"]))}</p>'
            + _table(["check", "result", "detail"],
                     [[_e(c["check"]), "PASS" if c["ok"] else "<b>FAIL</b>", _e(c["detail"])]
                      for c in verification["checks"]]))


def _per_file(block, label) -> list:
    return [[f"<code>{_e(f['path'])}</code>", label, _e(f["windows"]), _e(f["extractable"]), _pct(f["rate"]),
             _pct(f["mean_token_match"]), _e(f["longest_verbatim_tokens"])] for f in (block or {}).get("per_file", [])]


def _digests(record: dict) -> list:
    """The digests table: recipe, inputs, dataset manifest, tokenizer, weights and files, transcript, SBOMs, audit."""
    t, w, dm = record["training"], record["weights"], record["dataset_manifest"]
    return [
        ["recipe", f"<code>{_e(record['recipe']['path'])}</code>",
         f"<code>blake3:{_e(record['recipe']['blake3'])}</code>"],
        *[[f"input {_e(i['name'])}", _e(i["artifact"]), f"<code>sha256:{_e(i.get('sha256', '-'))}</code>"]
          for i in record["inputs"]],
        ["dataset manifest", f"{dm['totals']['files']} files, {dm['totals']['bytes']} bytes",
         f"<code>{_e(dm['merkle_root']['algorithm'])}:{_e(dm['merkle_root']['digest'])}</code>"],
        ["tokenizer.json", f"vocab {record['tokenizer']['vocab_size']}",
         f"<code>blake3:{_e(record['tokenizer']['tokenizer.json']['blake3'])}</code>"],
        ["weights (tensors)", _e(w["tensors"]["algorithm"]), f"<code>{_e(w['tensors']['digest'])}</code>"],
        *[[f"model/{_e(n)}", "file", f"<code>sha256:{_e(d['sha256'])}</code>"] for n, d in sorted(w["files"].items())],
        ["transcript.jsonl", f"{t['steps']} steps, head {_e(t['transcript_head'][:16])}…",
         f"<code>blake3:{_e(t['transcript']['blake3'])}</code>"],
        *[[f"SBOM ({_e(k)})", _e(v["file"]), f"<code>blake3:{_e(v['blake3'])}</code>"]
          for k, v in sorted((record.get("sbom") or {}).items())],
        ["audit.json", "memorization audit", f"<code>blake3:{_e(record['audit']['blake3'])}</code>"],
    ]


def _lineage(record: dict, outbound: str) -> str:
    """A fine-tune's lineage as drawn boxes: this model above the parent it was trained on (docs/recipe.md,
    "Fine-tuning"); "" for a model trained from scratch. The whole chain is `verify-attestation --chain`'s."""
    parents = [i for i in record["inputs"] if "parent" in i]
    if not parents:
        return ""
    nodes = [(record["recipe"]["name"], record["weights"]["tensors"]["digest"], outbound, "this model")]
    nodes += [(i["parent"]["recipe_name"], i["parent"]["weights"], i["parent"]["output_license"],
               f"its input {i['name']}: trained on " + ", ".join(f"{k} ({v} files)" for k, v in
                                                                  sorted(i["parent"]["input_licenses"].items())))
              for i in parents]
    box, gap, width = 56, 28, 640
    parts = []
    for k, (name, weights, licence, note) in enumerate(nodes):
        y = k * (box + gap)
        parts.append(f'<rect x="1" y="{y + 1}" width="{width - 2}" height="{box}" rx="6" class="node"/>'
                     f'<text x="12" y="{y + 22}"><tspan font-weight="bold">{_e(name)}</tspan> · licence '
                     f'{_e(licence)}</text><text x="12" y="{y + 44}" class="small">'
                     f'weights blake3:{_e(weights[:32])}… · {_e(note)}</text>')
        if k:
            parts.append(f'<line x1="40" y1="{y - gap + 1}" x2="40" y2="{y - 2}" class="edge"/>'
                         f'<text x="52" y="{y - gap / 2 + 5}" class="small">fine-tuned from</text>')
    height = len(nodes) * (box + gap) - gap + 2
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" id="lineage-tree" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="lineage">{"".join(parts)}</svg>')
    return (f'<h2 id="lineage">Lineage</h2>\n<div class="plot">{svg}</div>\n<p class="muted">Each parent was '
            "verified against its attestation before the build; <code>verify-attestation --chain</code> walks the "
            "whole lineage to its root.</p>\n")


def render(build_dir: Path, record: dict, audit: dict, transcript: list[dict], verification: dict | None) -> str:
    """The page's text. `verification`: {"ok", "verdict", "checks": [...], "keys": [...]} or None."""
    lic = audit.get("licence_compatibility") or {}
    s = audit["summary"]
    plots = dict(_plots(transcript, audit))
    name = record["recipe"]["name"]

    ver = _verification(verification)
    verdict = lic.get("verdict", "not judged")
    lic_cls = "ok" if verdict == "compatible" else "bad" if verdict == "incompatible" else "none"
    lic_rows = [[_e(i["name"]), _e(i["artifact"]), f"<code>{_e(i['license'])}</code>"] for i in record["inputs"]]
    inbound = [[f"<code>{_e(r['inbound'])}</code>", _e(r["files"]),
                "compatible" if r["compatible"] else "<b>incompatible</b>",
                _e(", ".join(r.get("allowed_outbound") or []) or "-")] for r in lic.get("inbound", [])]
    per_file = _per_file
    t = record["training"]
    w = record["weights"]
    digests = _digests(record)
    stage_rows = [[_e(st["name"]), _e(st["steps"]), _e(st["tokens"]),
                   f"{st['first_loss']:.4f} → {st['final_loss']:.4f}",
                   f"{st['seconds']:.1f} s"] for st in t["stages"]]
    machine = record.get("machine") or {}
    det = record.get("determinism") or {}

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(name)}: build report</title><style>{STYLE}</style></head>
<body>
<h1>{_e(name)}</h1>
<p class="muted">build {_e(record['invocation_id'])}, {_e(record['started'])} to {_e(record['finished'])};
provenance {_e(record['provenance_version'])}; weights <code>blake3-tensors-v1:{_e(w['tensors']['digest'])}</code></p>

<h2 id="verification">Verification</h2>
{ver}

<h2 id="licence">Licences</h2>
<p class="verdict {lic_cls}">{_e(lic.get('outbound', record.get('output_license')))} declared for the weights:
{_e(verdict)} with the training files' licences{(' according to ' + _e(lic['source'])) if lic.get('source') else ''};
the model completes up to {_pct(s['extraction_rate'])} of sampled training windows verbatim</p>
{_table(["input", "artifact", "declared licence"], lic_rows)}
{_table(["training files' licence", "files", "with " + str(lic.get('outbound', '')), "outbound licences it allows"],
        inbound) if inbound else ''}

{_lineage(record, lic.get('outbound', ''))}
<h2 id="training">Training</h2>
<div class="plot" id="plot-loss">{plots['loss']}</div>
{_table(["stage", "steps", "tokens", "loss", "time"], stage_rows)}

<h2 id="memorization">Memorization</h2>
<p>Highest extraction rate {_pct(s['extraction_rate'])} on training files, {_pct(s['control_extraction_rate'])} on
control files not trained on; {_e(s['longest_verbatim_from_header'])} tokens verbatim from a file's header alone.
{_e(audit['method']['name'])}, seed {_e(audit['method']['seed'])}, {_e(audit['method']['windows_per_file'])} windows
per file and prefix length.</p>
<div class="plot" id="plot-by-prefix">{plots['by-prefix']}</div>
<div class="plot" id="plot-per-file">{plots['per-file']}</div>
{_table(["file", "set", "windows", "extractable", "rate", "token match", "longest verbatim from header"],
        per_file(audit.get('training'), 'training') + per_file(audit.get('control'), 'control'))}

<h2 id="digests">Digests</h2>
{_table(["what", "", "digest"], digests)}

<h2 id="stack">Stack</h2>
{_table(["", ""], [[_e(k), f"<code>{_e(v)}</code>"] for k, v in [
    *sorted(record['toolchain']['installed'].items()),
    ("cpu capability", det.get('cpu_capability')), ("numerics", json.dumps(det.get('numerics'), sort_keys=True)),
    ("cpu", f"{machine.get('cpu_vendor')} {machine.get('cpu_model')}"), ("libc", machine.get('libc')),
    ("mkl", machine.get('mkl')), ("onednn", machine.get('onednn'))]])}
<p class="muted">Written by <code>provenance report</code> from {_e(build_dir.name)}/ (build.json, audit.json,
transcript.jsonl); nothing here is fetched from a network.</p>
<script>{SCRIPT}</script>
</body></html>
"""
