"""Our attention implementations by the recipe's name for them (`model.attn_implementation`)."""

from __future__ import annotations


def attention_module(name: str):
    """The module of an attention implementation of ours ("small-head", "tiled"), or None for PyTorch's."""
    if name == "small-head":
        from . import small_head_attention

        return small_head_attention
    if name == "tiled":
        from . import tiled_attention

        return tiled_attention
    return None
