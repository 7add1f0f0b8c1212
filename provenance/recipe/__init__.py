"""The recipe: the TOML source of a build (models, loader); see recipe/model.py and docs/recipe.md."""

from .model import (  # noqa: F401
    Audit,
    ARCHIVE_SUFFIXES, Checkpoint, Dataset, Determinism, Evaluate, Input, Layout, Limits, LoadedRecipe, Meta, Model, Output, Recipe,
    Reproducibility, Stage, Tokenizer, Toolchain, format_errors, load_recipe, parse_recipe,
)
