"""The chunked, fused output layer and loss (builder/loss.py): the same loss and gradients as the full
logits path up to float rounding, exact padding handling, and bits that do not depend on the
thread count or run."""

from __future__ import annotations

import hashlib

import pytest
import torch

from provenance.builder.loss import IGNORE, chunked_loss_sum, full_loss_sum


def _case(seed=0, b=3, t=40, d=16, v=97):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 30:] = IGNORE  # right padding
    labels[2, :] = IGNORE  # a window with nothing to learn
    return hidden, weight, labels


def _grads(fn, chunk=None):
    h, w, y = _case()
    loss = fn(h, w, y) if chunk is None else fn(h, w, y, chunk)
    (loss * 0.5).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [64, 70, 1024])
def test_chunked_equals_full_up_to_rounding(chunk):
    full = _grads(lambda h, w, y: full_loss_sum(h @ w.t(), y))
    fused = _grads(chunked_loss_sum, chunk)
    for a, b in zip(full, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert fused[1][2].abs().sum() == 0 and fused[1][0, 29:].abs().sum() == 0  # no gradient through padding


def test_all_padding_gives_zero_loss_and_gradient():
    h, w, y = _case()
    y[:] = IGNORE
    loss = chunked_loss_sum(h, w, y, 64)
    loss.backward()
    assert float(loss.detach()) == 0.0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


def test_chunked_bits_do_not_depend_on_threads():
    before = torch.get_num_threads()
    digests = []
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            loss, gh, gw = _grads(chunked_loss_sum, 64)
            digests.append(hashlib.sha256(loss.numpy().tobytes() + gh.numpy().tobytes() + gw.numpy().tobytes())
                           .hexdigest())
    finally:
        torch.set_num_threads(before)
    assert len(set(digests)) == 1
