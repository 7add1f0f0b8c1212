"""Training helpers: windows cover every token, phases shift the grid, the lr schedule is exact."""

from __future__ import annotations

import pytest

from provenance.builder.train import IGNORE, _spans, lr_factor, stage_steps, windows
from provenance.recipe import Stage


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


def test_vocabulary_padding_rounds_the_model_rows_up_and_only_up():
    """pad_vocab_to_multiple_of gives the embedding and output layer the tokenizer's size rounded up;
    the default, 1, leaves it as it is; out-of-range values are refused."""
    from pydantic import ValidationError

    from provenance.builder.train import build_model
    from provenance.recipe.model import Model

    base = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2, "max_position_embeddings": 16, "bos_token": "a", "eos_token": "b",
            "pad_token": "c"}
    assert Model(**base).padded_vocab(1573) == 1573
    padded = Model(**base, pad_vocab_to_multiple_of=64)
    assert [padded.padded_vocab(v) for v in (1573, 1600, 1601, 257)] == [1600, 1600, 1664, 320]
    model = build_model(padded, 300, {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}, seed=1)
    assert model.get_input_embeddings().weight.shape[0] == model.lm_head.weight.shape[0] == 320
    for bad in (0, 4097):
        with pytest.raises(ValidationError, match="pad_vocab_to_multiple_of"):
            Model(**base, pad_vocab_to_multiple_of=bad)
