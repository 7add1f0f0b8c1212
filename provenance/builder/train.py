"""Training: a transformers LlamaForCausalLM, this project's own plain loop, stage by stage.

Samples are fixed windows of each file's token ids (no packing across files; right padding
masked out of the loss); their order comes from a seeded torch.Generator per stage and epoch.
Each optimizer step appends one hash-chained line to the transcript.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import blake3

from .._internal.seeds import derive_seed
from ..recipe import Model, Recipe, Stage
from .tensors import param_digest, saved_state
from .transcript import Transcript

IGNORE = -100
PARAM_DIGEST_EVERY = 50


def _spans(n: int, seq_len: int, stride: int, offset: int = 0) -> list[tuple[int, int]]:
    """(start, end) of each window over a sequence of n tokens.

    Windows start every `stride` tokens from `offset`; with an offset, a short first window covers
    [0, offset). The last full window is aligned to the sequence's end, so no token is left out.
    """
    if n == 0:
        return []
    if n <= seq_len:
        return [(0, n)]
    offset = offset % seq_len
    spans = [(0, offset)] if offset else []
    starts = list(range(offset, n - seq_len + 1, stride))
    if not starts or starts[-1] != n - seq_len:
        starts.append(n - seq_len)
    return spans + [(a, a + seq_len) for a in starts]


def phase_offset(stage: Stage, phase: int) -> int:
    return (phase % stage.phases) * stage.seq_len // stage.phases


def count_windows(seqs: list[list[int]], stage: Stage, phase: int = 0) -> int:
    stride = stage.stride or stage.seq_len
    return sum(len(_spans(len(s), stage.seq_len, stride, phase_offset(stage, phase))) for s in seqs)


def windows(seqs: list[list[int]], seq_len: int, stride: int, pad_id: int, offset: int = 0):
    """Cut each sequence into windows (see _spans). Returns (input_ids, labels) LongTensors of shape
    [windows, seq_len]; right padding is labelled -100 so it never counts in the loss."""
    import torch

    ids, labels = [], []
    for s in seqs:
        for a, b in _spans(len(s), seq_len, stride, offset):
            w = s[a:b]
            pad = seq_len - len(w)
            ids.append(w + [pad_id] * pad)
            labels.append(w + [IGNORE] * pad)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def lr_factor(stage: Stage, step: int, total: int) -> float:
    """Multiplier of stage.lr at 0-based optimizer step `step` of `total`."""
    if step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    if stage.schedule == "constant":
        return 1.0
    span = max(1, total - stage.warmup_steps)
    progress = min(1.0, (step - stage.warmup_steps) / span)
    shape = 1.0 - progress if stage.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return stage.min_lr_ratio + (1.0 - stage.min_lr_ratio) * shape


def build_model(spec: Model, vocab_size: int, special: dict[str, int], seed: int, portable: bool = False,
                parent=None):
    """The recipe's LlamaForCausalLM for the tokenizer's `vocab_size` (padded as the recipe says),
    initialised from the seed: float32, or with `portable` a
    float64 model whose weights are not yet rounded (train() rounds and logs them, builder/portable.py).
    With a fine-tune's verified `parent` (builder/parent.py), its weights replace the initialisation."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.padded_vocab(vocab_size),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps,
        rope_theta=spec.rope_theta,
        hidden_act=spec.hidden_act,
        tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=spec.initializer_range,
        attention_bias=False,
        mlp_bias=False,
        use_cache=True,
        **special,
    )
    from .attention import attention_module

    kernel = attention_module(spec.attn_implementation)
    if kernel is not None:
        kernel.register()
    config._attn_implementation = spec.attn_implementation
    # Seed immediately before construction: LaaM initialised weights before seeding.
    torch.manual_seed(derive_seed(seed, "model-init"))
    if portable:
        from .portable import make_float64

        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # initialised in float64, rounded to float32 by train()
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(before)
        model = model.to(torch.float64)
        make_float64(model)
        return model
    model = LlamaForCausalLM(config).to(torch.float32)
    if parent is not None:
        from .parent import load_weights

        load_weights(model, parent)
    return model


