"""The command line: parse, dispatch, report. Library errors are printed once, without a traceback.

Exit codes (DESIGN.md §3): 0 success, 1 checked and failed, 2 could not check.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from .errors import InputError, ProvenanceError


def _emit_json(obj) -> None:
    print(json.dumps(obj, sort_keys=True))


def cmd_build(args) -> int:
    from .build import build, parse_handed
    from .progress import Reporter
    from .recipe import load_recipe
    from .store import Store

    recipe = load_recipe(args.recipe)
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    out = Path(args.out) if args.out else Path("build") / recipe.name
    reporter = Reporter(enabled=not args.json)
    signing = _signing(args, reporter)
    record = build(recipe, out=out, store=Store(args.store), threads=args.threads, offline=args.offline,
                   handed=parse_handed(args.input, recipe), allow_toolchain_mismatch=args.allow_toolchain_mismatch,
                   reporter=reporter, signing=signing, cpu_capability=args.cpu_capability)
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


def _signing(args, reporter):
    """Load (or, for the default path, create) the signing key before any long work starts."""
    from .build import Signing
    from .sign import default_key_path, identity_token, key_is_private_enough, keygen, load_signer, trust_config

    keys = [Path(k) for k in args.key] if args.key else [default_key_path()]
    if not args.key and not keys[0].exists():
        priv, pub = keygen(keys[0].parent, name=keys[0].stem)
        reporter.log(f"created a signing key pair: {priv} (private, 0600) and {pub}")
    for k in keys:
        if k.exists() and not key_is_private_enough(k):
            reporter.log(f"warning: private key {k} is readable by group or others")
    signing = Signing(signers=[load_signer(k) for k in keys])
    if args.sigstore:
        signing.sigstore_config = trust_config(Path(args.trust_config) if args.trust_config else None,
                                               staging=args.sigstore_staging)
        signing.sigstore_token = identity_token(args.identity_token)
    return signing


def cmd_keygen(args) -> int:
    from .sign import keygen

    priv, pub = keygen(Path(args.dir), name=args.name, key_type=args.type)
    if args.json:
        _emit_json({"ok": True, "private_key": str(priv), "public_key": str(pub)})
    else:
        print(f"private key {priv} (mode 0600; never commit it)\npublic key  {pub}")
    return 0


def cmd_verify(args) -> int:
    from .verify import render, verify

    report = verify(Path(args.attestation), keys=[Path(k) for k in args.key], threshold=args.threshold,
                    model=Path(args.model) if args.model else None, recipe=Path(args.recipe) if args.recipe else None,
                    inputs=args.inputs, store=Path(args.store) if args.store else None,
                    policy_path=Path(args.policy) if args.policy else None, sha256=args.sha256,
                    identity=args.identity, issuer=args.issuer,
                    trust_config=Path(args.trust_config) if args.trust_config else None,
                    trusted_root=Path(args.trusted_root) if args.trusted_root else None,
                    staging=args.sigstore_staging)
    if args.json:
        _emit_json(report.as_dict())
    else:
        print(render(report))
    return 0 if report.ok else 1


def add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("attestation", help="attestation.intoto.jsonl (DSSE) or a Sigstore bundle (.sigstore.json)")
    p.add_argument("--key", action="append", default=[], metavar="PUBLIC_KEY", help="PEM public key (repeatable)")
    p.add_argument("--threshold", type=int, default=1, help="signatures required from distinct --key keys")
    p.add_argument("--model", help="check this model dir's files against the subjects")
    p.add_argument("--sha256", action="store_true", help="also check the subjects' sha256 (default: blake3 only)")
    p.add_argument("--recipe", help="check this recipe file against externalParameters")
    p.add_argument("--inputs", action="store_true", help="re-hash the stored inputs and rebuild the manifest root")
    p.add_argument("--store", help="input store for --inputs (default $PROVENANCE_STORE or ~/.cache/provenance)")
    p.add_argument("--policy", help="policy TOML: allowed builders, required or forbidden licences")
    p.add_argument("--identity", help="Sigstore: expected certificate identity")
    p.add_argument("--issuer", help="Sigstore: expected OIDC issuer")
    p.add_argument("--trust-config", help="Sigstore: client trust config naming another instance")
    p.add_argument("--trusted-root", help="Sigstore: trusted_root.json to verify against offline")
    p.add_argument("--sigstore-staging", action="store_true", help="Sigstore: the public staging instance")
    _common(p)
    p.set_defaults(func=cmd_verify)


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="verify-attestation", description="Verify a provenance attestation.")
    add_verify_args(p)
    return p


def cmd_fetch(args) -> int:
    from .build import fetch_all, parse_handed
    from .progress import Reporter
    from .recipe import load_recipe
    from .store import Store

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


def cmd_check(args) -> int:
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.json:
        _emit_json({"ok": True, "recipe": recipe.name, **recipe.digests})
    else:
        print(f"{args.recipe}: valid recipe {recipe.name!r} (blake3:{recipe.digests['blake3']})")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="input store directory (default $PROVENANCE_STORE or ~/.cache/provenance)")
    p.add_argument("--offline", action="store_true", help="use only the store and handed-over files")
    p.add_argument("--input", action="append", default=[], metavar="NAME=PATH",
                   help="hand over a file obtained elsewhere; accepted only if it matches the input's pin")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="provenance", description="Rebuild model weights from a pinned recipe.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="build a recipe into a model directory")
    b.add_argument("recipe")
    b.add_argument("--out", help="output directory (default build/<recipe name>)")
    b.add_argument("--threads", type=int, help="override determinism.threads (does not change the bits)")
    b.add_argument("--cpu-capability", choices=["native", "default", "avx2", "avx512"],
                   help="override determinism.cpu_capability (ATen kernel instruction set; recorded)")
    b.add_argument("--allow-toolchain-mismatch", action="store_true",
                   help="build even if installed versions differ from toolchain pins (recorded)")
    b.add_argument("--key", action="append", default=[], metavar="PRIVATE_KEY",
                   help="sign with this PKCS#8 PEM key (repeatable; default $PROVENANCE_KEY or "
                        "~/.config/provenance/keys/provenance.key, created on first use)")
    b.add_argument("--sigstore", action="store_true", help="also sign keyless with Sigstore")
    b.add_argument("--identity-token", help="Sigstore: OIDC token (default $SIGSTORE_ID_TOKEN or ambient CI)")
    b.add_argument("--trust-config", help="Sigstore: client trust config for another instance")
    b.add_argument("--sigstore-staging", action="store_true", help="Sigstore: the public staging instance")
    _store_args(b)
    _common(b)
    b.set_defaults(func=cmd_build)

    f = sub.add_parser("fetch", help="fetch a recipe's inputs into the store, checking their pins")
    f.add_argument("recipe")
    _store_args(f)
    _common(f)
    f.set_defaults(func=cmd_fetch)

    k = sub.add_parser("keygen", help="write a signing key pair (NAME.key, mode 0600, and NAME.pub)")
    k.add_argument("dir")
    k.add_argument("--name", default="provenance")
    k.add_argument("--type", default="ed25519", choices=["ed25519", "ecdsa"], help="ecdsa = ECDSA P-256")
    _common(k)
    k.set_defaults(func=cmd_keygen)

    v = sub.add_parser("verify", help="verify an attestation (same as verify-attestation)")
    add_verify_args(v)

    c = sub.add_parser("check-recipe", help="validate a recipe and print its digest")
    c.add_argument("recipe")
    _common(c)
    c.set_defaults(func=cmd_check)
    return p


def run(argv: list[str] | None, p: argparse.ArgumentParser) -> int:
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help
        return int(e.code or 0)
    try:
        return args.func(args)
    except ProvenanceError as e:
        if getattr(args, "debug", False):
            traceback.print_exc()
        if getattr(args, "json", False):
            _emit_json({"ok": False, "error": e.diagnostics(), "exit_code": e.exit_code})
        print(f"error: {e.diagnostics()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run(argv, parser())


def entry() -> None:
    sys.exit(main())


def verify_main(argv: list[str] | None = None) -> int:
    return run(argv, verify_parser())


def verify_entry() -> None:
    sys.exit(verify_main())
