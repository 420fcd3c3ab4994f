"""Writers and readers in separate processes hammer one small ring that wraps many times,
so slots are overwritten while they are being read. Every record is self-validating (all
fields derive from (writer id, sequence number)); no row read may be torn or mixed, and a
read may not fail because a slot is busy with a live writer.

The tests also prove that they exercised what they claim, instead of assuming it:

* all processes wait at a barrier and start together; each reports when its first operation
  started and its last one ended (``time.monotonic``: one system-wide clock on Linux), and the
  writers' and readers' active intervals must overlap for most of the run;
* each reader reports how the data changed under it while it read: the insert tickets it drew
  kept growing from batch to batch (the ring wrapped while it sampled), or the slots it read
  held another record at its next read;
* where a test claims that samples race writers (the hot ring), the shared retry counter must
  have counted retries: a draw that found its slot being written and was redrawn.

Each run is bounded: it stops once a minimum duration has passed AND enough work was done
(or after a hard deadline, which then fails on the progress assertions). No assertion is about
speed."""

from __future__ import annotations

import multiprocessing
import queue as queue_mod
import threading
import time
import traceback

import numpy as np
import pytest

from shmreplay import ReplayBuffer

from helpers import ATARI_FRAME, kill_and_reap, make_records, record_fields, validate_records

N_WRITERS = 2
N_SAMPLERS = 2
BARRIER_TIMEOUT = 20.0  # for every child to start (spawn imports numpy, shmreplay, pytest)
HARD_DEADLINE = 20.0  # of a run, from the barrier on
CHILD_DEADLINE = 60.0  # a child stops by itself, whatever the parent does
MIN_SAMPLED_ROWS = 2_000  # per sampler / reader
SINGLE_READS_PER_BATCH = 8


# ---------------------------------------------------------------------------------------------
# Child processes (top-level functions: ``spawn`` pickles them by reference)
# ---------------------------------------------------------------------------------------------


def _report(q, role: str, ident: int, body) -> None:
    try:
        q.put(("ok", body()))
    except BaseException:  # noqa: BLE001 - everything goes to the parent
        q.put(("err", f"{role} {ident}:\n{traceback.format_exc()}"))


def _writer(name, wid, frame, start, stop, progress, q):
    """Writes self-validating records (alternating add and small extends) until ``stop``."""

    def body():
        buf = ReplayBuffer.attach(name)
        try:
            rng = np.random.default_rng(wid)
            seq = 0
            start.wait(BARRIER_TIMEOUT)
            began = time.monotonic()
            deadline = began + CHILD_DEADLINE
            while not stop.is_set() and time.monotonic() < deadline:
                if seq % 3 == 0:
                    n = int(rng.integers(2, 9))
                    buf.extend(make_records(wid, range(seq, seq + n), frame))
                    seq += n
                else:
                    rec = make_records(wid, [seq], frame)
                    buf.add(**{k: v[0] for k, v in rec.items()})
                    seq += 1
                progress.value = seq
            ended = time.monotonic()
        finally:
            buf.close()
        return {"role": "writer", "id": wid, "rows": seq, "start": began, "end": ended}

    _report(q, "writer", wid, body)


