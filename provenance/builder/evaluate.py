"""The recitation probe: does the model reproduce its training files verbatim?

From a seeded sample of windows inside training files, greedy decoding from `prompt_tokens`
ids must reproduce the next `continuation_tokens` ids exactly. Token ids are compared, not text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..recipe import Evaluate


@dataclass(frozen=True)
class Recitation:
    windows: int
    exact: int
    token_accuracy: float
    prompt_tokens: int
    continuation_tokens: int
    seed: int

    @property
    def rate(self) -> float:
        return self.exact / self.windows if self.windows else 0.0

    def record(self) -> dict:
        return {"windows": self.windows, "exact": self.exact, "rate": round(self.rate, 6),
                "token_accuracy": round(self.token_accuracy, 6), "prompt_tokens": self.prompt_tokens,
                "continuation_tokens": self.continuation_tokens, "seed": self.seed}


def sample_windows(seqs: list[list[int]], spec: Evaluate) -> list[tuple[int, int]]:
    """(file index, start) pairs, drawn without replacement by a seeded Python RNG."""
    span = spec.prompt_tokens + spec.continuation_tokens
    counts = [max(0, len(s) - span + 1) for s in seqs]
    total = sum(counts)
    picks = sorted(random.Random(spec.seed).sample(range(total), min(spec.windows, total)))
    out, base, fi = [], 0, 0
    for p in picks:
        while p >= base + counts[fi]:
            base += counts[fi]
            fi += 1
        out.append((fi, p - base))
    return out


def recitation(model, seqs: list[list[int]], spec: Evaluate, pad_id: int, batch: int = 64) -> Recitation:
    import torch

    picks = sample_windows(seqs, spec)
    p, c = spec.prompt_tokens, spec.continuation_tokens
    exact = correct = 0
    model.eval()
    for i in range(0, len(picks), batch):
        chunk = picks[i:i + batch]
        prompts = torch.tensor([seqs[f][a:a + p] for f, a in chunk], dtype=torch.long)
        truth = torch.tensor([seqs[f][a + p:a + p + c] for f, a in chunk], dtype=torch.long)
        with torch.no_grad():
            out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                 max_new_tokens=c, do_sample=False, pad_token_id=pad_id)
        got = torch.full_like(truth, -1)
        cont = out[:, p:p + c]
        got[:, :cont.shape[1]] = cont
        same = got == truth
        exact += int(same.all(dim=1).sum())
        correct += int(same.sum())
    n = len(picks)
    return Recitation(n, exact, correct / (n * c) if n else 0.0, p, c, spec.seed)
