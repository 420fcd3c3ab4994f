"""Real processes (spawn and fork): attach by name, pickled and inherited handles, the
attached-process registry, and writers killed in the middle of a copy."""

from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np
import pytest

import shmreplay
from shmreplay import ReplayBuffer

import helpers
from helpers import (
    Child,
    assert_slots_hold_keys,
    pid_alive,
    record_fields,
    rows_for_keys,
    run_in_child,
    segment_path,
    validate_records,
    wait_until,
)


def test_child_writes_parent_reads(mp_ctx, shm_name, atari_fields):
    with ReplayBuffer.create(shm_name, capacity=32, fields=atari_fields) as buf:
        n = run_in_child(mp_ctx, helpers.child_write_keys, shm_name, None, atari_fields, 0, 20)
        assert n == 20
        assert len(buf) == 20
        assert buf.stats()["inserts"] == 20
        assert_slots_hold_keys(buf, atari_fields, range(20))
        # and a second child continues the ticket sequence, wrapping the ring
        run_in_child(mp_ctx, helpers.child_write_keys, shm_name, None, atari_fields, 20, 30)
        assert len(buf) == 32
        assert buf.stats()["inserts"] == 50
        assert_slots_hold_keys(buf, atari_fields, range(18, 50))
        # the children are gone and were not left registered
        assert buf.processes() == [os.getpid()]
        assert buf.stats()["attached"] == 1


def test_parent_writes_child_reads(mp_ctx, shm_name, atari_fields):
    with ReplayBuffer.create(shm_name, capacity=16, fields=atari_fields) as buf:
        buf.extend(rows_for_keys(atari_fields, range(40)))
        n = run_in_child(mp_ctx, helpers.child_check_keys, shm_name, None, atari_fields, list(range(24, 40)))
        assert n == 16


def test_child_attach_with_path(mp_ctx, shm_name, shm_dir, control_fields):
    with ReplayBuffer.create(shm_name, capacity=10, fields=control_fields, path=shm_dir) as buf:
        run_in_child(mp_ctx, helpers.child_write_keys, shm_name, str(shm_dir), control_fields, 0, 15)
        assert_slots_hold_keys(buf, control_fields, range(5, 15))
        run_in_child(mp_ctx, helpers.child_check_keys, shm_name, str(shm_dir), control_fields, list(range(5, 15)))
    assert not os.path.exists(segment_path(shm_name, shm_dir))


def test_pickled_handle_into_spawn_child(shm_name, shm_dir, atari_fields):
    ctx = multiprocessing.get_context("spawn")
    with ReplayBuffer.create(shm_name, capacity=12, fields=atari_fields, path=shm_dir) as buf:
        buf.extend(rows_for_keys(atari_fields, range(7)))
        out = run_in_child(ctx, helpers.child_use_handle, buf, atari_fields, list(range(7)), 7, 5, True)
        assert out["pid"] != os.getpid()
        assert out["is_owner"] is False  # a re-attached handle does not own the segment
        assert out["name"] == shm_name
        assert out["path"] == buf.path
        assert out["len"] == 12
        assert len(buf) == 12
        assert_slots_hold_keys(buf, atari_fields, range(12))
        assert os.path.exists(buf.path)
        assert buf.stats()["attached"] == 1


def test_pickled_handle_into_fork_child_via_pickle(shm_name, atari_fields):
    """Explicit pickle bytes sent to a fork child re-attach there too."""
    import pickle

    ctx = multiprocessing.get_context("fork")
    with ReplayBuffer.create(shm_name, capacity=12, fields=atari_fields) as buf:
        buf.extend(rows_for_keys(atari_fields, range(3)))
        data = pickle.dumps(buf)
        out = run_in_child(ctx, helpers.child_unpickle_and_use, data, atari_fields, list(range(3)), 3, 4)
        assert out["is_owner"] is False
        assert_slots_hold_keys(buf, atari_fields, range(7))


@pytest.mark.parametrize("close_in_child", [False, True])
def test_fork_inherited_handle_keeps_working(shm_name, atari_fields, close_in_child):
    ctx = multiprocessing.get_context("fork")
    with ReplayBuffer.create(shm_name, capacity=12, fields=atari_fields) as buf:
        buf.extend(rows_for_keys(atari_fields, range(7)))
        # the handle object itself travels through fork (fork args are not pickled)
        out = run_in_child(ctx, helpers.child_use_handle, buf, atari_fields, list(range(7)), 7, 5, close_in_child)
        assert out["pid"] != os.getpid()
        assert out["len"] == 12
        # the child's use (and close) of its inherited copy changed nothing for the parent
        assert not buf.closed
        assert os.path.exists(buf.path)
        assert len(buf) == 12
        assert buf.stats()["inserts"] == 12
        assert_slots_hold_keys(buf, atari_fields, range(12))
        assert os.getpid() in buf.processes()
        assert buf.stats()["attached"] >= 1
        buf.extend(rows_for_keys(atari_fields, range(12, 15)))
        assert_slots_hold_keys(buf, atari_fields, range(3, 15))
        other = ReplayBuffer.attach(shm_name)  # still attachable by name
        other.close()