def _sampler(name, sid, n_writers, batch_size, start, stop, progress, torn, evidence, wrapped, q):
    """Samples batches (and reads single slots) until ``stop``; counts every torn or mixed row
    and records how the insert tickets it drew grew while it sampled."""

    def body():
        buf = ReplayBuffer.attach(name)
        try:
            cap = buf.capacity
            rng = np.random.default_rng(1000 + sid)
            rows = bad_total = bad_keys = index_errors = batches = fresh_batches = 0
            first_bad = ""
            first_max_key = max_key = -1
            start.wait(BARRIER_TIMEOUT)
            began = time.monotonic()
            deadline = began + CHILD_DEADLINE
            while not stop.is_set() and time.monotonic() < deadline:
                if len(buf) == 0:  # the writers started at the same moment
                    time.sleep(0.0005)
                    continue
                batch, info = buf.sample(batch_size, return_info=True)
                keys = info["key"]
                if info["index"].shape != (batch_size,) or not np.array_equal(
                    keys % np.uint64(cap), info["index"].astype(np.uint64)
                ):
                    bad_keys += 1
                nbad, desc = validate_records(batch, n_writers=n_writers)
                rows += batch_size
                if nbad:
                    bad_total += nbad
                    first_bad = first_bad or f"sample: {desc}"
                # tickets newer than any this sampler drew before: written since its last batch
                newest = int(keys.max())
                if first_max_key < 0:
                    first_max_key = newest
                elif newest > max_key:
                    fresh_batches += 1
                max_key = max(max_key, newest)
                batches += 1
                # single-slot reads of (possibly in-flight) slots
                for i in rng.integers(0, cap, size=SINGLE_READS_PER_BATCH).tolist():
                    try:
                        row = buf[i]
                    except IndexError:
                        row = None  # a slot not written yet is the only excuse
                        if len(buf) == cap:
                            index_errors += 1
                    if row is not None:
                        one = {k: np.asarray(v)[None] for k, v in row.items()}
                        nbad, desc = validate_records(one, n_writers=n_writers)
                        rows += 1
                        if nbad:
                            bad_total += nbad
                            first_bad = first_bad or f"buf[{i}]: {desc}"
                progress.value = rows
                torn.value = bad_total
                evidence.value = fresh_batches
                wrapped.value = max_key - first_max_key
            ended = time.monotonic()
        finally:
            buf.close()
        return {
            "role": "reader",
            "id": sid,
            "rows": rows,
            "torn": bad_total,
            "first_bad": first_bad,
            "bad_keys": bad_keys,
            "index_errors": index_errors,
            "batches": batches,
            "fresh_batches": fresh_batches,
            "first_max_key": first_max_key,
            "max_key": max_key,
            "start": began,
            "end": ended,
        }

    _report(q, "sampler", sid, body)


STREAM_LAPS = 8  # distinct contents per slot, written in turn


def _streaming_writer(name, wid, frame, batch_rows, start, stop, progress, q):
    """Extends precomputed batches of records over and over until ``stop``: almost all of this
    process's time is spent inside slot copies. Batch j holds sequence numbers
    j*batch_rows.., so consecutive laps of a slot hold different records and a read that mixed
    two laps is detected."""

    def body():
        buf = ReplayBuffer.attach(name)
        try:
            laps = [
                make_records(wid, range(j * batch_rows, (j + 1) * batch_rows), frame) for j in range(STREAM_LAPS)
            ]
            calls = 0
            start.wait(BARRIER_TIMEOUT)
            began = time.monotonic()
            deadline = began + CHILD_DEADLINE
            while not stop.is_set() and time.monotonic() < deadline:
                buf.extend(laps[calls % STREAM_LAPS])
                calls += 1
                progress.value = calls * batch_rows
            ended = time.monotonic()
        finally:
            buf.close()
        return {"role": "writer", "id": wid, "rows": calls * batch_rows, "start": began, "end": ended}

    _report(q, "writer", wid, body)


