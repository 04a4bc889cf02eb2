"""`NpyMember`: a `.npy` member of a shard read by offset, so a clip reads only its own rows."""

from __future__ import annotations

import os
import tarfile
import tokenize
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.shards.schema import ShardFormatError

# what numpy raises on a damaged `.npy` header: it parses the header's dict text with Python's tokenizer
NPY_HEADER_ERRORS = (ValueError, SyntaxError, tokenize.TokenError, UnicodeDecodeError)


_OPEN_FILES: dict[str, int] = {}  # path -> file descriptor, this process's few most recently read shards
_MAX_OPEN_FILES = 64


def _pread(path: str, size: int, offset: int) -> bytes:
    """`size` bytes at `offset` of `path`, through a small cache of open descriptors (positional reads)."""
    fd = _OPEN_FILES.pop(path, None)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        if len(_OPEN_FILES) >= _MAX_OPEN_FILES:
            os.close(_OPEN_FILES.pop(next(iter(_OPEN_FILES))))
    _OPEN_FILES[path] = fd  # most recent last
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise ShardFormatError(f"{path}: {size} bytes wanted at offset {offset}, {len(data)} there (truncated?)")
    return data


@dataclass(frozen=True)
class NpyMember:
    """An uncompressed `.npy` member of a shard, read on demand: indexing the first axis (an int, a slice of step
    1, or a list of ints) reads only those rows, by offset. What training holds instead of whole arrays, so a clip
    of 16 frames reads 16 frames of a 100-frame segment, and a skipped batch reads nothing but headers."""

    path: str
    offset: int  # of the array data in the file
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, start: int, stop: int) -> np.ndarray:
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        data = _pread(self.path, (stop - start) * row, self.offset + start * row)
        return np.frombuffer(data, self.dtype).reshape(stop - start, *self.shape[1:])

    def __getitem__(self, index: int | slice | list[int] | np.ndarray) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("NpyMember reads contiguous rows only (slice step 1)")
            return self._rows(start, max(start, stop))
        if isinstance(index, (int, np.integer)):
            return self._rows(*slice(index, index + 1).indices(len(self))[:2])[0]
        rows = [int(i) for i in index]
        if rows and rows == list(range(rows[0], rows[0] + len(rows))) and 0 <= rows[0] and rows[-1] < len(self):
            return self._rows(rows[0], rows[-1] + 1)  # consecutive rows (a clip's motion frames): one read
        return np.stack([self[i] for i in rows])

    @classmethod
    def from_tar(cls, path: str, member: tarfile.TarInfo, fileobj: Any) -> "NpyMember":
        """Parse the member's `.npy` header (from `fileobj`, the member's data) and check that the data the header
        promises is exactly what the member holds: C-ordered, no objects, no missing or extra bytes."""
        try:
            version = np.lib.format.read_magic(fileobj)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fileobj)
        except NPY_HEADER_ERRORS as err:
            raise ShardFormatError(f"{path}: {member.name}: unreadable .npy header ({err})") from err
        if dtype.hasobject or fortran:
            raise ShardFormatError(f"{path}: {member.name}: an {'object' if dtype.hasobject else 'F-ordered'} array "
                                   "(refused; nothing is unpickled)")
        header = fileobj.tell()
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if header + nbytes != member.size:
            raise ShardFormatError(f"{path}: {member.name}: {member.size - header} data bytes, its header "
                                   f"{dtype} {tuple(shape)} needs {nbytes}")
        return cls(path, member.offset_data + header, tuple(shape), dtype)
