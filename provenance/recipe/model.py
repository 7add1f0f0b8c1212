"""The recipe: a TOML file that pins every input and setting of a build.

Parsed with tomllib and validated by pydantic v2 (extra="forbid"); every problem is reported
at once with its dotted field path. docs/recipe.md documents each field.
"""

from __future__ import annotations

import re
import string
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .._internal.hashing import hash_bytes
from ..errors import InputError

# Every pattern matches the whole value (pydantic's patterns run on Rust's regex, where `$` is the
# end of the text; Python's own checks use fullmatch, since its `$` accepts a trailing newline),
# and every number is bounded: a value that validates here must also survive the build, the JSON of build.json and the
# RFC 8785 canonicalizer of the attestation (integers there stay below 2^53).
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)]
# A single path component that is safe to create: no separator, no "..", no leading dot or dash.
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")
PACKAGE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,98}[A-Za-z0-9])?")  # PEP 508 names
VERSION = re.compile(r"[0-9][0-9A-Za-z.+!-]{0,63}")
SAFE_INT = (1 << 53) - 1
PosInt = Annotated[int, Field(gt=0, le=SAFE_INT)]
NonNegInt = Annotated[int, Field(ge=0, le=SAFE_INT)]
Size = Annotated[int, Field(gt=0, le=1 << 20)]  # dimensions, lengths, batch sizes
MAX_RECIPE_BYTES = 1 << 20
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".zip")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Meta(Strict):
    """[recipe]: what this recipe builds."""

    name: Name
    description: str = ""


class Input(Strict):
    """[[inputs]]: one pinned artifact. At least one of sha256/blake3 is required."""

    name: Name
    kind: Literal["pypi", "url", "path", "model"]
    package: str | None = None
    version: str | None = None
    url: str | None = None
    path: str | None = None
    filename: str | None = None
    sha256: Hex64 | None = None
    blake3: Hex64 | None = None
    license: str = "NOASSERTION"
    extract: bool | None = None
    # kind = "model" (a parent model, docs/recipe.md "Fine-tuning"): `path` is its model directory,
    # `blake3` its weights digest (blake3-tensors-v1), `attestation` its signed provenance (pinned by
    # `attestation_sha256`) and `key` the public key that provenance must be signed with.
    attestation: str | None = None
    attestation_sha256: Hex64 | None = None
    key: str | None = None
    # or, for a parent signed keyless: the Sigstore bundle as `attestation`, the certificate identity and
    # OIDC issuer it must carry, and (for a Sigstore instance other than the public one) its trust config
    identity: str | None = None
    issuer: str | None = None
    trust_config: str | None = None

    @model_validator(mode="after")
    def _kind_fields(self) -> Input:
        problems = []
        if self.sha256 is None and self.blake3 is None:
            problems.append("an input must be pinned: set sha256 and/or blake3")
        keyless = self.kind == "model" and self.key is None and self.identity is not None
        wanted = {"pypi": ("package", "version"), "url": ("url",), "path": ("path",),
                  "model": ("path", "blake3", "attestation", "attestation_sha256",
                            *(("identity", "issuer", "trust_config") if keyless else ("key",)))}[self.kind]
        for field in wanted:
            if getattr(self, field) is None and (field != "trust_config" or not keyless):
                problems.append(f"kind = {self.kind!r} needs '{field}'" + (
                    " (or 'identity' and 'issuer' for a parent signed with Sigstore)" if field == "key" else ""))
        for field in ("package", "version", "url", "path", "attestation", "attestation_sha256", "key", "identity",
                      "issuer", "trust_config"):
            if field not in wanted and getattr(self, field) is not None:
                problems.append(f"'{field}' does not apply to kind = {self.kind!r}" + (
                    " with a 'key'" if self.kind == "model" else ""))
        if self.kind == "model":
            problems += [f"'{f}' does not apply to kind = 'model' (its pins are blake3, the weights digest, and "
                         "attestation_sha256)" for f in ("sha256", "filename", "extract")
                         if getattr(self, f) is not None]
        for field in ("attestation", "key", "trust_config"):
            value = getattr(self, field)
            if value is not None and ("\x00" in value or not value.strip()):
                problems.append(f"{field} must be a non-empty path without NUL, got {value!r}")
        if self.kind == "url" and self.url and (not re.match(r"https?://[^\s/]", self.url)
                                                 or any(c.isspace() or ord(c) < 0x20 for c in self.url)):
            problems.append(f"url must be an http:// or https:// URL without spaces or control characters, "
                            f"got {self.url!r}")
        if self.kind == "pypi" and self.package and not PACKAGE.fullmatch(self.package):
            problems.append(f"package must be a PyPI project name (letters, digits, '.', '_', '-'; starting and "
                            f"ending with a letter or digit), got {self.package!r}")
        if self.kind == "pypi" and self.version and not VERSION.fullmatch(self.version):
            problems.append(f"version must be an exact release such as '1.2.3', got {self.version!r}")
        if self.path is not None and ("\x00" in self.path or not self.path.strip()):
            problems.append(f"path must be a non-empty path without NUL, got {self.path!r}")
        if self.filename is not None and not FILE_NAME.fullmatch(self.filename):
            problems.append(f"filename must be a plain file name (letters, digits, '.', '_', '+', '-'; no '/' "
                            f"or '..', not starting with '.' or '-'), got {self.filename!r}")
        elif not problems and (not FILE_NAME.fullmatch(self.artifact_name) or ".." in self.artifact_name):
            problems.append(f"the artifact's file name {self.artifact_name!r} (from its {self.kind}) is not a plain "
                            "file name; set 'filename' to one")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def artifact_name(self) -> str:
        """The file name the artifact is stored under; its suffix decides extraction."""
        if self.filename:
            return self.filename
        if self.kind == "url" and self.url is not None:
            return self.url.rstrip("/").rsplit("/", 1)[-1] or self.name
        if self.kind in ("path", "model") and self.path is not None:
            return Path(self.path).name or self.name
        return f"{self.package}-{self.version}.tar.gz"

    @property
    def is_archive(self) -> bool:
        if self.extract is not None:
            return self.extract
        return self.artifact_name.lower().endswith(ARCHIVE_SUFFIXES)


