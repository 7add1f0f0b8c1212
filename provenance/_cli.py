"""The command line: parse the arguments, call the library, report. The one place that maps errors to
exit codes. What a command does lives in the package it belongs to (builder/, repro/, verify/, ...);
a command here checks its arguments, calls that, and prints the answer (with --json, one object).

Exit codes (README.md, "Commands"): 0 success, 1 checked and failed, 2 could not check. A library
error is printed once, without a traceback; an unexpected exception is exit 2 with "internal
error", and a traceback only with --debug.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import InputError, ProvenanceError


def parse_handed(values: list[str], recipe) -> dict[str, Path]:
    """`--input NAME=PATH` values: the recipe input each hands over, by name."""
    names = {i.name for i in recipe.recipe.inputs}
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not path:
            raise InputError(f"--input {v!r}: expected NAME=PATH")
        if name not in names:
            raise InputError(f"--input {v!r}: the recipe has no input named {name!r} (inputs: {sorted(names)})")
        out[name] = Path(path)
    return out


def _emit_json(obj) -> None:
    print(json.dumps(obj, sort_keys=True))


def cmd_build(args) -> int:
    from ._internal.progress import Reporter
    from .builder.launch import is_rank, launch_node, this_rank, topology
    from .builder.pipeline import build, check_request
    from .inputs.store import Store
    from .recipe import LoadedExport, load_any_recipe

    recipe = load_any_recipe(args.recipe)
    if isinstance(recipe, LoadedExport):
        return _export_build(args, recipe)
    _check_threads(args.threads)
    topo = topology(args.world_size, args.nnodes, args.node_rank, args.rdzv_endpoint, args.collective_timeout)
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise InputError(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    rank, world = this_rank()
    out = Path(args.out) if args.out else Path("build") / recipe.name
    store = Store(args.store)
    log = check_request(recipe, out, store, _path(args.rounding_log))  # before any key is made or input fetched
    reporter = Reporter(enabled=not args.json and rank == 0)
    signing = _signing(args, reporter) if rank == 0 and topo.node_rank == 0 else None  # only rank 0 signs
    handed = parse_handed(args.input, recipe)
    if topo.world_size > 1 and not is_rank():
        code = launch_node(recipe, topo, [a for a in args.argv if a != "--debug"], store=store, offline=args.offline,
                           handed=handed, reporter=reporter, debug=args.debug)
        return _ranks_ended(topo, code, reporter)
    if topo.world_size != world:
        raise InputError(f"--world-size {topo.world_size} but this process runs in a world of {world}")
    record = build(recipe, out=out, store=store, threads=args.threads, offline=args.offline, handed=handed,
                   allow_toolchain_mismatch=args.allow_toolchain_mismatch, reporter=reporter, signing=signing,
                   cpu_capability=args.cpu_capability, resume=args.resume, checkpoint_every=args.checkpoint_every,
                   use_cache=args.cache, keep_checkpoints=args.keep_checkpoints,
                   licence_compatibility=args.licence_compatibility, rounding_log=log,
                   collective_timeout=topo.collective_timeout)
    if record is None:  # a rank other than 0: rank 0 reports
        return 0
    weights = record["weights"]["tensors"]["digest"]
    rec = record["recitation"]
    if args.json:
        _emit_json({"ok": True, "out": str(out), "weights": f"blake3:{weights}",
                    "model_safetensors": record["weights"]["files"]["model.safetensors"],
                    "recitation": rec, "dataset_root": record["dataset_manifest"]["merkle_root"]["digest"],
                    "timings": record["timings"], "threads": record["determinism"]["threads"]})
        return 0
    print(f"built {recipe.name} into {out}/ in {record['timings']['total']:.1f} s")
    print(f"dataset root blake3-merkle-v1:{record['dataset_manifest']['merkle_root']['digest']} "
          f"({record['dataset_manifest']['totals']['files']} files, licences "
          f"{', '.join(record['dataset_manifest']['licenses'])})")
    print(f"recitation: {rec['exact']}/{rec['windows']} windows reproduced exactly "
          f"({rec['rate']:.1%}; {rec['prompt_tokens']}-token prompt, {rec['continuation_tokens']} tokens greedy; "
          f"token accuracy {rec['token_accuracy']:.1%})")
    print(f"model.safetensors sha256:{record['weights']['files']['model.safetensors']['sha256']}")
    print(f"weights blake3:{weights}")
    return 0


# What an export (builder/export.py) has no use for: it trains nothing and runs on one process.
TRAINING_OPTIONS = (("threads", None), ("world_size", None), ("nnodes", 1), ("resume", None),
                    ("checkpoint_every", None), ("keep_checkpoints", None), ("rounding_log", None),
                    ("cpu_capability", None), ("sigstore", False))


def _export_build(args, recipe) -> int:
    """`provenance build` of an export recipe: refuse the training options, then export and report."""
    from ._internal.progress import Reporter
    from .builder.export import export
    from .inputs.store import Store

    given = [name for name, default in TRAINING_OPTIONS if getattr(args, name, default) != default]
    if given:
        raise InputError(f"{recipe.path} is an export recipe (it trains nothing, on one process): "
                         + ", ".join("--" + g.replace("_", "-") for g in given) + " does not apply")
    out = Path(args.out) if args.out else Path("build") / recipe.name
    reporter = Reporter(enabled=not args.json)
    record = export(recipe, out=out, store=Store(args.store), handed=parse_handed(args.input, recipe),
                    reporter=reporter, signing=_signing(args, reporter),
                    allow_toolchain_mismatch=args.allow_toolchain_mismatch)
    return _report_export(args, recipe, out, record)


def _report_export(args, recipe, out: Path, record: dict) -> int:
    weights = record["weights"]["tensors"]["digest"]
    if args.json:
        _emit_json({"ok": True, "out": str(out), "weights": f"blake3:{weights}", "export": record["export"],
                    "model_safetensors": record["weights"]["files"]["model.safetensors"]})
        return 0
    print(f"exported {recipe.name} ({record['export']['transform']} of weights blake3:"
          f"{record['export']['from_weights']}) into {out}/ in {record['timings']['export']:.1f} s")
    print(f"model.safetensors sha256:{record['weights']['files']['model.safetensors']['sha256']}")
    print(f"weights blake3:{weights}")
    return 0


def _ranks_ended(topo, code: int, reporter) -> int:
    """The exit code of a launch of this node's ranks, and what it means."""
    if code != 0:
        how = (f"a rank ended with exit {code} (its message is above)" if code < 128
               else "interrupted (the ranks' messages above say how to resume)" if code in (130, 143)
               else f"a rank was killed by signal {code - 128}")
        print(f"error: the {topo.world_size}-rank build stopped: {how}", file=sys.stderr)
        return code if code in (1, 2, 130, 143) else 2
    if topo.nnodes > 1 and topo.node_rank != 0:
        reporter.log(f"node {topo.node_rank}: its ranks finished; rank 0, on node 0, wrote the outputs")
    return 0


