"""provenance: rebuild model weights from a pinned recipe and prove where they came from.

The pipeline reads top to bottom: recipe -> store -> dataset -> tokenizer -> train -> build.
"""

__version__ = "0.1.0"
