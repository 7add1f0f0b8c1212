"""Portable mode (`[determinism] portable = true`): training state whose bits do not depend on the
CPU's instruction set, after Srivastava, Arora and Boneh (2024), "Optimistic verifiable training by
controlling hardware nondeterminism".

Float32 results differ between kernel levels (AVX-512, AVX2, scalar) because each level sums in
another order and fuses other multiply-adds; training amplifies the difference. In portable mode:

1. The model is built and trained in float64 (`build_model(..., portable=True)`): initialisation,
   forward, loss, backward and AdamW. The float32 upcasts `transformers` hard-codes (RMSNorm,
   rotary embedding) are replaced by float64 versions; attention is SDPA's math kernel; the loss
   stays in float64 (builder/loss.py keeps float64 as it is).
2. After initialisation and after every optimizer step the training state (weights, both AdamW
   moments) and the recorded loss and gradient norm are rounded to float32 (round to nearest,
   ties to even) and kept as float64 values that float32 represents exactly. The weights a build
   writes are those float32 values.
3. Each gradient tensor is rounded to its block grid, multiples of q = 2^(E-23) with
   2^E <= max|g| < 2^(E+1) (quantize_grad): two levels' float64 gradients differ by about 2^-45
   of the tensor's largest element, which for a small element can exceed its own float32 ulp,
   but is far below q. The optimizer step is AdamW's formula (torch's, decoupled weight decay)
   in single IEEE operations only (no lerp, addcmul or addcdiv, whose kernels may fuse a
   multiply-add on one level and not on another): from the grid gradient and the rounded state,
   the moments, the update and the new weights are the same bits on every level.
4. What float64 noise can still decide is logged: a gradient element within `portable_margin`
   grid steps of a midpoint, a gradient maximum within 2^-30 of a power of two (E), an initial
   weight, the loss or the gradient norm within the margin (float32 ulps) of a rounding boundary;
   each in that step's transcript line, under `rounding`, so the log is hash-chained and signed
   with the transcript. A build given the log (`provenance build --rounding-log TRANSCRIPT`;
   `rebuild` and `replay` do it from the signed transcript) rounds those values the way the log
   says, and writes exactly the log's entries. Any other value was at least the margin away from
   a boundary in the logged build, so a build whose float64 result is within the margin of it
   rounds it the same way.

What breaks the argument, and is checked: a logged value that is not one of the two float32
neighbours of the rebuild's own result (the log does not fit this build: exit 1), and a log entry
never consumed (the log belongs to another build). What is not checked, and is measured instead
(docs/reproducibility.md): that two kernel levels stay within the margin of each other.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckFailed, InputError

# ---- float64 versions of what transformers computes in float32 ---------------------------------------

def _rms_norm_64(self, hidden_states):
    import torch

    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary_64(self, x, position_ids):
    import torch

    with torch.no_grad():
        freqs = position_ids[..., None].to(torch.float64) * self.inv_freq.to(device=x.device, dtype=torch.float64)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def make_float64(model) -> None:
    """Replace the float32 computations inside a float64 Llama with float64 ones (in place)."""
    import torch

    patched = set()
    for m in model.modules():
        kind = type(m).__name__
        if kind == "LlamaRMSNorm":
            m.forward = types.MethodType(_rms_norm_64, m)
            patched.add(kind)
        elif kind == "LlamaRotaryEmbedding":
            if getattr(m, "rope_type", "default") != "default":
                raise InputError(f"portable mode supports the default rotary embedding, not {m.rope_type!r}")
            dim = m.inv_freq.numel() * 2
            base = float(m.config.rope_parameters["rope_theta"])
            inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
            m.inv_freq = inv
            m.original_inv_freq = inv.clone()
            m.forward = types.MethodType(_rotary_64, m)
            patched.add(kind)
    if patched != {"LlamaRMSNorm", "LlamaRotaryEmbedding"}:
        raise RuntimeError(f"portable mode: expected RMSNorm and rotary modules in the model, found {sorted(patched)}")


# ---- rounding with a boundary log --------------------------------------------------------------------

def _round(x64, margin: float):
    """(float32 rounding of x64, flat indices of values within `margin` ulps of a rounding boundary)."""
    import torch

    r32 = x64.to(torch.float32)
    r = r32.to(torch.float64)
    up = x64 > r
    toward = torch.where(up, torch.full_like(r32, float("inf")), torch.full_like(r32, float("-inf")))
    ulp = (torch.nextafter(r32, toward).to(torch.float64) - r).abs()  # spacing on x's side of r
    dist = (x64 - r).abs()  # exact: x and r are within half an ulp of each other
    near = (ulp * 0.5 - dist) < margin * ulp  # also true for exact ties (dist == ulp/2)
    near &= (x64 != r) & torch.isfinite(x64)
    return r32, near.view(-1).nonzero().view(-1)


def _neighbours_ok(x64, r32, idx, forced):
    """Whether each forced float32 value is r32 or r32's neighbour towards x64 (the two candidates)."""
    import torch

    flat_x, flat_r = x64.reshape(-1)[idx], r32.reshape(-1)[idx]
    toward = torch.where(flat_x > flat_r.to(torch.float64), torch.full_like(flat_r, float("inf")),
                         torch.full_like(flat_r, float("-inf")))
    other = torch.nextafter(flat_r, toward)
    return (forced == flat_r) | (forced == other)


