"""The limit: plain numpy on the same bytes in a SharedMemory segment, with no synchronisation.

Not a usable replay buffer (concurrent readers see torn rows): it is what moving the same bytes
costs with no bookkeeping at all. Its storage is packed records (shmreplay's layout; the same
bytes can also be seen as columns or as raw rows), and each single-process scenario times
several sensible numpy ways, counting the best; variants named ``info:...`` are only reported.

* insert: ``put_rows`` copies a pre-packed ``(b, row_bytes)`` block into consecutive rows;
  ``put_fields`` copies each field of the batch into the records (what concurrent writers do);
  ``put_cols`` copies each field into its own column. ``info:memcpy``: a private block copy.
* sample: ``take_records`` is one ``np.take(records, idx, out=)`` (what concurrent samplers do),
  ``fancy_rows`` is ``rows[idx]`` (a fresh array), ``take_cols`` one ``np.take(..., out=)``
  per column. ``info:memcpy`` copies ``b`` consecutive rows (not a gather).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import numpy as np

from contenders._ring import ColumnRing, RecordRing, ShmStore
from contenders.numpy_lock import NumpyLock


class Limit(NumpyLock):
    key = "limit"
    is_limit = True
    use_lock = False

    @staticmethod
    def make_ring(store: ShmStore) -> ColumnRing:
        return RecordRing(store.records_view(), store.meta)

    def ops(self, op: str, batch_size: int, data: list) -> dict[str, Callable[[], Any]]:
        rows = self.store.rows_view()
        cap, rb = rows.shape
        b = batch_size
        block = np.empty((b, rb), np.uint8)
        columns = ColumnRing(self.store.cols, np.array([0, cap], np.int64))
        variants: dict[str, Callable[[], Any]] = {}
        if op in ("add", "extend"):
            src = np.full((b, rb), 3, np.uint8)
            pos = [0]

            def put_rows() -> None:
                i = pos[0]
                rows[i : i + b] = src
                pos[0] = i + b if i + 2 * b <= cap else 0

            items = itertools.cycle(data)
            put_cols = columns.add if op == "add" else columns.extend
            variants["put_rows"] = put_rows
            variants["put_fields"] = super().ops(op, b, data)[""]
            variants["put_cols"] = lambda: put_cols(next(items))
            variants["info:memcpy"] = lambda: np.copyto(block, src)
        else:
            rng = self.ring.rng

            def memcpy() -> None:
                i = int(rng.integers(0, cap - b))
                np.copyto(block, rows[i : i + b])

            variants["take_records"] = super().ops(op, b, data)[""]
            variants["fancy_rows"] = lambda: rows[rng.integers(0, cap, b)]
            variants["take_cols"] = lambda: columns.sample(b)
            variants["info:memcpy"] = memcpy
        return variants
