"""The `verify-attestation` console script, kept light: it starts hashing `--model` before the
command-line parser and the verifier are imported (see _internal/prefetch.py), then runs the CLI
and leaves as any Python program does (sys.exit: the interpreter's own teardown, no shortcut)."""

from __future__ import annotations

import sys


def verify_entry() -> None:
    from ._internal.prefetch import start_from_argv

    try:
        start_from_argv(sys.argv[1:])
    except Exception:  # noqa: BLE001 - speculative; the CLI reports every real problem
        pass
    from ._cli import verify_main

    sys.exit(verify_main())
