"""Regression tests for the priority tree's crash and staleness handling, each provoking its
race for real: threads sharing one handle killed mid-update, a key from 2^24 laps back, and a
dead updater whose entry lock a forked child keeps holding."""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct
import threading
import time
from typing import Any

import numpy as np

import shmreplay

CAP = 4096
# Where a handle entry counts the tree changes its process has in flight (see
# protocol/handles.rs): entry bytes 104..112 in the `handles` section.
ENTRY_BYTES, E_TREE_CHANGES = 128, 104


def _create(name: str) -> shmreplay.ReplayBuffer:
    buf = shmreplay.ReplayBuffer.create(
        name, capacity=CAP, fields={"x": ((), np.float32)}, sampler=shmreplay.Prioritized(alpha=1.0, eps=0.0)
    )
    buf.extend({"x": np.zeros(CAP, np.float32)}, priority=1.0)
    return buf


def _changes_in_flight(buf: shmreplay.ReplayBuffer) -> list[int]:
    """Every used entry's count of tree changes in flight, read from the segment file."""
    data = np.memmap(buf.path, dtype=np.uint8, mode="r")
    sections = [struct.unpack_from("<8sQQQ", data, 136 + 32 * i) for i in range(8)]
    handles = next(offset for tag, offset, _, _ in sections if tag == b"handles\0")
    counts = [
        int(data[handles + ENTRY_BYTES * e + E_TREE_CHANGES : handles + ENTRY_BYTES * e + E_TREE_CHANGES + 8].view(np.uint64)[0])
        for e in range(8)
    ]
    del data
    return counts


def _exact_after_ordinary_calls(buf: shmreplay.ReplayBuffer, seconds: float = 5.0) -> tuple[float, float]:
    """Samples (an ordinary call) until priority_total equals the sum of the leaves' p (alpha 1,
    eps 0, integer priorities: exact in floating point) or `seconds` pass; returns both."""
    keys = np.arange(CAP, dtype=np.uint64)
    deadline = time.monotonic() + seconds
    while True:
        buf.sample(64)
        want, got = float(buf.priorities(keys).sum()), buf.stats()["priority_total"]
        if got == want or time.monotonic() > deadline:
            return got, want
        time.sleep(0.01)


def _two_threads_updating(name: str, ready: Any) -> None:
    buf = shmreplay.ReplayBuffer.attach(name)
    keys = np.arange(CAP, dtype=np.uint64)

    def loop(lo: int, hi: int) -> None:
        for j in range(1 << 30):
            buf.update_priorities(keys[lo:hi], np.full(hi - lo, 1000.0 if j % 2 else float(j % 50 + 1)))

    for lo, hi in ((0, CAP // 2), (CAP // 2, CAP)):
        threading.Thread(target=loop, args=(lo, hi), daemon=True).start()
    ready.send(True)
    time.sleep(60)


def test_threads_sharing_a_handle_killed_mid_update(name_factory: Any) -> None:
    """Two threads update through one handle (one entry); the process is SIGKILLed while they
    do. Whatever either left half-done, survivors' samples make the total exact again."""
    ctx = multiprocessing.get_context("spawn")
    buf = _create(name_factory())
    rng = np.random.default_rng(0)
    landed = 0
    try:
        for _ in range(5):
            ready, done = ctx.Pipe(False)
            proc = ctx.Process(target=_two_threads_updating, args=(buf.name, done))
            proc.start()
            assert ready.recv()
            time.sleep(rng.uniform(0.05, 0.3))
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            landed += any(_changes_in_flight(buf))  # killed with a change in flight
            got, want = _exact_after_ordinary_calls(buf)
            assert got == want, f"priority_total {got}, the leaves sum to {want}"
            assert not any(_changes_in_flight(buf)), "the dead entry's count was not reset"
        assert landed, "no kill landed while a change was in flight: the race was not provoked"
    finally:
        buf.unlink()
        buf.close()


def _fork_then_update(name: str, report: Any) -> None:
    buf = shmreplay.ReplayBuffer.attach(name)
    buf.update_priorities(np.array([0], np.uint64), np.array([1.0]))
    child = os.fork()
    if child == 0:  # a worker that never touches the buffer, but inherits the lock's description
        time.sleep(30)
        os._exit(0)
    report.send(child)
    keys = np.arange(CAP, dtype=np.uint64)
    for j in range(1 << 30):
        buf.update_priorities(keys, np.full(CAP, 1000.0 if j % 2 else 3.0))


def test_a_forked_child_holding_a_dead_updaters_lock_does_not_block_the_repair(name_factory: Any) -> None:
    """The updater dies mid-change while a child it forked lives on, keeping the updater's
    entry lock held: the death is proved by pid, and the survivors repair anyway."""
    ctx = multiprocessing.get_context("spawn")
    buf = _create(name_factory())
    landed = 0
    try:
        for attempt in range(10):
            report, done = ctx.Pipe(False)
            proc = ctx.Process(target=_fork_then_update, args=(buf.name, done))
            proc.start()
            child = report.recv()
            try:
                time.sleep(0.2 + 0.01 * attempt)
                os.kill(proc.pid, signal.SIGKILL)
                proc.join()
                if not any(_changes_in_flight(buf)):
                    continue  # killed between two updates: nothing to repair this time
                landed += 1
                got, want = _exact_after_ordinary_calls(buf)
                assert got == want, f"with the child alive: priority_total {got}, the leaves sum to {want}"
            finally:
                os.kill(child, signal.SIGKILL)
            if landed >= 2:
                break
        assert landed, "no kill landed while a change was in flight: the race was not provoked"
    finally:
        buf.unlink()
        buf.close()


def test_a_key_from_2_24_laps_back_is_stale(name_factory: Any) -> None:
    """Leaf tags are the lap modulo 2^24 (or more): a key exactly 2^24 laps old shares its tag
    with the record now in its slot, and must still be refused as stale."""
    buf = shmreplay.ReplayBuffer.create(
        name_factory(), capacity=1, fields={"x": ((), np.uint8)}, sampler=shmreplay.Prioritized(alpha=1.0, eps=0.0)
    )
    try:
        buf.add(x=1, priority=1.0)
        old = buf.sample(1, return_info=True)[1]["key"].copy()
        # One call of 2^24 rows: all but the last are overwritten by the same call (never
        # written, so this is fast), and the last is the record 2^24 laps after `old`.
        buf.extend({"x": np.zeros(1 << 24, np.uint8)}, priority=2.0)
        current = buf.sample(1, return_info=True)[1]["key"]
        assert int(current[0]) == int(old[0]) + (1 << 24)
        assert buf.update_priorities(old, np.array([777.0])) == 0
        assert buf.stats()["stale_updates"] == 1
        assert buf.priorities(current)[0] == 2.0 and np.isnan(buf.priorities(old)[0])
    finally:
        buf.unlink()
        buf.close()
