"""The model directory as a closed set: every file in it is a signed subject, byte for byte.

Every entry under the directory is looked at, recursively and hidden ones included, without
following symlinks: a regular file must be a subject whose signed blake3 (and sha256 with
--sha256) it matches; any other file, any symlink and any special file fails by name, because
loaders read more than weights (`transformers` loads a `chat_template.jinja`, and with
`trust_remote_code` runs a `modeling_*.py`). Every `.safetensors` file must also be well formed
(see _internal/safetensors.py), checked on the same open file that is hashed.

The one kind of symlink read through is huggingface_hub's cache's own: in a snapshot
(`models--ORG--NAME/snapshots/REV/`, what `from_pretrained("ORG/NAME")` loads), a relative link
straight to a regular file in the repository's `blobs/` is that file (_internal/prefetch.py, scan).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import NamedTuple

from .._internal.hashing import hash_fd
from .._internal.prefetch import Prefetch, _identity, hub_blobs, scan  # noqa: F401 - re-exported
from .._internal.safetensors import SafetensorsError, check_fd
from ..attest.model import Statement
from ..errors import InputError
from .report import CheckName, Checks

# What an unlisted file is, for the message (every unlisted file fails, whatever it is).
KINDS = (
    ((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".ggml", ".onnx", ".h5", ".keras", ".msgpack",
      ".npz", ".npy", ".pkl", ".pickle", ".tflite", ".mlmodel", ".pt2", ".pb"), "weights"),
    ((".py",), "code that transformers runs with trust_remote_code"),
    ((".jinja", ".j2"), "a chat template that transformers loads"),
    ((".json",), "configuration that loaders read"),
)


def describe(name: str) -> str:
    lower = name.lower()
    for suffixes, what in KINDS:
        if lower.endswith(suffixes):
            return what
    return "a file"


class FileResult(NamedTuple):
    name: str
    digests: dict[str, str]
    matches: bool
    detail: str = ""
    unreadable: bool = False  # could not be opened or read: not checked, rather than found different


class ModelDirResult:
    """What the closed-set inspection found; `exact` when nothing differs from the signed set."""

    def __init__(self) -> None:
        self.files: dict[str, FileResult] = {}
        self.missing: list[str] = []
        self.unlisted: list[str] = []  # "name: what it is"
        self.structure: list[str] = []  # "name: problem"
        self.hint = ""  # said after the missing files when the signed set lies one directory down
        self.passed_over = ""  # a published folder's receipts and hub files, named in the report
        self.through_blobs = 0  # files of a huggingface_hub cache snapshot, read through their symlinks

    @property
    def differing(self) -> list[str]:
        return [n for n, f in sorted(self.files.items()) if not f.matches]

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unlisted or self.structure or self.differing)


# A published model folder (`provenance publish`, docs/receipts.md) keeps its receipts here, and its
# OMS signature at the top as `model.sig` (model_signing's convention). With `published`, exactly
# these file names may lie in it, unlisted; anything else there still fails.
PUBLISHED_SIGNATURE = "model.sig"
RECEIPTS_DIR = ".provenance"
RECEIPT_NAMES = frozenset({"attestation.intoto.jsonl", "attestation.sigstore.json", "audit.intoto.jsonl",
                           "vsa.intoto.jsonl", "sbom.spdx3.json", "sbom.cdx.json", "signing-key.pub",
                           "source.tar", "source.intoto.jsonl"})  # the corresponding source and its statement
# A published folder that went to the Hugging Face Hub and back also holds the hub's own files: the
# `.gitattributes` every hub repository is created with (read by git alone), and what
# huggingface_hub writes into a `--local-dir` download (`.cache/huggingface/`: a `.gitignore`, a
# CACHEDIR.TAG, and per downloaded file NAME `download/NAME.metadata` and `download/NAME.lock`).
# No loader reads them as the model. With `published` exactly these shapes are passed over, and
# named; a `.metadata` or `.lock` for a file that is not in the folder, or anything else under
# `.cache/`, still fails.
HUB_ATTRIBUTES = ".gitattributes"
HUB_BOOKKEEPING = ".cache/huggingface/"
_HUB_FIXED = frozenset({".gitignore", ".gitignore.lock", "CACHEDIR.TAG"})


def _is_receipt(name: str) -> bool:
    """Whether `name` is one of a published folder's receipts (model.sig or a known .provenance/ file)."""
    return name == PUBLISHED_SIGNATURE or (name.startswith(RECEIPTS_DIR + "/")
                                           and name[len(RECEIPTS_DIR) + 1:] in RECEIPT_NAMES)


