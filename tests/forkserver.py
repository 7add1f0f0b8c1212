"""A fork server for the tests' `python -m provenance ...` commands: a process that has imported torch and
transformers once (about 6 s of CPU on the AMD EPYC, most of what a tiny build costs: docs/benchmarks.md,
"The test suite's time"), then forks a fresh process per command that runs `python -m provenance` exactly
as the interpreter would (runpy, the command's own argv, environment, working directory, stdin from
/dev/null, stdout and stderr to the files it is given) and leaves as any Python program does (its
SystemExit or traceback, atexit handlers, the interpreter's teardown).

What the forked process shares with the server is only what importing those libraries set up; nothing
of provenance is imported here (each command imports the working tree's code afresh), no torch kernel
has run (so ATen's CPU level and MKL's branch are still chosen by the command: checked by the tests
that pin them), and no OpenMP region has started. The tests' client (conftest.run_cli) sends a command
here only when its environment differs from the server's in PROVENANCE_* variables alone, which the
libraries imported here never read; every other command, and the tests of the process boundary itself,
start a process of their own. Each forked process shares the server's str-hash seed: the tests that
hold a build to the same bits run to run compare against builds made in processes of their own.

Protocol, one request per connection on a Unix socket: the client sends one JSON line
{"argv": [...], "env": {...}, "cwd": DIR, "stdout": FILE, "stderr": FILE}; the server answers with the
exit status as subprocess reports it (negative: the signal that ended it), then closes.

Run as `python tests/forkserver.py SOCKET`; it prints "ready" on stdout once it listens, and leaves when
its stdin closes (the test process ended or let it go)."""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import socket
import sys


def preload() -> None:
    """What every build, rebuild, replay and model-loading check imports first."""
    import numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch._inductor.config  # noqa: F401  (torch itself, and what torch.use_deterministic_algorithms imports)
    import transformers  # noqa: F401
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401

    # Python's advice for a process that forks workers: the imported objects move to a generation the
    # collector never scans, so a child's collections and teardown do not touch (and copy) their pages.
    # Measured on the AMD EPYC: a forked child's exit takes 1.3 s without, 0.45 s with.
    gc.freeze()


def serve(path: str) -> dict:
    """Accept requests for ever; returns only in a forked process, with the request it is to run."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the server never waits for its children
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in ready:  # the test process closed it or ended: so does the server
            sys.exit(0)
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            return _supervise(conn)
        conn.close()


def _supervise(conn: socket.socket) -> dict:
    """In the server's child: read the request, fork the process that runs it (which returns it),
    wait for that process and send its exit status."""
    with conn.makefile("r") as f:
        request = json.loads(f.readline())
    pid = os.fork()
    if pid == 0:
        conn.close()
        return request
    _, status = os.waitpid(pid, 0)
    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    conn.close()
    os._exit(0)  # the supervisor only: the command's own process leaves normally


def become(request: dict) -> None:
    """Make this process the command's: working directory, environment, standard streams, argv."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, name, mode in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                           (2, request["stderr"], os.O_WRONLY)):
        opened = os.open(name, mode)
        os.dup2(opened, fd)
        os.close(opened)
    sys.path[0] = os.getcwd()  # as `python -m` puts it
    sys.argv = request["argv"][2:]  # runpy sets argv[0] to the module's file, as `python -m` does


if __name__ == "__main__":
    sys.path[0] = os.getcwd()  # not tests/, the directory of this script
    preload()
    request = serve(sys.argv[1])
    become(request)
    import runpy

    runpy.run_module(request["argv"][2], run_name="__main__", alter_sys=True)
