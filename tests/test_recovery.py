"""Surviving dead processes: writers SIGKILLed inside a copy, stale segments and ``gc``, and
Ctrl-C during calls that wait.

A test-only hook (``helpers.extend_pausing``: ``_core._test_extend_pausing`` with stage "copy",
or the older ``RawBuffer.extend_pausing``) stops a writer inside the copy of a record, with the
slot still claimed, so that a SIGKILL lands inside the copy for certain rather than by luck.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import helpers
import shmreplay
from helpers import make_records, record_fields, validate_records, wait_until
from shmreplay import ReplayBuffer

FRAME = (4, 16, 16)  # 1 KiB frames: small records, still several words per field


def writer_paused_mid_copy(name: str, path: str | None, wid: int, seqs: list[int], frame, conn) -> None:
    """Child: inserts records of writer ``wid``, stopping for good inside the first one's copy
    (the test hook's stage "copy", see ``helpers.extend_pausing``) after telling the parent
    which slot it holds."""
    buf = ReplayBuffer.attach(name, path=path)

    def pause(slot: int) -> None:
        conn.send(slot)
        while True:
            time.sleep(60)

    helpers.extend_pausing(buf, make_records(wid, seqs, frame), pause, "copy")


def start_paused_writer(ctx, name: str, path: str | None, wid: int, seqs: list[int], frame=FRAME):
    """Starts `writer_paused_mid_copy` and returns (process, slot it holds)."""
    parent_end, child_end = ctx.Pipe(duplex=False)
    args = (name, path, wid, seqs, frame, child_end)
    proc = ctx.Process(target=writer_paused_mid_copy, args=args, daemon=True)
    proc.start()
    reached = wait_until(lambda: parent_end.poll() or not proc.is_alive(), timeout=60)
    if not (reached and parent_end.poll()):
        kill(proc)
        raise AssertionError(f"the writer never reached the middle of its copy (exit code {proc.exitcode})")
    return proc, parent_end.recv()


def kill(proc) -> None:
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert not proc.is_alive()


def assert_valid(batch, n_writers: int) -> None:
    nbad, desc = validate_records(batch, n_writers=n_writers)
    assert nbad == 0, desc


# ---------------------------------------------------------------------------------------
# 1. Dead writers
# ---------------------------------------------------------------------------------------


def test_writer_killed_inside_the_copy_is_taken_over(mp_ctx, shm_name):
    fields = record_fields(FRAME)
    with ReplayBuffer.create(shm_name, capacity=4, fields=fields) as buf:
        buf.extend(make_records(0, range(4), FRAME))  # tickets 0-3 fill every slot
        proc, slot = start_paused_writer(mp_ctx, shm_name, None, wid=1, seqs=[100])  # ticket 4
        try:
            assert slot == 0
            # Its half-written record is never served, and the other slots stay writable.
            for _ in range(50):
                batch = buf.sample(16)
                assert_valid(batch, n_writers=1)
            buf.extend(make_records(0, range(4, 7), FRAME))  # tickets 5-7: slots 1-3
            assert buf.stats()["inserts"] == 7
        finally:
            kill(proc)
        # The slot is still marked busy by the dead writer: it holds no record, said at once.
        started = time.monotonic()
        with pytest.raises(IndexError, match="died"):
            buf[0]
        assert time.monotonic() - started < 4  # a live writer would be waited for 5 s
        assert_valid(buf.sample(64), n_writers=1)
        # The next writer of slot 0 (ticket 8) takes it over.
        buf.add(**{k: v[0] for k, v in make_records(0, [7], FRAME).items()})
        stats = buf.stats()
        assert stats["recovered"] == 1 and stats["size"] == 4
        steps = sorted(int(buf[i]["step"]) for i in range(4))
        assert steps == [4, 5, 6, 7]
        for i in range(4):
            assert_valid({k: np.asarray(v)[None] for k, v in buf[i].items()}, n_writers=1)


BIG_FRAME = (4, 128, 128)  # 64 KiB frames: copies take long enough for kills to land inside


def test_writers_killed_at_random_moments_while_others_write_and_sample(shm_name):
    """Two writer processes are SIGKILLed and restarted at random moments (one of the kills
    lands inside a copy for certain, through the hook) while a sampler validates every row."""
    ctx = multiprocessing.get_context("fork")
    rng = np.random.default_rng(7)
    fields = record_fields(BIG_FRAME)
    with ReplayBuffer.create(shm_name, capacity=32, fields=fields) as buf:
        stop = ctx.Event()
        sampled, torn, q = ctx.Value("q", 0), ctx.Value("q", 0), ctx.Queue()
        sampler = ctx.Process(
            target=helpers.concurrent_sampler,
            args=(shm_name, None, 0, 4, 16, stop, sampled, torn, q),
            daemon=True,
        )
        sampler.start()
        writers = []
        try:
            for kill_round in range(8):
                wid = kill_round % 2
                writer = ctx.Process(
                    target=helpers.child_hammer_extend, args=(shm_name, None, BIG_FRAME, wid, 24), daemon=True
                )
                writer.start()
                writers.append(writer)
                before = buf.stats()["inserts"]
                assert wait_until(lambda: buf.stats()["inserts"] > before + 24, timeout=30), "no progress"
                time.sleep(float(rng.uniform(0, 0.05)))
                kill(writer)
            paused, _slot = start_paused_writer(ctx, shm_name, None, 2, list(range(40)), BIG_FRAME)
            kill(paused)
            # Progress after every kill: a fresh writer overwrites the whole ring twice.
            survivor = ctx.Process(
                target=helpers.child_hammer_extend, args=(shm_name, None, BIG_FRAME, 3, 24), daemon=True
            )
            survivor.start()
            writers.append(survivor)
            before = buf.stats()["inserts"]
            assert wait_until(lambda: buf.stats()["inserts"] > before + 64, timeout=30), "no progress"
            kill(survivor)
            checked = sampled.value
            assert wait_until(lambda: sampled.value > checked + 64, timeout=30), "the sampler stalled"
        finally:
            stop.set()
            status, payload = q.get(timeout=60)
            sampler.join(30)
            for w in writers:
                kill(w)
        assert status == "ok", payload
        _, _, n_sampled, bad, first_bad, bad_keys, _, _ = payload
        assert (bad, bad_keys) == (0, 0), first_bad
        assert n_sampled > 0
        stats = buf.stats()
        assert stats["recovered"] >= 1, stats
        for i in range(buf.capacity):
            try:
                row = buf[i]
            except IndexError:
                continue  # a slot a killed writer still holds (no later writer reached it)
            assert_valid({k: np.asarray(v)[None] for k, v in row.items()}, n_writers=4)


# ---------------------------------------------------------------------------------------
# 2. Dead owners and leftovers: gc
# ---------------------------------------------------------------------------------------

CREATE_AND_DIE = """
import os, signal, sys, shmreplay
path, how, names = sys.argv[1], sys.argv[2], sys.argv[3:]
for name in names:
    buf = shmreplay.ReplayBuffer.create(name, capacity=8, fields={"x": ((), "int64")}, path=path)
    buf.add(x=1)
    if how == "close":
        buf.close()
if how == "hold":
    print("ready", flush=True)
    sys.stdin.read()
if how == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def create_in_child(path: Path, how: str, *names: str) -> subprocess.Popen | None:
    """Creates buffers in a child that is SIGKILLed ("kill"), exits after closing ("close"), or
    holds them until its stdin closes ("hold", returned)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CREATE_AND_DIE, str(path), how, *names],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    if how == "hold":
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        return proc
    proc.wait(60)
    return None


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shmreplay.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_gc_removes_stale_buffers_and_never_a_live_one(shm_dir):
    fields = {"x": ((), "int64")}
    create_in_child(shm_dir, "kill", "killed")
    create_in_child(shm_dir, "close", "exited")
    holder = create_in_child(shm_dir, "hold", "held")
    create_in_child(shm_dir, "kill", "killed-but-attached")
    attached = ReplayBuffer.attach("killed-but-attached", path=shm_dir)
    mine = ReplayBuffer.create("mine", capacity=8, fields=fields, path=shm_dir)
    ReplayBuffer.create("mine-closed", capacity=8, fields=fields, path=shm_dir).close()
    try:
        listed = {b["name"]: b for b in shmreplay.list_buffers(shm_dir)}
        assert {n for n, b in listed.items() if b["stale"]} == {"killed", "exited"}
        assert listed["held"]["creator_pid"] == holder.pid
        statuses = {b["name"]: b["status"] for b in json.loads(cli("ls", "--json", "--path", str(shm_dir)).stdout)}
        assert statuses == {
            "exited": "stale",
            "held": "live",
            "killed": "stale",
            "killed-but-attached": "live",
            "mine": "live",
            "mine-closed": "live",  # its creator (this process) may attach again
        }
        assert shmreplay.gc(shm_dir, dry_run=True) == ["exited", "killed"]
        assert len(shmreplay.list_buffers(shm_dir)) == 6
        proc = cli("gc", "--path", str(shm_dir))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split("\n")[:2] == ["removed exited", "removed killed"]
        assert sorted(os.listdir(shm_dir)) == [
            "shmreplay.held",
            "shmreplay.killed-but-attached",
            "shmreplay.mine",
            "shmreplay.mine-closed",
        ]
        assert shmreplay.gc(shm_dir) == []
        attached.add(x=2)  # the survivors work
        assert len(attached) == 2
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(60)
        attached.close()
        mine.close()
    # Once every process is gone the rest is stale too, except what this (live) process created.
    assert shmreplay.gc(shm_dir) == ["held", "killed-but-attached"]


def test_gc_removes_what_a_creator_killed_mid_create_left(tmp_path):
    """A creator killed while reserving a large segment leaves only a hidden temporary file,
    never a half-made buffer; gc removes it once its pid is dead, and leaves a live one's."""
    directory = Path("/dev/shm") / f"shmreplay-test-{os.getpid()}-{time.monotonic_ns()}"
    directory.mkdir()
    try:
        script = (
            "import sys, shmreplay\n"
            "shmreplay.ReplayBuffer.create('big', capacity=1_500_000, fields={'x': ((1000,), 'uint8')}, "
            "path=sys.argv[1])\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", script, str(directory)])
        try:
            assert wait_until(lambda: any(n.endswith(".creating") for n in os.listdir(directory)), 60)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        (left,) = os.listdir(directory)
        assert left.startswith(".shmreplay.big.") and left.endswith(".creating")
        assert shmreplay.list_buffers(directory) == []
        live_leftover = directory / f".shmreplay.other.{os.getpid()}-0.creating"
        live_leftover.write_bytes(b"")
        assert shmreplay.gc(directory) == []
        assert os.listdir(directory) == [live_leftover.name]
    finally:
        for name in os.listdir(directory):
            os.unlink(directory / name)
        directory.rmdir()


