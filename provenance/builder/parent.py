"""A parent model as a recipe input (`kind = "model"`): verified as `verify-attestation` would, then
copied, and only the copies used.

Before any work the build verifies the parent's attestation with the recipe's key against the parent's
model directory (the verifier of verify/, closed set, exact); a parent that does not verify stops the
build with the verifier's report (CheckFailed, exit 1). Its signed files are then copied into the
store's temporary space and each copy is held to the sha256 its attestation signs, so what is built on
is what was verified, whatever happens to the parent's folder meanwhile. docs/recipe.md ("Fine-tuning",
"Exports") describes the input.

`--input NAME=DIR` hands either another model directory or a parent's folder as a corresponding-source
archive lays it out (attest/source.py): DIR/model/, DIR/attestation.intoto.jsonl and, when present,
DIR/signing-key.pub stand for the recipe's path, attestation and key; the pins still apply.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .._internal.hashing import hash_file, tensor_digest
from ..attest.source import PARENT_ATTESTATION, PARENT_KEY, PARENT_MODEL, PARENT_SOURCE, input_prefix, parent_part
from ..errors import CheckFailed, DigestMismatch, FetchError, InputError
from ..inputs.store import Store, StoredInput
from ..recipe import Input, Model
from ..verify.model_dir import RECEIPTS_DIR

# What a fine-tune takes from its parent (the model card, generation config and tokenizer extras are
# written afresh, as for any build).
USED = ("model.safetensors", "tokenizer.json", "config.json")
# The most recipes a lineage carries above a parent (verify-attestation --chain walks as many links).
MAX_LINEAGE = 16


@dataclass(frozen=True)
class Ancestor:
    """A recipe above a parent in its lineage (its parent's, and so on up), as the parent's signed
    provenance carries it: the text, held to the digests recorded beside it."""

    recipe_name: str
    recipe: dict[str, str]  # its digests
    content: str

    def record(self) -> dict:
        return {"recipe_name": self.recipe_name, "recipe": dict(self.recipe), "recipe_content": self.content}


@dataclass(frozen=True)
class Parent:
    """A verified parent: where its files were copied, and what its attestation says."""

    files: Path  # the copies of every file its attestation signs
    weights: str  # blake3-tensors-v1 digest of model.safetensors
    attestation: dict[str, str]  # the attestation file's sha256 and blake3
    recipe: dict[str, str]  # the parent recipe's digests
    recipe_name: str
    output_license: str
    input_licenses: dict[str, int]  # licence -> files the parent (and its own parents) trained on
    subjects: dict[str, str]  # every file of the parent's model dir -> its signed sha256
    recipe_text: str = ""  # the parent's recipe as its attestation embeds it (its digest verified)
    lineage: tuple[Ancestor, ...] = ()  # the recipes above it, its own parent's first
    key: dict[str, str] | None = None  # the digests of the public key it was verified with (None: keyless)
    folder: Path | None = None  # the parent's folder as it was found: where its source.tar may be

    @property
    def attestation_file(self) -> Path:  # the verified copy
        return self.files.parent / PARENT_ATTESTATION

    @property
    def key_file(self) -> Path | None:  # the copy of the key it was verified with
        return self.files.parent / PARENT_KEY if self.key is not None else None

    def source_archive(self) -> Path | None:
        """The parent's own corresponding source where `publish` or a build puts it: a published folder's
        .provenance/source.tar, or source.tar beside a build's (or an archive's) model/; None when there
        is none. Unchecked."""
        if self.folder is None:
            return None
        if (self.folder / RECEIPTS_DIR).is_dir():
            f = self.folder / RECEIPTS_DIR / PARENT_SOURCE
        else:
            f = self.folder.parent / PARENT_SOURCE if self.folder.name == PARENT_MODEL.rstrip("/") else None
        return f if f is not None and f.is_file() else None

    def verified_line(self, name: str) -> str:
        """The build's log line for the verified parent behind input `name`."""
        return (f"input {name}: the model of {self.recipe_name!r}, verified against its attestation "
                f"(sha256:{self.attestation['sha256']}), weights blake3:{self.weights}")

    def record(self) -> dict:
        """What build.json and the attestation record about the parent (docs/formats.md)."""
        return {"weights": self.weights, "attestation": dict(self.attestation), "recipe": dict(self.recipe),
                "recipe_name": self.recipe_name, "output_license": self.output_license,
                "input_licenses": dict(self.input_licenses), "files": dict(self.subjects),
                "recipe_content": self.recipe_text, "lineage": [a.record() for a in self.lineage],
                **({"key": dict(self.key)} if self.key is not None else {})}


