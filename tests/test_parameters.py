"""Publishing parameters from the learner to the actors (issue 13): a one-slot ReplayBuffer
holds the latest flattened parameters and their version; actors read it with ``slot[0]`` (a
consistent copy that waits out a write in progress) or ``sample(1)``.

Every element of a published ``params`` equals its ``version``, so a read that mixed two
versions shows at once. 1M float32 (4 MB) per version: copies take about a millisecond, and
readers race writers all the time. Checked with real processes (the learner spawned or forked,
one actor spawned and one forked):

* every read is consistent and versions never go backwards for a reader;
* an actor SIGKILLed mid-loop stops nobody: the learner and the other actor go on, and the
  learner exits cleanly (no hang, as a ``multiprocessing.Queue`` had after a killed reader);
* a learner SIGKILLed mid-write (stopped inside the copy by the test hook, or killed at random
  moments of a publishing loop) never yields a torn read and never hangs a reader: the slot
  holds the last complete version, or (killed inside the copy, which overwrote it in place) no
  record, which readers see at once as ``IndexError`` / ``EmptyBufferError``; the next learner
  takes the slot over.

Progress and verdicts go through shared arrays without locks (never a multiprocessing lock or
queue, which a SIGKILLed process could leave held or half-written)."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import time
from typing import Any

import numpy as np
import pytest

import shmreplay
from shmreplay import EmptyBufferError, ReplayBuffer

import helpers

pytestmark = pytest.mark.timeout(240)

P = 1_000_000
START_TIMEOUT = 60.0  # spawn children import numpy and shmreplay

# Actor state words.
ITERATIONS, READS, LAST, TORN, BACKWARDS, EMPTY, MISSING, ATTACHED, DONE, SLOW, CONTENDED = range(11)
# Learner state words.
PUBLISHED, RETRIES, LEARNER_DONE, WRITING = range(4)


def fields(p: int = P) -> dict[str, Any]:
    return {"params": ((p,), np.float32), "version": ((), np.int64)}


# ---------------------------------------------------------------------------------------
# Process bodies (module level: spawn pickles them by name)
# ---------------------------------------------------------------------------------------


def _attach_when_there(name: str, path: str, deadline: float) -> ReplayBuffer:
    while True:
        try:
            return ReplayBuffer.attach(name, path=path)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def actor(name: str, path: str, state: Any, stop: Any) -> None:
    """Reads the slot in a loop until ``stop``: ``slot[0]`` and ``sample(1)`` in turn. Counts
    reads, torn reads, versions that went backwards, and the clear errors of an empty slot."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    deadline = time.monotonic() + 200
    slot = _attach_when_there(name, path, deadline)
    state[ATTACHED] = 1
    last = 0
    i = 0
    while not stop.value and time.monotonic() < deadline:
        i += 1
        started = time.monotonic()
        try:
            if i % 2:
                row = slot[0]
                params, version = row["params"], int(row["version"])
            else:
                batch = slot.sample(1)
                params, version = batch["params"][0], int(batch["version"][0])
        except IndexError:  # nothing published yet, or the learner died inside the copy
            state[MISSING] += 1
        except EmptyBufferError:  # the same for sample(1); also while a write is in flight
            state[EMPTY] += 1
        except shmreplay.ContendedError:  # slot[0] found the slot busy for 10 s: a failure
            state[CONTENDED] += 1
        else:
            if not (params == np.float32(version)).all():
                state[TORN] += 1
            if version < last:
                state[BACKWARDS] += 1
            last = version
            state[LAST] = version
            state[READS] += 1
        state[SLOW] = max(state[SLOW], int((time.monotonic() - started) * 1000))
        state[ITERATIONS] += 1
    slot.close()
    state[DONE] = 1


