"""A short timed probe for `check-recipe --plan`: a few optimizer steps of the costliest stage at its
micro-batch shape, on random token ids, in a child process so that its peak memory is its own."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

PROBE_STEPS = 3


def _child(recipe_path: str, stage_name: str, steps: int) -> dict:
    import torch

    from ..recipe import load_recipe
    from . import determinism
    from .train import IGNORE, build_model, micro_loss_sum

    r = load_recipe(recipe_path).recipe
    stage = next(s for s in r.stages if s.name == stage_name)
    determinism.apply(r.determinism)
    v = r.tokenizer.vocab_size
    n_special = len(r.tokenizer.special_tokens)
    ids = {"bos_token_id": 0, "eos_token_id": min(1, n_special - 1), "pad_token_id": n_special - 1}
    with determinism.sdpa_context(r.determinism):
        model = build_model(r.model, v, ids, r.determinism.seed, portable=r.determinism.portable)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, foreach=False)
        mb = stage.micro_batch_size or stage.batch_size
        gen = torch.Generator().manual_seed(0)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            x = torch.randint(0, v, (mb, stage.seq_len), generator=gen)
            loss = micro_loss_sum(model, model, stage, x, x) / max(1, int((x[:, 1:] != IGNORE).sum()))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    return {"micro_step_seconds": times, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_probe(recipe_path: str, stage_name: str, steps: int = PROBE_STEPS, timeout: float = 900) -> dict:
    """Run the probe in a child process. Returns seconds per micro-step (median after the first) and
    the child's peak RSS. Raises RuntimeError with the child's last lines if it fails."""
    code = ("import json, sys; from provenance.builder.probe import _child; "
            f"print(json.dumps(_child({recipe_path!r}, {stage_name!r}, {steps})))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-3:])
        raise RuntimeError(f"the timed probe failed (exit {p.returncode}): {tail}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    t = sorted(res["micro_step_seconds"][1:] or res["micro_step_seconds"])
    res["seconds_per_micro_step"] = t[len(t) // 2]
    return res
