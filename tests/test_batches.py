"""``batches()``: a background thread samples ahead into a ring of reusable batches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import shmreplay

FIELDS = {"x": ((16,), np.int64)}


def batch_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "shmreplay-batches")


def wait_until(condition, seconds: float = 2.0) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, "condition not reached"
        time.sleep(0.005)
    return time.monotonic() - start


def rows(first: int, n: int) -> dict[str, np.ndarray]:
    """Rows whose 16 values all equal their row number: a torn or refilled row shows."""
    return {"x": np.repeat(np.arange(first, first + n, dtype=np.int64)[:, None], 16, axis=1)}


@pytest.fixture
def filled(name_factory):
    with shmreplay.ReplayBuffer.create(name_factory(), capacity=512, fields=FIELDS) as buf:
        buf.extend(rows(0, 512))
        yield buf


def test_batches_are_whole_and_reused_in_a_ring(filled) -> None:
    seen = set()
    with filled.batches(8, prefetch=3) as it:
        for i, (batch, info) in enumerate(it):
            x = batch["x"]
            assert x.shape == (8, 16) and x.dtype == np.int64 and x.flags.c_contiguous
            assert (x == x[:, :1]).all(), "a row is not whole"
            assert (x[:, 0] == info["key"].astype(np.int64)).all()
            seen.add(id(x))
            if i == 40:
                break
    assert len(seen) == 4  # prefetch + 1 batches, reused


def test_a_held_batch_is_not_refilled_until_the_next_next(name_factory) -> None:
    with shmreplay.ReplayBuffer.create(name_factory(), capacity=64, fields=FIELDS) as buf:
        buf.extend(rows(0, 64))
        stop = threading.Event()

        def write() -> None:  # new rows all the time, so a refill would change the values
            n = 64
            while not stop.is_set():
                buf.extend(rows(n, 64))
                n += 64

        writer = threading.Thread(target=write)
        writer.start()
        try:
            with buf.batches(32, prefetch=1) as it:
                for _ in range(20):
                    batch, _ = next(it)
                    before = batch["x"].copy()
                    time.sleep(0.01)  # the thread fills the other batch meanwhile
                    np.testing.assert_array_equal(batch["x"], before)
        finally:
            stop.set()
            writer.join()


def test_copy_hands_out_fresh_arrays(filled) -> None:
    with filled.batches(4, copy=True) as it:
        got = [next(it)[0]["x"] for _ in range(6)]
    assert len({id(a) for a in got}) == 6
    assert all((a == a[:, :1]).all() for a in got)


def test_leaving_the_loop_stops_the_thread_at_once(filled) -> None:
    for i, _ in enumerate(filled.batches(4)):
        if i == 3:
            break
    # At once: a thread left running would never end; 1 s leaves room for a preemption.
    assert wait_until(lambda: batch_threads() == 0) < 1.0


def test_close_is_idempotent_and_ends_the_iteration(filled) -> None:
    it = filled.batches(4)
    next(it)
    it.close()
    it.close()
    assert batch_threads() == 0
    with pytest.raises(StopIteration):
        next(it)


def test_a_thread_waiting_on_a_limiter_stops_within_100_ms(name_factory) -> None:
    # The thread re-checks every 50 ms, so a close takes well under 100 ms; one measurement
    # on a loaded machine may include a preemption, so the bound is on the median of a few
    # attempts, and every attempt must end within a second (a close that waited for the
    # limiter - for ever here - or a lost wake-up would break that).
    took = []
    for _ in range(3):
        with shmreplay.ReplayBuffer.create(
            name_factory(), capacity=64, fields=FIELDS, limiter=shmreplay.MinSize(32)
        ) as buf:
            it = buf.batches(4)
            time.sleep(0.2)  # the thread is waiting for 32 rows
            start = time.monotonic()
            it.close()
            took.append(time.monotonic() - start)
            assert took[-1] < 1.0, took
            assert batch_threads() == 0
    assert sorted(took)[1] < 0.1, took


def test_shutdown_from_another_process_ends_the_iteration(name_factory) -> None:
    with shmreplay.ReplayBuffer.create(
        name_factory(), capacity=64, fields=FIELDS, limiter=shmreplay.MinSize(32)
    ) as buf:
        # The thread waits (nothing inserted) until another process shuts the buffer down.
        code = f"import shmreplay; shmreplay.ReplayBuffer.attach({buf.name!r}).shutdown()"
        it = buf.batches(4)
        time.sleep(0.2)
        other = subprocess.run([sys.executable, "-c", code], timeout=30)
        assert other.returncode == 0
        done = time.monotonic()
        assert list(it) == []
        assert time.monotonic() - done < 1.0  # ended by the shutdown, not by a timeout
        assert batch_threads() == 0


def test_errors_of_a_sample_are_raised_by_next(name_factory) -> None:
    with shmreplay.ReplayBuffer.create(name_factory(), capacity=8, fields=FIELDS) as buf:
        it = buf.batches(2)
        with pytest.raises(shmreplay.EmptyBufferError):
            next(it)
        with pytest.raises(StopIteration):
            next(it)
    with shmreplay.ReplayBuffer.create(
        name_factory(), capacity=8, fields=FIELDS, limiter=shmreplay.MinSize(4)
    ) as buf:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            next(buf.batches(2, timeout=0.2))
        assert 0.19 < time.monotonic() - start < 1.0


def test_bad_arguments_are_refused_before_any_thread_starts(filled, name_factory) -> None:
    for kwargs, error in [
        ({"prefetch": 0}, ValueError),
        ({"prefetch": 1.5}, TypeError),
        ({"copy": "yes"}, TypeError),
        ({"timeout": -1}, ValueError),
        ({"beta": 0.4}, TypeError),  # a uniform buffer
    ]:
        with pytest.raises(error):
            filled.batches(4, **kwargs)
    with pytest.raises(ValueError):
        filled.batches(0)
    assert batch_threads() == 0


def test_prioritized_batches_carry_weights_and_take_updates(name_factory) -> None:
    with shmreplay.ReplayBuffer.create(
        name_factory(), capacity=256, fields=FIELDS, sampler=shmreplay.Prioritized(alpha=1.0, eps=0.0)
    ) as buf:
        buf.extend(rows(0, 256), priority=np.arange(256, dtype=np.float64) + 1)
        for i, (batch, info) in enumerate(buf.batches(16, beta=1.0)):
            assert set(info) == {"index", "key", "probability", "weight", "priority"}
            assert (info["weight"] <= 1.0).all()
            buf.update_priorities(info["key"], np.ones(16))
            if i == 10:
                break


def test_episode_batches_of_steps_and_sequences(name_factory) -> None:
    fields = {"obs": ((3,), np.uint8), "action": ((), np.int32), "reward": ((), np.float32)}
    with shmreplay.EpisodeBuffer.create(name_factory(), capacity=500, fields=fields, frame_stack=2, n_step=2) as buf:
        w = buf.writer(num_envs=2)
        w.reset(obs=np.zeros((2, 3), np.uint8))
        for t in range(1, 120):
            ended = [t % 9 == 0, t % 13 == 0]
            w.step(obs=np.full((2, 3), t % 256, np.uint8), action=[t, t], reward=[1.0, 1.0],
                   terminated=ended, truncated=[False, False])
        for i, (batch, info) in enumerate(buf.batches(8)):
            assert batch["obs"].shape == (8, 2, 3) and batch["next_obs"].shape == (8, 2, 3)
            if i == 5:
                break
        with buf.batches(4, sequences=True, length=5, period=5) as it:
            seq, info = next(it)
            assert seq["obs"].shape == (4, 6, 2, 3) and seq["mask"].shape == (4, 5)
        with pytest.raises(TypeError):
            buf.batches(4, sequences=True)
        with pytest.raises(TypeError):
            buf.batches(4, length=5)
    assert wait_until(lambda: batch_threads() == 0) < 1.0


def test_ctrl_c_in_the_loop_stops_the_thread(name_factory) -> None:
    # Three rounds in one child: the thread's stop time is bounded by 100 ms on the median
    # (one round may be preempted on a loaded machine), and every round within a second (a
    # thread that kept waiting for the limiter - for ever here - breaks that).
    name = name_factory()
    rounds = 3
    code = textwrap.dedent(
        f"""
        import threading, time, sys
        import numpy as np, shmreplay
        buf = shmreplay.ReplayBuffer.create({name!r}, capacity=64, fields={{"x": ((4,), np.int64)}},
                                            limiter=shmreplay.MinSize(32))
        try:
            for _ in range({rounds}):
                try:
                    print("ready", flush=True)
                    for batch in buf.batches(4):  # waits for ever: nothing is inserted
                        pass
                except KeyboardInterrupt:
                    start = time.monotonic()
                    while any(t.name == "shmreplay-batches" for t in threading.enumerate()):
                        time.sleep(0.001)
                    print(f"stopped {{time.monotonic() - start:.3f}}", flush=True)
        finally:
            buf.unlink()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        stopped = []
        for _ in range(rounds):
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(0.3)
            sent = time.monotonic()
            proc.send_signal(signal.SIGINT)
            line = proc.stdout.readline().split()
            assert time.monotonic() - sent < 2.0
            assert line[0] == "stopped" and float(line[1]) < 1.0, line
            stopped.append(float(line[1]))
        assert sorted(stopped)[rounds // 2] < 0.1, stopped
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