def _resolve(value: str, recipe_dir: Path) -> Path:
    p = Path(value)
    return p if p.is_absolute() else recipe_dir / p


def fetch_parent(inp: Input, store: Store, *, recipe_dir: Path, handed: Path | None = None) -> StoredInput:
    """Verify the parent named by `inp` and return it as a stored input whose `parent` says what it is.
    `handed` (--input NAME=DIR) stands for the model directory."""
    assert inp.path is not None and inp.attestation is not None
    mdir = handed if handed is not None else _resolve(inp.path, recipe_dir)
    named = {"path": mdir, **{f: _resolve(getattr(inp, f), recipe_dir) for f in ("attestation", "key", "trust_config")
                              if getattr(inp, f) is not None}}
    if handed is not None and (handed / PARENT_MODEL).is_dir() and (handed / PARENT_ATTESTATION).is_file():
        mdir = named["path"] = handed / PARENT_MODEL  # a parent's folder (an archive's inputs/NAME/)
        named["attestation"] = handed / PARENT_ATTESTATION
        if "key" in named and (handed / PARENT_KEY).is_file():
            named["key"] = handed / PARENT_KEY
    for what, p in named.items():
        if not (p.is_dir() if what == "path" else p.is_file()):
            raise FetchError(f"input {inp.name!r}: {what} {p} is not a {'directory' if what == 'path' else 'file'}")
    att = named["attestation"]
    work = Path(tempfile.mkdtemp(dir=store.tmpdir(), prefix=f"parent-{inp.name}."))
    try:
        copied = work / PARENT_ATTESTATION
        shutil.copyfile(att, copied)
        if "key" in named:
            shutil.copyfile(named["key"], work / PARENT_KEY)
            named["key"] = work / PARENT_KEY  # verified with the copy, whose digests are recorded
        digests = hash_file(copied)
        if digests["sha256"] != inp.attestation_sha256:
            raise DigestMismatch(f"input {inp.name!r} attestation ({att})", "sha256", inp.attestation_sha256,
                                 digests["sha256"])
        statement = _verified(inp, copied, named, mdir)
        parent = _copy_used(inp, statement, mdir, work, digests)
        key = hash_file(work / PARENT_KEY) if "key" in named else None  # its sha256 and blake3
        parent = dataclasses.replace(parent, key=key, folder=mdir)
        return StoredInput(inp, work, {"blake3": parent.weights}, "model", is_dir=True, parent=parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def discard_copies(stored) -> None:
    """Remove the verified copies fetch_parent made of parents' files (in the store's tmp dir), once the
    command that fetched them is done with them."""
    for s in stored:
        if s.parent is not None:
            shutil.rmtree(s.path, ignore_errors=True)


def _verified(inp: Input, attestation: Path, named: dict[str, Path], mdir: Path) -> dict:
    """The parent's signed statement, once the verifier has found the attestation and the model dir exact:
    signed by the recipe's key, or (a Sigstore bundle) by the recipe's identity and issuer."""
    from ..verify import SigstoreTrust, Verifier, render

    if "key" in named:
        verifier, by = Verifier.configure(keys=[named["key"]]), f"key ({named['key']})"
    else:
        verifier = Verifier.configure(sigstore=SigstoreTrust(inp.identity, inp.issuer, named.get("trust_config")))
        by = f"Sigstore identity ({inp.identity}, issuer {inp.issuer})"
    # a published folder (`provenance publish`): its receipts are passed over, exactly as --published does
    result = verifier.verify(attestation, model=mdir, published=(mdir / RECEIPTS_DIR).is_dir())
    if not result.ok or result.parsed is None:
        raise CheckFailed(f"input {inp.name!r}: the parent model in {mdir} does not verify against its attestation "
                          f"and {by}:\n{render(result)}")
    return result.statement


def _copy_used(inp: Input, statement: dict, mdir: Path, work: Path, att: dict[str, str]) -> Parent:
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    missing = [n for n in USED if n not in subjects]
    if missing:
        raise InputError(f"input {inp.name!r}: the parent's attestation signs no {', '.join(missing)}; a fine-tune "
                         "needs its weights, tokenizer and configuration")
    files = work / "model"
    files.mkdir()
    for name in sorted(subjects):  # every signed file (the verifier has checked each name is a safe path)
        (files / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mdir / name, files / name)
        got = hash_file(files / name)["sha256"]
        if got != subjects[name]:
            raise CheckFailed(f"input {inp.name!r}: {mdir / name} changed after it was verified "
                              f"(sha256 {got}, signed {subjects[name]})")
    weights = tensor_digest(files / "model.safetensors")
    if weights != inp.blake3:
        raise DigestMismatch(f"input {inp.name!r} weights ({mdir / 'model.safetensors'}, blake3-tensors-v1)",
                             "blake3", inp.blake3 or "", weights)
    pred = statement["predicate"]
    outputs = pred["runDetails"]["provenance_outputs"]
    recipe = pred["buildDefinition"]["externalParameters"]["recipe"]
    name = tomllib.loads(recipe["content"]).get("recipe", {}).get("name", "")  # its digest was verified
    return Parent(files, weights, att, dict(recipe["digest"]), str(name), outputs["output_license"],
                  carried_licences(pred), subjects, recipe["content"], lineage_above(inp, pred))


def lineage_above(inp: Input, pred: dict) -> tuple[Ancestor, ...]:
    """The recipes above a parent, from what its signed provenance says of its own parent: that parent's
    recipe and the lineage recorded with it. Empty for a parent trained from scratch, or recorded by a
    version that kept no recipe text. Each text is held to its recorded digests (CheckFailed)."""
    from .._internal.hashing import hash_bytes

    for dep in pred["buildDefinition"]["resolvedDependencies"]:
        above = (dep.get("annotations") or {}).get("parent")
        if not isinstance(above, dict) or "recipe_content" not in above:
            continue
        chain = [above, *above.get("lineage", [])]
        if len(chain) > MAX_LINEAGE:
            raise InputError(f"input {inp.name!r}: the parent's lineage holds {len(chain)} recipes above it; at most "
                             f"{MAX_LINEAGE} are followed")
        out = []
        for a in chain:
            content, digests = a.get("recipe_content"), a.get("recipe")
            got = hash_bytes(content.encode()) if isinstance(content, str) else {}
            if not isinstance(digests, dict) or not digests or any(got.get(k) != v for k, v in digests.items()):
                raise CheckFailed(f"input {inp.name!r}: the parent's attestation carries the recipe of "
                                  f"{a.get('recipe_name')!r} with other digests than it records for it")
            out.append(Ancestor(str(a.get("recipe_name", "")), {str(k): str(v) for k, v in digests.items()},
                                str(content)))
        return tuple(out)
    return ()


def carried_licences(pred: dict) -> dict[str, int]:
    """Licence -> training files, over a build's own dataset and, for a fine-tune, what its parent carried."""
    out: dict[str, int] = {}
    for dep in pred["buildDefinition"]["resolvedDependencies"]:
        notes = dep.get("annotations", {})
        counts = notes.get("licenses") if dep.get("name") == "dataset-manifest" else \
            (notes.get("parent") or {}).get("input_licenses")
        for licence, files in (counts or {}).items():
            out[str(licence)] = out.get(str(licence), 0) + int(files)
    return out


def inbound_licences(own: dict[str, int], parent: Parent | None) -> dict[str, int]:
    """The licences a build's weights carry: its own training files' and its parent's (files summed)."""
    out = dict(own)
    for licence, files in (parent.input_licenses if parent is not None else {}).items():
        out[licence] = out.get(licence, 0) + files
    return out


def parent_tokenizer(parent: Parent, model: Model):
    """The parent's tokenizer (a fine-tune trains none of its own); the recipe's special tokens must be in it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str((parent.files / "tokenizer.json").read_text(encoding="utf-8"))
    absent = [f"model.{f} {getattr(model, f)!r}" for f in ("bos_token", "eos_token", "pad_token")
              if tok.token_to_id(getattr(model, f)) is None]
    if absent:
        raise InputError(f"{', '.join(absent)}: not a token of the parent's tokenizer; a fine-tune uses its parent's")
    return tok


def load_weights(model, parent: Parent) -> None:
    """Set `model`'s parameters to the parent's, name for name and shape for shape; a recipe whose [model]
    does not describe the parent is refused naming the first tensor that differs."""
    import torch

    from .._internal.safetensors import SafetensorsError, read_float_tensors

    try:  # a bfloat16 or float16 parent (an export) starts the fine-tune from its values, widened exactly
        theirs = read_float_tensors(parent.files / "model.safetensors")
    except SafetensorsError as e:
        raise InputError(f"the parent's model.safetensors: {e}; a fine-tune starts from floating-point weights "
                         "(an int8 export is not one)") from None
    ours = model.state_dict()
    for name in sorted(set(ours) | set(theirs)):
        if name not in theirs or name not in ours:
            side = "the parent" if name not in theirs else "this recipe's [model]"
            raise InputError(f"model: tensor {name!r} is not in {side}: the recipe's [model] must describe the "
                             "parent's architecture")
        if tuple(ours[name].shape) != tuple(theirs[name].shape):
            raise InputError(f"model: tensor {name!r} is {list(theirs[name].shape)} in the parent and "
                             f"{list(ours[name].shape)} by this recipe's [model] and tokenizer")
    with torch.no_grad():
        for name, tensor in ours.items():
            tensor.copy_(torch.from_numpy(theirs[name].copy()).to(tensor.dtype))


def parent_training(parent: Parent, store: Store, *, offline: bool, work: Path, tokenizer):
    """The training files the parent carries, for the child's memorization audit: the parent's own, as its
    recipe selects and lays them out, and those of every recipe above it in its lineage (an export's recipe
    trains on nothing and adds none), encoded with `tokenizer` (the fine-tune's, which is the parent's).
    Returns (token sequences, names, the recipes measured (name, files, whether the parent's own), why
    others could not be), a name "input:path" for the parent's own files and "recipe/input:path" for an
    ancestor's; a str saying why no file can be had instead (the parent and its lineage train on nothing,
    or name inputs by paths relative to their own recipe files). An input not in the store is taken from
    the parent's corresponding source, where the lineage's recipe `i` is the archive nested `i` deep (each
    file held to its pins by the store), else fetched (unless offline)."""
    recipes = [(parent.recipe_name, parent.recipe_text, "")]
    recipes += [(a.recipe_name, a.content, f"{a.recipe_name}/") for a in parent.lineage]
    seqs: list = []
    names: list[str] = []
    measured: list[dict] = []
    gaps: list[str] = []
    for i, (name, text, prefix) in enumerate(recipes):
        got = _training_files(name, text, store, offline=offline, work=work / str(i), tokenizer=tokenizer,
                              carried=(parent.source_archive(), i))
        whose = "the parent's" if i == 0 else f"{name!r}'s"
        if isinstance(got, str):
            gaps.append(f"{whose} {got}")
            continue
        if got is None:  # an export: its parent's files are what it carries
            continue
        seqs += got[0]
        names += [prefix + n for n in got[1]]
        measured.append({"recipe": name, "files": len(got[1]), "parent": i == 0})
    if not measured:
        return "; ".join(gaps) or ("the parent's recipe is not a training recipe, and its provenance carries no "
                                  "recipe of a parent that is")
    return seqs, names, measured, gaps


def _training_files(name: str, text: str, store: Store, *, offline: bool, work: Path, tokenizer,
                    carried: tuple[Path | None, int] = (None, 0)):
    """(token sequences, "input:path" names) of one recipe's training files; None for an export's recipe
    (it trains on nothing); a str saying why they cannot be had. `carried`: the archive holding this
    recipe's inputs, and how deep in it."""
    from ..inputs.dataset import layout_texts, select_dataset
    from ..recipe import parse_recipe
    from .tokenizer import encode_all

    where = Path(f"{name or 'parent'}.toml")  # names only: the recipe is the verified text
    try:
        if "export" in tomllib.loads(text):
            return None
    except tomllib.TOMLDecodeError as e:
        return f"recipe is not TOML ({e})"
    try:
        recipe = parse_recipe(where, text)
    except InputError as e:
        return f"recipe is not a training recipe ({str(e).splitlines()[0]})"
    own = [i for i in recipe.inputs if i.kind != "model"]
    local = [i.name for i in own if i.kind == "path" and not Path(i.path or "").is_absolute()]
    if local:
        return f"input {local[0]!r} is a path relative to its recipe file"
    try:
        stored = [_fetch_carried(i, store, offline=offline, limits=recipe.limits, carried=carried) for i in own]
    except FetchError as e:
        return f"input could not be had ({e})"
    files, _ = select_dataset(recipe.dataset, stored, work, where, recipe.limits)
    return encode_all(tokenizer, layout_texts(files, recipe.layout)), [f"{f.input}:{f.path}" for f in files]


def _fetch_carried(inp: Input, store: Store, *, offline: bool, limits, carried: tuple[Path | None, int]) -> StoredInput:
    """An ancestor's input: from the store, else from the corresponding source that carries it, else fetched
    (unless offline). Raises FetchError when none has it."""
    from ..inputs.store import fetch_input

    nowhere = Path("/nonexistent")  # an ancestor's input is never a path relative to a recipe file here
    if store.lookup(inp) is None and carried[0] is not None:
        handed = _from_archive(carried[0], carried[1], inp, store.tmpdir())
        if handed is not None:
            try:
                return fetch_input(inp, store, recipe_dir=nowhere, offline=True, handed=handed, limits=limits)
            except DigestMismatch:
                pass  # not the pinned bytes: the store keeps nothing of them; try the input's own source
            finally:
                handed.unlink(missing_ok=True)
    return fetch_input(inp, store, recipe_dir=nowhere, offline=offline, limits=limits)


def _from_archive(archive: Path, depth: int, inp: Input, tmp: Path) -> Path | None:
    """The file input `inp` copied out of the corresponding-source archive nested `depth` deep in
    `archive` (each level's parent folder holds the next as inputs/<name>/source.tar), or None."""
    import contextlib
    import tarfile

    want = input_prefix(inp.name) + inp.artifact_name
    try:
        with contextlib.ExitStack() as stack:
            tf = stack.enter_context(tarfile.open(archive, mode="r:"))
            for _ in range(depth):
                inner = next((m for m in tf.getmembers()
                              if m.isreg() and parent_part(m.name.partition("/")[2]) == PARENT_SOURCE), None)
                if inner is None:
                    return None
                tf = stack.enter_context(tarfile.open(fileobj=tf.extractfile(inner), mode="r:"))
            member = next((m for m in tf.getmembers() if m.isreg() and m.name.partition("/")[2] == want), None)
            if member is None:
                return None
            fd, name = tempfile.mkstemp(dir=tmp, prefix=f"carried-{inp.name}.")
            with open(fd, "wb") as out, tf.extractfile(member) as f:  # type: ignore[union-attr]
                shutil.copyfileobj(f, out)
            return Path(name)
    except (OSError, tarfile.TarError, EOFError):
        return None
