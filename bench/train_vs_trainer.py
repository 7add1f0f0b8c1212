"""Benchmark: this project's training loop vs Hugging Face `Trainer` (LaaM's engine), and
deterministic vs PyTorch-default settings, on the same model, data and number of steps.

Each measurement runs in its own process (alternating order, several repeats); only the
training steps are timed. Prints medians and ratios against the named baselines (ours / trainer
also as the median of each repeat's adjacent pair):

    ours / trainer           goal <= 0.9
    deterministic / default  goal <= 1.03

and, for honesty, ours / trainer-tuned: Trainer after the same memory settings our loop makes (the
C allocator's thresholds, PyTorch's NaN fill of new tensors off: provenance/builder/allocator.py),
which a Trainer user could make too.

Usage: python bench/train_vs_trainer.py [--recipe R] [--steps N] [--repeats K] [--modes ours,plain]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu  # bench/machine.py: this script's folder is on sys.path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _prepare(recipe_path: str):
    from provenance.builder.pipeline import fetch_all, prepare_data
    from provenance.inputs.store import Store
    from provenance.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    from provenance._internal.progress import Reporter

    stored = fetch_all(recipe, Store(), offline=False, handed={}, reporter=Reporter(enabled=False))
    with tempfile.TemporaryDirectory() as work:
        data = prepare_data(recipe, stored, Path(work))
    return recipe, data


def run_one(mode: str, recipe_path: str, steps: int) -> dict:
    import torch

    from provenance.builder import determinism
    from provenance.builder.train import Transcript, build_model, train, windows

    recipe, data = _prepare(recipe_path)
    r = recipe.recipe
    stage = r.stages[0].model_copy(update={"steps": steps, "epochs": None, "warmup_steps": min(10, steps)})
    det = r.determinism
    if mode == "default":
        # PyTorch's defaults: no deterministic algorithms, any SDPA backend, foreach optimizers.
        det = det.model_copy(update={"deterministic_algorithms": False})
    if mode != "plain":  # the plain loop gets none of the recipe's determinism: PyTorch's and MKL's defaults
        determinism.apply(det)
    else:
        torch.manual_seed(det.seed)
    r = r.model_copy(update={"stages": [stage], "determinism": det})
    if mode.startswith(("trainer", "plain")) and r.model.attn_implementation in ("small-head", "tiled"):
        # Trainer gets what a transformers user has: SDPA, with the recipe's backend.
        r = r.model_copy(update={"model": r.model.model_copy(update={"attn_implementation": "sdpa"})})
    model = build_model(r.model, data.tokenizer.get_vocab_size(), data.special_ids, det.seed)
    pad = data.special_ids["pad_token_id"]
    from provenance.builder.attention import attention_module

    kernel = attention_module(r.model.attn_implementation)
    if kernel is not None:
        kernel.load()  # compiled (first run) and loaded before the clock starts, as a build does before it fetches

    if mode in ("ours", "default"):
        with determinism.sdpa_context(det) if mode == "ours" else contextlib.nullcontext():
            t0 = time.perf_counter()
            res = train(model, r, data.seqs, pad, Transcript())
            seconds = time.perf_counter() - t0
        return {"mode": mode, "seconds": seconds, "final_loss": res[-1].final_loss, "steps": steps,
                "tokens": steps * stage.batch_size * stage.seq_len}

    if mode == "plain":
        return plain_loop(model, stage, data.seqs, pad, steps)

    from transformers import Trainer, TrainingArguments

    if mode == "trainer-tuned":
        from provenance.builder.allocator import tune

        tune()

    x, y = windows(data.seqs, stage.seq_len, stage.stride or stage.seq_len, pad)

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return x.shape[0]

        def __getitem__(self, i):
            return {"input_ids": x[i], "labels": y[i]}

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=stage.micro_batch_size or stage.batch_size,
            gradient_accumulation_steps=stage.batch_size // (stage.micro_batch_size or stage.batch_size),
            bf16=stage.precision == "bf16-autocast", learning_rate=stage.lr,
            max_steps=steps, warmup_steps=stage.warmup_steps, lr_scheduler_type=stage.schedule,
            weight_decay=stage.weight_decay, adam_beta1=stage.betas[0], adam_beta2=stage.betas[1],
            adam_epsilon=stage.eps, max_grad_norm=stage.grad_clip or 0.0, logging_steps=10**9,
            save_strategy="no", report_to=[], dataloader_num_workers=0, use_cpu=True, seed=det.seed % (1 << 31),
            disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=Windows())
        with determinism.sdpa_context(det):
            t0 = time.perf_counter()
            out = trainer.train()
            seconds = time.perf_counter() - t0
    return {"mode": mode, "seconds": seconds, "final_loss": out.training_loss, "steps": steps}


def plain_loop(model, stage, seqs, pad: int, steps: int, batch: int = 8) -> dict:
    """What a transformers user writes: LlamaForCausalLM with SDPA (PyTorch's default backends, default
    algorithms, MKL's own branch), float32, torch.optim.AdamW, `model(input_ids, labels=...).loss`, in
    batches of `batch` windows. The stand-in for LaaM's own loop (issue 34: it ran at LaaM's 1,025
    tokens/s on the machine where both were measured)."""
    import torch

    from provenance.builder.train import windows

    x, y = windows(seqs, stage.seq_len, stage.stride or stage.seq_len, pad)
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=tuple(stage.betas), eps=stage.eps,
                            weight_decay=stage.weight_decay)
    model.train()
    tokens = 0
    t0 = time.perf_counter()
    for step in range(steps * (stage.batch_size // batch or 1)):
        rows = torch.arange(step * batch, (step + 1) * batch) % x.shape[0]
        loss = model(input_ids=x[rows], labels=y[rows]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(x[rows].numel())
    seconds = time.perf_counter() - t0
    return {"mode": "plain", "seconds": seconds, "final_loss": float(loss), "steps": steps, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "ptrace-0.9.9-debugger.toml"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="ours,trainer,default,trainer-tuned",
                    help="comma-separated, of ours, trainer, default, trainer-tuned, plain")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.recipe, a.steps)))
        return
    modes = a.modes.split(",")
    tokens: dict[str, float] = {}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(a.repeats):
        for m in (modes if rep % 2 == 0 else modes[::-1]):
            p = subprocess.run([sys.executable, __file__, "--one", m, "--recipe", a.recipe, "--steps", str(a.steps)],
                               capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if p.returncode != 0:
                sys.exit(f"{m} failed:\n{p.stderr[-3000:]}")
            res = json.loads(p.stdout.strip().splitlines()[-1])
            times[m].append(res["seconds"])
            if "tokens" in res:
                tokens[m] = res["tokens"]
            print(f"  {m:8s} run {rep + 1}: {res['seconds']:.2f} s, final loss {res['final_loss']:.4f}", flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"\nCPU: {cpu()}; recipe {Path(a.recipe).name}, {a.steps} steps, {a.repeats} runs each, median seconds:")
    for m in modes:
        rate = f", {tokens[m] / med[m]:,.0f} tokens/s" if m in tokens else ""
        print(f"  {m:8s} {med[m]:.2f}  (min {min(times[m]):.2f}, max {max(times[m]):.2f}){rate}")
    if "ours" in modes and "trainer" in modes:
        print(f"ours / trainer          = {med['ours'] / med['trainer']:.3f}  (goal <= 0.9)")
        # ours and trainer run next to each other in every repeat: the median of those pairs' ratios
        # is less moved by a machine that drifts over minutes than the ratio of the medians.
        pairs = [o / t for o, t in zip(times["ours"], times["trainer"])]
        print(f"  paired, median of {len(pairs)} = {statistics.median(pairs):.3f}  "
              f"({', '.join(f'{x:.3f}' for x in pairs)})")
    if "ours" in modes and "trainer-tuned" in modes:
        print(f"ours / trainer-tuned    = {med['ours'] / med['trainer-tuned']:.3f}  (Trainer with our memory settings)")
    if "ours" in modes and "default" in modes:
        print(f"deterministic / default = {med['ours'] / med['default']:.3f}  (goal <= 1.03)")
    if "ours" in modes and "plain" in modes:
        speed = (tokens["ours"] / med["ours"]) / (tokens["plain"] / med["plain"])
        print(f"ours / plain loop, tokens/s = {speed:.2f}x  (goal >= 3 at LaaM's shape)")


if __name__ == "__main__":
    main()