def _signing(args, reporter):
    """The signing keys (--key, else the default key, created on first use), each shown able to sign."""
    from .attest.signing import KeylessRequest, prepare_signing

    keyless = (KeylessRequest(args.identity_token, _path(args.trust_config), args.sigstore_staging)
               if args.sigstore else None)
    return prepare_signing([Path(k) for k in args.key], reporter, keyless)


def cmd_keygen(args) -> int:
    from .attest.sign import keygen

    priv, pub = keygen(Path(args.dir), name=args.name, key_type=args.type)
    if args.json:
        _emit_json({"ok": True, "private_key": str(priv), "public_key": str(pub)})
    else:
        print(f"private key {priv} (mode 0600; never commit it)\npublic key  {pub}")
    return 0


def cmd_verify(args) -> int:
    if args.reproduced and not args.model:
        raise InputError("--reproduced judges a model dir: pass --model DIR")
    if args.reference_model and not args.reproduced:
        raise InputError("--reference-model answers the reproduced question: add --reproduced")
    if args.source and args.reproduced:
        raise InputError("--source checks a corresponding-source archive; ask it without --reproduced")
    if args.chain and args.reproduced:
        raise InputError("--chain verifies a model's lineage; ask it without --reproduced")
    prefetch = None
    if args.model and Path(args.model).is_dir():
        from ._internal.prefetch import take  # hashing has begun (verify-attestation) or starts now

        prefetch = take(Path(args.model), sha256=args.sha256)
    from .verify import SigstoreTrust, Verifier, render

    verifier = Verifier.configure(
        keys=[Path(k) for k in args.key], threshold=args.threshold, policy=_path(args.policy), sha256=args.sha256,
        store=_path(args.store), sigstore=SigstoreTrust(args.identity, args.issuer, _path(args.trust_config),
                                                        _path(args.trusted_root), args.sigstore_staging))
    asked = dict(recipe=_path(args.recipe), inputs=args.inputs, audit=_path(args.audit), published=args.published,
                 prefetch=prefetch)
    if args.reproduced:
        from .repro.reproduced import reproduced

        report = reproduced(verifier, Path(args.attestation), Path(args.model), reference=_path(args.reference_model),
                            **asked)
    else:
        report = verifier.verify(Path(args.attestation), model=_path(args.model), source=_path(args.source), **asked)
        if args.chain:
            from .verify.chain import walk

            report = walk(verifier, report, Path(args.attestation), [Path(c) for c in args.chain])
    if args.json:
        _emit_json(report.as_dict())
    else:
        print(render(report))
    return report.exit_code


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("attestation", help="attestation.intoto.jsonl (one DSSE envelope) or a Sigstore bundle")
    p.add_argument("--key", action="append", default=[], metavar="PUBLIC_KEY", help="PEM public key (repeatable)")
    p.add_argument("--threshold", type=int, default=1, help="valid signatures required from distinct --key keys")
    p.add_argument("--model", help="the model dir: it must hold exactly the signed files, byte for byte")
    p.add_argument("--sha256", action="store_true", help="also check the subjects' sha256 (blake3 is always checked)")
    p.add_argument("--published", action="store_true",
                   help="--model is a published folder (provenance publish): its .provenance/ receipts are not "
                        "part of the model; nothing else may be there")
    p.add_argument("--audit", metavar="FILE", help="the signed memorization audit (default: audit.intoto.jsonl beside "
                                                   "the attestation, checked when present)")
    p.add_argument("--reproduced", action="store_true",
                   help="ask instead whether --model's weights are a rebuild of the attested model: "
                        "reproduced (bitwise), reproduced (within tolerance) or diverged; never 'verified'")
    p.add_argument("--reference-model", metavar="DIR",
                   help="with --reproduced: the attested model dir itself (verified exactly first), so distances "
                        "are measured, not estimated from the fingerprint")
    p.add_argument("--recipe", help="check this recipe file against externalParameters")
    p.add_argument("--source", metavar="ARCHIVE",
                   help="check this corresponding-source archive (`provenance source`) against the attestation: the "
                        "build's, or the archive's own signed statement")
    p.add_argument("--chain", action="append", default=[], metavar="PARENT",
                   help="walk the model's lineage to its root: each parent's attestation, or its build dir (whose "
                        "model/ is then checked too), repeatable; every link is verified with the same --key keys")
    p.add_argument("--inputs", action="store_true",
                   help="re-hash the stored inputs and rebuild the manifest root; with --reproduced, also measure "
                        "recitation on windows of the whole training set drawn with a seed chosen now")
    p.add_argument("--store", help="input store for --inputs (default $PROVENANCE_STORE or ~/.cache/provenance)")
    p.add_argument("--policy", help="policy TOML: allowed builders, licence rules, [reproduced] bounds")
    p.add_argument("--identity", help="Sigstore: expected certificate identity")
    p.add_argument("--issuer", help="Sigstore: expected OIDC issuer")
    p.add_argument("--trust-config", help="Sigstore: client trust config naming another instance")
    p.add_argument("--trusted-root", help="Sigstore: trusted_root.json to verify against offline")
    p.add_argument("--sigstore-staging", action="store_true", help="Sigstore: the public staging instance")
    _common(p)
    p.set_defaults(func=cmd_verify)


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, given the terminal width: left to itself it imports shutil (and with
    it zlib, bz2 and lzma, ~2.5 ms of verify-attestation's start-up) for get_terminal_size, whose
    rule this repeats: $COLUMNS, else the terminal's width, else 80; argparse keeps 2 columns free."""

    def __init__(self, prog, **kw) -> None:
        if kw.get("width") is None:
            kw["width"] = _columns() - 2
        super().__init__(prog, **kw)


def _columns() -> int:
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="verify-attestation", description="Verify a provenance attestation.",
                                formatter_class=_HelpFormatter)
    add_verify_args(p)
    return p


