"""Adversarial tests for the hardened core: liveness that fails closed, no GIL stalls or
deadlocks while a write waits, gc/unlink that never remove what another process holds, dead
writers that never stall readers or skew ``len``, and hostile segments.

Every race here is made to overlap for real (barriers, events, a writer stopped inside its
copy by the test hook), and the tests assert that it did. Every wait is bounded: a call that
may hang runs in a child process that is killed after a deadline, so a hang fails the test
within about 30 s instead of stalling the run.

Test hook: ``helpers.extend_pausing`` (and ``helpers.PausedWriter``, a process stopped there)
uses ``shmreplay._core._test_extend_pausing(raw, columns, on_pause, stage)`` when the build has
it, else the older ``RawBuffer.extend_pausing`` (stage "copy" only).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import helpers
import shmreplay
from helpers import (
    PausedWriter,
    intervals_overlap,
    make_records,
    process_gone,
    record_fields,
    rows_for_keys,
    row_for_key,
    validate_records,
    wait_until,
)
from shmreplay import ReplayBuffer

FRAME = (4, 16, 16)  # 1 KiB frames: small records (one row well under 64 KiB)
ATARI = (4, 84, 84)  # 28 KiB frames: one row is ~56 KB (< 64 KiB), four rows are > 64 KiB
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ContendedError = getattr(shmreplay, "ContendedError", TimeoutError)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _popen(script: str, *args: str) -> subprocess.Popen:
    """A Python child running ``script`` with the tests directory importable, line-buffered
    text stdout, and SIGINT at its default disposition."""
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        preexec_fn=helpers.default_sigint,
    )


def _reap(proc: subprocess.Popen | None) -> str:
    """Kill (if still running) and reap a child; return its stderr for messages."""
    if proc is None:
        return ""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        except ProcessLookupError:
            pass
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        return f"(child {proc.pid} did not die)"
    try:
        return (proc.stderr.read() if proc.stderr is not None else "") or ""
    except ValueError:  # already closed
        return ""


def _discard(buf: ReplayBuffer) -> None:
    """Remove a test's buffer and close the handle, whatever state the test left it in."""
    try:
        buf.unlink()
    except (FileNotFoundError, ValueError):
        pass
    finally:
        buf.close()


class Lines:
    """Collects a child's stdout lines as they come, with this process's receive time."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[tuple[float, str]] = []
        self.cv = threading.Condition()
        self.eof = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cv:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self.cv.notify_all()
        with self.cv:
            self.eof = True
            self.cv.notify_all()

    def find(self, prefix: str) -> tuple[float, str] | None:
        with self.cv:
            for item in self.lines:
                if item[1].startswith(prefix):
                    return item
        return None

    def wait_for(self, prefix: str, timeout: float) -> tuple[float, str] | None:
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                for item in self.lines:
                    if item[1].startswith(prefix):
                        return item
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    return None
                self.cv.wait(left)

    def ticks_between(self, t0: float, t1: float) -> int:
        """Counter-thread lines ``tick N T`` whose child-side time T is in [t0, t1]."""
        with self.cv:
            ticks = [line.split() for _, line in self.lines if line.startswith("tick ")]
        return sum(1 for t in ticks if len(t) == 3 and t0 <= float(t[2]) <= t1)

    def text(self) -> str:
        with self.cv:
            return "\n".join(line for _, line in self.lines[-40:] if not line.startswith("tick "))


def _recv(conn: Any, timeout: float, what: str) -> tuple:
    if not conn.poll(timeout):
        raise AssertionError(f"{what}: no message within {timeout}s")
    msg = conn.recv()
    if msg[0] == "err":
        raise AssertionError(f"{what} failed:\n{msg[1]}")
    return msg


def _one(row: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[None] for k, v in row.items()}


def _assert_whole(buf: ReplayBuffer, i: int, n_writers: int) -> dict[str, Any]:
    row = buf[i]
    nbad, desc = validate_records(_one(row), n_writers=n_writers)
    assert nbad == 0, f"slot {i} holds a torn row: {desc}"
    return row


def _who(row: dict[str, Any]) -> tuple[int, int]:
    """(writer id, sequence number) of a self-validating record."""
    return int(np.asarray(row["action"])), int(np.asarray(row["step"]))


# =======================================================================================
# A. Liveness fails closed
# =======================================================================================


@pytest.mark.parametrize("full", ["checker", "writer"])
def test_live_writer_is_never_taken_over_when_its_liveness_cannot_be_checked(mp_ctx, shm_name, full):
    """A live writer stopped mid-copy must be waited for, never taken over, even when the
    process checking it cannot open anything (its descriptor table is full: /proc reads, pidfds
    and the like fail with EMFILE), or when the paused writer's own table is full. Unprovable
    death means "alive": after the paused writer resumes, every slot is whole and nothing was
    recovered."""
    fields = record_fields(FRAME)
    cap = 4
    with ReplayBuffer.create(shm_name, capacity=cap, fields=fields) as buf:
        buf.extend(make_records(0, range(cap), FRAME))  # tickets 0-3 fill the ring
        # ticket 4, slot 0: paused mid-copy, alive
        writer = PausedWriter(mp_ctx, shm_name, None, make_records(1, [100], FRAME), resumable=True, fill_fds=full == "writer")
        writer.start()
        checker = None
        parent_end, child_end = mp_ctx.Pipe(duplex=False)
        try:
            assert writer.slot == 0
            if full == "writer":
                assert writer.fds_opened > 0
            # tickets 5-8: slots 1, 2, 3, then slot 0, whose previous writer is paused
            checker = mp_ctx.Process(
                target=helpers.child_insert_reporting,
                args=(shm_name, None, make_records(2, range(4), FRAME), child_end, full == "checker"),
                daemon=True,
            )
            checker.start()
            inserting = _recv(parent_end, 60, "second writer")
            assert inserting[0] == "inserting", inserting
            if full == "checker":
                assert inserting[1] > 0, "the second writer's descriptor table was not filled"
            # A takeover takes milliseconds; a waiting writer is still waiting after 1.5 s.
            early = _recv(parent_end, 1.5, "second writer") if parent_end.poll(1.5) else None
            assert early is None, (
                f"the second writer finished while slot 0's writer (alive, paused mid-copy) still "
                f"held it: it took over a live writer: {early}"
            )
            assert checker.is_alive()
            writer.resume()
            writer.wait_done(30)
            result = _recv(parent_end, 30, "second writer (after the first resumed)")
        finally:
            writer.kill()
            if checker is not None:
                checker.kill()
                checker.join(30)
        assert result[0] == "done", f"the waiting writer failed: {result}"
        for i in range(cap):
            _assert_whole(buf, i, n_writers=3)
        assert _who(buf[0]) == (2, 3), "slot 0 must hold the newer row (written after the paused writer committed)"
        assert [_who(buf[i]) for i in (1, 2, 3)] == [(2, 0), (2, 1), (2, 2)]
        stats = buf.stats()
        assert stats["recovered"] == 0, stats
        assert len(buf) == cap


def test_writer_killed_mid_copy_is_taken_over_by_the_next_writer_of_its_slot(mp_ctx, shm_name):
    """Positive proof of death (SIGKILL: the kernel released everything it held) lets the next
    writer of the slot take it over at once: recovered == 1, the slot holds the new row."""
    fields = record_fields(FRAME)
    cap = 4
    with ReplayBuffer.create(shm_name, capacity=cap, fields=fields) as buf:
        buf.extend(make_records(0, range(cap), FRAME))
        writer = PausedWriter(mp_ctx, shm_name, None, make_records(1, [100], FRAME)).start()
        assert writer.slot == 0
        writer.kill()
        parent_end, child_end = mp_ctx.Pipe(duplex=False)
        nxt = mp_ctx.Process(
            target=helpers.child_insert_reporting,
            args=(shm_name, None, make_records(2, range(4), FRAME), child_end, False),
            daemon=True,
        )
        nxt.start()
        try:
            inserting = _recv(parent_end, 60, "next writer")
            result = _recv(parent_end, 30, "next writer")
        finally:
            nxt.kill()
            nxt.join(30)
        assert result[0] == "done", result
        assert result[1] - inserting[2] < 5, f"took {result[1] - inserting[2]:.1f}s to take over a dead writer's slot"
        stats = buf.stats()
        assert stats["recovered"] == 1, stats
        assert len(buf) == cap
        assert _who(_assert_whole(buf, 0, n_writers=3)) == (2, 3)
        for i in range(cap):
            _assert_whole(buf, i, n_writers=3)


# =======================================================================================
# B. No GIL stalls, no deadlocks; a waiting write gives up in the end
# =======================================================================================

WAITING_ADD = r"""
import os, sys, threading, time
import helpers, shmreplay
def say(line):  # one write(2) per line: lines of different threads never interleave
    os.write(1, (line + "\n").encode())
