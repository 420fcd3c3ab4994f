"""shmreplay: one segment, a seqlock per slot, copies in Rust without the GIL."""

from __future__ import annotations

import uuid
from typing import Any

import shmreplay
from contenders.base import Contender
from workloads import Batch, Workload


class ShmReplay(Contender):
    key = "shmreplay"

    def __init__(self, workload: Workload, capacity: int, buf: shmreplay.ReplayBuffer) -> None:
        super().__init__(workload, capacity)
        self.buf = buf
        self._out: dict[int, Batch] = {}

    @classmethod
    def create(cls, workload: Workload, capacity: int, prefix: str, role: str) -> "ShmReplay":
        fields = {f: (shape, dtype) for f, (shape, dtype) in workload.fields.items()}
        buf = shmreplay.ReplayBuffer.create(f"{prefix}{uuid.uuid4().hex[:8]}", capacity=capacity, fields=fields)
        return cls(workload, capacity, buf)

    def handle(self) -> Any:
        return (self.wl.name, self.capacity, self.buf.name)

    @classmethod
    def attach(cls, handle: Any, role: str) -> "ShmReplay":
        from workloads import WORKLOADS

        wl_name, capacity, name = handle
        return cls(WORKLOADS[wl_name], capacity, shmreplay.ReplayBuffer.attach(name))

    def close(self) -> None:
        if self.buf.is_owner:
            try:
                self.buf.unlink()
            except FileNotFoundError:
                pass
        self.buf.close()

    def add_one(self, row: Any) -> None:
        self.buf.add(**row)

    def extend(self, batch: Any) -> None:
        self.buf.extend(batch)

    def sample(self, batch_size: int) -> Batch:
        out = self._out.get(batch_size)
        if out is None:  # reuse output arrays, as the README recommends (out=)
            out = self._out[batch_size] = self.buf.sample(batch_size)
        return self.buf.sample(batch_size, out=out)