class Dataset(Strict):
    """[dataset]: which files of the inputs become training text."""

    include: Annotated[list[str], Field(min_length=1)]
    exclude: list[str] = []
    ignore_case: bool = False
    encoding: Literal["utf-8", "ascii", "latin-1"] = "utf-8"
    manifest_root: Hex64 | None = None


class Layout(Strict):
    """[layout]: how one file becomes one training text."""

    template: str = "{content}"

    @model_validator(mode="after")
    def _placeholders(self) -> Layout:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
        except ValueError as e:
            raise ValueError(f"template is not a valid format string: {e}") from None
        if "content" not in fields:
            raise ValueError("template must contain {content}")
        if fields - {"content", "path"}:
            raise ValueError(f"template may use only {{path}} and {{content}}, found "
                             f"{sorted(fields - {'content', 'path'})}")
        return self


class Tokenizer(Strict):
    """[tokenizer]: a byte-level BPE trained on the dataset."""

    kind: Literal["byte-level-bpe"] = "byte-level-bpe"
    vocab_size: Annotated[int, Field(ge=257, le=1 << 20)]
    min_frequency: PosInt = 2
    special_tokens: list[str] = []
    add_prefix_space: bool = True
    lowercase: bool = False
    trim_offsets: bool = False

    @model_validator(mode="after")
    def _unique(self) -> Tokenizer:
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError("special_tokens must be unique")
        return self