def _outside(idx, wide):
    """Position in `idx` of the first index not among `wide` (this build's own near values), or None."""
    import torch

    inside = torch.isin(idx, wide)
    return None if bool(inside.all()) else int((~inside).nonzero()[0])


def _round_grid(y, margin: float):
    """(round(y) to integers, half to even; flat indices of y within `margin` of a half-integer)."""
    import torch

    n = torch.round(y)
    near = ((y - torch.floor(y) - 0.5).abs() < margin) & torch.isfinite(y)
    return n, near.view(-1).nonzero().view(-1)


def _grid_scale(amax: float) -> tuple[int, bool]:
    """(E with 2^E <= amax < 2^(E+1), whether amax lies within 2^-30 of a power of two)."""
    import math

    m, e = math.frexp(amax)  # amax = m * 2^e, 0.5 <= m < 1
    return e - 1, (m - 0.5) < 0.5 * 2.0 ** -30 or (1.0 - m) < 2.0 ** -30


@dataclass
class RoundingLog:
    """Entries read from a transcript: (global step or -1 for the initial weights, tensor) -> [(index, bits)]."""

    source: Path
    digest: str = ""  # blake3 of the transcript it was read from
    entries: dict[tuple[int, str], list[tuple[int, int]]] = field(default_factory=dict)
    used: set[tuple[int, str]] = field(default_factory=set)

    def unused(self) -> list[tuple[int, str]]:
        return sorted(set(self.entries) - self.used)


