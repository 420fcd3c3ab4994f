"""Writers and readers in separate processes hammer one small ring that wraps many times,
so slots are overwritten while they are being read. Every record is self-validating (all
fields derive from (writer id, sequence number)); no row read may be torn or mixed, and a
read may not fail because a slot is busy with a live writer.

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
MIN_SAMPLED_ROWS = 2_000  # per sampler / reader


def _run(start_method, writer_specs, reader_specs, min_writes_each, min_writes_total, min_seconds):
    """Start writers and readers, stop them once enough happened, collect their reports.

    writer_specs / reader_specs: lists of (target, args before the shared objects)."""
    ctx = multiprocessing.get_context(start_method)
    stop = ctx.Event()
    q = ctx.Queue()
    w_progress = [ctx.RawValue("q", 0) for _ in writer_specs]
    r_progress = [ctx.RawValue("q", 0) for _ in reader_specs]
    r_torn = [ctx.RawValue("q", 0) for _ in reader_specs]
    procs = [
        ctx.Process(target=t, args=(*a, stop, w_progress[i], q), daemon=True) for i, (t, a) in enumerate(writer_specs)
    ] + [
        ctx.Process(target=t, args=(*a, stop, r_progress[i], r_torn[i], q), daemon=True)
        for i, (t, a) in enumerate(reader_specs)
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
                all(w >= min_writes_each for w in writes)
                and sum(writes) >= min_writes_total
                and all(v.value >= MIN_SAMPLED_ROWS for v in r_progress)
            )
            if (elapsed >= min_seconds and enough) or elapsed > HARD_DEADLINE:
                break
            if any(v.value for v in r_torn):
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
    readers = sorted(p for s, p in results if p[0] == "sampler")
    return writers, readers


def _assert_readers_clean(readers):
    report = "; ".join(
        f"reader {sid}: rows={n} torn={bad} first={first!r} bad_keys={bk} index_errors={ie}"
        for _, sid, n, bad, first, bk, ie, _stats in readers
    )
    assert sum(r[3] for r in readers) == 0, f"torn rows were returned: {report}"
    assert sum(r[5] for r in readers) == 0, f"info['key'] % capacity != info['index']: {report}"
    assert sum(r[6] for r in readers) == 0, f"buf[i] raised IndexError for a written slot: {report}"
    assert all(r[2] >= MIN_SAMPLED_ROWS for r in readers), report


def _assert_final_ring(buf, fields, n_writers, total_tickets):
    cap = buf.capacity
    rows = [buf[i] for i in range(cap)]
    final = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in fields}
    nbad, desc = validate_records(final, n_writers=n_writers)
    assert nbad == 0, desc
    batch, info = buf.sample(4 * cap, return_info=True)
    assert validate_records(batch, n_writers=n_writers) == (0, "")
    assert int(info["key"].max()) < total_tickets
    assert int(info["key"].min()) >= total_tickets - cap
    return final


CASES = [
    # a realistic ring: 512 Atari transitions (~56 KB each), batches of 32
    pytest.param(512, 32, ATARI_FRAME, 3.0, id="atari-512"),
    # a hot ring: 16 slots, so nearly every sample races a writer
    pytest.param(16, 8, ATARI_FRAME, 2.0, id="hot-16"),
]


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
@pytest.mark.parametrize("capacity,batch_size,frame,min_seconds", CASES)
def test_no_torn_rows_under_concurrent_writes(shm_name, start_method, capacity, batch_size, frame, min_seconds):
    """2 writers (add + small extends) and 2 samplers (sample + buf[i])."""
    fields = record_fields(frame)
    with ReplayBuffer.create(shm_name, capacity=capacity, fields=fields) as buf:
        writer_specs = [(helpers.concurrent_writer, (shm_name, None, wid, frame)) for wid in range(N_WRITERS)]
        reader_specs = [
            (helpers.concurrent_sampler, (shm_name, None, sid, N_WRITERS, batch_size)) for sid in range(N_SAMPLERS)
        ]
        writers, samplers = _run(start_method, writer_specs, reader_specs, capacity, 4 * capacity, min_seconds)

        # -- no torn or mixed row, ever; every sampled key matches its slot
        _assert_readers_clean(samplers)

        # -- everybody made progress: the ring wrapped many times while being sampled
        written = {wid: seq for _, wid, seq in writers}
        assert len(written) == N_WRITERS
        assert all(n >= capacity for n in written.values()), written
        assert sum(written.values()) >= 4 * capacity, written

        # -- the shared counters agree with what the children did
        stats = buf.stats()
        # every row a writer handed over was either committed or superseded (a later lap's
        # writer claimed its slot first); none may vanish
        assert stats["inserts"] + stats["superseded"] == sum(written.values()), (stats, written)
        assert stats["size"] == capacity == len(buf)
        assert stats["attached"] == 1, stats  # all children closed their handles
        assert stats["retries"] >= 0

        # -- the final ring: every slot valid, each record present once
        final = _assert_final_ring(buf, fields, N_WRITERS, sum(written.values()))
        ids = set(zip(final["action"].tolist(), final["step"].tolist()))
        assert len(ids) == capacity, "a record appears in two slots"
        for wid, step in ids:
            assert 0 <= step < written[wid]


STREAM_FRAME = (4, 64, 64)  # 16 KiB frames: 32 KiB records
STREAM_CAP = 4


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_single_slot_reads_of_busy_slots(shm_name, start_method):
    """One writer streams records into a 4-slot ring; a reader only calls buf[i], so
    it keeps landing on the slot being written. Every read must return a consistent copy
    (a live writer is never mistaken for a dead one)."""
    fields = record_fields(STREAM_FRAME)
    with ReplayBuffer.create(shm_name, capacity=STREAM_CAP, fields=fields) as buf:
        writer_specs = [(helpers.streaming_writer, (shm_name, None, 0, STREAM_FRAME, STREAM_CAP))]
        # one reader: on 2 cores the writer and the reader then really run at the same time
        reader_specs = [(helpers.slot_reader, (shm_name, None, 0, 1))]
        writers, readers = _run(start_method, writer_specs, reader_specs, 1_000, 1_000, 2.0)
        _assert_readers_clean(readers)
        total = writers[0][2]
        assert total >= 1_000
        stats = buf.stats()
        assert stats["inserts"] + stats["superseded"] == total, (stats, total)
        _assert_final_ring(buf, fields, 1, total)