name, frame = sys.argv[1], tuple(int(x) for x in sys.argv[2].split(","))
buf = shmreplay.ReplayBuffer.attach(name)
row = {k: v[0] for k, v in helpers.make_records(9, [0], frame).items()}
stop = threading.Event()
def counter():
    n = 0
    while not stop.is_set():
        n += 1
        say(f"tick {n} {time.monotonic():.6f}")
        time.sleep(0.02)
threading.Thread(target=counter, daemon=True).start()
time.sleep(0.2)
say(f"adding {time.monotonic():.6f}")
t0 = time.monotonic()
try:
    buf.add(**row)
    say(f"returned {time.monotonic() - t0:.3f}")
except KeyboardInterrupt:
    say(f"interrupted {time.monotonic() - t0:.3f}")
except BaseException as e:
    say(f"raised {type(e).__name__} {time.monotonic() - t0:.3f} {e}")
stop.set()
"""


def test_add_waiting_on_a_stopped_writer_leaves_other_threads_running_and_obeys_ctrl_c(shm_name):
    """A small add() (the path that keeps the GIL) waiting for a slot whose writer is a live,
    SIGSTOPped process must not freeze the other threads of its process, and SIGINT must make
    it raise KeyboardInterrupt within about a second."""
    ctx = multiprocessing.get_context("fork")
    fields = record_fields(FRAME)
    buf = ReplayBuffer.create(shm_name, capacity=1, fields=fields)
    buf.extend(make_records(0, [0], FRAME))
    writer = PausedWriter(ctx, shm_name, None, make_records(1, [1], FRAME)).start()  # ticket 1, slot 0
    proc = None
    try:
        writer.stop()
        proc = _popen(WAITING_ADD, shm_name, ",".join(map(str, FRAME)))  # its add: ticket 2, slot 0
        lines = Lines(proc)
        adding = lines.wait_for("adding", 30)
        assert adding is not None, f"the child never started its add: {_reap(proc)}"
        t_add = float(adding[1].split()[1])
        time.sleep(1.5)
        ended_early = lines.find("returned") or lines.find("raised") or lines.find("interrupted")
        ticks = lines.ticks_between(t_add + 0.3, t_add + 1.5)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        interrupted = lines.wait_for("interrupted", 5)
        outcome = lines.text()
    finally:
        err = _reap(proc)
        writer.kill()
        _discard(buf)
    assert ended_early is None, f"add() did not wait for the live writer's slot: {ended_early}"
    problems = []
    if ticks < 10:
        problems.append(f"another thread ticked {ticks} times in 1.2 s while add() waited (expected ~60): the GIL was held")
    if interrupted is None:
        problems.append("SIGINT did not interrupt the waiting add() within 5 s")
    elif interrupted[0] - sent > 1.5:
        problems.append(f"SIGINT took {interrupted[0] - sent:.2f}s to interrupt add()")
    assert not problems, "; ".join(problems) + f"\nchild output:\n{outcome}\n{err}"


TWO_THREADS_ONE_HANDLE = r"""
import os, sys, threading, time
import helpers, shmreplay
name = sys.argv[1]
frame = (4, 84, 84)
buf = shmreplay.ReplayBuffer.attach(name)
big = helpers.make_records(10, range(4), frame)     # > 64 KiB: the path that releases the GIL
small = helpers.make_records(11, range(3), frame)   # one row ~56 KB: the path that keeps it
def emit(msg):  # one write(2) per line: lines of different threads never interleave
    os.write(1, f"{msg} {time.monotonic():.6f}\n".encode())
stop = threading.Event()
def counter():
    n = 0
    while not stop.is_set():
        n += 1
        emit(f"tick {n}")
        time.sleep(0.02)
def t1():
    try:
        emit("t1-start"); buf.extend(big); emit("t1-done")
    except BaseException as e:
        emit(f"t1-error {type(e).__name__}")
def t2():
    try:
        emit("t2-start")
        for i in range(3):
            buf.add(**{k: v[i] for k, v in small.items()})
        emit("t2-done")
    except BaseException as e:
        emit(f"t2-error {type(e).__name__}")
threading.Thread(target=counter, daemon=True).start()
a = threading.Thread(target=t1, daemon=True); a.start()
time.sleep(0.5)
b = threading.Thread(target=t2, daemon=True); b.start()
while a.is_alive() or b.is_alive():
    time.sleep(0.05)
emit("all-done")
stop.set()
"""


def test_two_threads_on_one_handle_waiting_on_a_stopped_writer_do_not_deadlock(shm_name):
    """Thread 1 extends atari rows (> 64 KiB) and has to wait for a slot whose writer is a
    SIGSTOPped process; thread 2 then add()s small rows through the same handle. The process
    stays responsive (a counter thread keeps ticking), and once the stopped writer is continued
    and finishes, both threads finish: no deadlock between the handle's lock and the GIL."""
    ctx = multiprocessing.get_context("fork")
    fields = record_fields(ATARI)
    cap = 4
    buf = ReplayBuffer.create(shm_name, capacity=cap, fields=fields)
    buf.extend(make_records(0, range(cap), ATARI))  # tickets 0-3
    # ticket 4, slot 0: paused inside its copy, then SIGSTOPped
    writer = PausedWriter(ctx, shm_name, None, make_records(1, [100], ATARI), resumable=True).start()
    proc = None
    try:
        assert writer.slot == 0
        writer.stop()
        proc = _popen(TWO_THREADS_ONE_HANDLE, shm_name)  # t1: tickets 5-8 (slot 0 last)
        lines = Lines(proc)
        t2_start = lines.wait_for("t2-start", 30)
        assert t2_start is not None, f"thread 2 never started: {lines.text()} {_reap(proc)}"
        t0 = float(t2_start[1].split()[1])
        time.sleep(1.5)
        t1_done_early = lines.find("t1-done") or lines.find("t1-error")
        ticks = lines.ticks_between(t0 + 0.3, t0 + 1.5)
        writer.resume()  # release the hook, SIGCONT: the writer finishes ticket 4
        all_done = lines.wait_for("all-done", 15)
        outcome = lines.text()
        writer_done = writer.wait_done(15) if all_done else None
    finally:
        err = _reap(proc)
        writer.kill()
    try:
        assert t1_done_early is None, f"thread 1 did not wait for the stopped writer's slot: {t1_done_early}"
        problems = []
        if ticks < 10:
            problems.append(f"the counter thread ticked {ticks} times in 1.2 s while both writers waited (expected ~60)")
        if all_done is None:
            problems.append("the two writer threads did not both finish within 15 s of SIGCONT: deadlock")
        assert not problems, "; ".join(problems) + f"\nchild output:\n{outcome}\n{err}"
        assert "t1-done" in outcome and "t2-done" in outcome, outcome
        assert writer_done is not None and writer_done[0] == "done"
        for i in range(cap):
            _assert_whole(buf, i, n_writers=12)
        assert _who(buf[0]) == (10, 3)
        assert buf.stats()["recovered"] == 0
    finally:
        _discard(buf)


