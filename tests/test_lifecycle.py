"""Lifecycle hygiene: thousands of create/attach/inspect/close/unlink cycles, pickling, and
forked and spawned children leave nothing behind -- no file descriptor, no mapping of a
segment, no segment file or hidden temporary in the directory, no live handle entry -- and a
handle inherited through ``fork()`` keeps working in the child (and the parent sees what the
child wrote), whatever the parent does with its own copy meanwhile.

Leaks are measured on this process through ``/proc/self/fd`` and ``/proc/self/maps`` (lines
mapping a ``shmreplay.`` file, deleted or not), and on the segment through its handle table
(``stats()["attached"]``, ``processes()``).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import time

import numpy as np
import pytest

import helpers
import shmreplay
from conftest import SESSION_PREFIX
from helpers import (
    assert_row_equal,
    assert_slots_hold_keys,
    open_fds,
    row_for_key,
    rows_for_keys,
    run_forked,
    segment_mappings,
)
from shmreplay import ReplayBuffer

TINY = {"k": ((), np.int64), "v": ((3,), np.uint8)}
CYCLES = 2000


class Footprint:
    """What this process holds that a buffer could leak, and what is in the directory."""

    def __init__(self, directory: str, prefix: str) -> None:
        self.directory = directory
        self.prefix = prefix
        gc.collect()
        self.fds = open_fds()
        self.maps = segment_mappings()
        self.files = self._files()

    def _files(self) -> list[str]:
        return sorted(
            e
            for e in os.listdir(self.directory)
            if e.startswith("shmreplay." + self.prefix) or e.startswith(".shmreplay." + self.prefix)
        )

    def assert_same(self, files: list[str] | None = None) -> None:
        gc.collect()
        assert open_fds() == self.fds, f"file descriptors: {self.fds} -> {open_fds()}"
        assert segment_mappings() == self.maps, f"segment mappings: {self.maps} -> {segment_mappings()}"
        assert self._files() == (self.files if files is None else files)


def test_thousands_of_create_close_unlink_cycles(shm_dir):
    """Four ways to end a buffer's life, CYCLES/4 times each, in /dev/shm and in a path= dir."""
    for directory in (helpers.SHM_DIR, str(shm_dir)):
        name = f"{SESSION_PREFIX}cycle"
        before = Footprint(directory, SESSION_PREFIX)
        path = directory if directory != helpers.SHM_DIR else None
        started = time.monotonic()
        for i in range(CYCLES // 2):
            way = i % 4
            if way == 0:
                with ReplayBuffer.create(name, capacity=8, fields=TINY, path=path) as buf:
                    buf.add(k=i, v=np.full(3, i % 256, np.uint8))
            elif way == 1:
                buf = ReplayBuffer.create(name, capacity=8, fields=TINY, path=path)
                buf.unlink()
                buf.close()
            elif way == 2:
                buf = ReplayBuffer.create(name, capacity=8, fields=TINY, path=path)
                buf.close()
                shmreplay.remove(name, path=path)
            else:  # dropped without close: the handle goes with the object
                buf = ReplayBuffer.create(name, capacity=8, fields=TINY, path=path)
                buf.unlink()
                del buf
        elapsed = time.monotonic() - started
        before.assert_same()
        assert elapsed < 30, f"{CYCLES // 2} create cycles took {elapsed:.1f} s"


def test_thousands_of_attach_inspect_close_cycles(shm_name):
    with ReplayBuffer.create(shm_name, capacity=8, fields=TINY) as owner:
        owner.extend(rows_for_keys(TINY, range(8)))
        before = Footprint(helpers.SHM_DIR, SESSION_PREFIX)
        files = before.files
        for i in range(CYCLES):
            if i % 3 == 0:
                with ReplayBuffer.attach(shm_name) as h:
                    assert h.stats()["attached"] == 2
                    if i % 30 == 0:
                        h.sample(2)
            elif i % 3 == 1:
                h = ReplayBuffer.inspect(shm_name)
                assert len(h) == 8
                h.close()
            else:
                ReplayBuffer.attach(shm_name)  # dropped at once, never closed explicitly
        for _ in range(CYCLES // 4):
            clone = pickle.loads(pickle.dumps(owner))
            assert clone.name == shm_name
            del clone
        before.assert_same(files)
        assert owner.stats()["attached"] == 1
        assert owner.processes() == [os.getpid()]
        assert owner.stats()["inserts"] == 8
        assert_slots_hold_keys(owner, TINY, range(8))


def test_many_live_handles_then_all_closed(shm_name):
    """Holding hundreds of handles at once costs one mapping and one descriptor (its kernel
    lock) each; closing them all gives every handle entry, descriptor and mapping back."""
    with ReplayBuffer.create(shm_name, capacity=8, fields=TINY) as owner:
        before = Footprint(helpers.SHM_DIR, SESSION_PREFIX)
        handles = [ReplayBuffer.attach(shm_name) for _ in range(300)]
        assert owner.stats()["attached"] == 301
        assert open_fds() == before.fds + 300, "a handle holds exactly one descriptor"
        assert segment_mappings() == before.maps + 300
        for h in handles:
            h.close()
        handles.clear()
        before.assert_same()
        assert owner.stats()["attached"] == 1


def _child_writes(buf: ReplayBuffer, start: int, n: int) -> dict:
    """Forked child: uses the inherited handle, checks its own footprint, reports."""
    fds, maps = open_fds(), segment_mappings()
    buf.extend(rows_for_keys(TINY, range(start, start + n)))
    batch, info = buf.sample(16, return_info=True)
    for _ in range(200):  # the child's own attach/close cycles leak nothing either
        ReplayBuffer.attach(buf.name, path=os.path.dirname(buf.path)).close()
    gc.collect()
    return {
        "pid": os.getpid(),
        "fds": open_fds() - fds,
        "maps": segment_mappings() - maps,
        "attached_in_child": buf.stats()["attached"],
        "sampled": int(info["index"].shape[0]),
    }


def test_fork_children_use_inherited_handle_and_leave_nothing(shm_name):
    fields = TINY
    cap = 64
    with ReplayBuffer.create(shm_name, capacity=cap, fields=fields) as buf:
        buf.extend(rows_for_keys(fields, range(4)))
        before = Footprint(helpers.SHM_DIR, SESSION_PREFIX)
        reports = []
        for c in range(12):
            reports.append(run_forked(lambda c=c: _child_writes(buf, 4 + 5 * c, 5), timeout=60))
        pids = {r["pid"] for r in reports}
        assert len(pids) == 12
        for r in reports:
            assert r["fds"] == 0 and r["maps"] == 0, r
            assert r["attached_in_child"] == 2 and r["sampled"] == 16, r
        # the parent sees every row the children wrote, in ticket order
        assert len(buf) == 4 + 60 and buf.stats()["inserts"] == 64
        assert_slots_hold_keys(buf, fields, range(64))
        # the children are gone: only the parent's handle is live
        assert buf.stats()["attached"] == 1
        assert buf.processes() == [os.getpid()]
        before.assert_same()


def test_concurrent_fork_children(shm_name):
    """Four forked children insert into the inherited handle at the same time."""
    cap = 256
    ctx = multiprocessing.get_context("fork")
    with ReplayBuffer.create(shm_name, capacity=cap, fields=TINY) as buf:
        before = Footprint(helpers.SHM_DIR, SESSION_PREFIX)
        go = ctx.Event()

        def child(i: int) -> None:
            go.wait(30)
            for j in range(20):
                k = 1000 * (i + 1) + j
                buf.add(k=k, v=np.full(3, i, np.uint8))

        procs = [ctx.Process(target=child, args=(i,)) for i in range(4)]
        for p in procs:
            p.start()
        go.set()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
            p.close()  # its sentinel pipe is multiprocessing's descriptor, not ours
        assert len(buf) == 80 and buf.stats()["inserts"] == 80
        seen = sorted(int(buf[i]["k"]) for i in range(80))
        assert seen == sorted(1000 * (i + 1) + j for i in range(4) for j in range(20))
        for i in range(80):
            row = buf[i]
            assert int(row["v"][0]) == int(row["k"]) // 1000 - 1
        assert buf.stats()["attached"] == 1
        del procs, go
        before.assert_same()


def test_handle_survives_fork_whatever_the_parent_does(shm_name):
    """The parent closes (and unlinks) its handle while the child still holds its inherited
    copy: the child's copy keeps working, and a reader attached before sees the child's rows."""
    buf = ReplayBuffer.create(shm_name, capacity=8, fields=TINY)
    buf.add(**row_for_key(TINY, 0))
    reader = ReplayBuffer.attach(shm_name)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(w)
            os.read(r, 1)  # wait until the parent has closed and unlinked its handle
            buf.add(**row_for_key(TINY, 1))
            assert len(buf) == 2 and not buf.closed
            assert_row_equal(buf[1], row_for_key(TINY, 1))
            buf.close()
            code = 0
        finally:
            os._exit(code)
    os.close(r)
    try:
        buf.unlink()
        buf.close()
        assert buf.closed
        os.write(w, b"x")
    finally:
        os.close(w)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert len(reader) == 2
    assert_row_equal(reader[1], row_for_key(TINY, 1))
    assert reader.stats()["attached"] == 1
    reader.close()


def test_closed_handle_stays_closed_in_a_fork_child(shm_name):
    with ReplayBuffer.create(shm_name, capacity=8, fields=TINY) as buf:
        other = ReplayBuffer.attach(shm_name)
        other.close()

        def child():
            try:
                other.add(**row_for_key(TINY, 0))
            except ValueError as e:
                return str(e)
            return "no error"

        assert "closed" in run_forked(child, timeout=60)
        assert len(buf) == 0


def test_spawned_children_receive_pickled_buffers(shm_name):
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # spawn keeps one tracker fd for good: open it first
    ctx = multiprocessing.get_context("spawn")
    with ReplayBuffer.create(shm_name, capacity=64, fields=TINY) as buf:
        buf.extend(rows_for_keys(TINY, range(4)))
        before = Footprint(helpers.SHM_DIR, SESSION_PREFIX)
        with ctx.Pool(3) as pool:
            reports = pool.starmap(
                helpers.child_pickle_cycles_and_extend, [(buf, TINY, 4 + 10 * i, 10, 100) for i in range(3)], chunksize=1
            )
        for r in reports:
            assert r["fds"] == 0 and r["owner"] is False, r
            assert r["attached"] >= 2, r
        assert len(buf) == 34 and buf.stats()["inserts"] == 34
        # the children wrote at the same time: keys 4..33 are in slots 4..33, in some order
        by_value = {int(row_for_key(TINY, k)["k"]): k for k in range(34)}
        keys = [by_value[int(buf[i]["k"])] for i in range(34)]
        assert sorted(keys) == list(range(34)) and keys[:4] == [0, 1, 2, 3]
        for i, k in enumerate(keys):
            assert_row_equal(buf[i], row_for_key(TINY, k))
        assert helpers.wait_until(lambda: buf.stats()["attached"] == 1, timeout=10)
        assert buf.processes() == [os.getpid()]
        del pool
        before.assert_same()


def test_children_that_create_and_exit_leave_no_files(shm_dir):
    """Forked children create and remove buffers of their own (context manager, explicit
    unlink); nothing of theirs remains in the directory or in the parent."""
    before = Footprint(str(shm_dir), "")

    def child(i: int) -> int:
        for j in range(50):
            with ReplayBuffer.create(f"c{i}-{j}", capacity=8, fields=TINY, path=shm_dir) as b:
                b.add(**row_for_key(TINY, j))
        b = ReplayBuffer.create(f"c{i}-last", capacity=8, fields=TINY, path=shm_dir)
        b.unlink()
        return len(os.listdir(shm_dir))

    for i in range(4):
        assert run_forked(lambda i=i: child(i), timeout=60) == 0
    before.assert_same()
    assert os.listdir(shm_dir) == []
    assert shmreplay.gc(shm_dir) == []


def test_dead_creator_leaves_a_stale_buffer_that_gc_removes(shm_dir):
    """A child that creates a buffer and dies without closing leaves the file (by design: the
    buffer outlives processes); nothing of it stays in the parent, and gc removes it."""
    before = Footprint(str(shm_dir), "")

    def child() -> str:
        b = ReplayBuffer.create("orphan", capacity=8, fields=TINY, path=shm_dir)
        b.add(**row_for_key(TINY, 5))
        return b.path

    path = run_forked(child, timeout=60)
    assert os.listdir(shm_dir) == ["shmreplay.orphan"]
    with ReplayBuffer.inspect("orphan", path=shm_dir) as peek:
        assert peek.stats()["attached"] == 0 and len(peek) == 1
    assert [b["stale"] for b in shmreplay.list_buffers(shm_dir)] == [True]
    assert shmreplay.gc(shm_dir) == ["orphan"]
    assert not os.path.exists(path)
    before.assert_same()
