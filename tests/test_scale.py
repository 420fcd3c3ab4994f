"""Capacity scaling: the kernel objects a process holds (fds, mappings, semaphores) do not
grow with capacity, and a 1M-slot ring indexes correctly all the way round."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from shmreplay import ReplayBuffer

from helpers import assert_row_equal, control_fields, row_for_key, rows_for_keys, take_row

CAPACITIES = (100_000, 1_000_000)


def _kernel_objects(name: str) -> dict:
    gc.collect()
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/maps") as f:
        maps = f.read().splitlines()
    seg = "shmreplay." + name
    return {
        "fds": fds,
        "maps": len(maps),
        "segment_maps": sum(1 for line in maps if seg in line),
        "sem_maps": sum(1 for line in maps if "/dev/shm/sem." in line),
    }


def _delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in ("fds", "maps", "sem_maps")} | {"segment_maps": after["segment_maps"]}


def _measure(name: str, capacity: int, fields) -> dict:
    """Deltas for create and for a second (attached) handle in the same process.

    Mapping counts can jitter by an allocator arena; take the smallest of a few runs."""
    runs = []
    for attempt in range(3):
        nm = f"{name}-{attempt}"
        before = _kernel_objects(nm)
        buf = ReplayBuffer.create(nm, capacity=capacity, fields=fields)
        try:
            created = _kernel_objects(nm)
            other = ReplayBuffer.attach(nm)
            try:
                attached = _kernel_objects(nm)
            finally:
                other.close()
            buf.unlink()
        finally:
            buf.close()
        runs.append(
            {
                "create": _delta(created, before),
                "attach": {
                    k: v
                    for k, v in (
                        ("fds", attached["fds"] - created["fds"]),
                        ("maps", attached["maps"] - created["maps"]),
                        ("sem_maps", attached["sem_maps"] - created["sem_maps"]),
                        ("segment_maps", attached["segment_maps"] - created["segment_maps"]),
                    )
                },
                "after_close": _delta(_kernel_objects(nm), before),
            }
        )
    return min(runs, key=lambda r: (r["create"]["maps"], r["attach"]["maps"], r["after_close"]["maps"]))


def test_kernel_objects_do_not_grow_with_capacity(name_factory):
    fields = control_fields()
    # warm up: load the extension and whatever it allocates once per process
    with ReplayBuffer.create(name_factory(), capacity=16, fields=fields) as warm:
        warm.extend(rows_for_keys(fields, range(16)))
        warm.sample(4)
        ReplayBuffer.attach(warm.name).close()

    results = {cap: _measure(name_factory(), cap, fields) for cap in CAPACITIES}
    small, big = results[CAPACITIES[0]], results[CAPACITIES[1]]
    detail = f"100k: {small}\n1M: {big}"

    # identical whatever the capacity
    assert small["create"] == big["create"], detail
    assert small["attach"] == big["attach"], detail
    # and small in absolute terms: one segment, at most one mapping and one fd per handle
    for r in (small, big):
        assert r["create"]["segment_maps"] == 1, detail
        assert r["create"]["maps"] <= 1, detail
        assert r["create"]["fds"] <= 1, detail
        assert r["create"]["sem_maps"] == 0, detail
        assert r["attach"]["maps"] <= 1, detail
        assert r["attach"]["segment_maps"] <= 1, detail
        assert r["attach"]["fds"] <= 1, detail
        assert r["attach"]["sem_maps"] == 0, detail
        # nothing leaks once both handles are closed
        assert r["after_close"]["fds"] == 0, detail
        assert r["after_close"]["maps"] <= 0, detail
        assert r["after_close"]["segment_maps"] == 0, detail


def test_segment_size_is_linear_in_capacity(name_factory):
    fields = control_fields()
    sizes = {}
    for cap in CAPACITIES:
        with ReplayBuffer.create(name_factory(), capacity=cap, fields=fields) as buf:
            sizes[cap] = (buf.nbytes, buf.record_bytes)
            assert os.path.getsize(buf.path) == buf.nbytes
            # one file in /dev/shm per buffer, whatever the capacity
            assert os.path.basename(buf.path) == "shmreplay." + buf.name
    (n1, rb1), (n2, rb2) = sizes[CAPACITIES[0]], sizes[CAPACITIES[1]]
    assert rb1 == rb2 == 184
    per_slot = (n2 - n1) / (CAPACITIES[1] - CAPACITIES[0])
    # record plus per-slot metadata (a version word or so), nothing per-slot and large
    assert rb1 <= per_slot <= rb1 + 64, per_slot
    # the fixed overhead is small
    assert n1 - CAPACITIES[0] * per_slot <= 4 << 20


def test_million_slot_ring_wraps_correctly(shm_name):
    fields = control_fields()
    cap = 1_000_000
    extra = 1_000
    chunk = 250_000
    with ReplayBuffer.create(shm_name, capacity=cap, fields=fields) as buf:
        total = cap + extra
        for lo in range(0, total, chunk):
            hi = min(lo + chunk, total)
            buf.extend(rows_for_keys(fields, np.arange(lo, hi, dtype=np.uint64)))
        assert len(buf) == cap
        s = buf.stats()
        assert s["inserts"] == total and s["size"] == cap
        # the first slots hold the second lap, the rest the first lap
        for slot in (0, 1, extra - 1, extra, extra + 1, cap // 2, cap - 2, cap - 1):
            key = slot + cap if slot < extra else slot
            assert_row_equal(buf[slot], row_for_key(fields, key), where=f"slot {slot}")
        assert_row_equal(buf[-1], row_for_key(fields, cap - 1))
        batch, info = buf.sample(4096, return_info=True)
        keys = info["key"]
        assert np.array_equal(keys % np.uint64(cap), info["index"].astype(np.uint64))
        assert keys.min() >= extra and keys.max() < total
        exp = rows_for_keys(fields, keys)
        for name in fields:
            assert np.array_equal(batch[name], exp[name]), name
        # the sample is spread over the whole ring, not stuck near one end
        assert info["index"].min() < cap // 10 and info["index"].max() > cap - cap // 10


@pytest.mark.parametrize("cap", CAPACITIES)
def test_large_buffer_single_row_ops(name_factory, cap):
    fields = control_fields()
    with ReplayBuffer.create(name_factory(), capacity=cap, fields=fields) as buf:
        rows = rows_for_keys(fields, range(3))
        for i in range(3):
            buf.add(**take_row(rows, i))
        assert len(buf) == 3
        with pytest.raises(IndexError):
            buf[cap - 1]
        batch, info = buf.sample(64, return_info=True)
        assert set(info["index"].tolist()) <= {0, 1, 2}