def cmd_compare(args) -> int:
    from .repro.compare import BITWISE, WITHIN, compare
    from .verify.policy import load_policy

    bounds = load_policy(Path(args.policy) if args.policy else None).reproduced
    v = compare(Path(args.a), Path(args.b), bounds=bounds, functional_metrics=not args.tensors_only)
    if args.json:
        _emit_json(v.as_dict())
    else:
        o = v.metrics.get("overall", {})
        if o:
            print(f"tensors: {o['bitwise_tensors']}/{o['tensors']} bitwise; rel L2 {o['rel_l2']:.3g}, "
                  f"worst tensor rel L2 {o['max_tensor_rel_l2']:.3g}, max abs diff {o['max_abs_diff']:.3g}, "
                  f"max rel diff {o['max_rel_diff']:.3g}, cosine {o['cosine']:.9f}")
            worst = sorted(v.metrics["tensors"], key=lambda r: -r["rel_l2"])[:5]
            for r in worst:
                if not r["bitwise"]:
                    print(f"  {r['name']}: rel L2 {r['rel_l2']:.3g}, max abs {r['max_abs_diff']:.3g}, cosine "
                          f"{r['cosine']:.9f}")
        f = v.metrics.get("functional", {})
        if "eval_loss_diff" in f:
            print(f"functional: eval loss {f['eval_loss_a']:.6f} vs {f['eval_loss_b']:.6f} (diff "
                  f"{f['eval_loss_diff']:.3g}), "
                  f"greedy agreement {f['greedy_agreement']:.4f}, continuations equal {f['continuations_equal']}")
        if "recitation_rate_diff" in f:
            print(f"recitation rate diff {f['recitation_rate_diff']:.4f}")
        for reason in v.reasons:
            print(f"  {reason}")
        print(f"verdict: {v.verdict}")
    return 0 if v.verdict in (BITWISE, WITHIN) else 1


def cmd_diverge(args) -> int:
    from .repro.diverge import diverge

    if args.layers:
        return _diverge_layers(args)
    res = diverge(Path(args.a), Path(args.b))
    if args.json:
        _emit_json(res)
    elif res["identical"]:
        print(f"identical: {res['steps_compared']} steps")
    else:
        extra = (f" (loss {res['loss_a']!r} vs {res['loss_b']!r}, diff {res['loss_diff']:.3g})"
                 if "loss_diff" in res else "")
        print(f"first divergence at step {res['step']} (stage {res['stage']} step {res['stage_step']}): "
              f"{res['field']} differs: {res['a']} vs {res['b']}{extra}")
    return 0 if res["identical"] else 1


def _diverge_layers(args) -> int:
    from .repro.layers import layers

    res = layers(Path(args.a), Path(args.b), store=args.store, offline=args.offline,
                 log=(lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr)))
    if args.json:
        _emit_json(res)
    elif res["identical"]:
        print(f"identical: {res['steps_compared']} steps; nothing to re-run")
    elif res["first"] is None:
        print(f"step {res['step']} ({res['field']} differs in the transcripts): re-run here under cpu={res['stack_a']} "
              f"and cpu={res['stack_b']}, every operation gave the same bits ({res['ops_recorded'][0]} recorded)")
    else:
        f = res["first"]
        a = f["a"] or {}
        where = f"{a.get('op')} in {a.get('module')}" if a else "the end of the step"
        print(f"step {res['step']} ({res['field']} differs in the transcripts), re-run here under cpu={res['stack_a']} "
              f"and cpu={res['stack_b']}: the first operation whose output differs is #{f['index']} of "
              f"{res['ops_recorded'][0]}: {where}, output {a.get('shape')} {a.get('dtype')}"
              + (f": max |diff| {f['max_abs_diff']:.3g}, relative {f['relative']:.3g}, {f['elements_differing']} of "
                 f"{f['elements']} elements" if "max_abs_diff" in f else f" (under cpu={res['stack_b']}: {f['b']})"))
        print("the parameters were bitwise equal when the step began under both stacks"
              if res["params_equal_before_step"] else
              "the parameters already differed when the step began (the model's initialisation or an earlier step "
              "differed below what the transcript records); both stacks ran the step from the first one's")
    return 0 if res["identical"] else 1


def cmd_fetch(args) -> int:
    from ._internal.progress import Reporter
    from .builder.pipeline import fetch_all
    from .inputs.store import Store
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    store = Store(args.store)
    stored = fetch_all(recipe, store, offline=args.offline, handed=parse_handed(args.input, recipe),
                       reporter=Reporter(enabled=not args.json))
    rows = [{"name": s.input.name, "source": s.source, "path": str(s.path), **s.digests} for s in stored]
    if args.json:
        _emit_json({"ok": True, "store": str(store.root), "inputs": rows})
    else:
        for row in rows:
            print(f"{row['name']}: blake3:{row['blake3']} ({row['source']}) {row['path']}")
    return 0


def cmd_store_fsck(args) -> int:
    from .inputs.store import Store

    store = Store(args.store)
    counts = store.census()
    problems = store.fsck(repair=args.repair)
    checked = (f"{counts['blobs']} blob(s), {counts['sha256']} sha256 index entr"
               f"{'y' if counts['sha256'] == 1 else 'ies'} and {counts['trees']} directory snapshot(s) re-hashed")
    unchecked = (f"{counts['stages']} stage-cache entr{'y' if counts['stages'] == 1 else 'ies'} (each checked when a "
                 f"build reads it) and {counts['kernels']} compiled kernel(s) are named by what made them, not by "
                 "their content, and were not")
    if args.json:
        _emit_json({"ok": not problems, "store": str(store.root), "problems": problems, "repaired": args.repair,
                    "entries": counts})
    else:
        for line in problems:
            print(line)
        print(f"store {store.root}: " + (f"{len(problems)} bad entr{'y' if len(problems) == 1 else 'ies'}"
                                         + (" removed" if args.repair else " (rerun with --repair to remove)")
                                         if problems else "every entry matches its name")
              + f"; {checked}; {unchecked}")
    return 1 if problems and not args.repair else 0