def parse_entries(where: str, obj) -> dict[str, list[tuple[int, int]]]:
    """A transcript line's `rounding` object: {tensor: [[flat index, float32 bits as 8 hex digits], ...]}."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: `rounding` must be an object of tensor -> [[index, bits], ...]")
    out = {}
    for name, items in obj.items():
        if not isinstance(items, list) or not items:
            raise InputError(f"{where}: rounding[{name!r}] must be a non-empty list of [index, bits]")
        pairs = []
        for it in items:
            if (not isinstance(it, list) or len(it) != 2 or not isinstance(it[0], int) or isinstance(it[0], bool)
                    or it[0] < 0 or not isinstance(it[1], str) or len(it[1]) != 8):
                raise InputError(f"{where}: rounding[{name!r}]: expected [index >= 0, 8 hex digits], got {it!r}")
            try:
                bits = int(it[1], 16)
            except ValueError:
                raise InputError(f"{where}: rounding[{name!r}]: {it[1]!r} is not 8 hex digits") from None
            pairs.append((it[0], bits))
        out[name] = pairs
    return out


def read_log(path: Path, data: bytes | None = None) -> RoundingLog:
    """The rounding log of a portable build's transcript.jsonl (`data`, or the file's bytes; hash
    chain checked). Raises InputError."""
    import blake3

    from .transcript import read

    if data is None:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise InputError(f"--rounding-log {path}: cannot read it: {e.strerror}") from None
    log = RoundingLog(Path(path), blake3.blake3(data).hexdigest())
    for i, rec in enumerate(read(path, data), 1):
        if "rounding" not in rec:
            continue
        step = rec.get("global_step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise InputError(f"{path}:{i}: a line with `rounding` needs an integer global_step")
        for key, entries in rec["rounding"].items():
            phase = {"init": -1, "step": step}.get(key)
            if phase is None:
                raise InputError(f"{path}:{i}: rounding keys are 'init' and 'step', got {key!r}")
            for name, pairs in parse_entries(f"{path}:{i}: rounding.{key}", entries).items():
                log.entries[(phase, name)] = pairs
    return log


class Rounder:
    """Rounds the training state after each step, logging (or, given a log, following) the values
    near a rounding boundary. `counts` totals what was logged and what was forced."""

    def __init__(self, margin: float, log: RoundingLog | None = None) -> None:
        self.margin, self.log = margin, log
        self.logged = 0
        self.forced = 0

    def _given(self, phase: int, name: str, numel: int):
        """The log's entries for this tensor and step, as (index tensor, [bits]), marked used; None
        when there are none. Raises CheckFailed for an index outside the tensor."""
        import torch

        entries = self.log.entries.get((phase, name)) if self.log is not None else None
        if entries is None:
            return None
        self.log.used.add((phase, name))
        idx = torch.tensor([i for i, _ in entries], dtype=torch.long)
        if int(idx.max()) >= numel:
            raise CheckFailed(f"{self.log.source}: the rounding log does not fit this build: {name} has "
                              f"{numel} values, the log names index {int(idx.max())} ({_where(phase)})")
        return idx, [b for _, b in entries]

    def round_(self, phase: int, name: str, t, fixed=None) -> list[list]:
        """Round tensor `t` (float64, in place) to float32 values; return its log entries. `fixed`:
        a boolean mask of values computed the same on every level (never logged), or True for all."""
        import torch

        if fixed is True:
            with torch.no_grad():
                t.copy_(t.detach().to(torch.float32).to(torch.float64))
            return []
        r32, near = _round(t.detach(), self.margin)
        if fixed is not None:
            near = near[~fixed.reshape(-1)[near]]
        given = self._given(phase, name, r32.numel())
        if given is not None:
            idx, bits = given
            forced = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
            # A log decides only values this build also finds near a boundary (twice the margin: the
            # leader's value and this one differ by far less than the margin, never by a whole band).
            j = _outside(idx, _round(t.detach(), 2 * self.margin)[1])
            if j is not None:
                raise CheckFailed(
                    f"{self.log.source}: the rounding log does not fit this build: {name}[{int(idx[j])}] "
                    f"({_where(phase)}) is logged, but this build computed "
                    f"{float(t.detach().reshape(-1)[idx[j]])!r}, farther than twice the margin "
                    f"({self.margin:g} ulp) from a rounding boundary: a log may only decide values near one")
            ok = _neighbours_ok(t.detach(), r32, idx, forced)
            if not bool(ok.all()):
                j = int((~ok).nonzero()[0])
                raise CheckFailed(
                    f"{self.log.source}: the rounding log does not fit this build: {name}[{int(idx[j])}] "
                    f"({_where(phase)}) is logged as {float(forced[j])!r}, but this build computed "
                    f"{float(t.detach().reshape(-1)[idx[j]])!r}, whose float32 neighbours it is not")
            self.forced += int((r32.view(-1)[idx] != forced).sum())
            r32.view(-1)[idx] = forced
            chosen = idx
        elif self.log is not None:  # following a log: its entries, and no others, are this build's
            chosen = near[:0]
        else:
            chosen = near
        with torch.no_grad():
            t.copy_(r32.to(torch.float64))
        self.logged += chosen.numel()
        return _entries(chosen, r32.view(-1)[chosen])

    def round_scalar(self, phase: int, name: str, value: float) -> tuple[float, list[list]]:
        import torch

        t = torch.tensor([value], dtype=torch.float64)
        entries = self.round_(phase, name, t)
        return float(t[0]), entries

    def round_model(self, phase: int, model) -> dict[str, list[list]]:
        """Round every parameter (the initial weights); entries by tensor name."""
        out = {}
        for name, p in _named(model):
            e = self.round_(phase, name, p.data)
            if e:
                out[name] = e
        return out

    def quantize_grad(self, phase: int, name: str, g) -> tuple[object, dict[str, list[list]]]:
        """The gradient on its tensor's block grid: multiples of q = 2^(E-23), 2^E <= max|g| < 2^(E+1),
        so every element keeps the resolution a float32 has at the tensor's largest element, and
        float64 noise far below q decides nothing. Values within `margin` grid steps of a midpoint,
        and a maximum within 2^-30 of a power of two (E itself), are logged or followed."""
        import torch

        out = {}
        amax = float(g.abs().max()) if g.numel() else 0.0
        if amax == 0.0 or not torch.isfinite(torch.tensor(amax)):
            return g, out
        exp, edge = _grid_scale(amax)
        key = f"grad-scale/{name}"
        given = self.log.entries.get((phase, key)) if self.log is not None else None
        if given is not None:
            self.log.used.add((phase, key))
            logged = _bits_to_float(given[0][1])
            chosen, _ = _grid_scale(logged) if logged > 0 else (None, None)
            if len(given) != 1 or chosen is None or abs(chosen - exp) > 1:
                raise CheckFailed(f"{self.log.source}: the rounding log does not fit this build: {key} "
                                  f"({_where(phase)}) is logged as {logged!r}; this build's maximum is {amax!r}")
            exp = chosen
            out[key] = [[0, _float_to_bits(2.0 ** exp)]]
            self.logged += 1
        elif edge and self.log is None:
            out[key] = [[0, _float_to_bits(2.0 ** exp)]]
            self.logged += 1
        q = 2.0 ** (exp - 23)
        y = g / q  # exact: a power of two
        n, near = _round_grid(y, self.margin)
        gname = f"grad/{name}"
        given = self._given(phase, gname, n.numel())
        if given is not None:
            idx, bits = given
            forced = torch.tensor([_bits_to_float(b) for b in bits], dtype=torch.float64) / q
            yy = y.reshape(-1)[idx]
            j = _outside(idx, _round_grid(y, 2 * self.margin)[1])
            if j is not None:
                raise CheckFailed(
                    f"{self.log.source}: the rounding log does not fit this build: {gname}[{int(idx[j])}] "
                    f"({_where(phase)}) is logged, but this build computed {float(yy[j] * q)!r}, farther than "
                    f"twice the margin ({self.margin:g} grid steps) from a midpoint: a log may only decide values "
                    "near one")
            ok = (forced == torch.floor(yy)) | (forced == torch.ceil(yy))
            if not bool(ok.all()):
                j = int((~ok).nonzero()[0])
                raise CheckFailed(
                    f"{self.log.source}: the rounding log does not fit this build: {gname}[{int(idx[j])}] "
                    f"({_where(phase)}) is logged as {float(forced[j] * q)!r}, but this build computed "
                    f"{float(yy[j] * q)!r}, and the grid step there is {q!r}")
            self.forced += int((n.reshape(-1)[idx] != forced).sum())
            n.reshape(-1)[idx] = forced
            chosen = idx
        elif self.log is not None:  # following a log: its entries, and no others, are this build's
            chosen = near[:0]
        else:
            chosen = near
        gq = n * q
        if chosen.numel():
            out[gname] = _entries(chosen, gq.reshape(-1)[chosen].to(torch.float32))
            self.logged += chosen.numel()
        return gq, out

    def adamw_step(self, phase: int, model, opt) -> dict[str, list[list]]:
        """One AdamW step (torch.optim.AdamW's formula and state layout, decoupled weight decay) in
        single IEEE operations on the block-grid gradient (quantize_grad): moments, update and
        weights are then the same bits on every level. Entries by tensor name."""
        import math

        import torch

        out = {}
        with torch.no_grad():
            for group in opt.param_groups:
                lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
                if group.get("amsgrad") or group.get("maximize"):
                    raise InputError("portable mode implements plain AdamW (no amsgrad, no maximize)")
                members = {id(p) for p in group["params"]}
                for name, p in _named(model):
                    if id(p) not in members or p.grad is None:
                        continue
                    g, entries = self.quantize_grad(phase, name, p.grad)
                    out.update(entries)
                    st = opt.state[p]
                    if not st:
                        st["step"] = torch.tensor(0.0, dtype=torch.float32)
                        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["step"] += 1
                    step = float(st["step"])
                    st["exp_avg"].copy_(torch.add(torch.mul(st["exp_avg"], b1), torch.mul(g, 1.0 - b1)))
                    st["exp_avg_sq"].copy_(torch.add(torch.mul(st["exp_avg_sq"], b2),
                                                     torch.mul(torch.mul(g, g), 1.0 - b2)))
                    self.round_(phase, f"exp_avg/{name}", st["exp_avg"], fixed=True)
                    self.round_(phase, f"exp_avg_sq/{name}", st["exp_avg_sq"], fixed=True)
                    if wd != 0:
                        p.mul_(1.0 - lr * wd)
                    step_size = lr / (1.0 - b1 ** step)
                    inv_bc2_sqrt = 1.0 / math.sqrt(1.0 - b2 ** step)
                    denom = torch.add(torch.mul(torch.sqrt(st["exp_avg_sq"]), inv_bc2_sqrt), eps)
                    p.sub_(torch.mul(torch.div(st["exp_avg"], denom), step_size))
                    self.round_(phase, name, p.data, fixed=True)  # from rounded state: the same everywhere
        return out

    def finish(self) -> None:
        """Every entry of a given log must have been used; raises CheckFailed otherwise."""
        if self.log is not None and self.log.unused():
            phase, name = self.log.unused()[0]
            raise CheckFailed(f"{self.log.source}: the rounding log does not fit this build: "
                              f"{len(self.log.unused())} entr(ies) were never reached, the first {name} "
                              f"({_where(phase)})")


def _entries(indices, values32) -> list[list]:
    """Log entries [[flat index, float32 bits as 8 hex digits], ...] of float32 `values32` at `indices`."""
    import torch

    bits = values32.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return [[int(i), f"{int(b):08x}"] for i, b in zip(indices.tolist(), bits.tolist())]


def _bits_to_float(bits: int) -> float:
    import struct

    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _float_to_bits(x: float) -> str:
    import struct

    return f"{struct.unpack('<I', struct.pack('<f', x))[0]:08x}"


def _named(model):
    """(name, parameter) once per parameter (tied weights under their first name)."""
    seen = set()
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield name, p


def _where(phase: int) -> str:
    return "initial weights" if phase < 0 else f"after global step {phase}"
