"""The builder: tokenizer, determinism, the training loop, evaluation, the fingerprint, and the
pipeline that runs them (builder/pipeline.py). Nothing in verify/ imports from here."""