def cmd_check(args) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if not args.plan:
        if args.json:
            _emit_json({"ok": True, "recipe": recipe.name, **recipe.digests})
        else:
            print(f"{args.recipe}: valid recipe {recipe.name!r} (blake3:{recipe.digests['blake3']})")
        return 0
    from .builder.plan import plan_build

    plan = plan_build(recipe, store=args.store, probe=args.probe)
    if args.json:
        _emit_json({"ok": True, "recipe": recipe.name, **recipe.digests, "plan": plan})
        return 0
    gib = 1 << 30
    print(f"{args.recipe}: valid recipe {recipe.name!r} (blake3:{recipe.digests['blake3']})")
    print(f"parameters: {plan['parameters']:,} (vocabulary at most {recipe.recipe.tokenizer.vocab_size})")
    for st in plan["stages"]:
        steps = f"{st['steps']:,} steps" if st["steps"] is not None else f"steps unknown ({st['steps_note']})"
        dur = (f", about {st['hours']:.2f} h ({st['seconds_per_step']:.3g} s a step)"
               if st.get("hours") is not None else "")
        print(f"stage {st['name']}: {steps}, batch {st['batch_size']} in micro-batches of {st['micro_batch']}"
              f"{dur}; memory estimate {st['memory_bytes'] / gib:.2f} GiB")
        for k, v in st["memory_parts"].items():
            print(f"    {k:22s} {v / gib:7.2f} GiB")
    avail = plan["available_bytes"]
    print(f"peak estimate {plan['peak_bytes'] / gib:.2f} GiB; available {avail / gib:.2f} GiB" if avail else
          f"peak estimate {plan['peak_bytes'] / gib:.2f} GiB; available memory unknown")
    if plan.get("probe"):
        pr = plan["probe"]
        print(f"timed probe ({pr['stage']}, on random ids): {pr['seconds_per_step']:.3f} s per step "
              f"({pr['seconds_per_micro_step'][pr['stage']]:.3f} s per micro-step, "
              f"{pr['seconds_per_optimizer_step']:.3f} s per "
              f"optimizer step); one-time costs apart: {pr['one_time_seconds']:.1f} s (set-up, kernel compilation, "
              f"first step); peak RSS {pr['peak_rss'] / gib:.2f} GiB (estimate for that stage "
              f"{pr['estimate_bytes'] / gib:.2f} GiB)")
    print(plan["verdict"])
    return 0 if plan["fits"] else 2


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="input store directory (default $PROVENANCE_STORE or ~/.cache/provenance)")
    p.add_argument("--offline", action="store_true", help="use only the store and handed-over files")
    p.add_argument("--input", action="append", default=[], metavar="NAME=PATH",
                   help="hand over a file obtained elsewhere; accepted only if it matches the input's pin")


def _signing_args(p: argparse.ArgumentParser) -> None:
    """How a command that builds signs what it built (see _signing)."""
    p.add_argument("--key", action="append", default=[], metavar="PRIVATE_KEY",
                   help="sign with this PKCS#8 PEM key (repeatable; default $PROVENANCE_KEY or "
                        "~/.config/provenance/keys/provenance.key, created on first use)")
    p.add_argument("--sigstore", action="store_true", help="also sign keyless with Sigstore")
    p.add_argument("--identity-token", help="Sigstore: OIDC token (default $SIGSTORE_ID_TOKEN or ambient CI)")
    p.add_argument("--trust-config", help="Sigstore: client trust config for another instance")
    p.add_argument("--sigstore-staging", action="store_true", help="Sigstore: the public staging instance")


def _check_threads(threads: int | None) -> None:
    """--threads, where a command takes it: absent (the recipe's count) or 1 to 4096."""
    if threads is not None and not 1 <= threads <= 4096:
        raise InputError(f"--threads must be between 1 and 4096, got {threads}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="provenance", description="Rebuild model weights from a pinned recipe.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _build_command(sub)
    _setup_commands(sub)
    _rebuild_commands(sub)
    _question_commands(sub)
    _evidence_commands(sub)
    return p


def _build_command(sub) -> None:
    """provenance build."""
    b = sub.add_parser("build", help="build a recipe into a model directory")
    b.add_argument("recipe")
    b.add_argument("--out", help="output directory (default build/<recipe name>)")
    b.add_argument("--threads", type=int,
                   help="override determinism.threads (on some CPUs the bits change: docs/recipe.md)")
    b.add_argument("--world-size", type=int, default=None,
                   help="train on N processes in all (default 1, or one per node) with torch.distributed (gloo on "
                        "the CPU), launched with torchrun; under [determinism] reduction = 'canonical' every world "
                        "size gives the same bits")
    b.add_argument("--nnodes", type=int, default=1,
                   help="machines the build runs on; run the same command on each with its --node-rank")
    b.add_argument("--node-rank", type=int, default=0,
                   help="this machine's place, 0 to NNODES-1 (node 0 writes the outputs)")
    b.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="where node 0 serves torchrun's rendezvous store (needed with --nnodes > 1)")
    b.add_argument("--collective-timeout", type=float, metavar="SECONDS",
                   help="how long a rank waits for the others in a collective before the build stops (default 600)")
    b.add_argument("--cpu-capability", choices=["native", "default", "avx2", "avx512"],
                   help="override determinism.cpu_capability (ATen kernel instruction set; recorded)")
    resume = b.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", default=None,
                        help="require a checkpoint of this build in --out and continue from it (by default a "
                             "matching checkpoint is used when there is one)")
    resume.add_argument("--no-resume", dest="resume", action="store_false", help="ignore checkpoints; start afresh")
    b.add_argument("--rounding-log", metavar="TRANSCRIPT",
                   help="portable recipes: follow the rounding log in this transcript.jsonl of an earlier build of "
                        "the same recipe, so that values near a float32 rounding boundary round the same way")
    b.add_argument("--keep-checkpoints", action="store_true", default=None,
                   help="keep the scheduled checkpoints in OUT/replay/ for `provenance replay` "
                        "(overrides [checkpoint] keep_for_replay)")
    b.add_argument("--licence-compatibility", choices=("ignore", "warn", "fail"), default="warn",
                   help="judge the recipe's output licence against the training files' licences with flict and the "
                        "OSADL matrix: warn (default), fail before training when not compatible, or ignore")
    b.add_argument("--no-cache", dest="cache", action="store_false",
                   help="train every stage: do not reuse earlier stages' outputs from the stage cache in the store "
                        "(they are still written)")
    b.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help="override [checkpoint] every_steps (checkpoints never change the bits)")
    b.add_argument("--allow-toolchain-mismatch", action="store_true",
                   help="build even if installed versions differ from toolchain pins (recorded)")
    _signing_args(b)
    _store_args(b)
    _common(b)
    b.set_defaults(func=cmd_build)


