"""The audit's header probe decodes headers of equal length together: the same results as one at a time."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from provenance.audit.memorization import Text, _greedy, _header_probes


def test_batched_header_probes_equal_one_at_a_time():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=48)
    model = LlamaForCausalLM(cfg).eval()
    rng = random.Random(0)
    # Header lengths 0 (no header), 3, 4, 47 (room for one token) and 48 (none left in the
    # 48-position context); one body repeats what the model emits from its header.
    texts = [Text(f"f{i}", [rng.randrange(64) for _ in range(60)], h) for i, h in enumerate([3, 4, 3, 0, 4, 3, 47, 48])]
    emitted = _greedy(model, torch.tensor([texts[1].ids[:4]]), 12, 0)[0].tolist()
    texts[1] = Text("f1", texts[1].ids[:4] + emitted + texts[1].ids[4:], 4)
    spec = SimpleNamespace(header_tokens=12)
    one = _header_probes(model, texts, spec, 0, 48, batch=1)
    assert _header_probes(model, texts, spec, 0, 48, batch=2) == one
    assert [p["header_tokens_emitted"] for p in one] == [12, 12, 12, 0, 12, 12, 1, 0]
    assert one[1]["longest_verbatim_tokens"] == 12 and one[3]["longest_verbatim_tokens"] == 0
