"""The tensors a model directory holds and their digest (blake3-tensors-v1, docs/formats.md): what the
training loop, checkpoints, the pipeline and replay all mean by "the weights"."""

from __future__ import annotations

SAFETENSORS_DTYPES = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                      "int32": "I32", "uint8": "U8", "bool": "BOOL"}


def saved_state(model) -> dict:
    """The tensors a model dir holds: the state dict with tied weights once (the first name wins,
    `model.embed_tokens.weight` before `lm_head.weight`, as transformers saves them)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach()
    return out


def param_digest(model) -> str:
    """blake3-tensors-v1 of the tensors the model dir will hold: the same digest `build.json` gives
    the saved weights, so a transcript's last `params` equals the weights digest (docs/formats.md).
    A portable build's float64 training copy holds float32 values: its digest is theirs."""
    import torch

    from .._internal.hashing import tensors_digest

    return tensors_digest(digest_item(name, p.to(torch.float32) if p.dtype == torch.float64 else p)
                          for name, p in saved_state(model).items())


def digest_item(name: str, t) -> tuple[str, str, list[int], bytes]:
    """(name, safetensors dtype, shape, raw little-endian bytes) of a torch tensor, for tensors_digest."""
    import torch

    t = t.detach().cpu().contiguous()
    raw = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return name, SAFETENSORS_DTYPES[str(t.dtype).removeprefix("torch.")], list(t.shape), raw