def _setup_commands(sub) -> None:
    """What comes before a build: fetch, keygen, store fsck, check-recipe."""
    f = sub.add_parser("fetch", help="fetch a recipe's inputs into the store, checking their pins")
    f.add_argument("recipe")
    _store_args(f)
    _common(f)
    f.set_defaults(func=cmd_fetch)

    k = sub.add_parser("keygen", help="write a signing key pair (NAME.key, mode 0600, and NAME.pub)")
    k.add_argument("dir")
    k.add_argument("--name", default="provenance")
    k.add_argument("--type", default="ecdsa", choices=["ecdsa", "ed25519"],
                   help="ecdsa = ECDSA P-256 (the default: OMS signatures need it); ed25519 signs SLSA only")
    _common(k)
    k.set_defaults(func=cmd_keygen)

    st = sub.add_parser("store", help="the input store")
    st_sub = st.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    fk = st_sub.add_parser("fsck", help="re-hash every store entry and report (or --repair) bad ones")
    fk.add_argument("--store", help="input store directory (default $PROVENANCE_STORE or ~/.cache/provenance)")
    fk.add_argument("--repair", action="store_true", help="remove the bad entries")
    _common(fk)
    fk.set_defaults(func=cmd_store_fsck)

    c = sub.add_parser("check-recipe", help="validate a recipe and print its digest")
    c.add_argument("recipe")
    c.add_argument("--plan", action="store_true",
                   help="print the memory estimate, steps per stage and an expected duration (timed probe)")
    c.add_argument("--no-probe", dest="probe", action="store_false", help="with --plan: skip the timed probe")
    c.add_argument("--store", help="input store, to count steps of epoch-based stages")
    _common(c)
    c.set_defaults(func=cmd_check)


def _rebuild_commands(sub) -> None:
    """Rebuilding from an attestation or against a committed reference: rebuild, gate."""
    rb = sub.add_parser("rebuild", help="rebuild from an attestation's embedded recipe, judge it, sign a VSA")
    rb.add_argument("attestation")
    rb.add_argument("--attestation-key", action="append", default=[], metavar="PUBLIC_KEY",
                    help="public key that verifies the attestation (repeatable)")
    rb.add_argument("--out", help="output directory (default build/rebuild-<recipe>)")
    rb.add_argument("--bitwise", action="store_true", help="demand bitwise-equal weights")
    rb.add_argument("--cpu-capability", choices=("native", "default", "avx2", "avx512"),
                    help="rebuild with another ATen CPU level than the recipe's (another stack: judged within "
                         "tolerance)")
    rb.add_argument("--threads", type=int,
                    help="CPU threads (default: the recipe's; bitwise still required on the reference's stack, "
                         "so use it where the recipe is thread-invariant: docs/recipe.md)")
    rb.add_argument("--world-size", type=int, default=1,
                    help="rebuild on N processes (torchrun); under the canonical reduction the bits do not depend on "
                         "it, so bitwise is still required on the reference's stack")
    rb.add_argument("--policy", help="verifier policy TOML: allowed builders, [reproduced] bounds")
    rb.add_argument("--from-source", metavar="ARCHIVE",
                    help="rebuild from this corresponding-source archive alone (`provenance source`): offline, from "
                         "an empty store, with the archive's own code")
    _signing_args(rb)
    _store_args(rb)
    _common(rb)
    rb.set_defaults(func=cmd_rebuild)

    g = sub.add_parser("gate", help="CI gate: rebuild a recipe and judge it against its committed reference")
    g.add_argument("--recipe", default="recipes/ptrace-0.9.9-debugger.toml")
    g.add_argument("--reference", help="reference attestation (default attestations/<recipe>.intoto.jsonl)")
    g.add_argument("--attestation-key", help="its public key (default attestations/keys/<recipe>.pub)")
    g.add_argument("--out", help="build directory (default build/gate/<recipe>)")
    g.add_argument("--junit", help="write a JUnit XML report here")
    g.add_argument("--bitwise", action="store_true", help="demand bitwise equality whatever the stack")
    g.add_argument("--reprotest", action="store_true",
                   help="also rebuild once under every environment variation at once (build path, HOME, user, "
                        "locale, timezone, umask, PYTHONHASHSEED, file order, clock) and demand the same bits")
    g.add_argument("--policy", help="verifier policy TOML: allowed builders, [reproduced] bounds")
    _signing_args(g)
    _store_args(g)
    _common(g)
    g.set_defaults(func=cmd_gate)


def _question_commands(sub) -> None:
    """The questions about builds: verify, compare, diverge, matrix, replay."""
    v = sub.add_parser("verify", help="verify an attestation (same as verify-attestation)")
    add_verify_args(v)

    cp = sub.add_parser("compare", help="judge build B against build A: bitwise, within tolerance or diverged")
    cp.add_argument("a", help="reference build dir (or model dir)")
    cp.add_argument("b", help="candidate build dir (or model dir)")
    cp.add_argument("--tensors-only", action="store_true", help="skip the functional metrics (no torch)")
    cp.add_argument("--policy", help="policy TOML whose [reproduced] section sets the bounds")
    _common(cp)
    cp.set_defaults(func=cmd_compare)

    dv = sub.add_parser("diverge", help="the first step where two transcripts differ")
    dv.add_argument("a", help="a transcript.jsonl or the build dir holding it (with --layers: a build dir)")
    dv.add_argument("b", help="a transcript.jsonl or the build dir holding it (with --layers: a build dir)")
    dv.add_argument("--layers", action="store_true",
                    help="re-run the first divergent step here under both builds' stacks and name the first module "
                         "and operation whose output differs")
    _store_args(dv)
    _common(dv)
    dv.set_defaults(func=cmd_diverge)

    mx = sub.add_parser("matrix", help="build a recipe under every combination of settings and compare the cells")
    mx.add_argument("recipe")
    mx.add_argument("--vary", action="append", default=[], metavar="AXIS=V1,V2",
                    help="threads=1,2 | cpu=default,avx2,avx512 | world-size=1,2 (repeatable)")
    mx.add_argument("--out", help="directory for the cells (default build/<recipe>-matrix)")
    mx.add_argument("--store")
    mx.add_argument("--offline", action="store_true")
    _common(mx)
    mx.set_defaults(func=cmd_matrix)

    rp = sub.add_parser("replay", help="spot-check a build: re-execute seeded random segments between its checkpoints")
    rp.add_argument("build", metavar="BUILD_DIR_OR_ATTESTATION")
    rp.add_argument("--key", action="append", required=True, metavar="PUBLIC_KEY",
                    help="public key that verifies the build's attestation (repeatable)")
    rp.add_argument("--segments", type=int, default=3, metavar="K", help="segments to re-execute (default 3)")
    rp.add_argument("--seed", type=int, help="seed of the segment choice (default: drawn now, so a builder cannot "
                                             "know which segments will be checked; printed, to repeat a replay)")
    rp.add_argument("--threads", type=int, help="CPU threads (default: the recipe's)")
    rp.add_argument("--policy", help="verifier policy TOML: allowed builders, [reproduced] bounds")
    _store_args(rp)
    _common(rp)
    rp.set_defaults(func=cmd_replay)