def _slot_reader(name, sid, n_writers, start, stop, progress, torn, evidence, wrapped, q):
    """Reads single slots (``buf[i]``) of a ring being rewritten until ``stop``: each read must
    return a consistent copy, whatever the writer is doing to that slot. Counts the reads that
    found another record in the slot than its previous read of that slot did. (``wrapped`` is
    a sampler's measure: left at 0 here.)"""

    def body():
        buf = ReplayBuffer.attach(name)
        try:
            cap = buf.capacity
            rng = np.random.default_rng(2000 + sid)
            reads = bad_total = changed = 0
            first_bad = ""
            last_seen = [-1] * cap
            start.wait(BARRIER_TIMEOUT)
            began = time.monotonic()
            deadline = began + CHILD_DEADLINE
            while len(buf) < cap and time.monotonic() < deadline and not stop.is_set():
                time.sleep(0.0005)
            while not stop.is_set() and time.monotonic() < deadline:
                idx = rng.integers(0, cap, size=64).tolist()
                rows = [buf[i] for i in idx]  # back to back: most of the time is spent in reads
                batch = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
                nbad, desc = validate_records(batch, n_writers=n_writers)
                if nbad:
                    bad_total += nbad
                    first_bad = first_bad or f"buf[i] for i in {idx}: {desc}"
                for i, step in zip(idx, batch["step"].tolist()):
                    if last_seen[i] >= 0 and step != last_seen[i]:
                        changed += 1
                    last_seen[i] = step
                reads += 64
                progress.value = reads
                torn.value = bad_total
                evidence.value = changed
            ended = time.monotonic()
        finally:
            buf.close()
        return {
            "role": "reader",
            "id": sid,
            "rows": reads,
            "torn": bad_total,
            "first_bad": first_bad,
            "bad_keys": 0,
            "index_errors": 0,
            "changed": changed,
            "start": began,
            "end": ended,
        }

    _report(q, "reader", sid, body)


# ---------------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------------


def _run(
    start_method,
    buf,
    writer_specs,
    reader_specs,
    *,
    min_seconds,
    min_writes_each,
    min_writes_total,
    min_evidence,
    min_retries=0,
    min_wrapped=0,
):
    """Starts writers and readers together, stops them once enough happened, collects their
    reports: (writers, readers), each a list of dicts sorted by id.

    writer_specs / reader_specs: lists of (target, args before the shared objects). "Enough":
    ``min_seconds`` passed, every writer wrote ``min_writes_each`` rows and all of them
    ``min_writes_total``, every reader checked ``MIN_SAMPLED_ROWS`` rows and saw the data change
    under it ``min_evidence`` times (and, a sampler, drew tickets spanning ``min_wrapped``: the
    ring wrapped under it; a slot reader does not count that), and the buffer counted
    ``min_retries`` sampling retries.
    Waiting for the evidence rather than for a fixed time keeps the tests meaningful on a
    loaded machine, where the writers may run less often."""
    ctx = multiprocessing.get_context(start_method)
    n = len(writer_specs) + len(reader_specs)
    start = ctx.Barrier(n + 1)
    stop = ctx.Event()
    q = ctx.Queue()
    w_progress = [ctx.RawValue("q", 0) for _ in writer_specs]
    r_progress = [ctx.RawValue("q", 0) for _ in reader_specs]
    r_torn = [ctx.RawValue("q", 0) for _ in reader_specs]
    r_evidence = [ctx.RawValue("q", 0) for _ in reader_specs]
    r_wrapped = [ctx.RawValue("q", 0) for _ in reader_specs]
    procs = [
        ctx.Process(target=t, args=(*a, start, stop, w_progress[i], q), daemon=True)
        for i, (t, a) in enumerate(writer_specs)
    ] + [
        ctx.Process(target=t, args=(*a, start, stop, r_progress[i], r_torn[i], r_evidence[i], r_wrapped[i], q), daemon=True)
        for i, (t, a) in enumerate(reader_specs)
    ]
    results = []
    started = True
    retries_at_start = buf.stats()["retries"]
    try:
        for p in procs:
            p.start()
        # Wait for every child at the barrier, or stop waiting as soon as one died on the way.
        waiting_until = time.monotonic() + BARRIER_TIMEOUT
        while start.n_waiting < n and all(p.is_alive() for p in procs) and time.monotonic() < waiting_until:
            time.sleep(0.01)
        try:
            start.wait(5.0 if start.n_waiting == n else 0.0)
        except threading.BrokenBarrierError:
            started = False  # a child failed before the start: its report says why
        t0 = time.monotonic()
        while started:
            elapsed = time.monotonic() - t0
            writes = [v.value for v in w_progress]
            enough = (
                all(w >= min_writes_each for w in writes)
                and sum(writes) >= min_writes_total
                and all(v.value >= MIN_SAMPLED_ROWS for v in r_progress)
                and all(v.value >= min_evidence for v in r_evidence)
                and all(v.value >= min_wrapped for v in r_wrapped)
                and buf.stats()["retries"] - retries_at_start >= min_retries
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
                results.append(q.get(timeout=max(0.1, min(5.0, deadline - time.monotonic()))))
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs):
                    break
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        hung = [p.pid for p in procs if p.is_alive()]
    finally:
        stop.set()
        start.abort()
        kill_and_reap(procs)
        q.close()
        q.join_thread()

    errors = [payload for status, payload in results if status == "err"]
    assert not errors, "child failed:\n" + "\n".join(errors)
    assert started, f"the children never all reached the start barrier: exit codes {[p.exitcode for p in procs]}"
    assert not hung, f"children did not stop: {hung}"
    assert len(results) == len(procs), f"only {len(results)} of {len(procs)} children reported"
    reports = [payload for _, payload in results]
    writers = sorted((r for r in reports if r["role"] == "writer"), key=lambda r: r["id"])
    readers = sorted((r for r in reports if r["role"] == "reader"), key=lambda r: r["id"])
    _assert_overlapped(writers, readers, min_seconds)
    return writers, readers


