"""Errors that reach the user, each carrying its exit code.

The CLI catches `ProvenanceError` once around every command and prints
`diagnostics()` without a traceback (README.md: 2 = could not check, 1 = checked and failed).
"""

from __future__ import annotations


class ProvenanceError(Exception):
    """Something could not be done or checked: bad input, missing file, unreachable source."""

    exit_code = 2

    def diagnostics(self) -> str:
        return str(self)


class InputError(ProvenanceError):
    """A recipe, file or command-line value is malformed."""


class DigestMismatch(ProvenanceError):
    """Content did not match its pin. Exit 2: the build cannot go on from unpinned bytes."""

    def __init__(self, what: str, algorithm: str, expected: str, actual: str) -> None:
        self.what, self.algorithm, self.expected, self.actual = what, algorithm, expected, actual
        super().__init__(
            f"digest mismatch for {what}: expected {algorithm}:{expected}, got {algorithm}:{actual}"
        )


class UnsafeArchive(ProvenanceError):
    """An archive member would land outside its root, or is a device or special file."""


class FetchError(ProvenanceError):
    """An input could not be obtained (offline, unreachable host, missing local file)."""


class ToolchainMismatch(ProvenanceError):
    """Installed library versions differ from the recipe's pins."""


class CheckFailed(ProvenanceError):
    """A check ran and failed (digest, signature, policy, divergence)."""

    exit_code = 1


class Interrupted(ProvenanceError):
    """SIGINT or SIGTERM during training: a checkpoint was written and the build can be resumed."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RankFailed(ProvenanceError):
    """A distributed build lost a rank or its network: a collective failed or timed out."""