CONTENDED_WRITE = r"""
import sys, time
import helpers, shmreplay
name, call = sys.argv[1], sys.argv[2]
buf = shmreplay.ReplayBuffer.attach(name)
expected = getattr(shmreplay, "ContendedError", TimeoutError)
if call == "add":
    row = {k: v[0] for k, v in helpers.rows_for_keys(buf.fields, [99]).items()}
else:
    batch = helpers.rows_for_keys(buf.fields, range(90, 94))
print("ready", flush=True)
t0 = time.monotonic()
try:
    if call == "add":
        buf.add(**row)
    else:
        buf.extend(batch)
    print(f"returned {time.monotonic() - t0:.3f}", flush=True)
except BaseException as e:
    ok = isinstance(e, expected) and isinstance(e, TimeoutError)
    print(f"raised {type(e).__name__} {int(ok)} {time.monotonic() - t0:.3f} {e}", flush=True)
"""

BIG_FIELDS = {"obs": ((4, 84, 84), np.uint8), "x": ((), np.int64)}  # a row ~28 KB; 4 rows > 64 KiB


def _run_contended(script_args: tuple[str, ...], bound: float) -> str | None:
    """Runs CONTENDED_WRITE in a child; returns its "returned ..."/"raised ..." line, or None if
    it was still waiting after ``bound`` seconds (or died). The child is killed afterwards."""
    proc = _popen(CONTENDED_WRITE, *script_args)
    lines = Lines(proc)
    try:
        ready = lines.wait_for("ready", 30)
        assert ready is not None, f"the writing child never got ready: {_reap(proc)}"
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline and not lines.eof:
            if lines.find("returned") or lines.find("raised"):
                break
            time.sleep(0.05)
        item = lines.find("returned") or lines.find("raised")
        return None if item is None else item[1]
    finally:
        err = _reap(proc)
        if err.strip():
            sys.stderr.write(f"[writing child stderr]\n{err[-2000:]}\n")


@pytest.mark.parametrize("call", ["add", "extend"])
def test_write_waiting_on_a_stopped_writer_gives_up_with_contended_error(shm_name, call):
    """A write whose slot's previous writer stays alive but stopped (SIGSTOP) gives up after
    about 10 s with ContendedError (a TimeoutError), having written nothing; the stopped writer
    can still finish its own row afterwards. Bounded at 25 s (today: waits forever)."""
    ctx = multiprocessing.get_context("fork")
    buf = ReplayBuffer.create(shm_name, capacity=1, fields=BIG_FIELDS)
    buf.extend(rows_for_keys(BIG_FIELDS, [0]))
    writer = PausedWriter(ctx, shm_name, None, rows_for_keys(BIG_FIELDS, [1]), resumable=True).start()
    try:
        writer.stop()
        started = time.monotonic()
        line = _run_contended((shm_name, call), bound=25)
        elapsed = time.monotonic() - started
        assert line is not None, f"the {call} was still waiting after {elapsed:.0f}s: no give-up (it would wait forever)"
        assert line.startswith("raised"), f"the {call} overwrote the slot of a live (stopped) writer: {line}"
        _, name, ok, took, *_ = line.split(" ", 4)
        assert ok == "1", f"expected {ContendedError.__name__} (a TimeoutError), got: {line}"
        assert 5 <= float(took) <= 25, f"gave up after {took}s, expected about 10 s"
        assert buf.stats()["inserts"] == 1 and buf.stats()["recovered"] == 0
        writer.resume()
        writer.wait_done(30)
        assert buf.stats()["inserts"] == 2
        helpers.assert_row_equal(buf[0], row_for_key(BIG_FIELDS, 1), where="slot 0")
    finally:
        writer.kill()
        _discard(buf)


# =======================================================================================
# C. gc and unlink
# =======================================================================================

CREATE_AND_DIE = """
import os, signal, sys, shmreplay
path, how, names = sys.argv[1], sys.argv[2], sys.argv[3:]
for name in names:
    buf = shmreplay.ReplayBuffer.create(name, capacity=8, fields={"x": ((), "int64")}, path=path)
    buf.add(x=1)
if how == "hold":
    print("ready", flush=True)
    sys.stdin.read()
else:
    os.kill(os.getpid(), signal.SIGKILL)
"""

ATTACH_AND_HOLD = """
import sys, shmreplay
path, names = sys.argv[1], sys.argv[2:]
held = [shmreplay.ReplayBuffer.attach(n, path=path) for n in names]
print("ready", flush=True)
sys.stdin.read()
"""


