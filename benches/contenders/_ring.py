"""Plain numpy building blocks shared by the numpy-based contenders and the limit.

* :class:`ShmStore`: one ``multiprocessing.shared_memory`` segment holding one C-contiguous
  column per field plus two int64 counters (cursor, size).
* :class:`ColumnRing`: a ring over such columns (shared or private): slice copies in, one
  ``np.take(..., out=)`` per field out. No synchronisation: callers add their own.
* :class:`RecordRing`: the same ring over whole records (a packed structured dtype, the layout
  shmreplay uses): fields are copied in one by one, whole records are gathered out at once.
"""

from __future__ import annotations

import os
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from workloads import Batch, Workload

_ALIGN = 64


def _layout(wl: Workload, capacity: int) -> tuple[dict[str, int], int]:
    offsets, off = {}, _ALIGN  # the counters live in the first 64 bytes
    for name, (shape, dtype) in wl.fields.items():
        offsets[name] = off
        nbytes = capacity * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        off += -(-nbytes // _ALIGN) * _ALIGN
    return offsets, max(off, _ALIGN + capacity * wl.row_bytes)


class ShmStore:
    """Columns + counters in one SharedMemory segment named ``name``."""

    def __init__(self, wl: Workload, capacity: int, name: str, create: bool) -> None:
        self.wl, self.capacity, self.name, self.owner = wl, capacity, name, create
        self.offsets, size = _layout(wl, capacity)
        # Every process of a run is a spawn descendant of run.py and so shares its resource
        # tracker: an attach registers a name that is already registered, the owner's unlink
        # unregisters it, and nothing is unlinked when an attached process exits.
        self.shm = shared_memory.SharedMemory(name=name, create=create, size=size if create else 0)
        buf = self.shm.buf
        self.meta = np.ndarray((2,), np.int64, buffer=buf, offset=0)  # cursor, size
        self.cols = {
            f: np.ndarray((capacity, *shape), dtype, buffer=buf, offset=self.offsets[f])
            for f, (shape, dtype) in wl.fields.items()
        }

    def rows_view(self) -> np.ndarray:
        """The same data bytes seen as ``(capacity, row_bytes)`` uint8 rows (for the limit)."""
        return np.ndarray((self.capacity, self.wl.row_bytes), np.uint8, buffer=self.shm.buf, offset=_ALIGN)

    def records_view(self) -> np.ndarray:
        """The same data bytes seen as ``capacity`` packed records of :func:`record_dtype`."""
        return np.ndarray((self.capacity,), record_dtype(self.wl), buffer=self.shm.buf, offset=_ALIGN)

    def close(self) -> None:
        self.meta = None  # type: ignore[assignment]
        self.cols = {}
        try:
            self.shm.close()
        except BufferError:  # a caller still holds a view: the mapping goes at process exit
            pass
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


def record_dtype(wl: Workload) -> np.dtype:
    return np.dtype([(f, dtype, shape) for f, (shape, dtype) in wl.fields.items()])


def private_columns(wl: Workload, capacity: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    cols = {f: np.empty((capacity, *shape), dtype) for f, (shape, dtype) in wl.fields.items()}
    return cols, np.zeros(2, np.int64)


class ColumnRing:
    """A ring of rows stored column-wise: ``cols[field][slot]``; ``meta = [cursor, size]``."""

    def __init__(self, cols: dict[str, np.ndarray], meta: np.ndarray, seed: Any = None) -> None:
        self.cols, self.meta = cols, meta
        self.capacity = len(next(iter(cols.values())))
        self.rng = np.random.default_rng(seed if seed is not None else os.getpid())
        self._out: dict[int, Batch] = {}

    def add(self, row: dict) -> None:
        i = int(self.meta[0]) % self.capacity
        for f, col in self.cols.items():
            col[i] = row[f]
        self.meta[0] += 1
        self.meta[1] = min(self.capacity, int(self.meta[1]) + 1)

    def extend(self, batch: Batch) -> None:
        n = len(batch["done"])
        i = int(self.meta[0]) % self.capacity
        first = min(n, self.capacity - i)
        for f, col in self.cols.items():
            src = batch[f]
            col[i : i + first] = src[:first]
            if first < n:
                col[: n - first] = src[first:]
        self.meta[0] += n
        self.meta[1] = min(self.capacity, int(self.meta[1]) + n)

    def out(self, batch_size: int) -> Batch:
        """Reused output arrays for ``batch_size`` (no page faults on every call)."""
        if batch_size not in self._out:
            self._out[batch_size] = {f: np.empty((batch_size, *c.shape[1:]), c.dtype) for f, c in self.cols.items()}
        return self._out[batch_size]

    def indices(self, batch_size: int) -> np.ndarray:
        return self.rng.integers(0, max(1, int(self.meta[1])), batch_size)

    def sample(self, batch_size: int) -> Batch:
        idx = self.indices(batch_size)
        out = self.out(batch_size)
        for f, col in self.cols.items():
            np.take(col, idx, axis=0, out=out[f], mode="clip")  # "raise" would buffer out=
        return out


class RecordRing(ColumnRing):
    """A :class:`ColumnRing` whose columns are the fields of packed records; samples gather
    whole records with one ``np.take`` and return the fields of the gathered records."""

    def __init__(self, records: np.ndarray, meta: np.ndarray, seed: Any = None) -> None:
        super().__init__({f: records[f] for f in records.dtype.names}, meta, seed)
        self.records = records
        self._recs: dict[int, np.ndarray] = {}

    def sample(self, batch_size: int) -> Batch:
        out = self._recs.get(batch_size)
        if out is None:
            out = self._recs[batch_size] = np.empty(batch_size, self.records.dtype)
        np.take(self.records, self.indices(batch_size), out=out, mode="clip")
        return {f: out[f] for f in self.cols}
