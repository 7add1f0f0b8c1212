"""The fingerprint a build signs: a compact summary of its weights and their behaviour.

Per tensor: shape, dtype, norm, sum and seeded ±1 projections; functionally: the loss and argmax
predictions on fixed eval windows and greedy continuations of fixed prompts. repro/ judges another
build against it (docs/reproducibility.md says what it can and cannot establish).
"""

from __future__ import annotations

import math
from pathlib import Path

import blake3
import numpy as np

from .._internal.hashing import canonical_json, tensor_digest
from .._internal.safetensors import read_tensors

FINGERPRINT_FORMAT = "provenance-fingerprint-v1"


def _signs(seed: int, name: str, k: int, n: int) -> np.ndarray:
    """k x n matrix of ±1 from blake3's extendable output: portable across numpy and torch versions."""
    raw = blake3.blake3(f"provenance-fingerprint:{seed}:{name}".encode()).digest(length=(k * n + 7) // 8)
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[: k * n].reshape(k, n)
    return bits.astype(np.float64) * 2.0 - 1.0


def _fsum(v: np.ndarray) -> float:
    """The correctly rounded sum (math.fsum): independent of summation order, BLAS and CPU."""
    return math.fsum(v.tolist())


def tensor_fingerprint(tensors: dict[str, np.ndarray], *, projections: int, seed: int) -> dict:
    """Per tensor: shape, numpy dtype name, L2 norm, sum and `projections` ±1 projections.

    Every number is exactly specified (docs/formats.md): values widened to float64, products and
    squares rounded to float64, sums correctly rounded, so any implementation gets the same bits."""
    out = {}
    for name in sorted(tensors):
        t = tensors[name]
        x = t.astype(np.float64).ravel()
        signs = _signs(seed, name, projections, x.size)
        out[name] = {
            "shape": list(t.shape), "dtype": str(t.dtype), "norm": math.sqrt(_fsum(x * x)), "sum": _fsum(x),
            "projections": [_fsum(signs[i] * x) for i in range(projections)],
        }
    return out


def load_model(mdir: Path):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.use_deterministic_algorithms(True)
    model = AutoModelForCausalLM.from_pretrained(str(mdir), dtype=torch.float32)
    model.eval()
    return model


def functional(model, eval_ids: list[list[int]], prompts: list[list[int]], continuation: int, pad_id: int) -> dict:
    """Eval loss and per-position argmax on the eval windows; greedy continuations of the prompts."""
    import torch

    x = torch.tensor(eval_ids, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=x, labels=x)
        argmax = out.logits[:, :-1].argmax(-1).tolist()
        p = torch.tensor(prompts, dtype=torch.long)
        gen = model.generate(input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=continuation,
                             min_new_tokens=continuation, do_sample=False, pad_token_id=pad_id)
    cont = gen[:, p.shape[1]:].tolist()
    return {"eval_loss": float(out.loss), "argmax": argmax, "continuations": cont,
            "continuations_digest": blake3.blake3(canonical_json(cont)).hexdigest()}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    total = same = 0
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            total += 1
            same += x == y
    return same / total if total else 1.0


def make_fingerprint(model, mdir: Path, seqs: list[list[int]], spec, pad_id: int) -> dict:
    """The signed fingerprint of a finished build (spec: the recipe's [reproducibility] section)."""
    import random

    span = spec.eval_tokens
    cands = [(i, a) for i, s in enumerate(seqs) for a in range(0, max(0, len(s) - span) + 1, max(1, span // 2))
             if len(s) >= span]
    picks = sorted(random.Random(spec.seed).sample(cands, min(spec.eval_windows, len(cands))))
    eval_ids = [seqs[i][a:a + span] for i, a in picks]
    prompts = [w[: spec.prompt_tokens] for w in eval_ids[: spec.prompts]]
    fn = functional(model, eval_ids, prompts, spec.continuation_tokens, pad_id)
    tensors = read_tensors(mdir / "model.safetensors")
    return {
        "format": FINGERPRINT_FORMAT,
        "seed": spec.seed,
        "projections": spec.projections,
        "tensors": tensor_fingerprint(tensors, projections=spec.projections, seed=spec.seed),
        "tensor_digest": tensor_digest(mdir / "model.safetensors"),
        "eval": {"ids": eval_ids, "loss": fn["eval_loss"], "argmax": fn["argmax"], "prompts": prompts,
                 "continuation_tokens": spec.continuation_tokens, "continuations": fn["continuations"],
                 "continuations_digest": fn["continuations_digest"], "pad_token_id": pad_id},
        "tolerances": spec.tolerances(),
    }
