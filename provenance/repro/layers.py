"""`diverge --layers`: name the first module and operation whose output differs between two stacks.

The transcripts say at which step two builds part (repro/diverge.py). This re-runs the build on
this machine under each build's stack (its ATen CPU level, with the MKL and oneDNN pins that go
with it), each in a process of its own, up to and through that step. During the step every
operator that ATen runs is recorded (a TorchDispatchMode): its name, the module it ran in (for
the forward pass, from module hooks) or the autograd node (for the backward pass), the shape,
dtype and blake3 of its output. The first operator whose output bytes differ is the answer; a
second pass saves that one output under both stacks and measures the difference.

Both processes start from the recipe, so their states at the divergent step are equal only if
every earlier step was bitwise equal; whether the parameters were equal when the step began is
reported too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import InputError


def _record(build_dir: Path) -> dict:
    """build.json as strict JSON whose top level and sections are objects. Raises InputError."""
    from .._internal import jsonstrict

    try:
        record = jsonstrict.loads((build_dir / "build.json").read_bytes())
    except (OSError, ValueError) as e:
        raise InputError(f"{build_dir}: no readable build.json ({e}); --layers compares two build dirs") from None
    bad = [k for k in ("determinism", "distributed", "recipe") if not isinstance(record, dict)
           or not isinstance(record.get(k, {}), dict)]
    if not isinstance(record, dict) or bad:
        raise InputError(f"{build_dir}/build.json: not a build record of this tool ("
                         + (f"{', '.join(bad)} must be objects" if isinstance(record, dict) else "not a JSON object")
                         + "); --layers compares two build dirs")
    return record


def _stack(build_dir: Path) -> dict:
    record = _record(build_dir)
    det = record.get("determinism", {})
    level = str(det.get("cpu_capability_requested") or det.get("cpu_capability") or "native").lower()
    return {"cpu_capability": level, "world_size": record.get("distributed", {}).get("world_size", 1),
            "recipe_blake3": record.get("recipe", {}).get("blake3")}


def _embedded_recipe(build_dir: Path, dest: Path) -> Path:
    """The recipe a build embedded in its attestation, checked against build.json's digest."""
    import base64

    import blake3

    try:
        env = json.loads((build_dir / "attestation.intoto.jsonl").read_text().splitlines()[0])
        st = json.loads(base64.b64decode(env["payload"]))
        rec = st["predicate"]["buildDefinition"]["externalParameters"]["recipe"]
        text = rec["content"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise InputError(f"{build_dir}: no attestation with an embedded recipe ({e})") from None
    want = _record(build_dir)["recipe"].get("blake3")
    if blake3.blake3(text.encode()).hexdigest() != want:
        raise InputError(f"{build_dir}: the embedded recipe is not the one build.json records")
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "recipe.toml"
    path.write_text(text)
    return path


def layers(build_a: Path, build_b: Path, *, store: str | None, offline: bool, log=print) -> dict:
    """The first differing operation of the first divergent step of two builds of one recipe."""
    from .diverge import diverge

    a, b = _stack(build_a), _stack(build_b)
    if a["recipe_blake3"] != b["recipe_blake3"]:
        raise InputError("--layers compares two builds of the same recipe; these recipes differ")
    if a["world_size"] != 1 or b["world_size"] != 1:
        raise InputError("--layers re-runs single-process builds only (world size 1)")
    d = diverge(build_a / "transcript.jsonl", build_b / "transcript.jsonl")
    if d["identical"]:
        return {"identical": True, "steps_compared": d["steps_compared"]}
    step = int(d["step"])
    with tempfile.TemporaryDirectory(prefix="provenance-layers-") as tmp:
        recipe = _embedded_recipe(build_a, Path(tmp) / "recipe")
        runs = {}
        start = Path(tmp) / "a" / "params.safetensors"
        for label, stack in (("a", a), ("b", b)):
            log(f"re-running step {step} under {label}: cpu={stack['cpu_capability']} ...")
            runs[label] = _child(recipe, stack["cpu_capability"], step, Path(tmp) / label, store, offline, None,
                                 start if label == "b" else None)
        ops_a, ops_b = runs["a"]["ops"], runs["b"]["ops"]
        first = next((i for i, (x, y) in enumerate(zip(ops_a, ops_b)) if x != y), None)
        if first is None and len(ops_a) != len(ops_b):
            first = min(len(ops_a), len(ops_b))
        res = {"identical": False, "step": step, "field": d["field"], "stack_a": a["cpu_capability"],
               "stack_b": b["cpu_capability"], "ops_recorded": [len(ops_a), len(ops_b)],
               # Each process trained up to the step under its own stack; b then ran the step from a's
               # parameters, so the step's operations are compared from the same weights.
               "params_equal_before_step": runs["a"]["params"] == runs["b"]["own_params"]}
        if first is None:
            res["first"] = None
            return res
        op_a = ops_a[first] if first < len(ops_a) else None
        op_b = ops_b[first] if first < len(ops_b) else None
        res["first"] = {"index": first, "a": _describe(op_a), "b": _describe(op_b)}
        if op_a and op_b and op_a[:4] == op_b[:4]:
            log(f"measuring operation {first} ({op_a[1]} in {op_a[0]}) under both stacks ...")
            import numpy as np

            got = {}
            for label, stack in (("a", a), ("b", b)):
                out = Path(tmp) / f"{label}-full"
                _child(recipe, stack["cpu_capability"], step, out, store, offline, first,
                       start if label == "b" else None)
                got[label] = np.load(out / "tensor.npy")
            diff = np.abs(got["a"] - got["b"])
            scale = float(np.max(np.abs(got["a"]))) or 1.0
            res["first"].update({"max_abs_diff": float(diff.max()), "relative": float(diff.max()) / scale,
                                 "elements_differing": int((diff > 0).sum()), "elements": int(diff.size)})
        return res


def _describe(op) -> dict | None:
    if op is None:
        return None
    where, name, shape, dtype, _digest = op
    return {"module": where, "op": name, "shape": shape, "dtype": dtype}


def _child(recipe: Path, level: str, step: int, out: Path, store: str | None, offline: bool, full: int | None,
           start: Path | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "provenance.repro.layers", str(recipe), level, str(step), str(out),
           "" if full is None else str(full), store or "", "1" if offline else "0", str(start or "")]
    p = subprocess.run(cmd, capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                  if k != "ATEN_CPU_CAPABILITY"})
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        raise InputError(f"re-running step {step} under cpu={level} failed: {tail}")
    return json.loads((out / "ops.json").read_text())