@dataclass
class StageResult:
    name: str
    steps: int
    epochs: int  # epochs begun (the last may be partial)
    samples: int  # windows drawn
    first_loss: float
    final_loss: float
    seconds: float
    tokens: int
    micro_batch_size: int | None = None  # gradient accumulation (None: the whole batch at once)


def stage_steps(stage: Stage, seqs: list[list[int]]) -> int:
    """Optimizer steps of a stage: `steps`, or the batches of `epochs` epochs (phases cycle by epoch)."""
    if stage.steps is not None:
        return stage.steps
    per_phase = [math.ceil(count_windows(seqs, stage, p) / stage.batch_size) for p in range(stage.phases)]
    return sum(per_phase[e % stage.phases] for e in range(stage.epochs))


class StopAt(Exception):
    """Raised by train(stop_after=N) after optimizer step N, holding the live training state."""

    def __init__(self, global_step, model, opt, gen, order):
        super().__init__(f"stopped after optimizer step {global_step}")
        self.global_step, self.model, self.opt, self.gen, self.order = global_step, model, opt, gen, order


@dataclass(frozen=True)
class Dist:
    """This process's place in a distributed build (world_size 1: not distributed)."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None


def shard(idx, dist: Dist):
    """This rank's part of a global batch: every world_size-th sample from position rank.

    The global batch comes from the seeded permutation alone, so it is the same for any world size.
    """
    return idx[dist.rank::dist.world_size]


def causal_lm_loss_sum(logits, labels):
    """Sum of next-token cross-entropies over labelled positions (padding is -100): 0 for none."""
    from .loss import full_loss_sum

    return full_loss_sum(logits, labels)


def micro_loss_sum(net, model, stage: Stage, input_ids, labels):
    """Forward one micro-batch and return its summed loss, the way the stage says (builder/loss.py):
    `cross_entropy = "full"` through the model's logits, `"chunked"` fused with the output layer."""
    import torch

    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=stage.precision == "bf16-autocast"):
        if stage.cross_entropy == "chunked":
            hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
        else:
            logits = net(input_ids=input_ids, use_cache=False).logits
    if stage.cross_entropy == "chunked":
        from .loss import chunked_loss_sum

        return chunked_loss_sum(hidden, model.lm_head.weight, labels, stage.cross_entropy_chunk)
    return causal_lm_loss_sum(logits, labels)