def test_attached_processes_registry(mp_ctx, shm_name, control_fields):
    with ReplayBuffer.create(shm_name, capacity=8, fields=control_fields) as buf:
        ready, release = mp_ctx.Event(), mp_ctx.Event()
        child = Child(mp_ctx, helpers.child_attach_and_hold, shm_name, None, ready, release, True).start()
        try:
            assert ready.wait(60), "child did not attach"
            pids = buf.processes()
            assert child.pid in pids and os.getpid() in pids
            assert buf.stats()["attached"] == 2
            release.set()
            assert child.result(60) == child.pid
        finally:
            release.set()
            child.kill()
        assert child.pid not in buf.processes()
        assert buf.processes() == [os.getpid()]
        assert buf.stats()["attached"] == 1


def test_killed_process_is_not_listed(mp_ctx, shm_name, control_fields):
    with ReplayBuffer.create(shm_name, capacity=8, fields=control_fields) as buf:
        ready = mp_ctx.Event()
        child = Child(mp_ctx, helpers.child_attach_and_sleep, shm_name, None, ready).start()
        try:
            assert ready.wait(60), "child did not attach"
            assert child.pid in buf.processes()
            os.kill(child.pid, signal.SIGKILL)
            child.proc.join(30)
            assert not child.proc.is_alive()
        finally:
            child.kill()
        assert not pid_alive(child.pid)
        assert child.pid not in buf.processes(), "a dead process is still listed"
        assert buf.stats()["attached"] == 1
        # and the buffer is fully usable
        buf.extend(rows_for_keys(control_fields, range(3)))
        assert_slots_hold_keys(buf, control_fields, range(3))


KILL_FRAME = (4, 256, 256)  # 256 KiB per frame, 512 KiB per record: copies take a while
KILL_CAP = 8
KILL_BATCH = 16  # one extend = 8 MiB of copying, wrapping the ring twice


def test_writer_killed_mid_copy_neither_corrupts_nor_hangs(mp_ctx, shm_name):
    fields = record_fields(KILL_FRAME)
    with ReplayBuffer.create(shm_name, capacity=KILL_CAP, fields=fields) as buf:
        dead = []
        for _round in range(3):
            start = buf.stats()["inserts"]
            w = Child(mp_ctx, helpers.child_hammer_extend, shm_name, None, KILL_FRAME, 0, KILL_BATCH).start()
            try:
                progressed = wait_until(lambda: buf.stats()["inserts"] >= start + KILL_BATCH + 5, timeout=30)
                assert progressed, "writer made no progress"
                os.kill(w.pid, signal.SIGKILL)  # most likely in the middle of a slot copy
                w.proc.join(30)
                assert not w.proc.is_alive()
            finally:
                w.kill()
            dead.append(w.pid)
        # A fresh process (so that a hang is caught by a timeout, not by hanging the suite)
        # samples right away (no torn row, no hang), rewrites every slot, taking over any slot
        # a dead writer left in progress, and re-reads every slot.
        verifier_ctx = multiprocessing.get_context("spawn")
        stats = run_in_child(verifier_ctx, helpers.child_verify_after_kill, shm_name, None, 1, 5, timeout=120)
        assert stats["size"] == KILL_CAP
        for pid in dead:
            assert pid not in buf.processes()
        batch = buf.sample(32)
        assert validate_records(batch, n_writers=6) == (0, "")
        assert np.all(batch["action"] == 5)


def test_owner_process_exit_does_not_break_attached_reader(mp_ctx, shm_name, atari_fields):
    """The owner is the child: it creates, writes, and exits normally while the parent keeps
    its attached handle; the parent keeps reading what it can reach."""
    ready, release = mp_ctx.Event(), mp_ctx.Event()
    child = Child(mp_ctx, helpers.child_create_fill_hold, shm_name, atari_fields, 16, 10, ready, release).start()
    try:
        assert ready.wait(60), "child did not create the buffer"
        buf = ReplayBuffer.attach(shm_name)
        try:
            assert not buf.is_owner
            release.set()
            child.result(60)
            # the child used the context manager: the name is gone, our mapping is not
            assert not os.path.exists(segment_path(shm_name))
            assert len(buf) == 10
            assert_slots_hold_keys(buf, atari_fields, range(10))
            buf.extend(rows_for_keys(atari_fields, range(10, 14)))
            assert_slots_hold_keys(buf, atari_fields, range(14))
            assert buf.processes() == [os.getpid()]
        finally:
            buf.close()
    finally:
        release.set()
        child.kill()
        if os.path.exists(segment_path(shm_name)):
            shmreplay.remove(shm_name)
