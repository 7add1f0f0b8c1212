"""Reading files that a user or an attacker names: only regular files, only up to a limit.

A recipe, policy, key or attestation path might name a FIFO (a read that blocks forever), a
device such as /dev/zero (a read that never ends) or a huge file; each is refused at once, with
exit 2 and the limit named, before anything is read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import InputError


def read_regular_file(path: Path, what: str, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Raises InputError for anything else
    (a FIFO, a device such as /dev/zero, a directory, an oversized file) without blocking on it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise InputError(f"{path}: cannot read {what}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path}: {what} is not a regular file")
        if st.st_size > limit:
            raise InputError(f"{path}: {what} is {st.st_size} bytes, over the {limit}-byte limit")
        chunks, left = [], limit + 1
        while left > 0:
            b = os.read(fd, min(left, 1 << 20))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
        if len(data) > limit:
            raise InputError(f"{path}: {what} grew past the {limit}-byte limit while being read")
        return data
    finally:
        os.close(fd)