def train(model, recipe: Recipe, seqs: list[list[int]], pad_id: int, transcript: Transcript,
          progress: Callable[[str, int, int, float], None] | None = None, dist: Dist = Dist(),
          checkpointer=None, resume=None, on_stage_end=None, stop_after: int | None = None,
          rounder=None) -> list[StageResult]:
    """Train `model` through the recipe's stages. Under `reduction = "canonical"` every step's gradient
    is the canonical fold of its micro-batches' gradients (canonical_gradient: the same bits at any world
    size). Under "all-reduce", with dist.world_size > 1, the model is wrapped in DistributedDataParallel
    and each rank computes the gradient of its shard of every global batch; the loss is scaled so the
    all-reduced (averaged) gradient is the global per-token mean.

    With a `checkpointer` (builder/checkpoint.py), checkpoints are written on its schedule and, on
    SIGINT or SIGTERM, after the step in progress (then Interrupted is raised). With `resume` (a
    checkpoint.Resume), training continues from it and gives the same bits as an uninterrupted run.
    `on_stage_end(stage_index, state, tensors, transcript)` is called after each stage's last step
    (the stage cache). With `stop_after`, StopAt is raised after that global step (replay).

    A portable recipe (builder/portable.py) trains a float64 model from build_model(portable=True):
    the state is rounded to float32 values after initialisation and after every step by `rounder`
    (a portable.Rounder; one that logs is made when none is given), the log goes into the
    transcript, and the model is float32 when training completes."""
    import signal
    import threading

    import torch

    from .allocator import tune

    tune()  # reuse freed memory instead of fresh pages every step (builder/allocator.py; bits unchanged)
    results = []
    global_step = 0
    device = next(model.parameters()).device
    net = model
    if dist.world_size > 1 and recipe.determinism.reduction == "all-reduce":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    model.train()
    stop: list[int] = []
    handlers = {}
    if checkpointer is not None and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda signum, frame: stop.append(signum))
    if resume is not None:
        saved = {k.removeprefix("model/"): v for k, v in resume.tensors.items() if k.startswith("model/")}
        if set(saved) != set(saved_state(model)):
            raise ValueError(f"checkpoint {resume.path} holds other tensors than this model")
        with torch.no_grad():
            for name, t in saved_state(model).items():
                t.copy_(saved[name])
        transcript.lines, transcript.prev = list(resume.transcript_lines), resume.transcript_prev
        results = [StageResult(**r) for r in resume.state.results]
        global_step = resume.state.global_step
    init_rounding = {}
    if recipe.determinism.portable:
        from .portable import Rounder

        rounder = rounder or Rounder(recipe.determinism.portable_margin)
        if resume is None:
            init_rounding = rounder.round_model(-1, model)
    try:
        results = _stages(model, net, recipe, seqs, pad_id, transcript, progress, dist, checkpointer, resume,
                          results, global_step, device, stop, on_stage_end, stop_after, rounder, init_rounding)
        if rounder is not None:
            rounder.finish()
            model.to(torch.float32)  # exact: every value is a float32 value
        return results
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)


def _stages(model, net, recipe, seqs, pad_id, transcript, progress, dist, checkpointer, resume, results,
            global_step, device, stop, on_stage_end=None, stop_after=None, rounder=None,
            init_rounding=None) -> list[StageResult]:
    import torch

    from . import checkpoint as ckpt

    det = recipe.determinism
    for si, stage in enumerate(recipe.stages):
        if resume is not None and si < resume.state.stage:
            continue
        grids, total, opt, gen = _stage_start(model, stage, si, seqs, pad_id, det.seed)
        order = torch.empty(0, dtype=torch.long)
        cursor, epoch, step, t0 = 0, 0, 0, time.perf_counter()
        first = last = float("nan")
        tokens = samples = 0
        x = y = None
        if resume is not None and si == resume.state.stage and resume.state.step == 0:
            torch.set_rng_state(resume.tensors["rng/torch"])  # at a stage boundary: a fresh optimizer and order
            resume = None
        if resume is not None and si == resume.state.stage:
            order = _restore_stage(resume, model, opt, gen)
            rs = resume.state
            step, epoch, cursor = rs.step, rs.epoch, rs.cursor
            first, last, tokens, samples = rs.first, rs.last, rs.tokens, rs.samples
            t0 -= rs.seconds
            if epoch > 0:
                x, y = grids[(epoch - 1) % stage.phases]
            resume = None
        while step < total:
            if cursor >= order.numel():
                x, y, order = _epoch(grids, epoch, stage.phases, gen)
                cursor, epoch = 0, epoch + 1
            idx = order[cursor:cursor + stage.batch_size]
            cursor += stage.batch_size
            lr = stage.lr * lr_factor(stage, step, total)
            for group in opt.param_groups:
                group["lr"] = lr
            last, gnorm, rounding, n_global = _optimizer_step(model, net, opt, stage, x, y, idx, dist, device,
                                                              rounder, global_step, det.reduction)
            if step == 0:
                first = last
            tokens += n_global
            samples += idx.numel()
            record = _step_record(stage, step, global_step, epoch, idx, last, gnorm, lr, model, total,
                                  rounding if rounder is not None else None, init_rounding)
            step += 1
            global_step += 1
            done = [] if step < total else [StageResult(stage.name, total, epoch, samples, first, last,
                                                        round(time.perf_counter() - t0, 3), tokens,
                                                        stage.micro_batch_size)]
            def boundary_state():
                return _boundary_state(si, done, step, global_step, epoch, cursor, first, last, tokens, samples, t0,
                                       results)

            # The last step's checkpoint (not in the transcript): a build interrupted after training, while
            # it evaluates, audits or signs, resumes after its last step whatever its schedule or cache.
            last_step = (bool(done) and si == len(recipe.stages) - 1 and checkpointer is not None
                         and checkpointer.enabled)
            path = None
            if checkpointer is not None and (checkpointer.scheduled(global_step) or checkpointer.by_clock() or stop
                                             or last_step):
                path = _checkpoint(checkpointer, record, transcript, boundary_state(),
                                   ckpt.state_tensors(model, opt, gen, order), global_step, dist.rank)
            else:
                transcript.append(record)
            if done and on_stage_end is not None:
                on_stage_end(si, boundary_state(), ckpt.boundary_tensors(model), transcript)
            if stop_after is not None and global_step >= stop_after:
                results.extend(done)
                raise StopAt(global_step, model, opt, gen, order)
            if progress is not None:
                progress(stage.name, step, total, last)
            if stop:
                raise _interrupted(stop[0], global_step, path, dist.rank)
        results.extend(done)
    model.eval()
    return results