def _recorder_class(records: list, module_stack: list[str], full: int | None, out: Path):
    """A dispatch mode that records every operator's output (where, op, shape, dtype, blake3), and saves
    the `full`-th one whole to out/tensor.npy."""
    import blake3
    import numpy as np
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            first = result[0] if isinstance(result, (tuple, list)) and result else result
            if isinstance(first, torch.Tensor) and first.layout == torch.strided and not first.is_meta:
                node = torch._C._current_autograd_node()
                where = module_stack[-1] if module_stack else (f"backward:{node.name()}" if node else "-")
                t = first.detach()
                index = len(records)
                # a fresh dense copy: a one-element tensor counts as contiguous whatever its stride
                flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1))
                raw = flat.view(torch.uint8).numpy().tobytes() if t.numel() else b""
                records.append([where, str(func.overloadpacket.__name__), list(t.shape), str(t.dtype),
                                blake3.blake3(raw).hexdigest()])
                if full is not None and index == full:
                    np.save(out / "tensor.npy", t.double().numpy())
            return result

    return Recorder


def _track_modules(model, module_stack: list[str]) -> None:
    """Keep `module_stack` naming the module whose forward is running."""
    names = {m: n or "model" for n, m in model.named_modules()}

    def enter(mod, _inputs) -> None:
        module_stack.append(f"{names[mod]} ({type(mod).__name__})")

    def leave(mod, _inputs, _output) -> None:  # returns None: a hook's value would replace the output
        module_stack.pop()

    for m in model.modules():
        m.register_forward_pre_hook(enter)
        m.register_forward_hook(leave)


def _run(recipe_path: Path, level: str, step: int, out: Path, full: int | None, store: str | None,
         offline: bool, start: Path | None) -> None:
    """In a fresh process: build up to `step` under `level`, save the parameters then (or, with
    `start`, replace them by those), and record every operator of the step."""
    from ..builder import determinism
    from ..recipe import load_recipe

    recipe = load_recipe(recipe_path)
    r = recipe.recipe
    determinism.apply(r.determinism, cpu_capability=level)
    import torch

    from .._internal.progress import Reporter
    from ..builder import tensors as tensors_mod
    from ..builder import train as train_mod
    from ..builder.pipeline import fetch_all, prepare_data
    from ..builder.transcript import Transcript
    from ..inputs.store import Store

    stored = fetch_all(recipe, Store(store or None), offline=offline, handed={}, reporter=Reporter(enabled=False))
    data = prepare_data(recipe, stored, out / "work")
    records: list[list] = []
    module_stack: list[str] = []

    Recorder = _recorder_class(records, module_stack, full, out)
    with determinism.sdpa_context(r.determinism):
        model = train_mod.build_model(r.model, data.tokenizer.get_vocab_size(), data.special_ids, r.determinism.seed,
                                      portable=r.determinism.portable, parent=data.parent)
        _track_modules(model, module_stack)
        transcript = Transcript()
        original = train_mod.micro_loss_sum
        state = {"mode": None, "params": None, "own_params": None}

        def traced(net, mdl, stage, input_ids, labels):
            if len(transcript.lines) == step and state["mode"] is None:
                from safetensors.torch import load_file, save_file

                state["own_params"] = tensors_mod.param_digest(mdl)
                if start is not None:
                    loaded = load_file(str(start))
                    with torch.no_grad():
                        for name, t in tensors_mod.saved_state(mdl).items():
                            t.copy_(loaded[name])
                else:
                    save_file({k: v.detach().clone().contiguous() for k, v in tensors_mod.saved_state(mdl).items()},
                              str(out / "params.safetensors"))
                state["params"] = tensors_mod.param_digest(mdl)
                state["mode"] = Recorder()
                state["mode"].__enter__()  # through forward, backward and the optimizer step
            return original(net, mdl, stage, input_ids, labels)

        train_mod.micro_loss_sum = traced
        try:
            train_mod.train(model, r, data.seqs, data.special_ids["pad_token_id"], transcript, stop_after=step + 1)
        except train_mod.StopAt:
            pass
        finally:
            if state["mode"] is not None:
                state["mode"].__exit__(None, None, None)
            train_mod.micro_loss_sum = original
    (out / "ops.json").write_text(json.dumps({"ops": records, "params": state["params"],
                                              "own_params": state["own_params"]}))


if __name__ == "__main__":
    _recipe, _level, _step, _out, _full, _store, _offline, _start = sys.argv[1:9]
    _run(Path(_recipe), _level, int(_step), Path(_out), int(_full) if _full else None, _store or None,
         _offline == "1", Path(_start) if _start else None)