def _create_and_die(directory: Path, *names: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CREATE_AND_DIE, str(directory), "kill", *names], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _holder(script: str, directory: Path, *names: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(directory), *(["hold"] if script is CREATE_AND_DIE else []), *names],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def _release(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


@pytest.fixture
def shm_subdir():
    """A private directory on /dev/shm (tmpfs), removed afterwards."""
    d = Path("/dev/shm") / f"shmreplay-test-{os.getpid()}-{time.monotonic_ns()}"
    d.mkdir()
    try:
        yield d
    finally:
        for n in os.listdir(d):
            try:
                os.unlink(d / n)
            except FileNotFoundError:
                pass
        d.rmdir()


def _maps_show_deleted(path: str) -> bool:
    with open("/proc/self/maps") as f:
        return any(line.rstrip("\n").endswith(path + " (deleted)") for line in f)


def gc_worker(directory: str, barrier: Any, seconds: float, q: Any, threads: int = 1) -> None:
    """Child or thread: after the barrier, runs gc() back to back for ``seconds`` in ``threads``
    threads at once (gc releases the GIL); reports every call's interval and result, and every
    exception."""
    calls, errors = [], []

    def loop(deadline: float) -> None:
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                removed = shmreplay.gc(directory)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{type(e).__name__}: {e}")
                removed = []
            calls.append((t0, time.monotonic(), removed))

    try:
        barrier.wait(60)
        deadline = time.monotonic() + seconds
        workers = [threading.Thread(target=loop, args=(deadline,)) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(seconds + 60)
    except BaseException as e:  # noqa: BLE001
        errors.append(f"worker: {type(e).__name__}: {e}")
    q.put(("gc", os.getpid(), calls, errors))


def attach_worker(directory: str, barrier: Any, seconds: float, seed: int, q: Any) -> None:
    """Child: after the barrier, attaches to whatever buffer is in ``directory`` (stale ones
    included), uses it, checks it is still there while attached, closes; for ``seconds``."""
    ok, missing, violations, errors = [], 0, [], []
    rng = np.random.default_rng(seed)
    try:
        barrier.wait(60)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            names = [n[len("shmreplay."):] for n in os.listdir(directory) if n.startswith("shmreplay.")]
            if not names:
                time.sleep(0.001)
                continue
            name = str(rng.choice(names))
            t0 = time.monotonic()
            try:
                h = ReplayBuffer.attach(name, path=directory)
            except FileNotFoundError:
                missing += 1
                continue
            except Exception as e:  # noqa: BLE001
                errors.append(f"attach {name}: {type(e).__name__}: {e}")
                continue
            try:
                t1 = time.monotonic()
                h.add(x=7)
                time.sleep(0.002)  # hold it while the gcs run
                if not os.path.exists(h.path) or _maps_show_deleted(h.path):
                    violations.append(f"{name}: attached at {t0:.6f}, then its file was removed")
                ok.append((t0, t1, name))
            finally:
                h.close()
    except BaseException as e:  # noqa: BLE001
        errors.append(f"worker: {type(e).__name__}: {e}")
    q.put(("attach", os.getpid(), ok, missing, violations, errors))


def stale_factory(directory: str, barrier: Any, seconds: float, q: Any) -> None:
    """Child: keeps making stale buffers (a forked grandchild creates a few and dies)."""
    made, errors = 0, []
    try:
        barrier.wait(60)
        deadline = time.monotonic() + seconds
        rnd = 0
        while time.monotonic() < deadline:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - grandchild
                code = 0
                try:
                    for j in range(16):
                        name = f"churn{os.getpid()}-{rnd}-{j}"
                        ReplayBuffer.create(name, capacity=8, fields={"x": ((), "int64")}, path=directory)
                except BaseException:  # noqa: BLE001
                    code = 1
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            if status != 0:
                errors.append(f"factory grandchild exit status {status:#x}")
            made += 16
            rnd += 1
            time.sleep(0.005)
    except BaseException as e:  # noqa: BLE001
        errors.append(f"factory: {type(e).__name__}: {e}")
    q.put(("factory", os.getpid(), made, errors))


def test_concurrent_gcs_and_attaches_never_remove_a_held_buffer_nor_raise(shm_subdir):
    """Many gc() runs at once (2 processes of 2 threads, 2 threads here, and the `shmreplay gc`
    CLI in a loop) while 2 processes attach to whatever is in the directory and a factory keeps
    making stale buffers: no gc raises (no FileNotFoundError from two gcs removing the same
    file), the CLI exits 0, a buffer some live process holds is never removed, and an attach
    that succeeds never finds its file removed while it holds it. (Catching the double-removal
    race here is probabilistic; test_simultaneous_gcs_on_the_same_stale_buffers_never_raise
    catches it reliably.)"""
    d = shm_subdir
    stale = [f"stale{i}" for i in range(60)]
    _create_and_die(d, *stale)
    attached_only = [f"held{i}" for i in range(6)]  # creator dead, held by an attached process
    _create_and_die(d, *attached_only)
    keeper = _holder(ATTACH_AND_HOLD, d, *attached_only)
    creator = _holder(CREATE_AND_DIE, d, *[f"live{i}" for i in range(6)])  # creator alive
    protected = set(attached_only) | {f"live{i}" for i in range(6)}
    ctx = multiprocessing.get_context("fork")
    seconds = 3.0
    barrier = ctx.Barrier(2 + 2 + 2 + 1 + 1)  # gc procs, gc threads, attachers, factory, main
    q = ctx.Queue()
    procs = [ctx.Process(target=gc_worker, args=(str(d), barrier, seconds, q, 2), daemon=True) for _ in range(2)]
    procs += [ctx.Process(target=attach_worker, args=(str(d), barrier, seconds, s, q), daemon=True) for s in range(2)]
    procs.append(ctx.Process(target=stale_factory, args=(str(d), barrier, seconds, q), daemon=True))
    for p in procs:
        p.start()
    threads = [threading.Thread(target=gc_worker, args=(str(d), barrier, seconds, q), daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    cli_runs = []
    reports = []
    try:
        barrier.wait(60)
        deadline = time.monotonic() + seconds
        # the CLI runs while the workers do, and at least twice (each run starts an interpreter,
        # which a loaded machine may take most of the workers' 3 s to do)
        while time.monotonic() < deadline or (len(cli_runs) < 2 and time.monotonic() < deadline + 60):
            t0 = time.monotonic()
            r = subprocess.run(
                [sys.executable, "-m", "shmreplay.cli", "gc", "--path", str(d)], capture_output=True, text=True, timeout=60
            )
            cli_runs.append((t0, time.monotonic(), r.returncode, r.stderr.strip()[-300:], r.stdout))
        for _ in range(len(procs) + len(threads)):
            reports.append(q.get(timeout=60))
        for t in threads:
            t.join(30)
    finally:
        helpers.kill_and_reap(procs)
        surviving = {n[len("shmreplay."):] for n in os.listdir(d) if n.startswith("shmreplay.")}
        _release(keeper)
        _release(creator)
    gcs = [r for r in reports if r[0] == "gc"]
    attaches = [r for r in reports if r[0] == "attach"]
    factories = [r for r in reports if r[0] == "factory"]
    errors = [e for r in gcs for e in r[3]] + [e for r in attaches for e in r[5]] + [e for r in factories for e in r[3]]
    violations = [v for r in attaches for v in r[4]]
    removed_protected = sorted({n for r in gcs for c in r[2] for n in c[2]} & protected)
    bad_cli = [c for c in cli_runs if c[2] != 0]
    assert not errors, f"{len(errors)} errors, e.g. {errors[:5]}"
    assert not bad_cli, f"`shmreplay gc` failed {len(bad_cli)} of {len(cli_runs)} times: {bad_cli[:3]}"
    assert not violations, violations[:5]
    assert not removed_protected, f"gc removed buffers held by live processes: {removed_protected}"
    assert protected <= surviving, f"held buffers gone: {sorted(protected - surviving)}"
    # The races really happened: gcs that removed something ran at the same time as other gcs
    # and as successful attaches.
    calls = [(r[1], c) for r in gcs for c in r[2]]  # (pid, (t0, t1, removed))
    removing = [(pid, c) for pid, c in calls if c[2]]
    assert sum(len(c[2]) for _, c in calls) >= len(stale), "the gcs removed less than the stale buffers"
    overlapping_gcs = sum(1 for _, c in removing for _, c2 in calls if c2 is not c and intervals_overlap(c[:2], c2[:2]))
    assert overlapping_gcs > 0, "no gc that removed something ran concurrently with another gc"
    ok_attaches = [a for r in attaches for a in r[2]]
    assert len(ok_attaches) > 20, f"only {len(ok_attaches)} successful attaches"
    overlapping = sum(1 for a in ok_attaches if any(intervals_overlap(a[:2], c[:2]) for _, c in removing))
    assert overlapping > 0, "no successful attach overlapped a gc that was removing buffers"
    assert len(cli_runs) >= 2 and sum(f[2] for f in factories) > 0


# Rounds go on until the evidence is there (GC_RACE_MIN_ROUNDS rounds, GC_RACE_ENOUGH_MET of
# them racing); GC_RACE_SECONDS is only a ceiling for a machine too loaded to get there (a few
# seconds suffice on an idle one).
GC_RACERS, GC_RACE_THREADS, GC_RACE_ROUNDS, GC_RACE_SECONDS, GC_RACE_BUFFERS = 2, 3, 5000, 60.0, 100
GC_RACE_MIN_ROUNDS, GC_RACE_ENOUGH_MET = 40, 10


def _gcs_met(passes: list[tuple[float, float, int]]) -> bool:
    """True if two gc passes that both removed something overlapped in time."""
    busy = [p for p in passes if p[2] > 0]
    return any(intervals_overlap(x[:2], y[:2]) for k, x in enumerate(busy) for y in busy[k + 1 :])


def lockstep_gc_rounds(directory: str, me: int, shared: tuple, q: Any) -> None:
    """Child ``me`` of GC_RACERS: each round (racer 0 first makes 100 stale buffers through a
    forked grandchild that dies), all racers run gc() from the same instant, each in
    GC_RACE_THREADS threads at once (gc releases the GIL), so that they walk the directory in
    lockstep and reach the same stale buffers together; more gcs than cores also get preempted
    in the middle of removing a buffer. Racer 0 ends the
    rounds once enough of them had two gcs removing buffers at the same time (or a bound)."""
    barrier, go, stop, board = shared
    out, errors = [], []
    met = 0
    deadline = time.monotonic() + GC_RACE_SECONDS
    try:
        for i in range(GC_RACE_ROUNDS):
            if me == 0:
                pid = os.fork()
                if pid == 0:  # pragma: no cover - grandchild
                    try:
                        for j in range(GC_RACE_BUFFERS):
                            ReplayBuffer.create(f"g{i}-{j}", capacity=8, fields={"x": ((), "int64")}, path=directory)
                    finally:
                        os._exit(0)
                os.waitpid(pid, 0)
            barrier.wait(30)  # A: all ready
            if stop.value:
                break
            if me == 0:
                go.value = time.monotonic() + 0.010
            barrier.wait(30)  # B: go.value is set
            _until(go.value)
            passes: list[tuple[float, float, list[str]]] = []

            def one_gc() -> None:
                t0 = time.monotonic()
                try:
                    removed = shmreplay.gc(directory)
                except Exception as e:  # noqa: BLE001
                    errors.append(f"round {i}: {type(e).__name__}: {e}")
                    removed = []
                passes.append((t0, time.monotonic(), removed))

            threads = [threading.Thread(target=one_gc) for _ in range(GC_RACE_THREADS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            t0, t1 = min(p[0] for p in passes), max(p[1] for p in passes)
            removed = [n for p in passes for n in p[2]]
            out.append((t0, t1, removed))
            board[3 * me : 3 * me + 3] = [t0, t1, float(len(removed))]
            barrier.wait(30)  # C: every gc of the round has returned and posted its pass
            if me == 0:
                posted = [tuple(board[3 * k : 3 * k + 3]) for k in range(GC_RACERS)]
                met += _gcs_met(posted)  # type: ignore[arg-type]
                enough = met >= GC_RACE_ENOUGH_MET and i + 1 >= GC_RACE_MIN_ROUNDS
                if errors or enough or time.monotonic() > deadline:
                    stop.value = 1
    except BaseException as e:  # noqa: BLE001
        errors.append(f"racer {me}: {type(e).__name__}: {e}")
        barrier.abort()
    q.put((me, out, errors))


def test_simultaneous_gcs_on_the_same_stale_buffers_never_raise(shm_subdir, mp_ctx):
    """Two gc processes of three gc threads each start at the same instant, round after round,
    on 100 fresh stale buffers: they walk the directory together and reach the same buffers at
    once. No gc raises
    (FileNotFoundError when another gc removed the file first, ...), every stale buffer is
    removed by exactly one of them, and in at least 10 rounds two gcs were removing buffers at
    the same time (rounds go on, bounded, until then)."""
    shared = (mp_ctx.Barrier(GC_RACERS), mp_ctx.Value("d", 0.0), mp_ctx.Value("i", 0), mp_ctx.Array("d", 3 * GC_RACERS))
    q = mp_ctx.Queue()
    procs = [
        mp_ctx.Process(target=lockstep_gc_rounds, args=(str(shm_subdir), me, shared, q), daemon=True)
        for me in range(GC_RACERS)
    ]
    for p in procs:
        p.start()
    try:
        reports = sorted(q.get(timeout=GC_RACE_SECONDS + 60) for _ in procs)
    finally:
        helpers.kill_and_reap(procs)
    errors = [e for r in reports for e in r[2]]
    assert not errors, f"{len(errors)} gc errors, e.g. {errors[:3]}"
    rounds = min(len(r[1]) for r in reports)
    assert rounds >= GC_RACE_MIN_ROUNDS
    met = 0
    for i in range(rounds):
        removed = [n for r in reports for n in r[1][i][2]]
        assert sorted(removed) == sorted(f"g{i}-{j}" for j in range(GC_RACE_BUFFERS)), (
            f"round {i}: removed {sorted(removed)}"
        )
        met += _gcs_met([(r[1][i][0], r[1][i][1], len(r[1][i][2])) for r in reports])
    assert met >= GC_RACE_ENOUGH_MET, f"only {met} of {rounds} rounds had two gcs removing buffers at once"


LAUNCHER = r"""
import multiprocessing, multiprocessing.process, os, sys, time
import shmreplay
name, path, how, release = sys.argv[1:5]
buf = shmreplay.ReplayBuffer.create(name, capacity=8, fields={"x": ((), "int64")}, path=path)
buf.add(x=1)

def worker():
    # Holds the inherited handle object (the global `buf`) and never uses it.
    assert buf is not None
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)

p = multiprocessing.get_context("fork").Process(target=worker)
p.start()
# The launcher must not join its worker at exit (multiprocessing would): it leaves it running.
multiprocessing.process._children.discard(p)
print(p.pid, flush=True)
if how == "sigkill":
    time.sleep(60)
elif how == "os_exit":
    os._exit(0)
# how == "exit": a normal exit; Python finalizers (and the handle's) run
"""


@pytest.mark.parametrize("how", ["exit", "os_exit", "sigkill"])
def test_gc_keeps_a_buffer_whose_forked_worker_outlives_the_launcher(shm_subdir, tmp_path, how):
    """A launcher creates a buffer, forks a worker that only holds the inherited handle object,
    and exits (normally, through os._exit, or SIGKILLed). While the worker lives the buffer is
    in use (the worker can use its handle at any moment): gc must keep it. Once the worker has
    exited, gc removes it."""
    d = shm_subdir
    release = tmp_path / "release"
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, "launched", str(d), how, str(release)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    worker = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip().isdigit(), f"launcher said {line!r}: {proc.stderr.read() if proc.poll() is not None else ''}"
        worker = int(line)
        if how == "sigkill":
            proc.kill()
        proc.wait(30)
        assert not process_gone(worker), "the worker died with its launcher"
        assert os.path.exists(d / "shmreplay.launched")
        listed = {b["name"]: b for b in shmreplay.list_buffers(d)}
        removed = shmreplay.gc(d)
        still_there = os.path.exists(d / "shmreplay.launched")
        assert removed == [] and still_there, (
            f"gc removed a buffer whose worker (pid {worker}) is alive and holds a handle "
            f"(listed as {listed.get('launched')})"
        )
        assert listed["launched"]["stale"] is False
        with ReplayBuffer.attach("launched", path=d) as h:
            assert len(h) == 1
        assert shmreplay.gc(d) == [], "gc removed it once this process had attached and closed"
        release.write_text("go")
        assert wait_until(lambda: process_gone(worker), 30), "the worker did not exit"
        assert shmreplay.gc(d) == ["launched"]
        assert not os.path.exists(d / "shmreplay.launched")
    finally:
        release.write_text("go")
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
        if worker is not None and not process_gone(worker):
            os.kill(worker, signal.SIGKILL)


def test_unlink_of_a_removed_buffer_never_deletes_its_successor(shm_name):
    """a = create(n); remove(n); b = create(n): a.unlink() must not remove b's file. It raises
    FileNotFoundError (a's segment is already gone), and b is still there and attachable."""
    fields = {"x": ((), np.int64)}
    a = ReplayBuffer.create(shm_name, capacity=4, fields=fields)
    a.add(x=1)
    shmreplay.remove(shm_name)
    b = ReplayBuffer.create(shm_name, capacity=8, fields=fields)
    b.add(x=2)
    try:
        with pytest.raises(FileNotFoundError):
            a.unlink()
        assert os.path.exists(b.path), "a.unlink() deleted the new buffer b"
        with ReplayBuffer.attach(shm_name) as c:
            assert c.capacity == 8 and int(c[0]["x"]) == 2
        assert len(a) == 1 and int(a[0]["x"]) == 1  # a's own (unlinked) segment still works
    finally:
        a.close()
        b.close()
        if os.path.exists(helpers.segment_path(shm_name)):
            shmreplay.remove(shm_name)


def test_with_block_exit_never_deletes_a_successor_of_the_same_name(shm_name):
    """`with create(n) as a: remove(n); b = create(n)`: leaving the with-block must not remove b."""
    fields = {"x": ((), np.int64)}
    b = None
    try:
        with ReplayBuffer.create(shm_name, capacity=4, fields=fields) as a:
            a.add(x=1)
            shmreplay.remove(shm_name)
            b = ReplayBuffer.create(shm_name, capacity=8, fields=fields)
            b.add(x=2)
        assert os.path.exists(b.path), "leaving a's with-block deleted the new buffer b"
        with ReplayBuffer.attach(shm_name) as c:
            assert c.capacity == 8 and int(c[0]["x"]) == 2
    finally:
        if b is not None:
            b.close()
        if os.path.exists(helpers.segment_path(shm_name)):
            shmreplay.remove(shm_name)


def test_unlink_after_close_removes_the_segment(shm_name):
    """buf.close(); buf.unlink() removes the segment (it must neither raise nor leak the file)."""
    buf = ReplayBuffer.create(shm_name, capacity=4, fields={"x": ((), np.int64)})
    path = buf.path
    buf.close()
    try:
        buf.unlink()
        assert not os.path.exists(path), "close(); unlink() left the segment behind"
    finally:
        if os.path.exists(path):
            os.unlink(path)


PER_ROUND = 20  # stale buffers per round: gc's pass over them takes about as long as attaching them all


def _start_together(go: Any, round_seed: int, me: str) -> None:
    """Waits until the round's common start time ``go.value`` (CLOCK_MONOTONIC), plus 0-300 us
    on one side (which side and how long vary by round), so that over the rounds the attaches
    start before, with and after the gc's pass. A barrier alone wakes its waiters hundreds of
    microseconds (milliseconds under load) apart: the gc child sets ``go`` 10 ms ahead once
    both are at the barrier, and a second barrier publishes it."""
    rng = np.random.default_rng(round_seed)
    side, delay = ("gc", "attach")[int(rng.integers(2))], float(rng.uniform(0, 3e-4))
    _until(go.value + (delay if side == me else 0.0))


def _until(t: float) -> None:
    """Returns at CLOCK_MONOTONIC time ``t``: sleeps most of the way, spins the last 0.5 ms
    (spinning all the way, racers on 2 cores would deschedule one another)."""
    left = t - time.monotonic() - 5e-4
    if left > 0:
        time.sleep(left)
    while time.monotonic() < t:
        pass


# Rounds go on until the evidence is there (MIN_ROUNDS rounds, ENOUGH_* of them racing);
# RACE_SECONDS is the ceiling for a machine too loaded to get there (MAX_ROUNDS only a backstop:
# a busy machine races less often, 3 mixed rounds in 400 were seen with 2 CPU hogs).
MIN_ROUNDS, MAX_ROUNDS, RACE_SECONDS = 30, 5000, 60.0
ENOUGH_OVERLAPPED, ENOUGH_MIXED = 15, 5


def race_gc_rounds(directory: str, shared: tuple, q: Any) -> None:
    """Child: each round, a forked grandchild creates buffers r<i>-0..19 and dies (they are
    stale); then, at a common start time, gc() runs. Reports (t0, t1, removed) per round.
    Rounds go on until the attacher says it saw enough real overlaps (or a bound)."""
    barrier, go, stop, g0, g1 = shared
    out, errors = [], []
    try:
        for i in range(MAX_ROUNDS):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - grandchild
                try:
                    for j in range(PER_ROUND):
                        ReplayBuffer.create(f"r{i}-{j}", capacity=8, fields={"x": ((), "int64")}, path=directory)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
            barrier.wait(30)  # A: both ready
            if stop.value:
                break
            go.value = time.monotonic() + 0.010
            barrier.wait(30)  # B: the attacher reads go.value after this
            _start_together(go, i, "gc")
            t0 = time.monotonic()
            try:
                removed = shmreplay.gc(directory)
            except Exception as e:  # noqa: BLE001
                errors.append(f"round {i}: {type(e).__name__}: {e}")
                removed = []
            t1 = time.monotonic()
            out.append((t0, t1, removed))
            g0.value, g1.value = t0, t1
            barrier.wait(30)  # C: this round's gc has finished
    except BaseException as e:  # noqa: BLE001
        errors.append(f"gc child: {type(e).__name__}: {e}")
        barrier.abort()
    q.put(("gc", out, errors))


def race_attach_rounds(directory: str, shared: tuple, q: Any) -> None:
    """Child: each round, at the common start time, attaches every one of that round's stale
    buffers in a random order while the gc's pass runs, holding what it got; after the pass
    ended, each buffer it holds must still be there and usable. Reports (t0, t1, {name:
    outcome}) per round, and stops the rounds once enough of them really overlapped."""
    barrier, go, stop, g0, g1 = shared
    out, errors = [], []
    overlapped = mixed = 0
    deadline = time.monotonic() + RACE_SECONDS
    try:
        for i in range(MAX_ROUNDS):
            names = [f"r{i}-{j}" for j in np.random.default_rng(10_000 + i).permutation(PER_ROUND)]
            barrier.wait(30)  # A
            if stop.value:
                break
            barrier.wait(30)  # B
            _start_together(go, i, "attach")
            t0 = time.monotonic()
            held = {}
            for name in names:
                try:
                    held[name] = ReplayBuffer.attach(name, path=directory)
                except FileNotFoundError:
                    held[name] = None
            t1 = time.monotonic()
            barrier.wait(30)  # C: the gc of this round has finished
            outcome = {}
            for name, h in held.items():
                if h is None:
                    outcome[name] = "missing"
                    continue
                try:
                    there = os.path.exists(h.path) and not _maps_show_deleted(h.path)
                    h.add(x=i)
                    outcome[name] = "ok" if there else "attached-but-gone"
                finally:
                    h.close()
            out.append((t0, t1, outcome))
            overlapped += intervals_overlap((t0, t1), (g0.value, g1.value))
            mixed += len(set(outcome.values())) > 1
            enough = overlapped >= ENOUGH_OVERLAPPED and mixed >= ENOUGH_MIXED
            if (enough and i + 1 >= MIN_ROUNDS) or time.monotonic() > deadline or i + 1 == MAX_ROUNDS:
                stop.value = 1
    except BaseException as e:  # noqa: BLE001
        errors.append(f"attach child: {type(e).__name__}: {e}")
        barrier.abort()
    q.put(("attach", out, errors))


def test_attach_racing_gc_of_a_stale_buffer_never_ends_attached_to_a_removed_file(shm_subdir, mp_ctx):
    """Round after round, a gc pass over 20 stale buffers and attaches to each of them (random
    order) start at the same instant. Each attach either succeeds and the buffer stays (file
    there, usable, not reported removed) or fails with FileNotFoundError (and gc did remove
    it): never "attached, but the file is gone". Rounds continue (bounded) until 15 of them
    overlapped in time and 5 saw both outcomes in the same pass."""
    shared = (mp_ctx.Barrier(2), mp_ctx.Value("d", 0.0), mp_ctx.Value("i", 0), mp_ctx.Value("d", 0.0), mp_ctx.Value("d", 0.0))
    q = mp_ctx.Queue()
    procs = [
        mp_ctx.Process(target=race_gc_rounds, args=(str(shm_subdir), shared, q), daemon=True),
        mp_ctx.Process(target=race_attach_rounds, args=(str(shm_subdir), shared, q), daemon=True),
    ]
    for p in procs:
        p.start()
    try:
        reports = {r[0]: r for r in (q.get(timeout=RACE_SECONDS + 60), q.get(timeout=RACE_SECONDS + 60))}
    finally:
        helpers.kill_and_reap(procs)
    assert not reports["gc"][2] and not reports["attach"][2], (reports["gc"][2], reports["attach"][2])
    gcs, attaches = reports["gc"][1], reports["attach"][1]
    assert len(gcs) == len(attaches) >= MIN_ROUNDS
    bad = [(i, n) for i, a in enumerate(attaches) for n, o in a[2].items() if o == "attached-but-gone"]
    assert not bad, f"attached, then gc removed the file: {bad[:5]}"
    for i, (g, a) in enumerate(zip(gcs, attaches)):
        for name, o in a[2].items():
            if o == "ok":
                assert name not in g[2], f"round {i}: gc says it removed {name}, which was attached"
            else:
                assert name in g[2], f"round {i}: attach found no {name}, but this round's gc did not remove it"
    overlapped = sum(1 for g, a in zip(gcs, attaches) if intervals_overlap(g[:2], a[:2]))
    # Rounds where the same pass saw both outcomes: the attaches and the gc met in the middle.
    mixed = sum(1 for a in attaches if len(set(a[2].values())) > 1)
    assert overlapped >= ENOUGH_OVERLAPPED and mixed >= ENOUGH_MIXED, (
        f"in {len(gcs)} rounds only {overlapped} overlapped and {mixed} saw both outcomes"
    )


# =======================================================================================
# D. Dead writers never stall readers, and len() stays exact
# =======================================================================================


@pytest.mark.parametrize("before", ["empty", "overwrite"])
def test_buffer_whose_only_slot_lost_its_writer_mid_copy_answers_at_once(mp_ctx, shm_name, before):
    """Capacity 1; its writer is SIGKILLed mid-copy, the ring being empty ("empty") or its only
    row being overwritten ("overwrite"). Either way the buffer holds no record: sample(1) raises
    EmptyBufferError and buf[0] raises IndexError, each at once (< 1 s, not a 10 s spin or a
    TimeoutError), and len == 0."""
    fields = record_fields(FRAME)
    with ReplayBuffer.create(shm_name, capacity=1, fields=fields) as buf:
        if before == "overwrite":
            buf.extend(make_records(0, [0], FRAME))
        writer = PausedWriter(mp_ctx, shm_name, None, make_records(1, [1], FRAME)).start()
        writer.kill()
        started = time.monotonic()
        try:
            buf.sample(1)
            outcome = "returned a row"
        except Exception as e:  # noqa: BLE001
            outcome = e
        took = time.monotonic() - started
        assert isinstance(outcome, shmreplay.EmptyBufferError) and took < 1, (
            f"sample(1) with no record in the ring: {outcome!r} after {took:.2f}s"
        )
        started = time.monotonic()
        with pytest.raises(IndexError):
            buf[0]
        assert time.monotonic() - started < 1
        assert len(buf) == 0
        buf.extend(make_records(2, [2], FRAME))  # the next writer takes the slot over
        assert len(buf) == 1 and _who(_assert_whole(buf, 0, n_writers=3)) == (2, 2)


def test_writer_killed_in_a_huge_extend_never_stalls_sampling(mp_ctx, shm_name):
    """A writer killed mid-copy in the first row it writes of an extend larger than the ring
    (5000 rows into 1000 slots) on an empty buffer; then another writer adds 10 rows.
    sample(256) and sample(1024) return at once and only those 10 rows."""
    frame = (8,)
    fields = record_fields(frame)
    with ReplayBuffer.create(shm_name, capacity=1000, fields=fields) as buf:
        writer = PausedWriter(mp_ctx, shm_name, None, make_records(1, range(5000), frame)).start()
        writer.kill()
        assert len(buf) == 0
        buf.extend(make_records(2, range(10), frame))
        assert len(buf) == 10
        for n in (256, 1024):
            started = time.monotonic()
            batch = buf.sample(n)
            took = time.monotonic() - started
            assert took < 1, f"sample({n}) took {took:.2f}s"
            nbad, desc = validate_records(batch, n_writers=3)
            assert nbad == 0, desc
            assert np.all(batch["action"] == 2), "sampled a row that is not one of the 10 committed"
            assert set(batch["step"].tolist()) <= set(range(10))


def test_len_counts_a_row_whose_writer_died_between_commit_and_count(mp_ctx, shm_name):
    """Hook stage "count": the writer committed its row and was SIGKILLed before counting it.
    len() is the number of committed rows exactly (3 + that one), and the row is readable."""
    fields = record_fields(FRAME)
    with ReplayBuffer.create(shm_name, capacity=8, fields=fields) as buf:
        buf.extend(make_records(0, range(3), FRAME))
        writer = PausedWriter(mp_ctx, shm_name, None, make_records(1, [100], FRAME), stage="count").start()
        assert writer.slot == 3
        writer.kill()
        assert _who(_assert_whole(buf, 3, n_writers=2)) == (1, 100)
        assert len(buf) == 4, f"len {len(buf)} after 4 committed rows"
        buf.add(**{k: v[0] for k, v in make_records(0, [3], FRAME).items()})
        assert len(buf) == 5 and buf.stats()["size"] == 5


def test_len_is_exact_after_a_writer_dies_overwriting_a_slot(mp_ctx, shm_name):
    """Ring full (capacity 4); a writer is SIGKILLed mid-copy overwriting slot 0: the slot holds
    no record, so len == 3 and buf[0] raises IndexError; once the next writer of slot 0 took it
    over, len == 4 again."""
    fields = record_fields(FRAME)
    with ReplayBuffer.create(shm_name, capacity=4, fields=fields) as buf:
        buf.extend(make_records(0, range(4), FRAME))  # tickets 0-3
        writer = PausedWriter(mp_ctx, shm_name, None, make_records(1, [100], FRAME)).start()  # ticket 4
        assert writer.slot == 0
        writer.kill()
        with pytest.raises(IndexError):
            buf[0]
        assert len(buf) == 3, f"len {len(buf)} with slot 0 holding no record"
        buf.extend(make_records(0, range(4, 8), FRAME))  # tickets 5-8: slot 0 is taken over last
        assert len(buf) == 4
        assert buf.stats()["recovered"] == 1
        assert _who(_assert_whole(buf, 0, n_writers=2)) == (0, 7)


# =======================================================================================
# E. Hostile segments
# =======================================================================================


def test_forged_busy_word_naming_a_live_process_does_not_hang_add(shm_name):
    """Slot 0's version word is forged to say "busy, being written by process P", P being alive
    (it holds a handle) but writing nothing. add() into that slot must not wait forever: it
    gives up with ContendedError (a TimeoutError) in bounded time (checked at 25 s).

    The layout is not hard-coded: the forged words are found by diffing the segment file while
    P is really stopped inside its copy of slot 0 against the file after P finished; writing
    the "stopped inside" words back recreates that state with nobody writing."""
    ctx = multiprocessing.get_context("fork")
    fields = BIG_FIELDS
    buf = ReplayBuffer.create(shm_name, capacity=1, fields=fields)
    buf.extend(rows_for_keys(fields, [0]))
    path = buf.path
    writer = PausedWriter(ctx, shm_name, None, rows_for_keys(fields, [1]), resumable=True, linger=True).start()
    try:
        during = np.fromfile(path, dtype=np.uint64)
        writer.resume()
        writer.wait_done(30)
        after = np.fromfile(path, dtype=np.uint64)
        changed = np.flatnonzero(during != after)
        assert changed.size > 0
        words = np.memmap(path, dtype=np.uint64, mode="r+")
        words[changed] = during[changed]
        words.flush()
        del words
        # Now slot 0 says P is writing it; P is alive, holds its handle, and writes nothing.
        line = _run_contended((shm_name, "add"), bound=25)
        assert line is not None, "add() into a slot with a forged busy word was still waiting after 25 s"
        assert line.startswith("raised") and line.split()[2] == "1", (
            f"expected {ContendedError.__name__} (a TimeoutError): {line}"
        )
        assert not process_gone(writer.pid)
    finally:
        writer.kill()
        _discard(buf)


SPARSE_ATTACH = r"""
import sys, numpy as np, shmreplay
name, path = sys.argv[1], sys.argv[2]
try:
    buf = shmreplay.ReplayBuffer.attach(name, path=path)
except (shmreplay.InsufficientSpaceError, OSError) as e:
    print(f"refused {type(e).__name__}: {e}", flush=True)
    sys.exit(0)
print("attached", flush=True)
rows = {"obs": np.full((buf.capacity, 1024), 7, np.uint8)}
buf.extend(rows)
print("wrote", len(buf), flush=True)
"""


def test_sparse_segment_on_a_full_tmpfs_is_refused_at_attach_not_sigbus(small_tmpfs, shm_name):
    """A sparse copy of a segment (holes where the records go) on a small, nearly full tmpfs:
    attach must refuse it (InsufficientSpaceError, or a clear OSError) rather than map it and
    let the first write past the free space kill the process with SIGBUS."""
    fields = {"obs": ((1024,), np.uint8)}
    src = ReplayBuffer.create(shm_name, capacity=4096, fields=fields)  # ~4.3 MB, in /dev/shm
    src_path = src.path
    src.close()
    dst = small_tmpfs / f"shmreplay.{shm_name}"
    filler = small_tmpfs / "filler"
    try:
        subprocess.run(["cp", "--sparse=always", src_path, str(dst)], check=True, timeout=60)
        st = os.stat(dst)
        assert st.st_size == os.stat(src_path).st_size
        assert st.st_blocks * 512 < st.st_size // 2, "the copy is not sparse"
        vfs = os.statvfs(small_tmpfs)
        free = vfs.f_bavail * vfs.f_frsize
        with open(filler, "wb") as f:  # leave 1 MiB free: far less than the holes need
            f.write(b"\xff" * max(0, free - (1 << 20)))
        vfs = os.statvfs(small_tmpfs)
        assert vfs.f_bavail * vfs.f_frsize < st.st_size - st.st_blocks * 512
        proc = subprocess.run(
            [sys.executable, "-c", SPARSE_ATTACH, shm_name, str(small_tmpfs)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode >= 0, (
            f"the process was killed by signal {-proc.returncode} "
            f"({signal.Signals(-proc.returncode).name}) after: {proc.stdout!r}"
        )
        # "refused" means attach raised InsufficientSpaceError or another OSError (see SPARSE_ATTACH)
        assert proc.stdout.startswith("refused"), f"attach accepted the sparse segment: {proc.stdout!r} {proc.stderr[-500:]}"
    finally:
        for p in (dst, filler):
            if p.exists():
                p.unlink()
        if os.path.exists(src_path):
            os.unlink(src_path)


# --------------------------------------------------------------------------- PID namespaces

NAMESPACED_WRITER = """
import sys, time, numpy as np, shmreplay, helpers
name = sys.argv[1]
buf = shmreplay.ReplayBuffer.attach(name)
def on_pause(slot):
    print("paused", slot, flush=True)
    time.sleep(120)
helpers.extend_pausing(buf, helpers.make_records(1, [100], (4, 16, 16)), on_pause, "copy")
"""


def test_writer_in_another_pid_namespace_is_waited_for_and_taken_over_once_killed(shm_name):
    """A sidecar container: a writer in its own PID namespace (its pid means nothing here)
    paused mid-copy. The next writer of its slot, in our namespace, cannot judge that pid, so it
    must wait, not take over; once the sidecar is killed, the kernel releases its lock and the
    slot is taken over at once."""
    if not helpers.has_stage_hook():
        pytest.skip("needs the test-hooks build")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.decode().strip()}")
    fields = record_fields(FRAME)
    with ReplayBuffer.create(shm_name, capacity=1, fields=fields) as buf:
        buf.extend(make_records(0, [0], FRAME))
        sidecar = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-c", NAMESPACED_WRITER, shm_name],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=_env(),
        )
        try:
            assert sidecar.stdout is not None
            line = sidecar.stdout.readline()
            assert line.startswith("paused"), f"the namespaced writer did not pause: {line!r}"
            done: list[Any] = []

            def insert() -> None:
                try:
                    buf.extend(make_records(2, [1], FRAME))
                    done.append("done")
                except BaseException as e:  # noqa: BLE001 - reported below
                    done.append(e)

            waiter = threading.Thread(target=insert, daemon=True)
            waiter.start()
            waiter.join(2.0)
            assert not done, f"the writer did not wait for a writer it cannot prove dead: {done}"
            assert buf.stats()["recovered"] == 0
            sidecar.kill()  # unshare --kill-child: the namespace's processes die with it
            sidecar.wait(30)
            waiter.join(15)
            assert done == ["done"], done
        finally:
            if sidecar.poll() is None:
                sidecar.kill()
                sidecar.wait(30)
        assert buf.stats()["recovered"] == 1
        assert _who(buf[0]) == (2, 1)
        assert len(buf) == 1
