"""The stage cache: each training stage's output, content-addressed by everything that determines it.

An entry is the state at the end of stage i: the model's tensors, the torch RNG state, the
transcript so far and the counters, in the checkpoint format (builder/checkpoint.py), stored as
`STORE/stages/<key>.safetensors`. Its key is the blake3 of the canonical JSON of everything the
bits of stages 0..i depend on: this project's own code (its Python and C sources), the inputs, the
dataset manifest root, the layout, the tokenizer, the token sequences, the model config and special
token ids, the stages up to and including i, the determinism settings (not the thread count), the
installed toolchain, the world size and the checkpoint schedule (scheduled checkpoints' digests are in
the transcript).

A recipe that changes only its last stage therefore reuses the earlier stages' entries and gives
the same bits as a full build (tests/cli/test_stage_cache.py). An entry is written atomically and
checked on use (format, key, digest over its contents); one that fails is reported, removed and
rebuilt, never served. `provenance build --no-cache` ignores the cache (and refreshes it);
`rebuild`, `matrix` and `gate` never read it, since an independent rebuild must train.
"""

from __future__ import annotations

from pathlib import Path

import blake3

from .._internal.codedigest import code_digest
from .._internal.hashing import canonical_json

FORMAT = "provenance-stage-cache-v1"
DIRNAME = "stages"


def sequences_digest(seqs: list[list[int]]) -> str:
    h = blake3.blake3()
    for s in seqs:
        h.update(len(s).to_bytes(8, "little"))
        h.update(b"".join(int(t).to_bytes(4, "little") for t in s))
    return h.hexdigest()


def stage_keys(recipe, *, inputs: list[dict], manifest_root: dict, tokenizer_digest: dict, seqs: list[list[int]],
               special_ids: dict, determinism: dict, toolchain: dict, world_size: int,
               checkpoint_every: int | None) -> list[str]:
    """The cache key of each stage's output (stage i's key covers stages 0..i)."""
    from .checkpoint import bit_relevant

    det = bit_relevant(determinism)
    base = {
        "format": FORMAT, "code": code_digest(), "inputs": inputs, "manifest_root": manifest_root,
        "layout": recipe.layout.model_dump(mode="json"), "tokenizer": tokenizer_digest,
        "sequences": sequences_digest(seqs), "model": recipe.model.model_dump(mode="json"),
        "special_ids": special_ids, "determinism": det, "toolchain": toolchain, "world_size": world_size,
        "checkpoint_every_steps": checkpoint_every,
    }
    stages = [s.model_dump(mode="json") for s in recipe.stages]
    return [blake3.blake3(canonical_json({**base, "stages": stages[:i + 1]})).hexdigest()
            for i in range(len(stages))]


class StageCache:
    def __init__(self, store_root: Path, keys: list[str], *, read: bool = True, log=None) -> None:
        self.dir = Path(store_root) / DIRNAME
        self.keys, self.read, self.log = keys, read, log or (lambda msg: None)
        self.hits: list[bool] = [False] * len(keys)

    def path(self, i: int) -> Path:
        return self.dir / f"{self.keys[i]}.safetensors"

    def lookup(self):
        """The entry of the furthest stage present and sound (a checkpoint.Resume), or None."""
        from . import checkpoint as ckpt

        if not self.read:
            return None
        for i in reversed(range(len(self.keys))):
            p = self.path(i)
            if not p.exists():
                continue
            try:
                found = ckpt.read_file(p, self.keys[i])
                if found.state.stage != i + 1 or found.state.step != 0:
                    raise ValueError(f"holds the state after stage {found.state.stage}, step {found.state.step}")
            except (OSError, ValueError) as e:
                self.log(f"stage cache: removing {p.name}: {e}")
                p.unlink(missing_ok=True)
                continue
            self.hits[:i + 1] = [True] * (i + 1)
            return found
        return None

    def store(self, i: int, state, tensors: dict, transcript) -> None:
        """Write stage i's output (called by train() after the stage's last step). Failing to write
        the cache never fails the build."""
        from . import checkpoint as ckpt

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            ckpt.write_file(self.path(i), tensors, state, transcript, ckpt.state_digest(tensors, state), self.keys[i])
        except OSError as e:
            self.log(f"stage cache: could not write {self.path(i)} ({e.strerror}); the build goes on")

    def record(self, names: list[str], enabled: bool) -> dict:
        return {"format": FORMAT, "read": enabled,
                "stages": [{"stage": n, "key": k, "hit": h} for n, k, h in zip(names, self.keys, self.hits)]}