def _assert_overlapped(writers, readers, min_seconds):
    """Every writer and every reader were busy together for most of the run: the latest start
    comes well before the earliest end."""
    everyone = writers + readers
    latest_start = max(r["start"] for r in everyone)
    earliest_end = min(r["end"] for r in everyone)
    spans = "; ".join(
        f"{r['role']} {r['id']}: {r['start'] - latest_start:+.3f}..{r['end'] - latest_start:+.3f} s" for r in everyone
    )
    # the barrier releases everybody at once (a late start means a process did not wait for it),
    # and nobody stops before the parent says so, at least min_seconds later
    assert latest_start - min(r["start"] for r in everyone) < 2.0, spans
    assert earliest_end - latest_start >= 0.5 * min_seconds, f"writers and readers barely overlapped: {spans}"


def _assert_readers_clean(readers):
    report = "; ".join(
        f"reader {r['id']}: rows={r['rows']} torn={r['torn']} first={r['first_bad']!r} "
        f"bad_keys={r['bad_keys']} index_errors={r['index_errors']}"
        for r in readers
    )
    assert sum(r["torn"] for r in readers) == 0, f"torn rows were returned: {report}"
    assert sum(r["bad_keys"] for r in readers) == 0, f"info['key'] % capacity != info['index']: {report}"
    assert sum(r["index_errors"] for r in readers) == 0, f"buf[i] raised IndexError for a written slot: {report}"
    assert all(r["rows"] >= MIN_SAMPLED_ROWS for r in readers), report


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


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

CASES = [
    # a realistic ring: 512 Atari transitions (~56 KB each), batches of 32. A sample rarely
    # meets a slot being written here, so retries are not required.
    pytest.param(512, 32, ATARI_FRAME, 3.0, 0, id="atari-512"),
    # a hot ring: 16 slots and 2 writers, so samples keep racing writers: retries must happen
    pytest.param(16, 8, ATARI_FRAME, 2.0, 20, id="hot-16"),
]


