"""Writers and samplers in separate processes hammer one small ring that wraps many times,
so slots are overwritten while they are being read. Every record is self-validating (all
fields derive from (writer id, sequence number)); no sampled row may be torn or mixed.

Each run is bounded: it stops once a minimum duration has passed AND enough work was done
(or after a hard deadline, which then fails on the progress assertions). Nothing asserts a
timing."""

from __future__ import annotations

import multiprocessing
import queue as queue_mod
import time

import numpy as np
import pytest

from shmreplay import ReplayBuffer

import helpers
from helpers import ATARI_FRAME, kill_and_reap, record_fields, validate_records

N_WRITERS = 2
N_SAMPLERS = 2
HARD_DEADLINE = 60.0
MIN_SAMPLED_ROWS = 2_000  # per sampler


def _run(start_method: str, name: str, capacity: int, batch_size: int, frame, min_seconds: float):
    ctx = multiprocessing.get_context(start_method)
    stop = ctx.Event()
    q = ctx.Queue()
    w_progress = [ctx.RawValue("q", 0) for _ in range(N_WRITERS)]
    s_progress = [ctx.RawValue("q", 0) for _ in range(N_SAMPLERS)]
    s_torn = [ctx.RawValue("q", 0) for _ in range(N_SAMPLERS)]
    procs = [
        ctx.Process(
            target=helpers.concurrent_writer,
            args=(name, None, wid, frame, stop, w_progress[wid], q),
            daemon=True,
        )
        for wid in range(N_WRITERS)
    ] + [
        ctx.Process(
            target=helpers.concurrent_sampler,
            args=(name, None, sid, N_WRITERS, batch_size, stop, s_progress[sid], s_torn[sid], q),
            daemon=True,
        )
        for sid in range(N_SAMPLERS)
    ]
    results = []
    try:
        for p in procs:
            p.start()
        t0 = time.monotonic()
        while True:
            elapsed = time.monotonic() - t0
            writes = [v.value for v in w_progress]
            enough = (
                all(w >= capacity for w in writes)
                and sum(writes) >= 4 * capacity
                and all(v.value >= MIN_SAMPLED_ROWS for v in s_progress)
            )
            if (elapsed >= min_seconds and enough) or elapsed > HARD_DEADLINE:
                break
            if any(v.value for v in s_torn):
                break  # already failed: stop early, the assertion below reports it
            if any(not p.is_alive() for p in procs):
                break
            time.sleep(0.05)
        stop.set()
        deadline = time.monotonic() + 60
        while len(results) < len(procs) and time.monotonic() < deadline:
            try:
                results.append(q.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue_mod.Empty:
                break
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        hung = [p.pid for p in procs if p.is_alive()]
    finally:
        stop.set()
        kill_and_reap(procs)
        q.close()
        q.join_thread()

    errors = [payload for status, payload in results if status == "err"]
    assert not errors, "child failed:\n" + "\n".join(errors)
    assert not hung, f"children did not stop: {hung}"
    assert len(results) == len(procs), f"only {len(results)} of {len(procs)} children reported"
    writers = sorted(p for s, p in results if p[0] == "writer")
    samplers = sorted(p for s, p in results if p[0] == "sampler")
    return writers, samplers


CASES = [
    # a realistic ring: 512 Atari transitions (~56 KB each), batches of 32
    pytest.param(512, 32, ATARI_FRAME, 3.0, id="atari-512"),
    # a hot ring: 16 slots, so nearly every sample races a writer
    pytest.param(16, 8, ATARI_FRAME, 2.0, id="hot-16"),
]


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
@pytest.mark.parametrize("capacity,batch_size,frame,min_seconds", CASES)
def test_no_torn_rows_under_concurrent_writes(shm_name, start_method, capacity, batch_size, frame, min_seconds):
    fields = record_fields(frame)
    with ReplayBuffer.create(shm_name, capacity=capacity, fields=fields) as buf:
        writers, samplers = _run(start_method, shm_name, capacity, batch_size, frame, min_seconds)

        # -- no torn or mixed row, ever
        report = "; ".join(
            f"sampler {sid}: sampled={n} torn={bad} first={first!r} bad_keys={bk} index_errors={ie}"
            for _, sid, n, bad, first, bk, ie, _stats in samplers
        )
        assert sum(s[3] for s in samplers) == 0, f"torn rows were returned: {report}"
        assert sum(s[5] for s in samplers) == 0, f"info['key'] % capacity != info['index']: {report}"
        assert sum(s[6] for s in samplers) == 0, f"buf[i] raised IndexError for a written slot: {report}"

        # -- everybody made progress: the ring wrapped many times while being sampled
        written = {wid: seq for _, wid, seq in writers}
        assert len(written) == N_WRITERS
        assert all(n >= capacity for n in written.values()), written
        assert sum(written.values()) >= 4 * capacity, written
        assert all(s[2] >= MIN_SAMPLED_ROWS for s in samplers), report

        # -- the shared counters agree with what the children did
        stats = buf.stats()
        assert stats["inserts"] == sum(written.values()), (stats, written)
        assert stats["size"] == capacity == len(buf)
        assert stats["attached"] == 1, stats  # all children closed their handles
        assert stats["retries"] >= 0

        # -- the final ring: every slot valid, each record present once
        rows = [buf[i] for i in range(capacity)]
        final = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in fields}
        nbad, desc = validate_records(final, n_writers=N_WRITERS)
        assert nbad == 0, desc
        ids = set(zip(final["action"].tolist(), final["step"].tolist()))
        assert len(ids) == capacity, "a record appears in two slots"
        for wid, step in ids:
            assert 0 <= step < written[wid]
        batch, info = buf.sample(4 * capacity, return_info=True)
        assert validate_records(batch, n_writers=N_WRITERS) == (0, "")
        assert int(info["key"].max()) < stats["inserts"]
        assert int(info["key"].min()) >= stats["inserts"] - capacity