def _evidence_commands(sub) -> None:
    """The evidence about a build: audit, sbom, publish, report."""
    au = sub.add_parser("audit", help="re-run a signed build's memorization audit and compare it with the signed one")
    au.add_argument("build", metavar="BUILD_DIR")
    au.add_argument("--key", action="append", required=True, metavar="PUBLIC_KEY",
                    help="public key that verifies the build's attestation (repeatable)")
    au.add_argument("--threads", type=int, help="CPU threads (default: the recipe's)")
    _store_args(au)
    _common(au)
    au.set_defaults(func=cmd_audit)

    so = sub.add_parser("source", help="write a build's complete corresponding source as one reproducible archive")
    so.add_argument("build", metavar="BUILD_DIR", nargs="?", help="a finished build's folder")
    so.add_argument("--recipe", help="instead of a build: the recipe, its inputs fetched, handed over or in the store")
    so.add_argument("--out", required=True, metavar="FILE", help="the archive to write (an uncompressed tar)")
    so.add_argument("--key", action="append", default=[], metavar="PRIVATE_KEY",
                    help="sign the corresponding-source statement into FILE.intoto.jsonl (repeatable)")
    _store_args(so)
    _common(so)
    so.set_defaults(func=cmd_source, sigstore=False)

    sb = sub.add_parser("sbom", help="check a build's SBOM (signed, valid) and write it out")
    sb.add_argument("build", metavar="BUILD_DIR")
    sb.add_argument("--format", required=True, choices=("spdx3", "cyclonedx"),
                    help="spdx3 (SPDX 3.0.1 JSON-LD) or cyclonedx (CycloneDX 1.6 JSON)")
    sb.add_argument("--key", action="append", default=[], metavar="PUBLIC_KEY",
                    help="public key that verifies the build's attestation (repeatable); without it the SBOM "
                         "is checked against build.json only")
    sb.add_argument("--out", metavar="FILE", help="write the SBOM here (default: standard output)")
    _common(sb)
    sb.set_defaults(func=cmd_sbom)

    pb = sub.add_parser("publish", help="lay a verified build out as a Hugging Face model folder (dry run: "
                                         "nothing is uploaded) and check it verifies as published")
    pb.add_argument("build", metavar="BUILD_DIR")
    pb.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new or empty)")
    pb.add_argument("--key", action="append", required=True, metavar="PUBLIC_KEY",
                    help="the public key that verifies the build; shipped as .provenance/signing-key.pub")
    pb.add_argument("--source-max-bytes", type=int, metavar="N",
                    help="ship the corresponding source (source.tar) only up to N bytes; above, its signed statement "
                         "alone, which names it by digest (default: always ship it)")
    _common(pb)
    pb.set_defaults(func=cmd_publish)

    rt = sub.add_parser("report", help="write a build's evidence as one self-contained HTML page")
    rt.add_argument("build", metavar="BUILD_DIR")
    rt.add_argument("--key", action="append", default=[], metavar="PUBLIC_KEY",
                    help="public key that verifies the build (repeatable); the page shows the verdict")
    rt.add_argument("--out", metavar="FILE", help="where to write the page (default BUILD_DIR/report.html)")
    _common(rt)
    rt.set_defaults(func=cmd_report)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `finally` (temporary files, staging) runs."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def run(argv: list[str] | None, p: argparse.ArgumentParser) -> int:
    import signal

    if threading_is_main():
        signal.signal(signal.SIGTERM, _on_sigterm)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(p, argv)
    if isinstance(args, int):
        return args
    args.argv = argv
    debug, as_json = getattr(args, "debug", False), getattr(args, "json", False)
    try:
        _check_written_paths(args)
        _check_builder_installed(args)
        return args.func(args)
    except ProvenanceError as e:
        if debug:
            _print_traceback()
        if as_json:
            _emit_json({"ok": False, "error": e.diagnostics(), "exit_code": e.exit_code})
        print(f"error: {e.diagnostics()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM); temporary files removed", file=sys.stderr)
        return 143
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in BUILDER_MODULES:
            return _internal_error(e, debug, as_json)
        msg = (f"`{' '.join(['provenance', *argv[:1]])}` needs the builder, which this installation does not have "
               f"(no module named {e.name!r}): pip install 'provenance[build]'")
        if as_json:
            _emit_json({"ok": False, "error": msg, "exit_code": 2})
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the one place an unexpected failure becomes exit 2
        return _internal_error(e, debug, as_json)


# The `build` extra's libraries (pyproject.toml): a bare `pip install provenance` is the verifier alone.
BUILDER_MODULES = frozenset({"torch", "transformers", "tokenizers", "safetensors", "matplotlib", "rapidfuzz",
                             "cyclonedx", "spdx_python_model"})


# The commands that train or load a model: refused before any work where the `build` extra is missing.
BUILDER_COMMANDS = frozenset({"cmd_build", "cmd_rebuild", "cmd_gate", "cmd_matrix", "cmd_replay", "cmd_diverge",
                              "cmd_audit"})


def _check_builder_installed(args) -> None:
    import importlib.util

    if getattr(args.func, "__name__", "") not in BUILDER_COMMANDS:
        return
    for name in ("torch", "transformers", "tokenizers", "safetensors"):
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def _internal_error(e: Exception, debug: bool, as_json: bool) -> int:
    if debug:
        _print_traceback()
    msg = f"internal error: {type(e).__name__}: {e}; rerun with --debug for a traceback"
    if as_json:
        _emit_json({"ok": False, "error": msg, "exit_code": 2})
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _parse(p: argparse.ArgumentParser, argv: list[str]):
    """The parsed arguments, or the exit code of a usage error (2) or --help (0). A usage error under
    --json also prints one JSON object on stdout, as every other error does."""
    import contextlib
    import io

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return p.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help
        return int(e.code or 0)
    finally:
        sys.stderr.write(said.getvalue())
        lines = said.getvalue().strip().splitlines()
        wants_json = "--json" in argv[:argv.index("--")] if "--" in argv else "--json" in argv
        if lines and wants_json and "error: " in lines[-1]:
            _emit_json({"ok": False, "error": lines[-1].split("error: ", 1)[1], "exit_code": 2})


# The options naming a place this tool writes (and prints, in the commands it suggests).
WRITTEN_PATHS = (("out", "--out"), ("store", "--store"), ("junit", "--junit"), ("dir", "keygen DIR"))