# Batches in which a sampler drew a ticket newer than any it drew before.
MIN_FRESH_BATCHES = 50


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
@pytest.mark.parametrize("capacity,batch_size,frame,min_seconds,min_retries", CASES)
def test_no_torn_rows_under_concurrent_writes(
    shm_name, start_method, capacity, batch_size, frame, min_seconds, min_retries
):
    """2 writers (add + small extends) and 2 samplers (sample + buf[i]), all started together."""
    fields = record_fields(frame)
    with ReplayBuffer.create(shm_name, capacity=capacity, fields=fields) as buf:
        writer_specs = [(_writer, (shm_name, wid, frame)) for wid in range(N_WRITERS)]
        reader_specs = [(_sampler, (shm_name, sid, N_WRITERS, batch_size)) for sid in range(N_SAMPLERS)]
        writers, samplers = _run(
            start_method,
            buf,
            writer_specs,
            reader_specs,
            min_seconds=min_seconds,
            min_writes_each=capacity,
            min_writes_total=4 * capacity,
            min_evidence=MIN_FRESH_BATCHES,
            min_retries=min_retries,
            min_wrapped=2 * capacity,  # asserted below
        )

        # -- no torn or mixed row, ever; every sampled key matches its slot
        _assert_readers_clean(samplers)

        # -- everybody made progress: the ring wrapped many times while being sampled
        written = {w["id"]: w["rows"] for w in writers}
        assert len(written) == N_WRITERS
        assert all(n >= capacity for n in written.values()), written
        total = sum(written.values())
        assert total >= 4 * capacity, written

        # -- each sampler drew ever newer rows: the writers wrote between its batches, and the
        # ring wrapped (at least twice) while it sampled
        for s in samplers:
            assert s["fresh_batches"] >= MIN_FRESH_BATCHES, f"sampler {s['id']} rarely drew new rows: {s}"
            wrapped = s["max_key"] - s["first_max_key"]
            assert wrapped >= 2 * capacity, f"sampler {s['id']}: the ring did not wrap under it: {s}"
            assert s["max_key"] < total

        # -- the shared counters agree with what the children did
        stats = buf.stats()
        # every row a writer handed over was either committed or superseded (a later lap's
        # writer claimed its slot first); none may vanish
        assert stats["inserts"] + stats["superseded"] == total, (stats, written)
        # no writer died, and none was taken for dead while it wrote
        assert stats["recovered"] == 0 and stats.get("lost", 0) == 0, stats
        assert stats["size"] == capacity == len(buf)
        assert stats["attached"] == 1, stats  # all children closed their handles
        assert stats["samples"] >= sum(s["batches"] for s in samplers) * batch_size, stats
        if min_retries:
            # samples really raced writers: draws of slots being written were redrawn
            assert stats["retries"] >= min_retries, stats

        # -- the final ring: every slot valid, each record present once
        final = _assert_final_ring(buf, fields, N_WRITERS, total)
        ids = set(zip(final["action"].tolist(), final["step"].tolist()))
        assert len(ids) == capacity, "a record appears in two slots"
        for wid, step in ids:
            assert 0 <= step < written[wid]


STREAM_FRAME = (4, 64, 64)  # 16 KiB frames: 32 KiB records
STREAM_CAP = 4
# Reads that found another record in the slot than the reader's previous read of it.
MIN_CHANGED_READS = 1_000


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_single_slot_reads_of_busy_slots(shm_name, start_method):
    """One writer streams records into a 4-slot ring; a reader only calls buf[i], so it keeps
    landing on the slot being written. Every read must return a consistent copy (a live writer
    is never mistaken for a dead one: that read would raise IndexError), and the reader must
    have seen the slots rewritten between its reads all along."""
    fields = record_fields(STREAM_FRAME)
    with ReplayBuffer.create(shm_name, capacity=STREAM_CAP, fields=fields) as buf:
        writer_specs = [(_streaming_writer, (shm_name, 0, STREAM_FRAME, STREAM_CAP))]
        # one reader: on 2 cores the writer and the reader then really run at the same time
        reader_specs = [(_slot_reader, (shm_name, 0, 1))]
        writers, readers = _run(
            start_method,
            buf,
            writer_specs,
            reader_specs,
            min_seconds=2.0,
            min_writes_each=1_000,
            min_writes_total=1_000,
            min_evidence=MIN_CHANGED_READS,
        )
        _assert_readers_clean(readers)
        total = writers[0]["rows"]
        assert total >= 1_000
        reader = readers[0]
        # the writer kept rewriting the slots between the reads: it was writing while they happened
        assert reader["changed"] >= MIN_CHANGED_READS, reader
        stats = buf.stats()
        assert stats["inserts"] + stats["superseded"] == total, (stats, total)
        assert stats["recovered"] == 0 and stats.get("lost", 0) == 0, stats
        _assert_final_ring(buf, fields, 1, total)