def learner(name: str, path: str, state: Any, stop: Any, create: bool, base: int, pause: float) -> None:
    """Publishes versions ``base + 1, base + 2, ...`` until ``stop``, ``pause`` seconds apart:
    creates the slot (and removes it on exit, as its creator) or attaches to it.

    A pause, as a learner that publishes every few updates has: a read needs the slot unchanged
    for as long as its copy takes, and a writer rewriting 4 MB back to back can starve readers
    (seqlock readers never block the writer)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if create:
        slot = ReplayBuffer.create(name, capacity=1, fields=fields(), path=path)
    else:
        slot = ReplayBuffer.attach(name, path=path)
    params = np.empty(P, np.float32)
    with slot:
        version = base
        while not stop.value:
            version += 1
            params.fill(version)
            state[WRITING] = version
            slot.add(params=params, version=version)
            state[PUBLISHED] = version
            time.sleep(pause)
        state[RETRIES] = slot.stats()["retries"]
    state[LEARNER_DONE] = 1


def paused_learner(name: str, path: str, state: Any, versions: int, conn: Any) -> None:
    """Publishes versions 1..``versions``, then stops inside the copy of the next (the test
    hook, half of the record written) and tells ``conn``; waits there until killed."""
    slot = ReplayBuffer.attach(name, path=path)
    params = np.empty(P, np.float32)
    for version in range(1, versions + 1):
        params.fill(version)
        slot.add(params=params, version=version)
        state[PUBLISHED] = version
        time.sleep(0.005)
    params.fill(versions + 1)

    def pause(_slot: int) -> None:
        conn.send("paused")
        time.sleep(300)
        os._exit(3)

    helpers.extend_pausing(slot, {"params": params[None], "version": np.array([versions + 1])}, pause)
    os._exit(4)  # never reached: killed while paused


# ---------------------------------------------------------------------------------------
# Helpers of the tests
# ---------------------------------------------------------------------------------------


def _words(n: int) -> Any:
    return multiprocessing.RawArray(ctypes.c_int64, n)


def _flag() -> Any:
    return multiprocessing.RawValue(ctypes.c_int64, 0)


def _wait(pred: Any, timeout: float, what: str) -> None:
    if not helpers.wait_until(pred, timeout):
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Actors:
    """One spawned and one forked actor reading the slot."""

    def __init__(self, name: str, path: str) -> None:
        self.stop = _flag()
        self.states = [_words(11), _words(11)]
        self.procs = [
            multiprocessing.get_context(method).Process(target=actor, args=(name, path, state, self.stop), daemon=True)
            for method, state in zip(("spawn", "fork"), self.states)
        ]

    def start(self) -> "Actors":
        for p in self.procs:
            p.start()
        _wait(lambda: all(s[ATTACHED] for s in self.states), START_TIMEOUT, "the actors to attach")
        return self

    def progress(self, i: int, more: int, timeout: float = 30.0, what: str = "iterations") -> None:
        word = {"iterations": ITERATIONS, "reads": READS}[what]
        start = self.states[i][word]
        _wait(lambda: self.states[i][word] >= start + more, timeout, f"actor {i} to make {more} more {what}")

    def finish(self, alive: list[int]) -> None:
        self.stop.value = 1
        for i in alive:
            self.procs[i].join(30)
            assert self.procs[i].exitcode == 0, f"actor {i} exit code {self.procs[i].exitcode}"
            assert self.states[i][DONE] == 1

    def check(self, i: int) -> None:
        s = self.states[i]
        assert s[TORN] == 0, f"actor {i}: {s[TORN]} torn reads of {s[READS]}"
        assert s[BACKWARDS] == 0, f"actor {i}: versions went backwards {s[BACKWARDS]} times"
        assert s[CONTENDED] == 0, f"actor {i}: slot[0] raised ContendedError {s[CONTENDED]} times"

    def kill(self) -> None:
        helpers.kill_and_reap(self.procs)


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------


def test_actors_read_consistent_versions_and_a_killed_actor_stops_nobody(mp_ctx, shm_name, tmp_path):
    path = str(tmp_path)
    lstate, lstop = _words(4), _flag()
    learner_proc = mp_ctx.Process(target=learner, args=(shm_name, path, lstate, lstop, True, 0, 0.002), daemon=True)
    actors = Actors(shm_name, path)
    try:
        learner_proc.start()
        actors.start()
        for i in (0, 1):
            actors.progress(i, 50, what="reads")
        # SIGKILL the spawned actor in the middle of its loop (reading, most likely).
        os.kill(actors.procs[0].pid, signal.SIGKILL)
        actors.procs[0].join(10)
        assert actors.procs[0].exitcode == -signal.SIGKILL
        # The learner and the other actor go on.
        published = lstate[PUBLISHED]
        _wait(lambda: lstate[PUBLISHED] >= published + 50, 30, "the learner to publish 50 more versions")
        actors.progress(1, 50, what="reads")
        # The learner exits cleanly and promptly, removing its slot.
        lstop.value = 1
        learner_proc.join(30)
        assert learner_proc.exitcode == 0, f"learner exit code {learner_proc.exitcode}"
        assert lstate[LEARNER_DONE] == 1
        with pytest.raises(FileNotFoundError):
            ReplayBuffer.attach(shm_name, path=path)
        actors.finish(alive=[1])
        for i in (0, 1):
            actors.check(i)
        # The readers did race the writer: sample() redrew a slot being written.
        assert lstate[RETRIES] > 0
        assert actors.states[1][LAST] <= lstate[PUBLISHED]
    finally:
        lstop.value = 1
        actors.kill()
        helpers.kill_and_reap([learner_proc])


def test_learner_killed_inside_the_copy(mp_ctx, shm_name, tmp_path):
    """The learner stops inside the copy of version 21 (the test hook) and is SIGKILLed there.
    Readers never see a torn row; once it is dead, both reads say at once that the slot holds
    no record (the copy overwrote version 20 in place); a new learner takes the slot over."""
    path = str(tmp_path)
    with ReplayBuffer.create(shm_name, capacity=1, fields=fields(), path=path) as slot:
        lstate = _words(4)
        conn, child_end = mp_ctx.Pipe(duplex=False)
        learner_proc = mp_ctx.Process(target=paused_learner, args=(shm_name, path, lstate, 20, child_end), daemon=True)
        actors = Actors(shm_name, path)
        try:
            actors.start()
            learner_proc.start()
            assert conn.poll(START_TIMEOUT), "the learner never reached the hook"
            assert conn.recv() == "paused"
            assert lstate[PUBLISHED] == 20
            time.sleep(0.3)  # readers meet the paused writer: slot[0] waits, sample(1) is empty
            os.kill(learner_proc.pid, signal.SIGKILL)
            learner_proc.join(10)
            assert learner_proc.exitcode == -signal.SIGKILL
            # No reader hangs: both keep going, and every read of theirs after this is a clear error.
            for i in (0, 1):
                actors.progress(i, 20)
            started = time.monotonic()
            with pytest.raises(IndexError, match="no record"):
                slot[0]
            with pytest.raises(EmptyBufferError):
                slot.sample(1)
            assert time.monotonic() - started < 1.0
            assert len(slot) == 0
            for i in (0, 1):
                assert actors.states[i][LAST] <= 20
            # A new learner takes the slot over; the actors read its versions.
            lstop = _flag()
            second = mp_ctx.Process(target=learner, args=(shm_name, path, _words(4), lstop, False, 1000, 0.002), daemon=True)
            second.start()
            try:
                _wait(lambda: all(s[LAST] > 1000 for s in actors.states), START_TIMEOUT, "the actors to read the new learner's versions")
            finally:
                lstop.value = 1
                second.join(30)
            assert second.exitcode == 0
            assert slot.stats()["recovered"] >= 1
            actors.finish(alive=[0, 1])
            for i in (0, 1):
                actors.check(i)
                assert actors.states[i][SLOW] < 10_000, "a read waited for the dead learner"
        finally:
            actors.kill()
            helpers.kill_and_reap([learner_proc])


def test_learner_killed_at_random_moments(mp_ctx, shm_name, tmp_path):
    """Learners publishing every millisecond are SIGKILLed at random moments, round after
    round (each new one takes over), until kills have landed both inside a copy and outside.
    After each kill the slot holds the last complete version (or, killed inside the copy, no
    record), the actors keep going, and no read is ever torn or older than one read before."""
    path = str(tmp_path)
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    with ReplayBuffer.create(shm_name, capacity=1, fields=fields(), path=path) as slot:
        actors = Actors(shm_name, path)
        outcomes = {"mid-copy": 0, "complete": 0}
        learner_proc = None
        try:
            actors.start()
            rounds = 0
            while rounds < 40 and not (rounds >= 4 and outcomes["mid-copy"] and outcomes["complete"]):
                rounds += 1
                lstate = _words(4)
                learner_proc = mp_ctx.Process(target=learner, args=(shm_name, path, lstate, _flag(), False, rounds * 100_000, 0.001), daemon=True)
                learner_proc.start()
                _wait(lambda: lstate[PUBLISHED] >= rounds * 100_000 + 3, START_TIMEOUT, "the learner to publish")
                time.sleep(float(rng.uniform(0.0, 0.05)))
                os.kill(learner_proc.pid, signal.SIGKILL)
                learner_proc.join(10)
                assert learner_proc.exitcode == -signal.SIGKILL
                published, writing = lstate[PUBLISHED], lstate[WRITING]
                started = time.monotonic()
                try:
                    row = slot[0]
                except IndexError:
                    outcomes["mid-copy"] += 1
                    assert len(slot) == 0
                    with pytest.raises(EmptyBufferError):
                        slot.sample(1)
                else:
                    outcomes["complete"] += 1
                    version = int(row["version"])
                    assert version in (published, writing), (version, published, writing)
                    assert (row["params"] == np.float32(version)).all()
                    assert int(slot.sample(1)["version"][0]) == version
                assert time.monotonic() - started < 1.0, "a read waited for the dead learner"
                for i in (0, 1):
                    actors.progress(i, 5)
            assert outcomes["mid-copy"] and outcomes["complete"], f"after {rounds} rounds: {outcomes}"
            actors.finish(alive=[0, 1])
            for i in (0, 1):
                actors.check(i)
        finally:
            actors.kill()
            if learner_proc is not None:
                helpers.kill_and_reap([learner_proc])


def test_reading_before_anything_is_published(shm_name, tmp_path):
    """Before the first publish: ``IndexError`` from ``slot[0]``, ``EmptyBufferError`` from
    ``sample(1)``, at once."""
    with ReplayBuffer.create(shm_name, capacity=1, fields=fields(8), path=tmp_path) as slot:
        reader = ReplayBuffer.attach(shm_name, path=tmp_path)
        with pytest.raises(IndexError):
            reader[0]
        with pytest.raises(shmreplay.EmptyBufferError):
            reader.sample(1)
        slot.add(params=np.full(8, 3, np.float32), version=3)
        row = reader[0]
        assert int(row["version"]) == 3 and (row["params"] == 3).all()
        reader.close()
