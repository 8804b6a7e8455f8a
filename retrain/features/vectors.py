"""Vectors by key for one run: appended to an anonymous file as extraction computes them, read
back a few rows at a time (``VectorStore``), and served to the streaming head (``StoredVectors``);
the cache itself is in bottlenecks.py."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


class VectorStore(Mapping):
    """Vectors by key, kept in an anonymous temporary file rather than in memory.

    Extraction appends each batch's vectors here as it goes, so its memory does not grow with
    the number of images; reading maps the file. The file lives beside the cache shards (on
    the same disk; the system's temporary folder when that is read-only) and has no name, so
    nothing is left behind when the process ends, however it ends.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self._directory = directory
        self._file = None
        self._rows: dict[str, int] = {}
        self._count = 0
        self._dim = 0
        self._mapped = None
        self._mapped_rows = 0

    def _open(self):
        import tempfile

        if self._directory is not None:
            try:
                Path(self._directory).mkdir(parents=True, exist_ok=True)
                return tempfile.TemporaryFile(dir=self._directory, prefix=".tmp-vectors-")
            except OSError:
                pass
        return tempfile.TemporaryFile(prefix="retrain-vectors-")

    def add(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Append ``vectors`` [n, dim] under ``keys``; a key added again points at its newest row."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(keys) != len(vectors):
            raise ValueError(f"{len(keys)} keys for {len(vectors)} vectors")
        if not len(keys):
            return
        if self._file is None:
            self._file = self._open()
            self._dim = vectors.shape[1]
        elif vectors.shape[1] != self._dim:
            raise ValueError(f"vectors of dimension {vectors.shape[1]} added to a store of dimension {self._dim}")
        self._file.write(vectors.tobytes())
        self._rows.update(zip(keys, range(self._count, self._count + len(keys))))
        self._count += len(keys)

    def __getitem__(self, key: str) -> np.ndarray:
        row = self._rows[key]
        if row >= self._mapped_rows:
            self._file.flush()
            self._mapped = np.memmap(self._file, dtype=np.float32, mode="r", shape=(self._count, self._dim))
            self._mapped_rows = self._count
        return np.array(self._mapped[row])

    def __contains__(self, key) -> bool:
        return key in self._rows

    def __iter__(self):
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def dim(self) -> int:
        return self._dim

    def rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """The rows of ``keys`` in the file (KeyError for a key not in the store)."""
        return np.fromiter((self._rows[key] for key in keys), np.int64, count=len(keys))

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """The vectors at ``rows`` (any order), as [len(rows), dim] float32.

        Read with ``pread``, not through the memory map: pages of a mapped file count in the
        process's resident memory for as long as the mapping lives, read ones only in the page
        cache. Rows close together are read in one call (gaps of up to ``READ_GAP`` rows read through);
        consecutive rows asked in order are read straight into the result."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self._dim), np.float32)
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= self._count:
            raise IndexError(f"rows outside the store's {self._count}")
        self._file.flush()
        fd, row_bytes = self._file.fileno(), self._dim * 4
        in_order = bool(np.all(rows[1:] > rows[:-1]))
        order = np.arange(len(rows)) if in_order else np.argsort(rows, kind="stable")
        ordered = rows[order]
        breaks = np.flatnonzero(np.diff(ordered) > READ_GAP) + 1
        for start, stop in zip(np.concatenate([[0], breaks]).tolist(), np.concatenate([breaks, [len(rows)]]).tolist()):
            first, last = int(ordered[start]), int(ordered[stop - 1])
            if in_order and last - first == stop - 1 - start:
                _pread_into(fd, out[start:stop], first * row_bytes)
                continue
            block = np.frombuffer(_pread(fd, (last - first + 1) * row_bytes, first * row_bytes),
                                  np.float32).reshape(-1, self._dim)
            out[order[start:stop]] = block[ordered[start:stop] - first]
        return out


READ_GAP = 16  # rows: a gap this small is cheaper to read through than to skip with another call


def _pread_into(fd: int, array: np.ndarray, offset: int) -> None:
    """Fill the contiguous ``array`` from the file at ``offset``, without an intermediate copy where
    the system has ``preadv``."""
    if not hasattr(os, "preadv"):
        array[...] = np.frombuffer(_pread(fd, array.nbytes, offset), array.dtype).reshape(array.shape)
        return
    view, done = memoryview(array).cast("B"), 0
    while done < len(view):
        count = os.preadv(fd, [view[done:done + (1 << 30)]], offset + done)
        if not count:
            raise OSError(f"vector store ends before byte {offset + len(view)}")
        done += count


def _pread(fd: int, size: int, offset: int) -> bytes:
    parts = []
    while size > 0:  # one call returns at most about 2 GB on Linux
        data = os.pread(fd, min(size, 1 << 30), offset)
        if not data:
            raise OSError(f"vector store ends before byte {offset + size}")
        parts.append(data)
        size, offset = size - len(data), offset + len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class StoredVectors:
    """Rows of vector stores seen as one [n, dim] array that is read a piece at a time: the training
    vectors the minibatch head streams when they do not fit in memory (training/head.py).

    ``parts``: (store, rows) pairs, concatenated in order. ``read(positions)`` returns those
    rows only; nothing holds all of them."""

    def __init__(self, parts: Sequence[tuple[VectorStore, np.ndarray]]):
        self.parts = [(store, np.asarray(rows, np.int64)) for store, rows in parts if len(rows)]
        self.offsets = np.cumsum([0] + [len(rows) for _, rows in self.parts])
        dims = {store.dim for store, _ in self.parts}
        if len(dims) > 1:
            raise ValueError(f"vector stores of different dimensions: {sorted(dims)}")
        self.shape = (int(self.offsets[-1]), dims.pop() if dims else 0)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, positions) -> np.ndarray:
        """Rows ``positions`` (any order) as [len(positions), dim] float32."""
        positions = np.asarray(positions, np.int64)
        out = np.empty((len(positions), self.shape[1]), np.float32)
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"positions outside the {len(self)} vectors")
        part = np.searchsorted(self.offsets, positions, "right") - 1
        for number, (store, rows) in enumerate(self.parts):
            mask = part == number
            if mask.any():
                out[mask] = store.read_rows(rows[positions[mask] - self.offsets[number]])
        return out