def _check_written_paths(args) -> None:
    """A path this tool writes to holds no control character: a newline in `--out` made a directory whose
    name breaks every line that prints it (the resume hint, a copied command, the logs)."""
    for attr, flag in WRITTEN_PATHS:
        value = getattr(args, attr, None)
        if isinstance(value, str) and any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise InputError(f"{flag} {value!r}: contains a control character (a newline, a tab or the like); "
                             "choose a path without one")


def _check_output_file(flag: str, value: str | None) -> None:
    """Preflight for a file the user names: a place a file can be put, not a directory, link or device."""
    from ._internal.atomic import output_file_problem

    problem = output_file_problem(Path(value)) if value else None
    if problem:
        raise InputError(f"{flag} {value}: {problem}")


def _print_traceback() -> None:
    import traceback  # only with --debug: ~5 ms of every start-up otherwise

    traceback.print_exc()


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> int:
    return run(argv, parser())


def entry() -> None:
    sys.exit(main())


def verify_main(argv: list[str] | None = None) -> int:
    return run(argv, verify_parser())


def cmd_matrix(args) -> int:
    from .recipe import load_recipe
    from .repro.matrix import parse_vary, plot, run_matrix, table

    recipe = load_recipe(args.recipe)
    axes = parse_vary(args.vary)
    out = Path(args.out) if args.out else Path("build") / f"{recipe.name}-matrix"
    log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    cells = run_matrix(Path(args.recipe), axes, out, store=args.store, offline=args.offline, log=log)
    png = plot(cells, out / "matrix-loss.png")
    failed = [c for c in cells if c.status == "failed"]
    diverged = [c for c in cells if c.verdict == "diverged"]
    if args.json:
        _emit_json({"recipe": recipe.name, "cells": [c.as_dict() for c in cells], "plot": str(png) if png else None,
                    "groups": sorted({c.group for c in cells if c.group}),
                    "ok": not failed and not diverged})
    else:
        print(table(cells))
        groups = {}
        for c in cells:
            if c.group:
                groups.setdefault(c.group, []).append(c.index)
        print("bitwise-identical groups: " + "; ".join(f"{g}: cells {v}" for g, v in sorted(groups.items())))
        if png:
            print(f"plot: {png}")
    if failed:
        return 2
    return 1 if diverged else 0


def cmd_replay(args) -> int:
    from .inputs.store import Store
    from .repro.rebuild import verified_statement
    from .repro.replay import build_of, replay, verdict_line
    from .verify.policy import load_policy

    if not 1 <= args.segments <= 10_000:
        raise InputError(f"--segments must be between 1 and 10000, got {args.segments}")
    _check_threads(args.threads)
    build_dir, att = build_of(Path(args.build))
    payload, st = verified_statement(att, [Path(k) for k in args.key], _path(args.policy))
    bounds = load_policy(_path(args.policy)).reproduced
    log = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr))
    if args.seed is None:
        import secrets

        args.seed = secrets.randbits(31)
    log(f"segment seed {args.seed}" + ("" if "--seed" in args.argv else " (drawn now; --seed repeats this choice)"))
    report = replay(build_dir, payload, st, segments=args.segments, seed=args.seed, store=Store(args.store),
                    handed=lambda recipe: parse_handed(args.input, recipe), offline=args.offline,
                    threads=args.threads, bounds=bounds, log=log)
    if args.json:
        _emit_json(report.as_dict())
    else:
        print(f"stack: {report.stack}")
        for seg in report.segments:
            print(f"segment {seg.start:>7} -> {seg.end:<7} {seg.verdict:<17} {seg.seconds:8.1f} s"
                  + "".join(f"\n    {x}" for x in seg.reasons))
        if report.build_train_seconds:
            print(f"replay took {report.seconds:.1f} s; the build trained for {report.build_train_seconds:.1f} s")
        print(verdict_line(report))
    return 0 if report.ok else 1


def cmd_audit(args) -> int:
    """Re-run a build's memorization audit on its model dir and compare it with the signed one."""
    from ._internal.progress import Reporter
    from .audit.memorization import summary_line
    from .repro.reaudit import rerun_audit

    _check_threads(args.threads)
    fresh, differing = rerun_audit(Path(args.build), args.key, store=args.store, offline=args.offline,
                                   threads=args.threads, handed=lambda recipe: parse_handed(args.input, recipe),
                                   reporter=Reporter(enabled=not args.json))
    if args.json:
        _emit_json({"ok": not differing, "audit": fresh, "matches_signed": not differing})
    else:
        print(summary_line(fresh))
        print("the re-run audit DIFFERS from the signed one: " + ", ".join(differing) if differing else
              "the re-run audit equals the signed one")
    return 1 if differing else 0


