"""The command line: parse, dispatch, report. Library errors are printed once, without a traceback.

Exit codes (DESIGN.md §3): 0 success, 1 checked and failed, 2 could not check.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from .errors import ProvenanceError


def _emit_json(obj) -> None:
    print(json.dumps(obj, sort_keys=True))


def cmd_build(args) -> int:
    from .build import build, parse_handed
    from .progress import Reporter
    from .recipe import load_recipe
    from .store import Store

    recipe = load_recipe(args.recipe)
    if args.threads is not None and args.threads < 1:
        raise ProvenanceError(f"--threads must be at least 1, got {args.threads}")
    out = Path(args.out) if args.out else Path("build") / recipe.name
    reporter = Reporter(enabled=not args.json)
    record = build(recipe, out=out, store=Store(args.store), threads=args.threads, offline=args.offline,
                   handed=parse_handed(args.input, recipe), allow_toolchain_mismatch=args.allow_toolchain_mismatch,
                   reporter=reporter)
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
    b.add_argument("--allow-toolchain-mismatch", action="store_true",
                   help="build even if installed versions differ from toolchain pins (recorded)")
    _store_args(b)
    _common(b)
    b.set_defaults(func=cmd_build)

    f = sub.add_parser("fetch", help="fetch a recipe's inputs into the store, checking their pins")
    f.add_argument("recipe")
    _store_args(f)
    _common(f)
    f.set_defaults(func=cmd_fetch)

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


def verify_entry() -> None:
    print("error: verify-attestation is not available yet: signed attestations are issue 3 "
          "(see docs/README in the repository)", file=sys.stderr)
    sys.exit(2)
