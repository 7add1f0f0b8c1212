"""The ranks of a distributed build: joining them, checking they build the same thing, and turning a
lost rank into a clear error instead of a hang.

Before the first step every rank hashes what decides the bits it will compute (recipe, this tool's
code, the dataset manifest's root, the tokenizer, the toolchain, where training starts and the
weights it starts from); the ranks exchange the digests with all_gather (fixed-size byte tensors:
nothing is pickled) and every rank refuses to start, naming the first rank and field that differ
from rank 0's. A collective that fails or outlasts the timeout ends the build with RankFailed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from .._internal.hashing import blake3_bytes, canonical_json
from ..errors import InputError, RankFailed

DEFAULT_TIMEOUT = 600  # seconds a collective may wait for the other ranks (--collective-timeout)


def launch(torchrun_args: list[str], *, debug: bool = False) -> int:
    """Run torchrun (torch.distributed.run, its documented command line) in this process on `torchrun_args`;
    the exit code of the first rank that failed (a rank killed by a signal gives 128 + the signal), or 0.

    Each rank prints its own error; torchrun's log lines and its failure report, a traceback, are shown
    only with --debug. The ranks run one OpenMP thread each unless OMP_NUM_THREADS says otherwise (each
    rank then sets the recipe's count itself, builder/determinism.py)."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCHELASTIC_ERROR_FILE", os.devnull)
    if not debug:  # torch's elastic loggers set their own levels: quiet each one
        for name in [*logging.root.manager.loggerDict, "torch.distributed"]:
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(torchrun_args))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
    except SignalException as e:  # SIGINT or SIGTERM to the launcher: torchrun stopped the ranks (they checkpoint)
        return 128 + int(e.sigval)
    return 0


def join(backend: str, timeout: float) -> None:
    """Join the process group torchrun describes in the environment; collectives time out after `timeout` s."""
    from datetime import timedelta

    import torch.distributed as tdist

    with collective("joining the process group"):
        tdist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout))


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Run a collective; a failure of the group (a rank died, the network broke, the timeout passed)
    becomes RankFailed naming this rank and what it was doing."""
    try:
        yield
    except (RuntimeError, TimeoutError, ConnectionError) as e:
        rank = os.environ.get("RANK", "?")
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise RankFailed(f"rank {rank}: {what} failed: another rank stopped, the network failed or the collective "
                         f"timed out ({first}); the last complete checkpoint is kept: run the same command again "
                         "to resume (at any world size under the canonical reduction)") from None


def field_digests(fields: dict[str, object]) -> dict[str, str]:
    """blake3 of each field's canonical JSON (strings are taken as they are)."""
    return {k: blake3_bytes(v.encode() if isinstance(v, str) else canonical_json(v)) for k, v in fields.items()}


def agree(fields: dict[str, object], rank: int, world_size: int) -> None:
    """Refuse to train unless every rank has the same digest of every field as rank 0 (InputError,
    naming the first differing rank and field). Called on every rank with the fields in the same order."""
    import torch
    import torch.distributed as tdist

    digests = field_digests(fields)
    mine = torch.tensor(list(bytes.fromhex("".join(digests.values()))), dtype=torch.uint8)
    got = [torch.empty_like(mine) for _ in range(world_size)]
    with collective("comparing the ranks' recipe, code, data, tokenizer and toolchain"):
        tdist.all_gather(got, mine)
    names = list(digests)
    for r, t in enumerate(got):
        for i, name in enumerate(names):
            theirs, ref = bytes(t[32 * i:32 * i + 32].tolist()), bytes(got[0][32 * i:32 * i + 32].tolist())
            if theirs != ref:
                raise InputError(f"rank {r} differs from rank 0 in {name} (blake3 {theirs.hex()[:16]}… vs "
                                 f"{ref.hex()[:16]}…): every node must build the same recipe with the same code, "
                                 f"inputs and toolchain; refused before training (this is rank {rank})")
