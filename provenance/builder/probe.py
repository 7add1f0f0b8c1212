"""A short timed probe for `check-recipe --plan`: each stage's training step, measured the way the build
runs it, on random token ids, in a child process so that its peak memory is its own (the costliest
stage's micro-batches run first, so the peak is that stage's).

What the build does before its first step is done here too and timed apart as one-time costs: the
determinism settings (fixed-order GEMM included), the allocator and NaN-fill settings, compiling our
attention kernel, and the first micro-step and optimizer step (first calls, the optimizer's state,
the allocator's first growth). Then micro-steps (forward and backward of one micro-batch) and
optimizer steps (gradient norm, AdamW, zeroing) are timed separately: a step of a stage costs
`micro-batches per step x micro-step + optimizer step`. Each stage's micro-batch shape is timed itself
(after one untimed micro-step of that shape): at small batches the per-call costs, not the tokens,
set a micro-step's time, so scaling one stage's time by tokens misjudged the others.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from statistics import median

MICRO_STEPS = 3  # timed micro-steps after the warm-up
OPTIMIZER_STEPS = 2  # timed optimizer steps after the warm-up


def _child(recipe_path: str, stage_name: str, store_root: str | None) -> dict:
    """`stage_name` (the costliest) first, then every other stage's micro-batch shape."""
    import torch

    from ..recipe import load_recipe
    from . import allocator, attention, clib, determinism
    from .train import adamw, build_model

    t0 = time.perf_counter()
    r = load_recipe(recipe_path).recipe
    stage = next(s for s in r.stages if s.name == stage_name)
    determinism.apply(r.determinism)
    allocator.tune()
    kernel = attention.attention_module(r.model.attn_implementation)
    if kernel is not None:
        clib.configure(store_root)
        kernel.load()
    v = r.tokenizer.vocab_size
    n_special = len(r.tokenizer.special_tokens)
    ids = {"bos_token_id": 0, "eos_token_id": min(1, n_special - 1), "pad_token_id": n_special - 1}
    with determinism.sdpa_context(r.determinism):
        model = build_model(r.model, v, ids, r.determinism.seed, portable=r.determinism.portable)
        model.train()
        opt = adamw(model, stage)
        setup = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(0)
        warm = _micro_step(model, stage, gen, v) + _optimizer_step(model, opt, stage)
        micro = {stage.name: [_micro_step(model, stage, gen, v) for _ in range(MICRO_STEPS)]}
        optim = [_optimizer_step(model, opt, stage) for _ in range(OPTIMIZER_STEPS)]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        for other in (s for s in r.stages if s.name != stage.name):
            _micro_step(model, other, gen, v)  # this shape's first call
            micro[other.name] = [_micro_step(model, other, gen, v) for _ in range(MICRO_STEPS)]
            model.zero_grad(set_to_none=True)
    return {"setup_seconds": setup, "warmup_seconds": warm, "micro_step_seconds": micro,
            "optimizer_step_seconds": optim, "peak_rss": peak}


def _micro_step(model, stage, gen, vocab: int) -> float:
    """Forward and backward of one micro-batch of random ids, as the build's step runs each one."""
    import torch

    from .train import IGNORE, micro_loss_sum

    mb = min(stage.micro_batch_size or stage.batch_size, stage.batch_size)
    t0 = time.perf_counter()
    x = torch.randint(0, vocab, (mb, stage.seq_len), generator=gen)
    loss = micro_loss_sum(model, model, stage, x, x) / max(1, int((x[:, 1:] != IGNORE).sum()))
    loss.backward()
    return time.perf_counter() - t0


def _optimizer_step(model, opt, stage) -> float:
    """The end of the build's step: the gradient norm (clipped if the stage says so), AdamW, zeroing."""
    from .train import grad_norm

    t0 = time.perf_counter()
    grad_norm(model, stage)
    opt.step()
    opt.zero_grad(set_to_none=True)  # as the build does: the next backward allocates them anew
    return time.perf_counter() - t0


def run_probe(recipe_path: str, stage_name: str, store_root: str | None = None, timeout: float = 900) -> dict:
    """Run the probe in a child process. Returns each stage's median micro-step, the median optimizer
    step, the one-time costs apart, and the child's peak RSS during the costliest stage's steps.
    Raises RuntimeError with the child's last lines if it fails."""
    code = ("import json, sys; from provenance.builder.probe import _child; "
            f"print(json.dumps(_child({recipe_path!r}, {stage_name!r}, {store_root!r})))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-3:])
        raise RuntimeError(f"the timed probe failed (exit {p.returncode}): {tail}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["seconds_per_micro_step"] = {name: median(times) for name, times in res["micro_step_seconds"].items()}
    res["seconds_per_optimizer_step"] = median(res["optimizer_step_seconds"])
    return res


def step_seconds(probe: dict, stage_name: str, micro_batches: int) -> float:
    """The probe's estimate of one step of a stage."""
    return micro_batches * probe["seconds_per_micro_step"][stage_name] + probe["seconds_per_optimizer_step"]
