"""TorchRL ``ReplayBuffer(storage=LazyMemmapStorage(...), shared=True)`` (optional: torch,
tensordict, torchrl).

The storage is memory-mapped files (put in /dev/shm here, like the others' segments); with
``shared=True`` every add, extend and sample takes one ``multiprocessing.Lock``. Torch runs with
one intra-op thread per process, like every other contender.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
import warnings
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict
from torchrl.data import LazyMemmapStorage, ReplayBuffer

from contenders.base import Contender
from workloads import WORKLOADS, Batch, Workload

torch.set_num_threads(1)
logging.getLogger("torchrl").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", module="torchrl")


class TorchRL(Contender):
    key = "torchrl"

    def __init__(self, workload: Workload, capacity: int, rb: Any, scratch: str | None) -> None:
        super().__init__(workload, capacity)
        self.rb, self.scratch = rb, scratch

    @classmethod
    def create(cls, workload: Workload, capacity: int, prefix: str, role: str) -> "TorchRL":
        scratch = f"/dev/shm/{prefix}torchrl-{uuid.uuid4().hex[:8]}"
        os.makedirs(scratch)
        rb = ReplayBuffer(storage=LazyMemmapStorage(capacity, scratch_dir=scratch), shared=True)
        return cls(workload, capacity, rb, scratch)

    def handle(self) -> Any:
        return (self.wl.name, self.capacity, self.rb)

    @classmethod
    def attach(cls, handle: Any, role: str) -> "TorchRL":
        wl_name, capacity, rb = handle
        return cls(WORKLOADS[wl_name], capacity, rb, None)

    def close(self) -> None:
        self.rb = None
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def prepare(self, batch: Batch) -> Any:
        n = len(batch["done"])
        return TensorDict({f: torch.from_numpy(np.ascontiguousarray(v)) for f, v in batch.items()}, batch_size=[n])

    def prepare_row(self, row: dict) -> Any:
        return TensorDict({f: torch.as_tensor(np.asarray(v)) for f, v in row.items()}, batch_size=[])

    def add_one(self, row: Any) -> None:
        self.rb.add(row)

    def extend(self, batch: Any) -> None:
        self.rb.extend(batch)

    def sample(self, batch_size: int) -> Any:
        return self.rb.sample(batch_size)

    def to_numpy(self, sampled: Any) -> Batch:
        return {f: sampled[f].numpy() for f in self.wl.fields}
