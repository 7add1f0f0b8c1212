"""Starting a build on several processes or machines: the topology the command line asks for, checked
before any work, and this node's ranks launched with torchrun once the inputs are in the store
(docs/distributed.md). Each rank then runs `provenance build` itself; rank 0, on node 0, writes the
outputs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..inputs.store import Store
from ..recipe import LoadedRecipe
from .pipeline import fetch_all, topology_problems
from .ranks import DEFAULT_TIMEOUT

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .._internal.progress import Reporter

MAX_RANKS = 1024


@dataclass(frozen=True)
class Topology:
    """Where a build runs: `world_size` ranks in all over `nnodes` machines, this one `node_rank`."""

    world_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # HOST:PORT where node 0 serves torchrun's rendezvous store
    collective_timeout: float = DEFAULT_TIMEOUT  # seconds a rank waits for the others in a collective

    @property
    def per_node(self) -> int:
        return self.world_size // self.nnodes


def topology(world_size: int | None, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None,
             collective_timeout: float | None = None) -> Topology:
    """The topology `build --world-size --nnodes --node-rank --rdzv-endpoint --collective-timeout` asks
    for (world size default: one rank per node), checked. Raises InputError naming the option."""
    if not 1 <= nnodes <= MAX_RANKS:
        raise InputError(f"--nnodes must be between 1 and {MAX_RANKS}, got {nnodes}")
    world_size = nnodes if world_size is None else world_size
    if not 1 <= world_size <= MAX_RANKS:
        raise InputError(f"--world-size must be between 1 and {MAX_RANKS}, got {world_size}")
    if world_size % nnodes:
        raise InputError(f"--world-size {world_size} is not a multiple of --nnodes {nnodes} (every node "
                         "runs the same number of ranks)")
    timeout = DEFAULT_TIMEOUT if collective_timeout is None else collective_timeout
    if not 1 <= timeout <= 86400:
        raise InputError(f"--collective-timeout must be between 1 and 86400 seconds, got {timeout}")
    if nnodes == 1:
        if rdzv_endpoint is not None or node_rank:
            raise InputError("--rdzv-endpoint and --node-rank are for a build on several machines: add --nnodes N")
        return Topology(world_size, collective_timeout=timeout)
    if not 0 <= node_rank < nnodes:
        raise InputError(f"--node-rank must be between 0 and {nnodes - 1} (--nnodes {nnodes}), got {node_rank}")
    if rdzv_endpoint is None:
        raise InputError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (where node 0 listens)")
    _check_endpoint(rdzv_endpoint)
    return Topology(world_size, nnodes, node_rank, rdzv_endpoint, timeout)


def _check_endpoint(endpoint: str) -> None:
    host, _, port = endpoint.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if (not bare or not all(c.isalnum() or c in ".-:" for c in bare) or bare.startswith("-")
            or not port.isdigit() or not 1 <= int(port) <= 65535):
        raise InputError(f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT (a host name or address, a "
                         "port from 1 to 65535)")


def this_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them for a rank; (0, 1) in a process torchrun did not start."""
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > 1 << 20:
        raise InputError(f"${name} = {raw!r}: expected a non-negative integer (set by torchrun)")
    return int(raw)


def is_rank() -> bool:
    """Whether this process is one of torchrun's ranks (and not the command that launches them)."""
    return "RANK" in os.environ


def launch_node(recipe: LoadedRecipe, topo: Topology, build_args: list[str], *, store: Store, offline: bool,
                handed: dict[str, Path], reporter: Reporter, debug: bool = False) -> int:
    """Fetch the recipe's inputs here, then run this node's ranks with torchrun, each `provenance
    build_args... --offline`. The exit code of the first rank that failed (128 + the signal of one
    killed), or 0. Raises InputError, before anything is fetched, for a stage the world size does not fit."""
    for i, s in enumerate(recipe.recipe.stages):
        for problem in topology_problems(recipe.recipe, s, topo.world_size):
            raise InputError(f"{recipe.path}: stages[{i}].{problem}")
    fetch_all(recipe, store, offline=offline, handed=handed, reporter=reporter)
    if topo.nnodes == 1:
        where = ["--standalone", "--nnodes=1"]
    else:  # static rendezvous: node R's ranks are R*per_node and up, so node 0 holds rank 0, which writes
        where = [f"--nnodes={topo.nnodes}", f"--node-rank={topo.node_rank}", "--rdzv-backend=static",
                 f"--rdzv-endpoint={topo.rdzv_endpoint}", "--max-restarts=0"]
    reporter.log(f"launching {topo.per_node} of {topo.world_size} ranks: torchrun {' '.join(where)} "
                 f"--nproc-per-node={topo.per_node}")
    from .ranks import launch

    return launch([*where, f"--nproc-per-node={topo.per_node}", "--module", "provenance", *build_args, "--offline"],
                  debug=debug)
