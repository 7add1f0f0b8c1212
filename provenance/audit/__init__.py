"""The memorization audit of a built model (memorization.py); see docs/audit.md."""