class Model(Strict):
    """[model]: the transformers LlamaConfig (vocab size comes from the trained tokenizer)."""

    architecture: Literal["llama"] = "llama"
    hidden_size: Size
    intermediate_size: Size
    num_hidden_layers: Size
    num_attention_heads: Size
    num_key_value_heads: Size
    max_position_embeddings: Size
    rms_norm_eps: Annotated[float, Field(allow_inf_nan=False, gt=0)] = 1e-6
    rope_theta: Annotated[float, Field(allow_inf_nan=False, gt=0)] = 10000.0
    hidden_act: Literal["silu"] = "silu"
    tie_word_embeddings: bool = False
    initializer_range: Annotated[float, Field(allow_inf_nan=False, gt=0)] = 0.02
    # "small-head" and "tiled": our causal attention kernels on the CPU, for heads of dimension <= 8
    # (builder/small_head_attention.py) and of a multiple of 16 (builder/tiled_attention.py); other bits
    # than SDPA's, so a recipe choice.
    attn_implementation: Literal["eager", "sdpa", "small-head", "tiled"] = "sdpa"
    # The embedding and output layer get this many rows rounded up from the tokenizer's vocabulary
    # (the extra rows are never an input; they stay in the softmax and learn to be unlikely). A
    # multiple of 64 keeps the output layer's gradient thread-invariant under MKL (docs/recipe.md).
    pad_vocab_to_multiple_of: Annotated[int, Field(ge=1, le=4096)] = 1
    bos_token: str
    eos_token: str
    pad_token: str

    def padded_vocab(self, vocab_size: int) -> int:
        """The model's vocabulary: the tokenizer's rounded up to `pad_vocab_to_multiple_of`."""
        m = self.pad_vocab_to_multiple_of
        return -(-vocab_size // m) * m

    @model_validator(mode="after")
    def _heads(self) -> Model:
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if problems:
            raise ValueError("; ".join(problems))
        return self


Beta = Annotated[float, Field(allow_inf_nan=False, ge=0, lt=1)]  # an AdamW beta


class Stage(Strict):
    """[[stages]]: one training stage; the optimizer starts afresh in each."""

    name: Name
    lr: Annotated[float, Field(allow_inf_nan=False, gt=0)]
    batch_size: Size
    micro_batch_size: Size | None = None  # gradient accumulation: batch_size samples in micro-batches of this size
    epochs: PosInt | None = None
    steps: PosInt | None = None
    warmup_steps: NonNegInt = 0
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    min_lr_ratio: Annotated[float, Field(allow_inf_nan=False, ge=0, le=1)] = 0.0
    optimizer: Literal["adamw"] = "adamw"
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: Annotated[float, Field(allow_inf_nan=False, gt=0)] = 1e-8
    weight_decay: Annotated[float, Field(allow_inf_nan=False, ge=0)] = 0.0
    grad_clip: Annotated[float, Field(allow_inf_nan=False, gt=0)] | None = 1.0
    seq_len: Size
    stride: Size | None = None
    phases: Size = 1
    precision: Literal["float32", "bf16-autocast"] = "float32"
    # "full": logits for every position, then cross-entropy (HF's way). "chunked": the output layer and
    # the loss fused over chunks of `cross_entropy_chunk` positions, in float32, never holding all the
    # logits (builder/loss.py). They give different bits; the choice is part of the recipe.
    cross_entropy: Literal["full", "chunked"] = "full"
    cross_entropy_chunk: Annotated[int, Field(ge=64, le=1 << 20)] = 1024
    # "parent": the first stage starts from the weights and tokenizer of the recipe's model input
    # (a fine-tune; docs/recipe.md "Fine-tuning") instead of the seed's initialisation.
    init: Literal["random", "parent"] = "random"

    @model_validator(mode="after")
    def _length(self) -> Stage:
        problems = []
        if (self.epochs is None) == (self.steps is None):
            problems.append("set exactly one of 'epochs' or 'steps'")
        if self.stride is not None and self.stride > self.seq_len:
            problems.append(f"stride ({self.stride}) must not exceed seq_len ({self.seq_len})")
        if self.phases > self.seq_len:
            problems.append(f"phases ({self.phases}) must not exceed seq_len ({self.seq_len})")
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            problems.append(f"micro_batch_size ({self.micro_batch_size}) exceeds batch_size ({self.batch_size})")
        if self.steps is not None and self.warmup_steps > self.steps:
            problems.append(f"warmup_steps ({self.warmup_steps}) exceeds the stage's steps ({self.steps})")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Determinism(Strict):
    """[determinism]: every knob that can change the bits; applied in determinism.py."""

    seed: Annotated[int, Field(ge=0, lt=1 << 63)]
    threads: Annotated[int, Field(gt=0, le=4096)] = 2
    interop_threads: Annotated[int, Field(gt=0, le=4096)] = 1
    deterministic_algorithms: bool = True
    matmul_precision: Literal["highest", "high", "medium"] = "highest"
    sdpa_backend: Literal["math", "flash", "efficient", "cudnn"] = "math"
    device: Literal["cpu", "cuda"] = "cpu"
    cpu_capability: Literal["native", "default", "avx2", "avx512"] = "native"
    cudnn_benchmark: bool = False
    allow_tf32: bool = False
    cublas_workspace_config: Literal[":4096:8", ":16:8"] = ":4096:8"
    # Portable mode (builder/portable.py, docs/reproducibility.md): float64 compute, float32 state
    # rounded after every step, values near a rounding boundary logged in the transcript.
    portable: bool = False
    portable_margin: Annotated[float, Field(gt=0, lt=0.5)] = 2.0 ** -16
    # Whose matrix products: "vendor" (PyTorch's: MKL, whose code branch depends on the CPU's vendor and
    # model) or "fixed-order" (builder/fixed_gemm.c: every sum in one order, the same bits on every x86-64 CPU).
    kernels: Literal["vendor", "fixed-order"] = "vendor"
    # How a step's gradient is summed: "canonical" (builder/train.py, docs/formats.md): each micro-batch's
    # gradient on its own, folded left to right over the global micro-batch index, then scaled by 1/tokens:
    # the same bits for any world size, node count or accumulation split of the same micro_batch_size.
    # "all-reduce": DistributedDataParallel's averaging (its order is the backend's; bits follow the topology).
    reduction: Literal["canonical", "all-reduce"] = "all-reduce"


class Toolchain(Strict):
    """[toolchain]: exact library versions; a mismatch stops the build unless allowed."""

    python: str | None = None
    torch: str
    transformers: str
    tokenizers: str
    safetensors: str | None = None
    allow_mismatch: bool = False


class Evaluate(Strict):
    """[evaluate]: the recitation probe (greedy continuation of windows inside training files)."""

    prompt_tokens: Size = 32
    continuation_tokens: Size = 64
    windows: Size = 64
    seed: NonNegInt = 0


class Reproducibility(Strict):
    """[reproducibility]: the fingerprint a build signs, and the tolerances another build is judged by.

    Defaults are justified by measurement in docs/reproducibility.md.
    """

    max_rel_l2: Annotated[float, Field(allow_inf_nan=False, ge=0)] = 0.6
    min_cosine: Annotated[float, Field(allow_inf_nan=False, ge=-1, le=1)] = 0.8
    max_eval_loss_diff: Annotated[float, Field(allow_inf_nan=False, ge=0)] = 5e-3
    min_greedy_agreement: Annotated[float, Field(allow_inf_nan=False, ge=0, le=1)] = 0.98
    max_recitation_rate_diff: Annotated[float, Field(allow_inf_nan=False, ge=0, le=1)] = 0.1
    eval_windows: Size = 16
    eval_tokens: Annotated[int, Field(ge=8, le=1 << 20)] = 64
    prompts: Size = 8
    prompt_tokens: Size = 16
    continuation_tokens: Size = 32
    projections: Annotated[int, Field(ge=1, le=64)] = 16
    seed: NonNegInt = 0

    def tolerances(self) -> dict[str, float]:
        return {"max_rel_l2": self.max_rel_l2, "min_cosine": self.min_cosine,
                "max_eval_loss_diff": self.max_eval_loss_diff, "min_greedy_agreement": self.min_greedy_agreement,
                "max_recitation_rate_diff": self.max_recitation_rate_diff}


class Limits(Strict):
    """[limits]: caps on what inputs may cost, so a hostile archive, server or path cannot exhaust the
    machine. Each is refused with exit 2 naming the limit."""

    max_download_bytes: Annotated[int, Field(gt=0, le=1 << 44)] = 4 << 30
    download_stall_seconds: Annotated[float, Field(allow_inf_nan=False, gt=0, le=86400)] = 60.0
    download_deadline_seconds: Annotated[float, Field(allow_inf_nan=False, gt=0, le=7 * 86400)] = 3600.0
    # curl's --speed-limit / --speed-time: slower than this many bytes per second over a whole window
    # stops the download (a server that trickles a byte every few seconds never trips the stall limit)
    download_min_bytes_per_second: Annotated[int, Field(ge=0, le=1 << 30)] = 1024
    download_rate_window_seconds: Annotated[float, Field(allow_inf_nan=False, gt=0, le=86400)] = 60.0
    max_extracted_bytes: Annotated[int, Field(gt=0, le=1 << 44)] = 8 << 30
    max_extracted_files: Annotated[int, Field(gt=0, le=1 << 24)] = 500_000


class Checkpoint(Strict):
    """[checkpoint]: when a build writes resumable checkpoints into OUT/checkpoint/ (they never change
    the bits; scheduled ones are recorded in the transcript)."""

    every_steps: PosInt | None = None
    every_minutes: Annotated[float, Field(allow_inf_nan=False, gt=0, le=7 * 24 * 60)] | None = 30.0
    keep: Annotated[int, Field(gt=0, le=1000)] = 2
    keep_for_replay: bool = False


class Audit(Strict):
    """[audit]: the memorization audit every build runs (provenance/audit/memorization.py)."""

    prefix_tokens: Annotated[list[Annotated[int, Field(gt=0, le=4096)]], Field(min_length=1, max_length=8)] = \
        [16, 32, 64, 128]
    suffix_tokens: Annotated[int, Field(gt=0, le=1024)] = 50
    windows_per_file: Annotated[int, Field(gt=0, le=1000)] = 8
    header_tokens: Annotated[int, Field(gt=0, le=4096)] = 256
    seed: NonNegInt = 0
    # Files of the same inputs that were not trained on, measured the same way (the control).
    control_include: list[str] = []
    control_exclude: list[str] = []


class Output(Strict):
    """[output]: what the built model declares about itself."""

    license: str
    # false: the inputs are not to be redistributed, so `provenance source` writes no archive
    source_bundle: bool = True


class Recipe(Strict):
    recipe: Meta
    inputs: Annotated[list[Input], Field(min_length=1)]
    dataset: Dataset
    layout: Layout = Layout()
    tokenizer: Tokenizer
    model: Model
    stages: Annotated[list[Stage], Field(min_length=1)]
    determinism: Determinism
    toolchain: Toolchain
    evaluate: Evaluate = Evaluate()
    audit: Audit = Audit()
    reproducibility: Reproducibility = Reproducibility()
    limits: Limits = Limits()
    checkpoint: Checkpoint = Checkpoint()
    output: Output

    @model_validator(mode="after")
    def _cross(self) -> Recipe:
        problems = []
        for what, names in (("inputs", [i.name for i in self.inputs]), ("stages", [s.name for s in self.stages])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                problems.append(f"{what}: names must be unique, repeated: {dup}")
        for field in ("bos_token", "eos_token", "pad_token"):
            tok = getattr(self.model, field)
            if tok not in self.tokenizer.special_tokens:
                problems.append(f"model.{field}: {tok!r} is not in tokenizer.special_tokens")
        for i, stage in enumerate(self.stages):
            if stage.seq_len > self.model.max_position_embeddings:
                problems.append(
                    f"stages[{i}].seq_len: {stage.seq_len} exceeds model.max_position_embeddings "
                    f"({self.model.max_position_embeddings})"
                )
        problems.extend(_parent_problems(self))
        if self.determinism.portable:
            problems.extend(_portable_problems(self))
        elif self.model.attn_implementation in ("small-head", "tiled"):
            problems.extend(_kernel_problems(self))
        if self.determinism.kernels == "fixed-order":
            problems.extend(_fixed_order_problems(self))
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _parent_problems(recipe: Recipe) -> list[str]:
    """What a fine-tune (a model input and `init = "parent"`) needs, as `field: problem` strings."""
    models = [i for i, inp in enumerate(recipe.inputs) if inp.kind == "model"]
    inits = [i for i, s in enumerate(recipe.stages) if s.init == "parent"]
    problems = []
    if len(models) > 1:
        problems.append(f"inputs[{models[1]}]: a recipe has at most one model input (its parent)")
    if inits and inits != [0]:
        problems.append(f"stages[{inits[-1]}].init: only the first stage can start from the parent's weights")
    if models and not inits:
        problems.append(f"inputs[{models[0]}]: a model input is the parent of a fine-tune: set "
                        "stages[0].init = \"parent\"")
    if inits and not models:
        problems.append("stages[0].init: 'parent' needs an input of kind = \"model\" (the parent)")
    if inits and recipe.determinism.portable:
        problems.append("stages[0].init: a portable build starts from its own float64 initialisation; fine-tuning "
                        "a parent in portable mode is not supported")
    return problems


def _kernel_problems(recipe: Recipe) -> list[str]:
    """What our attention kernels ("small-head", "tiled") need, as `field: problem` strings (empty when fine)."""
    m = recipe.model
    name = m.attn_implementation
    problems = []
    head_dim = m.hidden_size // m.num_attention_heads
    if name == "small-head" and head_dim > 8:
        problems.append(f"model.attn_implementation: 'small-head' is for heads of dimension <= 8; this model's are "
                        f"{head_dim} (hidden_size / num_attention_heads): use 'sdpa'"
                        + (", or 'tiled'" if head_dim % 16 == 0 else ""))
    if name == "tiled" and (head_dim % 16 or head_dim > 1024):
        problems.append(f"model.attn_implementation: 'tiled' is for heads of dimension 16, 32, 48, ... (a multiple of "
                        f"16, at most 1024); this model's are {head_dim} (hidden_size / num_attention_heads): use "
                        + ("'small-head' or 'sdpa'" if head_dim <= 8 else "'sdpa'"))
    if recipe.determinism.device != "cpu":
        problems.append(f"model.attn_implementation: {name!r} runs on the CPU; determinism.device is 'cuda'")
    for i, s in enumerate(recipe.stages):
        if s.precision != "float32":
            problems.append(f"stages[{i}].precision: {name!r} attention computes in float32; {s.precision!r} "
                            "is not allowed with it")
        if name == "tiled" and s.seq_len > 4096:
            problems.append(f"stages[{i}].seq_len: 'tiled' attention takes sequences of at most 4096 positions "
                            f"(it keeps two seq_len x seq_len matrices per thread); this stage's are {s.seq_len}")
    return problems


def _fixed_order_problems(recipe: Recipe) -> list[str]:
    """What fixed-order kernels cannot hold to, as `field: problem` strings (empty when fine)."""
    det = recipe.determinism
    problems = []
    if det.device != "cpu":
        problems.append("determinism.kernels: 'fixed-order' is our CPU GEMM; determinism.device is 'cuda', whose "
                        "products are cuBLAS's")
    if det.portable:
        problems.append("determinism.kernels: 'fixed-order' computes float32 products; portable mode computes in "
                        "float64 (it is vendor-independent on its own)")
    if det.sdpa_backend != "math":
        problems.append(f"determinism.sdpa_backend: 'fixed-order' kernels need 'math' (SDPA's {det.sdpa_backend!r} "
                        "CPU kernel calls the vendor's BLAS directly, where no fixed-order product can stand in)")
    if det.cpu_capability == "native":
        problems.append("determinism.kernels: 'fixed-order' fixes the products, not ATen's other kernels: pin "
                        "determinism.cpu_capability ('avx2' runs the same ATen code on every x86-64 vendor)")
    return problems + _other_precisions(recipe, "'fixed-order' kernels compute float32 products; {} (autocast) would "
                                                "send them elsewhere")


def _portable_problems(recipe: Recipe) -> list[str]:
    """What a portable recipe may not use, as `field: problem` strings (empty when fine)."""
    det = recipe.determinism
    problems = []
    if det.device != "cpu":
        problems.append("determinism.device: portable mode runs on the CPU (float64 on CUDA is not measured)")
    if det.sdpa_backend != "math":
        problems.append("determinism.sdpa_backend: portable mode needs 'math' (float64 attention)")
    if recipe.model.attn_implementation != "sdpa":
        problems.append("model.attn_implementation: portable mode needs 'sdpa' (eager attention's softmax is "
                        "float32 in transformers, and 'small-head' and 'tiled' compute in float32)")
    return problems + _other_precisions(recipe, "portable mode computes in float64; {} is not allowed")


def _other_precisions(recipe: Recipe, why: str) -> list[str]:
    """`stages[i].precision: why` for every stage not in float32 (`why` names the precision as {})."""
    return [f"stages[{i}].precision: " + why.format(repr(s.precision)) for i, s in enumerate(recipe.stages)
            if s.precision != "float32"]


class Export(Strict):
    """[export]: a deterministic transform of the parent's weights (builder/export.py)."""

    # "bfloat16": every floating-point tensor cast to bfloat16, rounding to nearest, ties to even.
    # "int8": each weight matrix quantized per output row, symmetric, absmax scale (docs/recipe.md).
    transform: Literal["bfloat16", "int8"]


class ExportRecipe(Strict):
    """An export: a recipe whose one input is a parent model and whose build is a transform of its weights
    (docs/recipe.md, "Exports")."""

    recipe: Meta
    inputs: Annotated[list[Input], Field(min_length=1, max_length=1)]
    export: Export
    toolchain: Toolchain
    output: Output

    @model_validator(mode="after")
    def _parent(self) -> ExportRecipe:
        if self.inputs[0].kind != "model":
            raise ValueError("an export's one input is the model it transforms: kind = \"model\"")
        return self


def parent_input(recipe: Recipe | ExportRecipe) -> Input | None:
    """The recipe's model input (the parent of a fine-tune), if it has one."""
    return next((i for i in recipe.inputs if i.kind == "model"), None)


class LoadedRecipe:
    """A validated recipe with the file it came from and that file's digests."""

    def __init__(self, path: Path, text: str, recipe: Recipe, digests: dict[str, str]) -> None:
        self.path, self.text, self.recipe, self.digests = path, text, recipe, digests

    @property
    def name(self) -> str:
        return self.recipe.recipe.name


class LoadedExport:
    """A validated export recipe with the file it came from and that file's digests."""

    def __init__(self, path: Path, text: str, recipe: ExportRecipe, digests: dict[str, str]) -> None:
        self.path, self.text, self.recipe, self.digests = path, text, recipe, digests

    @property
    def name(self) -> str:
        return self.recipe.recipe.name


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def format_errors(path: Path, err: ValidationError, *, what: str = "recipe", doc: str = "docs/recipe.md") -> str:
    """Every problem pydantic found in `path`, a `what` file whose format `doc` documents."""
    lines = [f"{path}: {err.error_count()} problem(s) in the {what}:"]
    for e in err.errors(include_url=False):
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown field (not part of the {what} format, see {doc})"
        elif e["type"] == "missing":
            msg = "required field is missing"
        got = "" if e["type"] in ("missing", "value_error") else f" (got {e.get('input')!r})"
        lines.append(f"  {_loc(e['loc'])}: {msg}{got}")
    return "\n".join(lines)


def _toml(path: Path, text: str) -> dict[str, object]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML: {e}") from None


def parse_recipe(path: Path, text: str) -> Recipe:
    data = _toml(path, text)
    if "export" in data:
        raise InputError(f"{path}: an export recipe ([export]) is built with `provenance build` and rebuilt with "
                         "`provenance rebuild`; this command takes a training recipe")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise InputError(format_errors(path, e)) from None


def _read(path: Path) -> tuple[bytes, str]:
    from .._internal.reading import read_regular_file

    raw = read_regular_file(path, "recipe", MAX_RECIPE_BYTES)
    try:
        return raw, raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: recipe is not UTF-8 text") from None


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read and validate a (training) recipe file. Raises InputError listing every problem."""
    path = Path(path)
    raw, text = _read(path)
    return LoadedRecipe(path, text, parse_recipe(path, text), hash_bytes(raw))


def load_any_recipe(path: str | Path) -> LoadedRecipe | LoadedExport:
    """A training recipe, or an export recipe (one with an [export] table)."""
    path = Path(path)
    raw, text = _read(path)
    if "export" not in _toml(path, text):
        return LoadedRecipe(path, text, parse_recipe(path, text), hash_bytes(raw))
    try:
        return LoadedExport(path, text, ExportRecipe.model_validate(_toml(path, text)), hash_bytes(raw))
    except ValidationError as e:
        raise InputError(format_errors(path, e, what="export recipe")) from None
