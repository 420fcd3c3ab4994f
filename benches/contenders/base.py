"""The interface every contender implements, with defaults for the simple cases."""

from __future__ import annotations

import itertools
from typing import Any, Callable

from workloads import PREFILL_WID, Batch, Workload


class Contender:
    """A replay buffer design under test.

    Life cycle: ``create(workload, capacity, prefix, role)`` in the owning process, ``fill``,
    then ``handle()`` is passed (as a ``Process`` argument) to other processes, which call
    ``attach(handle, role)``. ``role`` is ``"solo"`` (one process does everything), ``"shared"``
    (the owner of a buffer that other processes use), ``"writer"`` or ``"sampler"``.

    Inputs are prepared once, outside timed loops, into the contender's native form
    (``prepare``/``prepare_row``): a user of that library would already hold data in that form.
    """

    key = ""
    is_limit = False  # the limit is not synchronised: torn rows are expected there

    def __init__(self, workload: Workload, capacity: int) -> None:
        self.wl = workload
        self.capacity = capacity

    # ---- life cycle ----
    @classmethod
    def create(cls, workload: Workload, capacity: int, prefix: str, role: str) -> "Contender":
        raise NotImplementedError

    def handle(self) -> Any:
        """Something picklable (through ``Process`` arguments) that ``attach`` accepts."""
        raise NotImplementedError

    @classmethod
    def attach(cls, handle: Any, role: str) -> "Contender":
        raise NotImplementedError

    def close(self) -> None:
        """Detach; the owner also destroys the buffer (and every file it made)."""

    # ---- data ----
    def prepare(self, batch: Batch) -> Any:
        return batch

    def prepare_row(self, row: dict) -> Any:
        return row

    def add_one(self, row: Any) -> None:
        raise NotImplementedError

    def extend(self, batch: Any) -> int | None:
        """Insert a prepared batch; may return the rows actually accepted (None: all)."""
        raise NotImplementedError

    def sample(self, batch_size: int) -> Any:
        raise NotImplementedError

    def to_numpy(self, sampled: Any) -> Batch:
        return sampled

    def fill(self, rows: int) -> None:
        """Untimed set-up: write at least ``rows`` valid rows (so sampling covers the whole ring)."""
        pool = [self.prepare(b) for b in self.wl.pool(PREFILL_WID, 4, self.wl.fill_batch)]
        for k in range(-(-rows // self.wl.fill_batch)):
            self.extend(pool[k % len(pool)])

    def flush(self) -> None:
        """Wait until every row inserted so far is stored (only asynchronous designs wait)."""

    def start_sampling(self) -> None:
        """Called once in a ``solo`` process between the insert and the sample scenarios."""

    # ---- what the scenarios time ----
    def ops(self, op: str, batch_size: int, data: list) -> dict[str, Callable[[], Any]]:
        """Callables to time for ``op`` ("add", "extend" or "sample"), by variant name.

        ``data`` is a list of prepared rows ("add") or batches ("extend"). Contenders have one
        variant (""); the limit has several and counts the best of those not named "info:...".
        """
        if op == "add":
            rows = itertools.cycle(data)
            add_one = self.add_one
            return {"": lambda: add_one(next(rows))}
        if op == "extend":
            batches = itertools.cycle(data)
            extend = self.extend
            return {"": lambda: extend(next(batches))}
        sample = self.sample
        return {"": lambda: sample(batch_size)}
