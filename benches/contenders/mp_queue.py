"""Actors send transitions through a ``multiprocessing.Queue`` to the learner, which owns a
private numpy ring and samples from it.

* ``solo`` role (single-process scenarios): the measuring process is the actor and a learner
  process drains the queue into its ring; an insert is counted once the learner has stored it
  (``flush``). For the sample scenarios the measuring process becomes the learner: the learner
  process stops, and the measuring process samples its own private ring.
* ``shared`` role (concurrent): writers put, the sampler is the learner: before each batch it
  drains whatever is queued into its ring.

The queue is bounded, so actors block instead of growing an unbounded backlog.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from typing import Any

from contenders._ring import ColumnRing, private_columns
from contenders.base import Contender
from workloads import PREFILL_WID, WORKLOADS, Batch, Workload

QUEUE_ITEMS = 16


def _filled_ring(wl: Workload, capacity: int) -> ColumnRing:
    ring = ColumnRing(*private_columns(wl, capacity))
    pool = wl.pool(PREFILL_WID, 4, wl.fill_batch)
    for k in range(-(-capacity // wl.fill_batch)):
        ring.extend(pool[k % len(pool)])
    return ring


def _drain(q: Any, ring: ColumnRing) -> int:
    """Move what is queued now (at most the queue's size) into the ring; returns the rows moved."""
    rows = 0
    for _ in range(QUEUE_ITEMS):
        try:
            kind, item = q.get_nowait()
        except queue.Empty:
            break
        if kind == "row":
            ring.add(item)
            rows += 1
        else:
            ring.extend(item)
            rows += len(item["done"])
    return rows


def learner_main(q: Any, wl_name: str, capacity: int, stored: Any, ready: Any, stop: Any) -> None:
    """The learner process of the ``solo`` role: fill its ring, then store what arrives."""
    ring = _filled_ring(WORKLOADS[wl_name], capacity)
    ready.set()
    deadline = time.monotonic() + 600
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            kind, item = q.get(timeout=0.05)
        except queue.Empty:
            continue
        if kind == "row":
            ring.add(item)
            n = 1
        else:
            ring.extend(item)
            n = len(item["done"])
        stored.value += n


class MpQueue(Contender):
    key = "mp_queue"

    def __init__(self, workload: Workload, capacity: int, q: Any, role: str) -> None:
        super().__init__(workload, capacity)
        self.q, self.role = q, role
        self.ring: ColumnRing | None = None
        self.learner: Any = None
        self.sent = 0

    @classmethod
    def create(cls, workload: Workload, capacity: int, prefix: str, role: str) -> "MpQueue":
        ctx = mp.get_context("spawn")
        self = cls(workload, capacity, ctx.Queue(QUEUE_ITEMS), role)
        if role == "solo":
            self.stored, self.ready, self.stop = ctx.RawValue("q", 0), ctx.Event(), ctx.Event()
            self.learner = ctx.Process(
                target=learner_main, args=(self.q, workload.name, capacity, self.stored, self.ready, self.stop), daemon=True
            )
            self.learner.start()
        return self

    def handle(self) -> Any:
        return (self.wl.name, self.capacity, self.q)

    @classmethod
    def attach(cls, handle: Any, role: str) -> "MpQueue":
        wl_name, capacity, q = handle
        self = cls(WORKLOADS[wl_name], capacity, q, role)
        if role == "sampler":
            self.ring = _filled_ring(self.wl, capacity)
        return self

    def fill(self, rows: int) -> None:
        if self.learner is not None and not self.ready.wait(600):  # the learner fills its own ring
            raise TimeoutError("mp_queue learner did not start")

    def _stop_learner(self) -> None:
        if self.learner is not None:
            self.stop.set()
            self.learner.join(30)
            if self.learner.is_alive():
                self.learner.kill()
                self.learner.join(5)
            self.learner = None

    def close(self) -> None:
        self._stop_learner()
        if self.ring is not None and self.role == "sampler":
            # Writers flush what they queued before they exit: keep reading until it stops.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    self.q.get(timeout=1.0)
                except queue.Empty:
                    break
        self.ring = None
        if self.role != "writer":
            self.q.cancel_join_thread()
        self.q.close()

    def _put(self, item: Any, rows: int) -> int:
        try:
            self.q.put(item, timeout=2.0)
        except queue.Full:  # the learner is gone (end of a run): nothing was inserted
            return 0
        self.sent += rows
        return rows

    def add_one(self, row: Any) -> None:
        self._put(("row", row), 1)

    def extend(self, batch: Any) -> int:
        return self._put(("batch", batch), len(batch["done"]))

    def flush(self) -> None:
        deadline = time.monotonic() + 60
        while self.learner is not None and self.stored.value < self.sent and time.monotonic() < deadline:
            time.sleep(0.0005)

    def start_sampling(self) -> None:
        self._stop_learner()
        self.ring = _filled_ring(self.wl, self.capacity)

    def sample(self, batch_size: int) -> Batch:
        assert self.ring is not None, "mp_queue samples in the learner only"
        _drain(self.q, self.ring)
        return self.ring.sample(batch_size)
