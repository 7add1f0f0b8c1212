"""Reading safetensors files without torch, and checking their structure exactly.

A file is well formed when: an 8-byte little-endian header length N, N bytes of UTF-8 JSON (a
strict object: no duplicate keys), optional `__metadata__` mapping strings to strings, and every
other key a tensor `{dtype, shape, data_offsets}` whose byte length equals its element count
times its dtype's size; the tensors, taken in offset order, tile the data region exactly: the
first starts at 0, each starts where the previous ends, the last ends at the end of the file.
So no byte of the file is outside the header or a tensor: nothing can be appended, hidden
between tensors or shared by two of them. (The `safetensors` library refuses such files too.)
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from . import jsonstrict

MAX_HEADER = 100 << 20
MAX_RANK = 64  # numpy's limit; a header may not make the element count's product a quadratic-time job
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
               "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4"}


class SafetensorsError(ValueError):
    """The file is not a well-formed safetensors file; the message says where."""


class TensorInfo(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    start: int  # offsets within the data region
    end: int


class Header(NamedTuple):
    length: int  # N, the JSON header's byte length
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]

    @property
    def data_start(self) -> int:
        return 8 + self.length


def parse_header(head: bytes, size: int) -> Header:
    """Validate the header of a file of `size` bytes whose first bytes are `head` (at least 8 + N).

    Raises SafetensorsError naming the first problem."""
    if size < 8 or len(head) < 8:
        raise SafetensorsError(f"file of {size} bytes is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER:
        raise SafetensorsError(f"header length {n} exceeds the {MAX_HEADER}-byte limit")
    if 8 + n > size:
        raise SafetensorsError(f"header length {n} runs past the end of the {size}-byte file")
    raw = bytes(head[8:8 + n])
    if not raw.startswith(b"{"):
        raise SafetensorsError("header does not start with '{'")
    try:
        obj = jsonstrict.loads(raw)
    except ValueError as e:
        raise SafetensorsError(f"header is not strict JSON: {e}") from None
    if not isinstance(obj, dict):
        raise SafetensorsError("header is not a JSON object")
    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k,
                                                 v in metadata.items()):
        raise SafetensorsError("__metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, info in obj.items():
        if not name:
            raise SafetensorsError("a tensor has an empty name")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"tensor {name!r}: expected exactly dtype, shape and data_offsets")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise SafetensorsError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise SafetensorsError(f"tensor {name!r}: shape must be a list of non-negative integers")
        if len(shape) > MAX_RANK:
            raise SafetensorsError(f"tensor {name!r}: {len(shape)} dimensions, more than {MAX_RANK}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise SafetensorsError(f"tensor {name!r}: data_offsets {offs!r} must be [begin, end] with 0 <= begin <= "
                                   f"end")
        want = _nbytes(shape, DTYPE_SIZES[dtype], size)
        if want is None:
            raise SafetensorsError(f"tensor {name!r}: shape of {len(shape)} dimension(s) holds more bytes than the "
                                   f"{size}-byte file")
        if offs[1] - offs[0] != want:
            raise SafetensorsError(f"tensor {name!r}: {offs[1] - offs[0]} bytes for {dtype} {shape}, expected {want}")
        tensors[name] = TensorInfo(dtype, tuple(shape), offs[0], offs[1])
    data_len = size - 8 - n
    pos = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start != pos:
            what = ("overlaps the previous tensor" if t.start < pos
                    else f"leaves a gap of {t.start - pos} bytes before it")
            raise SafetensorsError(f"tensor {name!r} at data offset {t.start} {what}")
        pos = t.end
    if pos != data_len:
        if pos > data_len:
            raise SafetensorsError(f"tensors end at data offset {pos}, past the end of the file ({data_len} data "
                                   f"bytes)")
        raise SafetensorsError(f"{data_len - pos} byte(s) after the last tensor: the tensors must cover the file "
                               f"exactly")
    return Header(n, metadata, tensors)


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int | None:
    """The byte length of a tensor of `shape`, or None once it passes `limit` (then no tensor of it
    fits the file, and the product is not carried on: its digits would grow with every dimension)."""
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > limit:
            return None
    return n


def check_fd(fd: int) -> Header:
    """Validate the safetensors file open on `fd`. Raises SafetensorsError."""
    size = os.fstat(fd).st_size
    if size < 8:
        raise SafetensorsError(f"file of {size} bytes is shorter than the 8-byte header length")
    first = os.pread(fd, 8, 0)
    (n,) = struct.unpack("<Q", first)
    head = first + os.pread(fd, min(n, MAX_HEADER, size - 8), 8)
    return parse_header(head, size)


class Checked:
    """A validated safetensors file mapped read-only; `data(name)` is a zero-copy view of one tensor."""

    def __init__(self, header: Header, buf: mmap.mmap | bytes) -> None:
        self.header, self._buf = header, buf

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.header.tensors

    def data(self, name: str) -> memoryview:
        t = self.header.tensors[name]
        base = self.header.data_start
        return memoryview(self._buf)[base + t.start: base + t.end]


@contextmanager
def open_checked(path: Path) -> Iterator[Checked]:
    """Open, validate and map a safetensors file. Raises SafetensorsError or OSError."""
    with open(path, "rb") as f:
        header = check_fd(f.fileno())
        size = os.fstat(f.fileno()).st_size
        buf = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        view = Checked(header, buf)
        try:
            yield view
        finally:
            view._buf = b""
            try:
                buf.close()
            except BufferError:  # a caller still holds a view; the map closes when it is dropped
                pass


def _stored_tensors(path: Path) -> Iterator[tuple[str, str, list[int], Any]]:
    """(name, dtype, shape, its bytes as a read-only uint8 array) for each tensor of a validated file."""
    import numpy as np

    with open(path, "rb") as f:
        header = check_fd(f.fileno())
    if not header.tensors:
        return
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=header.data_start)
    for name, t in header.tensors.items():
        yield name, t.dtype, list(t.shape), data[t.start:t.end]


def read_float_tensors(path: Path) -> dict[str, Any]:
    """Every tensor of a validated safetensors file as a numpy float array: F64 and F32 as stored, F16 and
    BF16 widened to float32, exactly (every value of either is a float32; a bfloat16 is a float32's upper
    16 bits). Raises SafetensorsError for a malformed file or a tensor of any other dtype."""
    import numpy as np

    out: dict[str, Any] = {}
    for name, dtype, shape, raw in _stored_tensors(path):
        if dtype in ("F64", "F32"):
            a = np.frombuffer(raw, dtype=np.dtype(NUMPY_DTYPES[dtype]))
        elif dtype == "F16":
            a = np.frombuffer(raw, dtype=np.dtype("<f2")).astype(np.float32)
        elif dtype == "BF16":
            a = (np.frombuffer(raw, dtype=np.dtype("<u2")).astype(np.dtype("<u4")) << 16).view(np.dtype("<f4"))
        else:
            raise SafetensorsError(f"tensor {name!r} has dtype {dtype}; only floating-point tensors (F64, F32, F16, "
                                   "BF16) are read as numbers here")
        out[name] = a.reshape(shape)
    return out


def read_tensors(path: Path) -> dict[str, Any]:
    """Every tensor of a validated safetensors file as a read-only numpy array (memory-mapped).

    Raises SafetensorsError for a malformed file or a dtype numpy cannot represent."""
    import numpy as np

    out: dict[str, Any] = {}
    for name, dtype, shape, raw in _stored_tensors(path):
        if dtype not in NUMPY_DTYPES:
            raise SafetensorsError(f"tensor {name!r} has dtype {dtype}; only {', '.join(NUMPY_DTYPES)} can be "
                                   "compared numerically")
        out[name] = np.frombuffer(raw, dtype=np.dtype(NUMPY_DTYPES[dtype])).reshape(shape)
    return out
