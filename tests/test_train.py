"""Training helpers: windows cover every token, phases shift the grid, the lr schedule is exact."""

from __future__ import annotations

import pytest

from provenance.recipe import Stage
from provenance.build.train import IGNORE, _spans, lr_factor, stage_steps, windows


@pytest.mark.parametrize("n,seq_len,stride,offset", [(100, 32, 32, 0), (100, 32, 16, 0), (100, 32, 32, 8),
                                                     (20, 32, 32, 0), (64, 32, 32, 16), (33, 32, 32, 31)])
def test_spans_cover_every_token_within_bounds(n, seq_len, stride, offset):
    spans = _spans(n, seq_len, stride, offset)
    covered = set()
    for a, b in spans:
        assert 0 <= a < b <= n and b - a <= seq_len
        covered.update(range(a, b))
    assert covered == set(range(n))


def test_phase_offset_shifts_the_grid():
    assert _spans(100, 32, 32, 0) == [(0, 32), (32, 64), (64, 96), (68, 100)]
    assert _spans(100, 32, 32, 16) == [(0, 16), (16, 48), (48, 80), (68, 100)]


def test_windows_pad_right_and_mask_padding():
    x, y = windows([[5, 6, 7], [8] * 5], seq_len=4, stride=4, pad_id=0)
    assert x.tolist() == [[5, 6, 7, 0], [8, 8, 8, 8], [8, 8, 8, 8]]
    assert y.tolist() == [[5, 6, 7, IGNORE], [8, 8, 8, 8], [8, 8, 8, 8]]


def stage(**kw):
    base = dict(name="s", lr=1.0, batch_size=2, steps=10, seq_len=8)
    return Stage(**{**base, **kw})


def test_lr_schedule():
    s = stage(warmup_steps=2, schedule="linear")
    assert [round(lr_factor(s, i, 10), 4) for i in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375,
                                                                   0.25, 0.125]
    c = stage(schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(c, 0, 10) == pytest.approx(1.0) and lr_factor(c, 10, 10) == pytest.approx(0.1)
    assert lr_factor(stage(schedule="constant", warmup_steps=4), 7, 10) == 1.0


def test_epoch_steps_follow_the_phase_grids():
    seqs = [list(range(120))]
    s = Stage(name="s", lr=1.0, batch_size=2, epochs=3, seq_len=32, phases=2)
    # phase 0: 4 windows -> 2 batches; phase 1: 5 windows -> 3 batches; epochs cycle 0,1,0
    assert stage_steps(s, seqs) == 2 + 3 + 2
