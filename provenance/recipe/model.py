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

from .._internal.hashing import hash_file
from ..errors import InputError

Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)]
PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
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
    kind: Literal["pypi", "url", "path"]
    package: str | None = None
    version: str | None = None
    url: str | None = None
    path: str | None = None
    filename: str | None = None
    sha256: Hex64 | None = None
    blake3: Hex64 | None = None
    license: str = "NOASSERTION"
    extract: bool | None = None

    @model_validator(mode="after")
    def _kind_fields(self) -> Input:
        problems = []
        if self.sha256 is None and self.blake3 is None:
            problems.append("an input must be pinned: set sha256 and/or blake3")
        wanted = {"pypi": ("package", "version"), "url": ("url",), "path": ("path",)}[self.kind]
        for field in wanted:
            if getattr(self, field) is None:
                problems.append(f"kind = {self.kind!r} needs '{field}'")
        for field in ("package", "version", "url", "path"):
            if field not in wanted and getattr(self, field) is not None:
                problems.append(f"'{field}' does not apply to kind = {self.kind!r}")
        if self.kind == "url" and self.url and not re.match(r"^https?://", self.url):
            problems.append(f"url must start with http:// or https://, got {self.url!r}")
        if self.kind == "pypi" and self.version and not re.match(r"^[0-9][0-9A-Za-z.+!-]*$", self.version):
            problems.append(f"version must be an exact release such as '1.2.3', got {self.version!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def artifact_name(self) -> str:
        """The file name the artifact is stored under; its suffix decides extraction."""
        if self.filename:
            return self.filename
        if self.kind == "url":
            return self.url.rstrip("/").rsplit("/", 1)[-1] or self.name
        if self.kind == "path":
            return Path(self.path).name
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
            raise ValueError(f"template may use only {{path}} and {{content}}, found {sorted(fields - {'content', 'path'})}")
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
    hidden_size: PosInt
    intermediate_size: PosInt
    num_hidden_layers: PosInt
    num_attention_heads: PosInt
    num_key_value_heads: PosInt
    max_position_embeddings: PosInt
    rms_norm_eps: Annotated[float, Field(gt=0)] = 1e-6
    rope_theta: Annotated[float, Field(gt=0)] = 10000.0
    hidden_act: Literal["silu"] = "silu"
    tie_word_embeddings: bool = False
    initializer_range: Annotated[float, Field(gt=0)] = 0.02
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"
    bos_token: str
    eos_token: str
    pad_token: str

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


class Stage(Strict):
    """[[stages]]: one training stage; the optimizer starts afresh in each."""

    name: Name
    lr: Annotated[float, Field(gt=0)]
    batch_size: PosInt
    epochs: PosInt | None = None
    steps: PosInt | None = None
    warmup_steps: NonNegInt = 0
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0
    optimizer: Literal["adamw"] = "adamw"
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    eps: Annotated[float, Field(gt=0)] = 1e-8
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    seq_len: PosInt
    stride: PosInt | None = None
    phases: PosInt = 1
    precision: Literal["float32", "bf16-autocast"] = "float32"

    @model_validator(mode="after")
    def _length(self) -> Stage:
        problems = []
        if (self.epochs is None) == (self.steps is None):
            problems.append("set exactly one of 'epochs' or 'steps'")
        if self.stride is not None and self.stride > self.seq_len:
            problems.append(f"stride ({self.stride}) must not exceed seq_len ({self.seq_len})")
        if self.phases > self.seq_len:
            problems.append(f"phases ({self.phases}) must not exceed seq_len ({self.seq_len})")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Determinism(Strict):
    """[determinism]: every knob that can change the bits; applied in determinism.py."""

    seed: Annotated[int, Field(ge=0, lt=1 << 63)]
    threads: PosInt = 2
    interop_threads: PosInt = 1
    deterministic_algorithms: bool = True
    matmul_precision: Literal["highest", "high", "medium"] = "highest"
    sdpa_backend: Literal["math", "flash", "efficient", "cudnn"] = "math"
    device: Literal["cpu", "cuda"] = "cpu"
    cpu_capability: Literal["native", "default", "avx2", "avx512"] = "native"
    cudnn_benchmark: bool = False
    allow_tf32: bool = False
    cublas_workspace_config: Literal[":4096:8", ":16:8"] = ":4096:8"


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

    prompt_tokens: PosInt = 32
    continuation_tokens: PosInt = 64
    windows: PosInt = 64
    seed: NonNegInt = 0


class Reproducibility(Strict):
    """[reproducibility]: the fingerprint a build signs, and the tolerances another build is judged by.

    Defaults are justified by measurement in docs/reproducibility.md.
    """

    max_rel_l2: Annotated[float, Field(ge=0)] = 0.6
    min_cosine: Annotated[float, Field(ge=-1, le=1)] = 0.8
    max_eval_loss_diff: Annotated[float, Field(ge=0)] = 5e-3
    min_greedy_agreement: Annotated[float, Field(ge=0, le=1)] = 0.98
    max_recitation_rate_diff: Annotated[float, Field(ge=0, le=1)] = 0.1
    eval_windows: PosInt = 16
    eval_tokens: Annotated[int, Field(ge=8)] = 64
    prompts: PosInt = 8
    prompt_tokens: PosInt = 16
    continuation_tokens: PosInt = 32
    projections: Annotated[int, Field(ge=1, le=64)] = 16
    seed: NonNegInt = 0

    def tolerances(self) -> dict:
        return {"max_rel_l2": self.max_rel_l2, "min_cosine": self.min_cosine,
                "max_eval_loss_diff": self.max_eval_loss_diff, "min_greedy_agreement": self.min_greedy_agreement,
                "max_recitation_rate_diff": self.max_recitation_rate_diff}


class Output(Strict):
    """[output]: what the built model declares about itself."""

    license: str


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
    reproducibility: Reproducibility = Reproducibility()
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
        if problems:
            raise ValueError("; ".join(problems))
        return self


class LoadedRecipe:
    """A validated recipe with the file it came from and that file's digests."""

    def __init__(self, path: Path, text: str, recipe: Recipe, digests: dict[str, str]) -> None:
        self.path, self.text, self.recipe, self.digests = path, text, recipe, digests

    @property
    def name(self) -> str:
        return self.recipe.recipe.name


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: {err.error_count()} problem(s) in the recipe:"]
    for e in err.errors(include_url=False):
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not part of the recipe format, see docs/recipe.md)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        got = "" if e["type"] in ("missing", "value_error") else f" (got {e.get('input')!r})"
        lines.append(f"  {_loc(e['loc'])}: {msg}{got}")
    return "\n".join(lines)


def parse_recipe(path: Path, text: str) -> Recipe:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML: {e}") from None
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise InputError(format_errors(path, e)) from None


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read and validate a recipe file. Raises InputError listing every problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read recipe: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: recipe is not UTF-8 text") from None
    recipe = parse_recipe(path, text)
    return LoadedRecipe(path, text, recipe, hash_file(path))
