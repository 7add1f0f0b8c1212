"""The `verify-attestation` console script, kept light: it starts hashing `--model` before the
command-line parser and the verifier are imported (see _internal/prefetch.py), then runs the CLI
and leaves without the interpreter's teardown."""

from __future__ import annotations

import os
import sys


def verify_entry() -> None:
    from ._internal.prefetch import start_from_argv

    try:
        start_from_argv(sys.argv[1:])
    except Exception:  # noqa: BLE001 - speculative; the CLI reports every real problem
        pass
    from .cli import verify_main

    code = verify_main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed or broken stream: let the interpreter report it as usual
        sys.exit(code)
    # The verdict is printed and flushed, every file is closed and nothing is registered to run at
    # exit: skip the interpreter's teardown, ~15 ms of module finalisation and OpenSSL clean-up
    # after the answer, one sixth of what verification costs beyond hashing (docs/benchmarks.md).
    os._exit(code)
