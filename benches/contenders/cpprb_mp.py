"""cpprb ``MPReplayBuffer`` (optional: ``pip install cpprb``).

Shared ctypes arrays; explorers (writers) and the learner (sampler) exclude each other with
events and a counter instead of one lock. Its documentation assumes a single learner.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import numpy as np
from cpprb import MPReplayBuffer

from contenders.base import Contender
from workloads import WORKLOADS, Batch, Workload


class Cpprb(Contender):
    key = "cpprb"

    def __init__(self, workload: Workload, capacity: int, rb: Any) -> None:
        super().__init__(workload, capacity)
        self.rb = rb

    @classmethod
    def create(cls, workload: Workload, capacity: int, prefix: str, role: str) -> "Cpprb":
        env = {f: {"shape": shape or 1, "dtype": dtype} for f, (shape, dtype) in workload.fields.items()}
        return cls(workload, capacity, MPReplayBuffer(capacity, env, ctx=mp.get_context("spawn")))

    def handle(self) -> Any:
        return (self.wl.name, self.capacity, self.rb)

    @classmethod
    def attach(cls, handle: Any, role: str) -> "Cpprb":
        wl_name, capacity, rb = handle
        return cls(WORKLOADS[wl_name], capacity, rb)

    def close(self) -> None:
        self.rb = None  # shared ctypes memory is released with the last process holding it

    def add_one(self, row: Any) -> None:
        self.rb.add(**row)

    def extend(self, batch: Any) -> None:
        self.rb.add(**batch)

    def sample(self, batch_size: int) -> Batch:
        return self.rb.sample(batch_size)

    def to_numpy(self, sampled: Any) -> Batch:
        n = len(sampled["done"])
        return {f: np.asarray(sampled[f]).reshape((n, *shape)) for f, (shape, _) in self.wl.fields.items()}