GC_ON_GO = """
import json, sys, time, shmreplay
sys.stdin.readline()  # "go"
t0 = time.monotonic()
removed = shmreplay.gc(sys.argv[1])
print(json.dumps({"t0": t0, "t1": time.monotonic(), "removed": removed}), flush=True)
"""


def test_gc_racing_attachers_never_removes_an_attached_buffer(shm_dir):
    """Stress: gc runs in another process while this one attaches to the same stale buffers.
    Every attach that succeeds must leave the buffer in place; the others fail cleanly.

    The gc process is started first and waits for "go" on its stdin, so that its pass and the
    attaches start together; rounds (fresh stale buffers each) go on until one really
    overlapped in time with gc removing some buffers while others got attached (bounded)."""
    overlapped_rounds = 0
    for rnd in range(10):
        names = [f"stale{rnd}-{i}" for i in range(40)]
        create_in_child(shm_dir, "kill", *names)
        gc = subprocess.Popen(
            [sys.executable, "-c", GC_ON_GO, str(shm_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        handles, missing = [], []
        order = [str(n) for n in np.random.default_rng(rnd).permutation(names)]
        try:
            time.sleep(0.3)  # the gc process is up and waiting for "go"
            assert gc.stdin is not None
            gc.stdin.write("go\n")
            gc.stdin.flush()
            a0 = time.monotonic()
            for name in order:
                try:
                    handles.append(ReplayBuffer.attach(name, path=shm_dir))
                except FileNotFoundError:
                    missing.append(name)
            a1 = time.monotonic()
            out, _ = gc.communicate(timeout=60)
            assert gc.returncode == 0, f"gc failed (exit code {gc.returncode})"
            report = json.loads(out)
            removed = set(report["removed"]) & set(names)  # (it also removes earlier rounds' leftovers)
            attached = {h.name for h in handles}
            assert removed | attached == set(names) and not removed & attached, (sorted(removed), sorted(attached))
            assert set(missing) <= removed
            for h in handles:
                assert os.path.exists(h.path), f"gc removed {h.name} while it was attached"
                h.add(x=3)
        finally:
            if gc.poll() is None:
                gc.kill()
                gc.wait(30)
            for h in handles:
                h.close()
        if removed and attached and report["t0"] <= a1 and a0 <= report["t1"]:
            overlapped_rounds += 1
            break
    assert overlapped_rounds, "in 10 rounds, gc's pass never overlapped the attaches with both outcomes"


# ---------------------------------------------------------------------------------------
# 7. Ctrl-C during calls that wait
# ---------------------------------------------------------------------------------------

BLOCKED_CALL = """
import sys, time, shmreplay
call, name, path = sys.argv[1], sys.argv[2], sys.argv[3]
buf = None
if call != "create":
    buf = shmreplay.ReplayBuffer.attach(name, path=path)
print("ready", flush=True)
started = time.monotonic()
try:
    if call == "create":
        shmreplay.ReplayBuffer.create(name, capacity=4_000_000, fields={"x": ((1000,), "uint8")}, path=path)
    elif call == "extend":
        buf.extend(__import__("helpers").make_records(9, [0, 1], (4, 16, 16)))
    elif call == "add":
        buf.add(**{k: v[0] for k, v in __import__("helpers").make_records(9, [0], (4, 16, 16)).items()})
    elif call == "read":
        buf[0]
    print("returned", flush=True)
except KeyboardInterrupt:
    print(f"interrupted {time.monotonic() - started:.3f}", flush=True)
"""


@pytest.mark.parametrize("call", ["extend", "add", "read", "create"])
def test_ctrl_c_stops_a_waiting_call_promptly(call, shm_name):
    """SIGINT reaches a call that waits (on a slot a live writer holds, or while reserving
    gigabytes) within a fraction of a second, as KeyboardInterrupt, leaving nothing behind.
    (``sample`` does not wait here: a ring whose only slot is mid-overwrite holds no record, so
    it raises EmptyBufferError at once; see test_hardening.py.)"""
    directory = Path("/dev/shm") / f"shmreplay-test-{os.getpid()}-{time.monotonic_ns()}"
    directory.mkdir()
    ctx = multiprocessing.get_context("fork")
    writer = None
    try:
        if call != "create":
            buf = ReplayBuffer.create(shm_name, capacity=1, fields=record_fields(FRAME), path=directory)
            buf.extend(make_records(0, [0], FRAME))
            writer, _ = start_paused_writer(ctx, shm_name, str(directory), wid=1, seqs=[1])
        env = dict(os.environ, PYTHONPATH=os.path.dirname(helpers.__file__))
        proc = subprocess.Popen(
            [sys.executable, "-c", BLOCKED_CALL, call, shm_name, str(directory)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=helpers.default_sigint,
        )
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(0.5)  # well inside the wait (10 s for read, add and extend)
        assert proc.poll() is None, "the call returned before it was interrupted"
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        out, _ = proc.communicate(timeout=30)
        assert out.startswith("interrupted"), out
        assert time.monotonic() - sent < 2.0
        if call == "create":
            assert os.listdir(directory) == []  # neither the buffer nor its temporary file
        else:
            assert buf.stats()["inserts"] == 1
            buf.close()
    finally:
        if writer is not None:
            kill(writer)
        for name in os.listdir(directory):
            os.unlink(directory / name)
        directory.rmdir()


def test_gc_and_ls_see_buffers_from_a_thread_attaching_concurrently(shm_dir):
    """list_buffers and gc run in a loop while one thread of this process creates, attaches,
    uses and unlinks buffers (live: gc must never take one, or the thread's unlink fails) and
    another keeps making stale buffers through children that are SIGKILLed. gc removes only
    the stale ones, never raises, and both kinds of work really overlap the gc loop."""
    fields = {"x": ((), "int64")}
    stop = threading.Event()
    errors: list[BaseException] = []
    churned, made = [0], [0]

    def churn() -> None:
        try:
            while not stop.is_set():
                with ReplayBuffer.create(capacity=4, fields=fields, path=shm_dir) as b:
                    ReplayBuffer.attach(b.name, path=shm_dir).close()
                    b.add(x=1)
                    b.unlink()  # FileNotFoundError if a gc had removed this live buffer
                churned[0] += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def make_stale() -> None:
        try:
            k = 0
            while not stop.is_set():
                create_in_child(shm_dir, "kill", *[f"dead{k}-{j}" for j in range(5)])
                made[0] += 5
                k += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=churn), threading.Thread(target=make_stale)]
    for t in threads:
        t.start()
    removed_total: list[str] = []
    churn_during = 0
    try:
        assert wait_until(lambda: made[0] > 0 and churned[0] > 0, 60), "the churn threads did not start"
        churn_start = churned[0]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not errors:
            shmreplay.list_buffers(shm_dir)
            removed = shmreplay.gc(shm_dir)
            assert all(n.startswith("dead") for n in removed), f"gc removed a live buffer: {removed}"
            removed_total += removed
            churn_during = churned[0] - churn_start
            if len(removed_total) >= 20 and churn_during >= 50:
                break
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert len(removed_total) >= 20, f"gc removed only {len(removed_total)} stale buffers while the others churned"
    assert churn_during >= 50, f"only {churn_during} live create/attach/unlink cycles overlapped the gc loop"
    assert len(set(removed_total)) == len(removed_total)
    shmreplay.gc(shm_dir)
    assert not [n for n in os.listdir(shm_dir) if n.startswith("shmreplay.dead")], "stale buffers left after the last gc"
