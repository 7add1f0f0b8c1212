"""The plan: what a recipe will cost before anything runs. Memory of the first step, from the model
config, the batch and the sequence length; steps per stage where the data is known.

The estimate is arithmetic on the recipe alone (the vocabulary is taken at the recipe's
`tokenizer.vocab_size`, an upper bound), so `provenance build` can refuse a recipe that would not
fit before it fetches anything. docs/recipe.md compares it with measured peaks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .model import Recipe, Stage

GiB = 1 << 30
# The process before training: Python, torch, transformers, tokenizers, the data (measured: the
# default recipe's build holds about 0.9 GiB before its first step).
RUNTIME_BYTES = int(0.9 * GiB)
HEADROOM = 0.9  # refuse above this fraction of the memory available


def parameter_count(r: Recipe, vocab: int | None = None) -> int:
    m = r.model
    v = m.padded_vocab(vocab or r.tokenizer.vocab_size)
    head_dim = m.hidden_size // m.num_attention_heads
    kv = m.num_key_value_heads * head_dim
    per_layer = (2 * m.hidden_size * m.hidden_size + 2 * m.hidden_size * kv  # q, o; k, v
                 + 3 * m.hidden_size * m.intermediate_size + 2 * m.hidden_size)  # gate, up, down; two norms
    return v * m.hidden_size * (1 if m.tie_word_embeddings else 2) + m.num_hidden_layers * per_layer + m.hidden_size


@dataclass(frozen=True)
class MemoryEstimate:
    stage: str
    micro_batch: int
    parts: dict[str, int]  # bytes by component

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.parts.items())
        return f"stage {self.stage!r} (micro-batch {self.micro_batch}): {self.total / GiB:.2f} GiB ({parts} GiB)"


def stage_memory(r: Recipe, stage: Stage, vocab: int | None = None, world_size: int = 1) -> MemoryEstimate:
    """Peak memory of one training step of `stage` in one process, float32 throughout (an upper
    bound for bf16 autocast), float64 in portable mode. Attention: eager attention and SDPA's math
    backend both materialize the scores, batch × heads × seq × seq, kept per layer for backward; SDPA's flash backend,
    `small-head` and `tiled` do not (`tiled` holds two seq × seq matrices per thread while it runs).
    The loss: `cross_entropy = "full"` holds the logits three times over, `"chunked"` one chunk's."""
    m = r.model
    v = m.padded_vocab(vocab or r.tokenizer.vocab_size)
    b = stage.micro_batch_size or (stage.batch_size if r.determinism.reduction == "canonical"
                                   else -(-stage.batch_size // world_size))
    t, f = stage.seq_len, 8 if r.determinism.portable else 4
    p = parameter_count(r, v)
    hidden = b * t * (10 * m.hidden_size + 4 * m.intermediate_size) * f
    if m.attn_implementation == "small-head":
        # Saves the output and two floats per query; keys and values are copied transposed.
        d = m.hidden_size // m.num_attention_heads
        scores = b * (m.num_attention_heads * (d + 2) + 4 * m.num_key_value_heads * d) * t * f
        attention = scores * m.num_hidden_layers
    elif m.attn_implementation == "tiled":
        # Saves its inputs' output and two floats per query (the inputs are saved by the projections);
        # per thread, while it runs, keys and values transposed and two seq × seq matrices.
        d = m.hidden_size // m.num_attention_heads
        scores = b * m.num_attention_heads * (d + 2) * t * f
        sp = -(-t // 8) * 8
        attention = scores * m.num_hidden_layers + r.determinism.threads * 4 * (2 * d * sp + 2 * t * sp)
    elif m.attn_implementation == "sdpa" and r.determinism.sdpa_backend == "flash":
        # The flash kernel keeps only the output and the row log-sum-exp; per thread it holds one
        # block of scores (at most 512 × 512), a few MiB.
        scores = b * m.num_attention_heads * t * f
        attention = scores * m.num_hidden_layers + 2 * r.determinism.threads * 512 * 512 * f
    else:
        scores = b * m.num_attention_heads * t * t * f
        attention = scores * (m.num_hidden_layers + 3)  # one saved per layer, three transient
    if stage.cross_entropy == "chunked":
        rows = min(stage.cross_entropy_chunk, b * t)
        loss = rows * v * f + b * t * m.hidden_size * f  # one chunk's logits; the hidden states' gradient
    else:
        loss = 3 * b * t * v * f  # logits, log-softmax, its gradient
    parts = {
        "weights+grads+AdamW": 4 * f * p,
        # the canonical reduction's accumulator, this micro-batch's flattened gradient and one gathered per rank
        **({"canonical fold": (world_size + 2) * f * p} if r.determinism.reduction == "canonical" else {}),
        "attention scores": attention,
        "other activations": hidden * m.num_hidden_layers,
        "logits and loss": loss,
        "runtime": RUNTIME_BYTES,
    }
    return MemoryEstimate(stage.name, b, parts)


def peak_memory(r: Recipe, vocab: int | None = None, world_size: int = 1) -> MemoryEstimate:
    return max((stage_memory(r, s, vocab, world_size) for s in r.stages), key=lambda e: e.total)


def available_memory() -> int | None:
    """Bytes this process may still use: MemAvailable, capped by a cgroup v2 limit if one is set."""
    avail = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        return None
    for path in ("/sys/fs/cgroup/memory.max",):
        try:
            raw = open(path).read().strip()
            used = int(open("/sys/fs/cgroup/memory.current").read().strip())
        except (OSError, ValueError):
            continue
        if raw.isdigit():
            avail = min(avail or 1 << 62, int(raw) - used)
    return avail


def memory_problem(r: Recipe, world_size: int = 1, available: int | None = None) -> str | None:
    """A one-paragraph refusal if the recipe's first steps would not fit, else None."""
    est = peak_memory(r, world_size=world_size)
    avail = available if available is not None else available_memory()
    if avail is None:
        return None
    need = est.total * world_size
    if need <= HEADROOM * avail:
        return None
    stage = next(s for s in r.stages if s.name == est.stage)
    fit = max(1, int(est.micro_batch * (HEADROOM * avail / world_size - est.parts["weights+grads+AdamW"]
                                         - est.parts["runtime"])
                     / max(1, need / world_size - est.parts["weights+grads+AdamW"] - est.parts["runtime"])))
    fit = max(d for d in range(1, stage.batch_size + 1) if stage.batch_size % d == 0 and d <= fit)
    return (f"not enough memory: the first step needs about {need / GiB:.1f} GiB "
            f"({est.describe()}{f', × {world_size} ranks' if world_size > 1 else ''}), and "
            f"{avail / GiB:.1f} GiB is available (limit {HEADROOM:.0%} of it). Set micro_batch_size = {fit} "
            f"or less in stage {stage.name!r} (gradient accumulation keeps batch_size {stage.batch_size}), "
            "or lower seq_len (see `provenance check-recipe --plan`)")


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