def cmd_sbom(args) -> int:
    """Hand out a build's SBOM after checking it (repro/evidence.py): written to --out, else to stdout."""
    from ._internal.atomic import atomic_write_bytes
    from .repro.evidence import checked_sbom

    _check_output_file("--out", args.out)
    sbom = checked_sbom(Path(args.build), args.format, args.key)
    if args.out:
        atomic_write_bytes(Path(args.out), sbom.data)
    if args.json:
        _emit_json({"ok": True, "format": sbom.format, "file": str(sbom.path), "blake3": sbom.blake3,
                    "signed": sbom.signed, "out": args.out})
    elif args.out:
        print(f"{sbom.format}: {sbom.path} ({sbom.bound}; valid) written to {args.out}")
    else:
        sys.stdout.write(sbom.data.decode())
        print(f"{sbom.format}: {sbom.path} ({sbom.bound}; valid)", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    """Write a build's self-contained HTML report (default BUILD_DIR/report.html)."""
    from ._internal.atomic import atomic_write_bytes
    from .repro.evidence import report_page

    _check_output_file("--out", args.out)
    build_dir = Path(args.build)
    rep = report_page(build_dir, args.key)
    out = Path(args.out) if args.out else build_dir / "report.html"
    atomic_write_bytes(out, rep.page)
    code = rep.exit_code
    if args.json:
        _emit_json({"ok": code == 0, "report": str(out), "verification": rep.state, "bytes": len(rep.page),
                    **({"exit_code": code} if code else {})})
    else:
        print(f"report: {out} ({len(rep.page):,} bytes; verification: {rep.state})")
        if code:
            print(f"error: the build does not verify with --key ({rep.state}); the page says which check failed, "
                  "and is written so it can be read, not published", file=sys.stderr)
    return code


def cmd_publish(args) -> int:
    """Lay a verified build out as a Hugging Face model folder (nothing is uploaded) and check that
    it verifies as published: the SLSA attestation and the OMS signature, each against the folder."""
    from .publish import publish
    from .verify.model_dir import RECEIPTS_DIR

    if len(args.key) != 1:
        raise InputError("--key: publish ships one public key (signing-key.pub); pass exactly one")
    if args.source_max_bytes is not None and args.source_max_bytes < 0:
        raise InputError(f"--source-max-bytes must be 0 or more, got {args.source_max_bytes}")
    out, key = Path(args.out), Path(args.key[0])
    done = publish(Path(args.build), out, key, args.source_max_bytes)
    if args.json:
        _emit_json({"ok": done.ok, "out": str(out), "files": done.files, "receipts": done.receipts, "oms": done.oms,
                    "source": done.source, "checks": {what: r.as_dict() for what, r in done.reports}})
    else:
        print(f"published {len(done.files)} model file(s){', model.sig' if done.oms else ''} and {len(done.receipts)} "
              f"receipt(s) under {RECEIPTS_DIR}/ into {out} (nothing uploaded)")
        print(f"corresponding source: {done.source}")
        for what, r in done.reports:
            failed = [c for c in r.checks if not c.ok]
            print(f"{what}: {r.result}" + "".join(f"\n  FAIL {c.check}: {c.detail}" for c in failed))
        # PUBLIC_KEY, not the copy in the folder: whoever can change the files can change that copy too.
        if done.oms:
            print(f"model_signing users: model_signing verify key {out} --signature {out / 'model.sig'} "
                  "--public_key PUBLIC_KEY")
        else:
            print("no model.sig: the build was signed with ed25519 only, and OMS accepts ECDSA keys only")
        print(f"verify-attestation {out / RECEIPTS_DIR / 'attestation.intoto.jsonl'} --key PUBLIC_KEY "
              f"--model {out} --published")
        from .verify.keys import load_public_key

        kid = load_public_key(key).keyid[:16]
        print(f"signing key id {kid}: announce it where your users can check it; they verify with the key "
              f"you announce as PUBLIC_KEY (the copy in {RECEIPTS_DIR}/signing-key.pub travels with the files "
              "and proves nothing by itself)")
    return 0 if done.ok else 1


def cmd_source(args) -> int:
    """`provenance source`: the corresponding-source archive of a build (or of a recipe), signed with --key."""
    from ._internal.progress import Reporter
    from .inputs.store import Store
    from .repro.source import source_of

    if (args.build is None) == (args.recipe is None):
        raise InputError("name a build dir (BUILD_DIR) or a recipe (--recipe RECIPE), one of the two")
    _check_output_file("--out", args.out)
    signing = _signing(args, Reporter(enabled=not args.json)) if args.key else None
    done = source_of(Path(args.out), Store(args.store), build_dir=_path(args.build), recipe_path=_path(args.recipe),
                     offline=args.offline, handed=lambda recipe: parse_handed(args.input, recipe),
                     signers=signing.signers if signing else None)
    summary = done.summary()
    if args.json:
        _emit_json(summary)
    else:
        print(f"corresponding source: {done.archive} ({summary['bytes']:,} bytes, sha256 {summary['sha256']})")
        print(f"  inputs {', '.join(summary['inputs'])}; code digest {done.claims.code}; licences "
              f"{', '.join(summary['licenses'])}")
        print(f"  signed statement: {done.statement}" if done.statement else
              "  not signed (pass --key PRIVATE_KEY to sign it)")
    return 0


def _settings(args):
    """What `rebuild` and `gate` were asked, for repro/judged.py."""
    from .repro.judged import Settings

    return Settings(store=args.store, offline=args.offline, keys=tuple(Path(k) for k in args.key),
                    handed=(lambda recipe: parse_handed(args.input, recipe)) if args.input else None,
                    threads=getattr(args, "threads", None), cpu_capability=getattr(args, "cpu_capability", None),
                    world_size=getattr(args, "world_size", 1), policy=_path(args.policy))


def cmd_rebuild(args) -> int:
    from ._internal.progress import Reporter
    from .builder.launch import topology
    from .repro.judged import rebuild
    from .verify import render

    if not args.attestation_key:
        raise InputError("--attestation-key PUBLIC_KEY is needed to verify the attestation before rebuilding"
                         + (" (--key is the private key that signs the verification summary)" if args.key else ""))
    _check_threads(args.threads)
    topology(args.world_size)  # the same rule as build's
    reporter = Reporter(enabled=not args.json)
    done = rebuild(Path(args.attestation), [Path(k) for k in args.attestation_key], _settings(args),
                   lambda: _signing(args, reporter), reporter, out=_path(args.out), bitwise=args.bitwise,
                   from_source=_path(args.from_source), keyless=args.sigstore)
    report = done.judged.report
    if args.json:
        _emit_json({**report.as_dict(), "stack": done.judged.why, "vsa": str(done.vsa),
                    "verificationResult": done.verification_result})
    else:
        print(f"stack: {done.judged.why}")
        print(render(report))
        print(f"VSA ({done.verification_result}) signed into {done.vsa}")
    return 0 if report.ok else 1


def cmd_gate(args) -> int:
    from ._internal.progress import Reporter
    from .repro.gate import gate

    _check_output_file("--junit", args.junit)  # written after a rebuild of minutes
    recipe_path = Path(args.recipe)
    name = recipe_path.stem
    reporter = Reporter(enabled=not args.json)
    res = gate(recipe_path, reference=_path(args.reference) or Path("attestations") / f"{name}.intoto.jsonl",
               key=_path(args.attestation_key) or Path("attestations") / "keys" / f"{name}.pub",
               out=_path(args.out) or Path("build") / "gate" / name, settings=_settings(args),
               signing=lambda: _signing(args, reporter), reporter=reporter, bitwise=args.bitwise,
               reprotest=args.reprotest, junit_path=_path(args.junit))
    if args.json:
        _emit_json({"ok": res.ok, "question": "reproduced", "result": res.result, "verdict": res.verdict,
                    "checks": [{"check": n, "ok": o, "detail": d} for n, o, d in res.cases]})
    else:
        for n, o, d in res.cases:
            print(f"{'PASS' if o else 'FAIL'}  {n}: {d}")
        print("question: is the rebuild a reproduction of the committed reference? (reproduced)")
        print(f"gate: {'PASSED' if res.ok else 'FAILED'}: {res.result}")
    return 0 if res.ok else 1
