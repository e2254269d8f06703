"""A GGUF file's header, walked before the gguf package reads the file.

Every count and length in the header is checked against the bytes left in the file, so a
truncated or corrupt file fails at once with a ValueError naming it and what is wrong. (The gguf
reader trusts the counts: a header claiming 2**40 tensors looped for seconds before an
OverflowError, a claimed 2**50-entry array was allocated, and random bytes after the magic gave
"cannot fit 'int' into an offset-sized integer"; none named the file.)

Layout (little-endian): magic "GGUF", version u32, tensor count u64, metadata count u64; each
metadata field a key string, a value type u32 and its value; each tensor a name string, n_dims
u32, n_dims u64 dims, a ggml type u32 and a data offset u64. A string is a u64 length and its
bytes; an array is an element type u32, a u64 count and the elements.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

VERSIONS = (2, 3)  # the versions the gguf package reads
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9


def tensor_type_ids(path: Path) -> dict[str, int]:
    """Tensor name -> raw ggml type id, read from the header of the GGUF file at `path` (whose
    first four bytes are b"GGUF"). Raises ValueError naming `path` when the header runs past the
    end of the file or holds an implausible count, length or type."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        header = _Header(buf, path)
        try:
            return header.read()
        except RecursionError:  # arrays nested thousands deep
            raise header.fail("metadata arrays nested too deep") from None


class _Header:
    """A cursor over the header bytes that refuses to read, skip or count past their end."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path} ({len(self.buf)} bytes): {what}; the file is truncated "
                          f"or corrupt (not a GGUF file gguf can read)")

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        if size > self.left():
            raise self.fail(f"the header ends inside {what} at byte {self.pos}")
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return values

    def skip(self, size: int, what: str) -> None:
        if size > self.left():
            raise self.fail(f"{what} needs {size} bytes at byte {self.pos}, past the end")
        self.pos += size

    def fits(self, count: int, each: int, what: str) -> None:
        """`count` items of at least `each` bytes must fit in what is left of the file."""
        if count * each > self.left():
            raise self.fail(f"the header claims {count} {what}, more than the {self.left()} "
                            f"bytes left can hold (at least {each} bytes each)")

    def string(self, what: str) -> bytes:
        (n,) = self.take("Q", f"the length of {what}")
        start = self.pos
        self.skip(n, what)
        return bytes(self.buf[start:self.pos])

    def value(self, kind: int, what: str) -> None:
        if kind in SCALAR_BYTES:
            self.skip(SCALAR_BYTES[kind], what)
        elif kind == STRING:
            self.string(what)
        elif kind == ARRAY:
            inner, n = self.take("IQ", f"the element type and count of {what}")
            if inner in SCALAR_BYTES:
                self.fits(n, SCALAR_BYTES[inner], f"elements in {what}")
                self.pos += n * SCALAR_BYTES[inner]
            elif inner in (STRING, ARRAY):
                self.fits(n, 8 if inner == STRING else 12, f"elements in {what}")
                for _ in range(n):
                    self.value(inner, f"an element of {what}")
            else:
                raise self.fail(f"{what} has element type id {inner}; expected 0..12")
        else:
            raise self.fail(f"{what} has value type id {kind}; expected 0..12")

    def read(self) -> dict[str, int]:
        self.skip(4, "the magic")
        (version,) = self.take("I", "the version")
        if version not in VERSIONS:
            raise self.fail(f"GGUF version {version}; expected one of {list(VERSIONS)}")
        n_tensors, n_fields = self.take("QQ", "the tensor and metadata counts")
        self.fits(n_fields, 8 + 4 + 1, "metadata fields")  # key length, value type, a value
        self.fits(n_tensors, 8 + 4 + 4 + 8, "tensors")  # name length, n_dims, type, offset
        for i in range(n_fields):
            key = self.string(f"metadata key {i}").decode("utf-8", "replace")
            (kind,) = self.take("I", f"the value type of metadata {key!r}")
            self.value(kind, f"metadata {key!r}")
        ids = {}
        for i in range(n_tensors):
            name = self.string(f"the name of tensor {i}").decode("utf-8", "replace")
            (n_dims,) = self.take("I", f"tensor {name!r}")
            if n_dims > MAX_DIMS:
                raise self.fail(f"tensor {name!r} claims {n_dims} dims; ggml has at most "
                                f"{MAX_DIMS}")
            self.skip(8 * n_dims, f"the dims of tensor {name!r}")
            ids[name] = self.take("IQ", f"tensor {name!r}")[0]
        return ids