def _epoch(grids, epoch: int, phases: int, gen):
    """(x, y, order) of a new epoch: one pass over one window grid, in an order drawn from the stage's
    generator; the grids (phases) take turns."""
    import torch

    x, y = grids[epoch % phases]
    return x, y, torch.randperm(x.shape[0], generator=gen)


def _stage_start(model, stage: Stage, si: int, seqs: list[list[int]], pad_id: int, seed: int):
    """A stage's window grids (one per phase), its step count, a fresh AdamW and its data-order generator."""
    import torch

    grids = [windows(seqs, stage.seq_len, stage.stride or stage.seq_len, pad_id, phase_offset(stage, p))
             for p in range(stage.phases)]
    return grids, stage_steps(stage, seqs), adamw(model, stage), \
        torch.Generator().manual_seed(derive_seed(seed, "data-order", si))


def adamw(model, stage: Stage):
    """The stage's optimizer: a fresh single-tensor AdamW (foreach=False) with its settings."""
    import torch

    return torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=stage.betas, eps=stage.eps,
                             weight_decay=stage.weight_decay, foreach=False)


def grad_norm(model, stage: Stage):
    """The gradients' global L2 norm, clipping them first where the stage says `grad_clip`."""
    import torch

    if stage.grad_clip is not None:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip, foreach=False)
    return torch.linalg.vector_norm(
        torch.stack([p.grad.detach().norm() for p in model.parameters() if p.grad is not None]))


def _boundary_state(si: int, done: list, step: int, global_step: int, epoch: int, cursor: int, first, last,
                    tokens: int, samples: int, t0: float, results: list):
    """The checkpoint state after a step (at a stage's end: the next stage's start)."""
    from dataclasses import asdict

    from . import checkpoint as ckpt

    return ckpt.State(si + (1 if done else 0), 0 if done else step, global_step, 0 if done else epoch,
                      0 if done else cursor, first, last, 0 if done else tokens, 0 if done else samples,
                      0.0 if done else round(time.perf_counter() - t0, 3), [asdict(r) for r in results + done])


def _checkpoint(checkpointer, record: dict, transcript: Transcript, state, tensors, global_step: int, rank: int):
    """Append the step's line (naming the checkpoint's digest when the schedule asked for this one) and
    write the checkpoint (on rank 0); its path."""
    from . import checkpoint as ckpt

    digest = ckpt.state_digest(tensors, state)
    if checkpointer.scheduled(global_step):
        record["checkpoint"] = digest
    transcript.append(record)
    return checkpointer.write(tensors, state, transcript, digest) if rank == 0 else None


