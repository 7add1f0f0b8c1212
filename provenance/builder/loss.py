"""The training loss: next-token cross-entropy summed over labelled positions.

Two implementations a recipe chooses between (`[[stages]] cross_entropy`); they give different bits:

- `full`: the model's logits for every position, then `cross_entropy` on them (what HF's
  `Trainer` does). For a 32,768-token vocabulary and a micro-batch of 8 × 512 tokens the logits
  alone are 512 MiB in float32, and their gradient as much again.
- `chunked`: the output layer and the loss fused, over chunks of positions in a fixed order, in
  float32 whatever the autocast setting. The gradient with respect to the hidden states and the
  output weight is computed in the forward pass, chunk by chunk, so no more than one chunk's
  logits ever exist (in the manner of fused linear cross-entropy kernels). Deterministic: fixed
  chunk order, plain matrix products, no atomics.
"""

from __future__ import annotations

IGNORE = -100


def _at_least_float32(t):
    """float32 for half-precision and float32 tensors; float64 (portable mode) stays float64."""
    import torch

    return t if t.dtype == torch.float64 else t.float()


def full_loss_sum(logits, labels):
    """Sum of next-token cross-entropies over labelled positions (padding is -100): 0 for none.

    The labels are shifted, not the logits (as transformers' own loss does): position t is scored
    against label t+1 and the last position against nothing. Slicing `logits[:, :-1]` instead would
    copy the whole logits tensor to flatten it and, in backward, zero-fill a full-size gradient and
    copy into it (about 5 % of a default-recipe step, docs/benchmarks.md). Every row's loss and
    gradient is the same either way; only the order of the float32 sum of the row losses differs."""
    import torch

    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return torch.nn.functional.cross_entropy(_at_least_float32(logits.reshape(-1, logits.shape[-1])),
                                             shifted.reshape(-1), ignore_index=IGNORE, reduction="sum")


def _linear_ce():
    import torch

    class LinearCrossEntropySum(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, labels, chunk: int):
            with torch.autocast(hidden.device.type, enabled=False):
                h = _at_least_float32(hidden)
                w = _at_least_float32(weight)
                grad_h = torch.empty_like(h)
                grad_w = torch.zeros_like(w)
                loss = torch.zeros((), dtype=h.dtype, device=h.device)
                for a in range(0, h.shape[0], chunk):
                    hc, yc = h[a:a + chunk], labels[a:a + chunk]
                    logits = hc @ w.t()
                    valid = yc != IGNORE
                    yi = torch.where(valid, yc, 0)
                    logits.sub_(logits.amax(dim=1, keepdim=True))
                    picked = logits.gather(1, yi[:, None]).squeeze(1)
                    logits.exp_()
                    total = logits.sum(dim=1)
                    loss += torch.where(valid, total.log() - picked, 0.0).sum()
                    logits.div_(total[:, None])  # softmax
                    rows = torch.arange(logits.shape[0], device=h.device)
                    logits[rows, yi] -= 1.0  # softmax - one-hot: d(loss)/d(logits)
                    logits.mul_(valid[:, None])
                    torch.mm(logits, w, out=grad_h[a:a + chunk])
                    grad_w.addmm_(logits.t(), hc)
            ctx.save_for_backward(grad_h, grad_w)
            ctx.dtypes = (hidden.dtype, weight.dtype)
            return loss

        @staticmethod
        def backward(ctx, g):
            grad_h, grad_w = ctx.saved_tensors
            return (grad_h * g).to(ctx.dtypes[0]), (grad_w * g).to(ctx.dtypes[1]), None, None

    return LinearCrossEntropySum


_FN = None


def chunked_loss_sum(hidden, weight, labels, chunk: int):
    """Sum of next-token cross-entropies of `hidden @ weight.T`, fused and chunked (see above).

    hidden: [batch, seq, d] final hidden states; labels: [batch, seq] with -100 for padding."""
    global _FN
    if _FN is None:
        _FN = _linear_ce()
    d = hidden.shape[-1]
    return _FN.apply(hidden[:, :-1].reshape(-1, d), weight, labels[:, 1:].reshape(-1), chunk)
