"""The tokenizer: a byte-level BPE trained on the laid-out dataset texts with `tokenizers`.

Training is deterministic for a given text sequence; the tokenizer.json digest is recorded.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import ByteLevelBPETokenizer, Tokenizer

from ..recipe import Model
from ..recipe import Tokenizer as TokenizerSpec


def train_tokenizer(texts: list[str], spec: TokenizerSpec) -> Tokenizer:
    bpe = ByteLevelBPETokenizer(add_prefix_space=spec.add_prefix_space, lowercase=spec.lowercase,
                                trim_offsets=spec.trim_offsets)
    bpe.train_from_iterator(texts, vocab_size=spec.vocab_size, min_frequency=spec.min_frequency,
                            special_tokens=list(spec.special_tokens), show_progress=False)
    # Round-trip through JSON so the object used for encoding is exactly what is saved.
    return Tokenizer.from_str(bpe._tokenizer.to_str())


def tokenizer_json(tok: Tokenizer) -> bytes:
    return (tok.to_str(pretty=True) + "\n").encode()


def special_ids(tok: Tokenizer, model: Model) -> dict[str, int]:
    ids = {}
    for field in ("bos_token", "eos_token", "pad_token"):
        ids[field.replace("_token", "_token_id")] = tok.token_to_id(getattr(model, field))
    return ids


def encode_all(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    # encode_batch is parallel in Rust but its output does not depend on thread count.
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def save_hf_files(tok: Tokenizer, model: Model, max_len: int, out: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for transformers."""
    import json

    from .._internal.atomic import atomic_write_bytes

    atomic_write_bytes(out / "tokenizer.json", tokenizer_json(tok))
    specials = {"bos_token": model.bos_token, "eos_token": model.eos_token, "pad_token": model.pad_token}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    atomic_write_bytes(out / "tokenizer_config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    atomic_write_bytes(out / "special_tokens_map.json", (json.dumps(specials, indent=2, sort_keys=True) +
                                                         "\n").encode())