def _restore_stage(resume, model, opt, gen):
    """A checkpoint's optimizer state, data-order generator and torch RNG, within the stage it was
    written in; returns the epoch's data order."""
    import torch

    t = resume.tensors
    params = list(model.parameters())
    opt_state = {i: {k: t[f"opt/{i}/{k}"] for k in ("step", "exp_avg", "exp_avg_sq") if f"opt/{i}/{k}" in t}
                 for i in range(len(params))}
    sd = opt.state_dict()
    sd["state"] = {i: v for i, v in opt_state.items() if v}
    opt.load_state_dict(sd)
    gen.set_state(t["rng/data"])
    torch.set_rng_state(t["rng/torch"])
    return t["data/order"]


def micro_batch_count(stage: Stage) -> int:
    """Micro-batches in a full global batch of the stage (1 without micro_batch_size)."""
    return -(-stage.batch_size // (stage.micro_batch_size or stage.batch_size))


def micro_batches(idx, stage: Stage) -> list:
    """The global batch `idx` cut into micro-batches of micro_batch_size (the whole batch when unset),
    in order: micro-batch j is the j-th slice, whatever the world size."""
    mb = stage.micro_batch_size or idx.numel()
    return [idx[i:i + mb] for i in range(0, idx.numel(), mb)] or [idx]


def canonical_gradient(model, stage: Stage, x, y, idx, dist: Dist, device):
    """A step's summed gradient and summed loss by the canonical fold (docs/formats.md, "canonical
    reduction"), left in the parameters' .grad; returns the loss sum as a tensor.

    Micro-batch j (micro_batches) is computed on rank j mod world_size, its gradient on its own (zeroed
    before its backward). Round k gathers micro-batches kW..kW+W-1 from every rank with all_gather, and
    every rank folds them into one accumulator left to right: acc = g_0, then acc + g_1, acc + g_2, ...
    over the global index. Each g_j is the same bits on any rank, so the fold is the same on any topology."""
    params = list(model.parameters())
    micro = micro_batches(idx, stage)
    world, rank = dist.world_size, dist.rank
    acc = None
    for k in range(-(-len(micro) // world)):
        j = k * world + rank
        flat = _micro_gradient(model, params, stage, x, y, micro[j], device) if j < len(micro) else None
        for r, g in enumerate(_gather(flat, params, world, device)):
            if k * world + r < len(micro):
                acc = g.clone() if acc is None else acc.add_(g)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = acc[offset:offset + n].view_as(p).clone()
        offset += n
    return acc[offset]


def _micro_gradient(model, params, stage: Stage, x, y, chunk, device):
    """One micro-batch's gradient of its summed loss, flattened, with the loss sum appended."""
    import torch

    for p in params:
        p.grad = None
    part = micro_loss_sum(model, model, stage, x[chunk].to(device), y[chunk].to(device))
    part.backward()
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=device)
             for p in params]
    return torch.cat([*grads, part.detach().reshape(1).to(params[0].dtype)])


def _gather(flat, params, world: int, device) -> list:
    """Every rank's flattened micro-batch gradient of this round, by rank (zeros from a rank with none)."""
    import torch

    if world == 1:
        return [flat]
    import torch.distributed as tdist

    if flat is None:
        flat = torch.zeros(sum(p.numel() for p in params) + 1, dtype=params[0].dtype, device=device)
    from .ranks import collective

    out = [torch.empty_like(flat) for _ in range(world)]
    with collective("gathering the micro-batch gradients"):
        tdist.all_gather(out, flat)
    return out


def _optimizer_step(model, net, opt, stage: Stage, x, y, idx, dist: Dist, device, rounder, global_step: int,
                    reduction: str = "all-reduce"):
    """One optimizer step over the global batch `idx`: (loss, gradient norm, rounding log, tokens)."""

    n_global = int((y[idx][:, 1:] != IGNORE).sum())
    if reduction == "canonical":
        import torch

        loss_sum = canonical_gradient(model, stage, x, y, idx, dist, device)
        inv = torch.tensor(1.0 / max(1, n_global), dtype=loss_sum.dtype)  # the normalisation, after the fold
        for p in model.parameters():
            p.grad.mul_(inv)
        return _update(model, opt, stage, rounder, global_step, float(loss_sum) / max(1, n_global)) + (n_global,)
    local = shard(idx, dist)
    scale = dist.world_size / max(1, n_global)
    # Gradient accumulation: this rank's samples in micro-batches, always in the same order,
    # each micro-batch's per-token-sum loss scaled by the global token count, so the
    # accumulated gradient is the global per-token mean (summed in a fixed order).
    chunks = micro_batches(local, stage)
    loss_sum = None
    for ci, chunk in enumerate(chunks):
        sync = dist.world_size == 1 or ci == len(chunks) - 1
        with contextlib.nullcontext() if sync else net.no_sync():
            part = micro_loss_sum(net, model, stage, x[chunk].to(device), y[chunk].to(device))
            (part * scale).backward()
        loss_sum = part.detach() if loss_sum is None else loss_sum + part.detach()
    total_loss = loss_sum.detach()
    if dist.world_size > 1:
        import torch.distributed as tdist

        from .ranks import collective

        with collective("summing the loss"):
            tdist.all_reduce(total_loss)
    return _update(model, opt, stage, rounder, global_step, float(total_loss) / max(1, n_global)) + (n_global,)


def _update(model, opt, stage: Stage, rounder, global_step: int, last: float):
    """Clip, step the optimizer on the gradients in .grad, clear them: (loss, gradient norm, rounding log)."""
    gnorm = grad_norm(model, stage)
    rounding = {}
    if rounder is not None:  # portable mode: AdamW in IEEE operations, float32 state, boundary log
        rounding = rounder.adamw_step(global_step, model, opt)
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    if rounder is not None:
        last, e = rounder.round_scalar(global_step, "loss", last)
        if e:
            rounding["loss"] = e
        gnorm, e = rounder.round_scalar(global_step, "grad_norm", float(gnorm))
        if e:
            rounding["grad_norm"] = e
    return last, gnorm, rounding


def _step_record(stage: Stage, step: int, global_step: int, epoch: int, idx, last, gnorm, lr, model, total: int,
                 rounding: dict | None, init_rounding: dict) -> dict:
    """The step's transcript line (docs/formats.md); `rounding` is None outside portable mode."""
    record = {
        "stage": stage.name, "step": step, "global_step": global_step, "epoch": epoch,
        "samples": blake3.blake3(idx.numpy().astype("<i8").tobytes()).hexdigest(),
        "loss": float(last).hex(), "grad_norm": float(gnorm).hex(), "lr": float(lr).hex(),
    }
    if rounding is not None and (rounding or (init_rounding and global_step == 0)):
        record["rounding"] = {**({"init": init_rounding} if init_rounding and global_step == 0 else {}),
                              **({"step": rounding} if rounding else {})}
    if (step + 1) % PARAM_DIGEST_EVERY == 0 or step + 1 == total:
        record["params"] = param_digest(model)
    return record


def _interrupted(signum: int, global_step: int, path, rank: int = 0):
    from ..errors import Interrupted

    name, code = ("SIGINT", 130) if signum == 2 else ("SIGTERM", 143)
    if rank != 0:  # rank 0 writes the checkpoint and says how to resume
        return Interrupted(f"rank {rank}: interrupted ({name}) after optimizer step {global_step}", code)
    return Interrupted(f"interrupted ({name}) after optimizer step {global_step}; checkpoint {path}; run the same "
                       "`provenance build` command again to resume (same --out)", code)