def _hub_bookkeeping(name: str, folder: set[str]) -> bool:
    """Whether `name` is hub bookkeeping of a folder whose other files are `folder`."""
    if name == HUB_ATTRIBUTES:
        return True
    if not name.startswith(HUB_BOOKKEEPING):
        return False
    rest = name[len(HUB_BOOKKEEPING):]
    if rest in _HUB_FIXED:
        return True
    if not rest.startswith("download/"):
        return False
    rest = rest[len("download/"):]
    return any(rest.endswith(suffix) and rest[:-len(suffix)] in folder for suffix in (".metadata", ".lock"))


def inspect(st: Statement, model_dir: Path, *, sha256: bool, prefetch: Prefetch | None = None,
            published: bool = False) -> ModelDirResult:
    """Hash and check every file of `model_dir` against the statement (blake3, and sha256 with
    `sha256`). Raises InputError if the directory cannot be read at all."""
    expected = {s.name: {"blake3": st.files[s.name], **({"sha256": s.digest["sha256"]} if sha256 else {})}
                for s in st.subject}
    sizes = st.runDetails.provenance_outputs.sizes or {}
    return inspect_digests(expected, model_dir, prefetch=prefetch, published=published, sizes=sizes)


def inspect_digests(expected: dict[str, dict[str, str]], model_dir: Path, *, prefetch: Prefetch | None = None,
                    skip: frozenset[str] = frozenset(), published: bool = False,
                    sizes: dict[str, int] | None = None) -> ModelDirResult:
    """The closed-set check against `expected` (name -> {algorithm: hex}, every algorithm given is
    checked; blake3 and sha256 are known). `skip`: names (relative, POSIX) of files that are not part
    of the set: the detached signature being verified, when it lies inside the directory.
    `published`: the receipts of a published folder (RECEIPTS_DIR/RECEIPT_NAMES) are not part of it.
    `sizes`: signed byte sizes; a file of another size fails without being read.
    Raises InputError if the directory cannot be read at all."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"--model {model_dir}: not a directory")
    present, refused = scan(model_dir)
    blobs = hub_blobs(model_dir)
    folder = {n for n in present if not n.startswith(HUB_BOOKKEEPING)}  # the signature being verified included
    present = {n: p for n, p in present.items() if n not in skip}
    res = ModelDirResult()
    if published:
        receipts = {n for n in present if _is_receipt(n)}
        hub = {n for n in present if _hub_bookkeeping(n, folder)}
        present = {n: p for n, p in present.items() if n not in receipts and n not in hub}
        booked = sum(1 for n in hub if n != HUB_ATTRIBUTES)
        under = sum(1 for n in receipts if n != PUBLISHED_SIGNATURE)
        res.passed_over = ", ".join(
            [PUBLISHED_SIGNATURE] * (PUBLISHED_SIGNATURE in receipts)
            + [f"{under} receipt(s) under {RECEIPTS_DIR}/"] * bool(under)
            + [f"the hub's {HUB_ATTRIBUTES}"] * (HUB_ATTRIBUTES in hub)
            + [f"{booked} file(s) of huggingface_hub's download bookkeeping ({HUB_BOOKKEEPING})"] * bool(booked))
    res.unlisted = refused + [f"{n}: {describe(n)}, not among the signed subjects"
                              for n in sorted(set(present) - set(expected))]
    res.missing = sorted(set(expected) - set(present))
    if blobs is not None:
        res.through_blobs = sum(1 for p in present.values() if os.path.dirname(p) == blobs)
    extra = set(present) - set(expected)
    if not published and any(n.startswith(RECEIPTS_DIR + "/") for n in extra) and all(
            _is_receipt(n) or _hub_bookkeeping(n, folder) for n in extra):
        res.unlisted.append(f"every file beyond the signed set is a published folder's receipt ({RECEIPTS_DIR}/, "
                            f"{PUBLISHED_SIGNATURE}) or the hub's ({HUB_ATTRIBUTES}, {HUB_BOOKKEEPING}): to verify "
                            "a folder from `provenance publish`, add --published")
    if res.missing and len(res.missing) == len(expected):
        res.hint = _one_level_down(model_dir, set(expected), set(present))
    if prefetch is not None:  # an unlisted file fails by name, unread; a listed one of another size, by its size
        prefetch.limit_to({n for n in set(expected) & set(present) if not sizes or n not in sizes
                           or _size(present[n]) == sizes[n]})
    for name in sorted(set(expected) & set(present)):
        want = expected[name]
        need_sha = "sha256" in want
        try:
            fd = os.open(present[name], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            res.files[name] = FileResult(name, {}, False, f"cannot open: {e.strerror} (not checked)", unreadable=True)
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                res.unlisted.append(f"{name}: changed into a non-regular file while being checked")
                continue
            if sizes and name in sizes and info.st_size != sizes[name]:
                res.files[name] = FileResult(name, {}, False, f"{info.st_size} bytes, signed {sizes[name]}: not "
                                             "read (a file of another size cannot have the signed digest)")
                continue
            if name.lower().endswith(".safetensors"):
                try:
                    check_fd(fd)
                except SafetensorsError as e:
                    res.structure.append(f"{name}: {e}")
            got = prefetch.get(name, _identity(info), need_sha) if prefetch else None
            if got is None:
                got = hash_fd(fd, sha256=need_sha)
        except OSError as e:  # FileChanged: truncated or grown while read; or a read error
            res.files[name] = FileResult(name, {}, False, f"could not be read whole: {e}")
            continue
        finally:
            os.close(fd)
        problems = [f"{algo} expected {digest}, got {got.get(algo)}" for algo, digest in want.items()
                    if got.get(algo) != digest]
        res.files[name] = FileResult(name, got, not problems, "; ".join(problems))
    return res


def _size(path: str) -> int | None:
    try:
        return os.lstat(path).st_size
    except OSError:
        return None


def _one_level_down(model_dir: Path, expected: set[str], present: set[str]) -> str:
    """When none of the signed files is in the directory but all of them are in one of its
    subdirectories (a build's output dir given for its model/), say which --model was meant."""
    tops = {n.split("/", 1)[0] for n in present if "/" in n}
    for top in sorted(tops):
        if all(f"{top}/{name}" in present for name in expected):
            return (f"every signed file is in {top}/ inside it: did you mean --model {model_dir / top}? "
                    "(the closed set is that directory)")
    return ""


def report_exact(report: Checks, res: ModelDirResult, *, sha256: bool, judged_elsewhere: frozenset[str] = frozenset(),
                 algos: str | None = None) -> None:
    """The `verified` question: every file exact, nothing else in the directory.

    `judged_elsewhere` names files whose difference another check judges (the reproduced question)."""
    algos = algos or ("blake3 and sha256" if sha256 else "blake3")
    unread = [f"{n}: {res.files[n].detail}" for n in res.differing if res.files[n].unreadable]
    bad = [f"{n}: missing" for n in res.missing] + [f"{n}: {res.files[n].detail}" for n in res.differing
                                                   if n not in judged_elsewhere and not res.files[n].unreadable]
    if res.hint:
        bad.insert(0, res.hint)
    same = sum(1 for f in res.files.values() if f.matches)
    other = len(res.files) - same - len(unread)
    if unread and not bad:
        report.could_not_check(CheckName.MODEL_FILES, "; ".join(unread))
    else:
        report.add(CheckName.MODEL_FILES, not (bad or unread), "; ".join(bad + unread)
                   or f"{same} file(s) match the signed digests ({algos})"
                   + (f"; {other} weight file(s) differ and are judged below" if other else ""))
    report.add(CheckName.UNLISTED_FILES, not res.unlisted,
               "; ".join(res.unlisted) or "the directory holds the signed files and nothing else"
               + (f" (passed over as a published folder's: {res.passed_over})" if res.passed_over else "")
               + (f"; {res.through_blobs} of them, a snapshot in huggingface_hub's cache, read through their "
                  "links into its blobs/, as a loader reads them" if res.through_blobs else ""))
    n_st = sum(1 for n in res.files if n.lower().endswith(".safetensors"))
    report.add(CheckName.SAFETENSORS, not res.structure,
               "; ".join(res.structure) or f"{n_st} safetensors file(s) well formed: tensors tile the data exactly")
