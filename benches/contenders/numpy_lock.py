"""A numpy ring (one column per field) in a SharedMemory segment behind one multiprocessing.Lock.

Every add, extend and sample takes the one lock, so writers and the sampler run one at a time.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import uuid
from typing import Any

from contenders._ring import ColumnRing, ShmStore
from contenders.base import Contender
from workloads import WORKLOADS, Batch, Workload


class NumpyLock(Contender):
    key = "numpy_lock"
    use_lock = True

    def __init__(self, workload: Workload, capacity: int, store: ShmStore, lock: Any) -> None:
        super().__init__(workload, capacity)
        self.store, self.lock = store, lock
        self.ring = self.make_ring(store)
        self.guard = lock if lock is not None else contextlib.nullcontext()

    @staticmethod
    def make_ring(store: ShmStore) -> ColumnRing:
        return ColumnRing(store.cols, store.meta)

    @classmethod
    def create(cls, workload: Workload, capacity: int, prefix: str, role: str) -> "NumpyLock":
        store = ShmStore(workload, capacity, f"{prefix}{uuid.uuid4().hex[:8]}", create=True)
        return cls(workload, capacity, store, mp.get_context("spawn").Lock() if cls.use_lock else None)

    def handle(self) -> Any:
        return (self.wl.name, self.capacity, self.store.name, self.lock)

    @classmethod
    def attach(cls, handle: Any, role: str) -> "NumpyLock":
        wl_name, capacity, name, lock = handle
        wl = WORKLOADS[wl_name]
        return cls(wl, capacity, ShmStore(wl, capacity, name, create=False), lock)

    def close(self) -> None:
        self.ring = None  # type: ignore[assignment]
        self.store.close()

    def add_one(self, row: Any) -> None:
        with self.guard:
            self.ring.add(row)

    def extend(self, batch: Any) -> None:
        with self.guard:
            self.ring.extend(batch)

    def sample(self, batch_size: int) -> Batch:
        with self.guard:
            return self.ring.sample(batch_size)
