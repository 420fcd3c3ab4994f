"""The design from the original question: ``multiprocessing.shared_memory`` plus 1,000
``multiprocessing.Lock``s (slot ``i`` is guarded by lock ``i % 1000``), rows copied field by
field with ``tobytes`` (in) and ``np.frombuffer(...).copy()`` (out), one row at a time.

The write cursor is a shared counter behind one more lock. Each Lock is a POSIX semaphore: one
more mapping (and, while alive, a file in /dev/shm) per lock in every process that holds them.
"""

from __future__ import annotations

import multiprocessing as mp
import uuid
from typing import Any

import numpy as np

from contenders._ring import ColumnRing, ShmStore
from contenders.base import Contender
from workloads import WORKLOADS, PREFILL_WID, Batch, Workload

N_LOCKS = 1000


class Locks1000(Contender):
    key = "locks1000"

    def __init__(self, workload: Workload, capacity: int, store: ShmStore, locks: list, cursor_lock: Any) -> None:
        super().__init__(workload, capacity)
        self.store, self.locks, self.cursor_lock = store, locks, cursor_lock
        self.mv = store.shm.buf
        # (name, dtype, shape, bytes per row, column offset) per field
        self.layout = [
            (f, dtype, shape, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, store.offsets[f])
            for f, (shape, dtype) in workload.fields.items()
        ]
        self.rng = np.random.default_rng()

    @classmethod
    def create(cls, workload: Workload, capacity: int, prefix: str, role: str) -> "Locks1000":
        ctx = mp.get_context("spawn")
        store = ShmStore(workload, capacity, f"{prefix}{uuid.uuid4().hex[:8]}", create=True)
        return cls(workload, capacity, store, [ctx.Lock() for _ in range(N_LOCKS)], ctx.Lock())

    def handle(self) -> Any:
        return (self.wl.name, self.capacity, self.store.name, self.locks, self.cursor_lock)

    @classmethod
    def attach(cls, handle: Any, role: str) -> "Locks1000":
        wl_name, capacity, name, locks, cursor_lock = handle
        wl = WORKLOADS[wl_name]
        return cls(wl, capacity, ShmStore(wl, capacity, name, create=False), locks, cursor_lock)

    def close(self) -> None:
        self.mv = None
        self.store.close()

    def fill(self, rows: int) -> None:
        # Untimed set-up only: bulk numpy copies (the per-row path would take minutes at 10M rows).
        ring = ColumnRing(self.store.cols, self.store.meta)
        pool = self.wl.pool(PREFILL_WID, 4, self.wl.fill_batch)
        for k in range(-(-rows // self.wl.fill_batch)):
            ring.extend(pool[k % len(pool)])

    def _claim(self, n: int) -> int:
        meta = self.store.meta
        with self.cursor_lock:
            start = int(meta[0])
            meta[0] = start + n
            meta[1] = min(self.capacity, start + n)
        return start

    def _write(self, slot: int, values: Any) -> None:
        mv = self.mv
        with self.locks[slot % N_LOCKS]:
            for f, dtype, _shape, nbytes, off in self.layout:
                start = off + slot * nbytes
                mv[start : start + nbytes] = np.asarray(values[f], dtype).tobytes()

    def add_one(self, row: Any) -> None:
        self._write(self._claim(1) % self.capacity, row)

    def extend(self, batch: Any) -> None:
        n = len(batch["done"])
        start = self._claim(n)
        for j in range(n):
            self._write((start + j) % self.capacity, {f: batch[f][j] for f in batch})

    def sample(self, batch_size: int) -> Batch:
        size = max(1, int(self.store.meta[1]))
        cols: dict[str, list] = {f: [] for f, *_ in self.layout}
        mv = self.mv
        for slot in self.rng.integers(0, size, batch_size).tolist():
            with self.locks[slot % N_LOCKS]:
                for f, dtype, shape, nbytes, off in self.layout:
                    a = np.frombuffer(mv, dtype, count=nbytes // dtype.itemsize, offset=off + slot * nbytes)
                    cols[f].append(a.reshape(shape).copy())
        return {f: np.stack(v) for f, v in cols.items()}
