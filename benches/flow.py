"""Flow control (issue 14): what the rate limiters cost, and the FIFO ``Queue`` against
``multiprocessing.Queue`` and faster-fifo.

    .venv/bin/python benches/flow.py              # every figure, 5 repetitions (roughly 5 min on 2 cores)
    .venv/bin/python benches/flow.py --quick      # smoke run: small sizes, 1 repetition (< 1 min)
    .venv/bin/python benches/flow.py --only limiter_overhead --reps 3
    .venv/bin/python benches/flow.py --only queue_control --seconds 10 --contenders shmreplay,faster_fifo

Figures (``--only`` takes their names or numbers, default all):

1. ``limiter_overhead``: per-call cost of ``add`` (one control row), ``extend`` (64 rows) and
   ``sample(32)`` (into reused arrays) on a full control buffer with no limiter, with
   ``MinSize(1)`` and with ``SampleToInsertRatio`` whose error buffer is so wide that nothing ever
   waits (and a second unlimited buffer: the spread between two identical ones). The buffers
   live in one process and are timed in turns (a 5 % difference is smaller than the spread
   between processes); the ratio limited / unlimited is the figure.
2. ``queue_atari``: ``sampler=Queue()`` of 512 atari rows (16 consumer batches, 29 MB: an
   on-policy queue kept short, as IMPALA keeps its policy lag small): 2 producer processes
   (``extend`` 16 rows) and 2 consumer processes (``sample(32)``) for ``--seconds``: delivered
   rows/s; against ``multiprocessing.Queue`` (producers put the same 16-row batches as dicts of
   numpy arrays, consumers get) and faster-fifo.
3. ``queue_atari_deep``: the same with a queue of 20,000 rows (1.1 GB), which the producers,
   faster than the consumers, keep full: every row goes to memory and back. For reference
   (no target).
4. ``queue_control``: the same as 2 with control rows (100,000); the target is against faster-fifo.

Every delivered row's ids are checked in its consumer and counted once (duplicates), and after
a shmreplay run whatever is left in the queue is drained and checked too: every row produced
must have been delivered exactly once. One check in ``--whole-every`` (default 8; 1: all of
them; a check is one delivery of atari rows, a block of 256 control rows) also checks the rows
byte for byte (a row's bytes are derived from its producer and sequence number, which it
carries). Contenders are checked alike: the check is the consumers'
work, not the transport's, and checking every byte costs about as much as taking the row (the
share of the consumers' time is in the table). shmreplay runs end with ``shutdown()``: the
consumers, waiting in ``sample`` by then, must raise ``ShutdownError``.

Every measurement runs in a fresh process group (``run.run_job``), contenders take turns (the
order rotates from repetition to repetition) and the report gives medians over ``--reps``. A
contender whose package is missing (faster-fifo), or a shmreplay without flow control, is skipped
with a message. Prints a table (CPU and copy kernels first, targets last) and writes
``flow[-quick].json`` to ``--out`` (default benches/results/). See benches/README.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import inspect
import itertools
import multiprocessing as mp
import os
import pickle
import queue
import statistics
import sys
import time
import traceback
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import harness  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import sysinfo  # noqa: E402
from run import SHM_DIR  # noqa: E402
from workloads import PREFILL_WID, WORKLOADS, Batch, Workload, take_row  # noqa: E402

FIGURES = ["limiter_overhead", "queue_atari", "queue_atari_deep", "queue_control"]  # --only: these names, or 1-4

# ---- figure 1 ----
LIMITERS = ["none", "none_again", "min_size", "ratio"]  # none_again: a second unlimited buffer (A/A)
RATIO_SPI = 8.0
RATIO_ERROR_BUFFER = 1e12  # so wide that neither side ever waits
LIMITER_LABELS = {
    "none": "no limiter",
    "none_again": "no limiter, 2nd buffer (A/A)",
    "min_size": "MinSize(1)",
    "ratio": f"SampleToInsertRatio({RATIO_SPI:g}, min_size=1, error_buffer={RATIO_ERROR_BUFFER:g})",
}
OPS = ["add", "extend_b64", "sample_b32"]
OP_TITLES = {"add": "add (1 row)", "extend_b64": "extend(64)", "sample_b32": "sample(32, out=)"}
OVERHEAD_MAX = 1.05

# ---- figures 2 to 4 ----
PRODUCERS = 2
CONSUMERS = 2
PUT_BATCH = 16
GET_BATCH = 32
POOL_ROWS = 64  # template rows per producer (a power of two dividing 2**24)
# Rows a consumer checks at once: atari checks are bound by memory bandwidth (check whatever
# one call delivered); control checks are bound by numpy's per-call cost, so blocks of 256 rows.
CHECK_BLOCK = {"atari": 1, "control": 256}
GRACE_S = 0.1  # from an (almost) empty queue to the shutdown: the consumers wait in sample()
QUEUE_KEYS = ["shmreplay", "mp_queue", "faster_fifo"]
QUEUE_LABELS = {
    "shmreplay": "shmreplay Queue()",
    "mp_queue": "multiprocessing.Queue",
    "faster_fifo": "faster_fifo.Queue",
}
NEEDS = {"shmreplay": ("shmreplay",), "mp_queue": (), "faster_fifo": ("faster_fifo",)}
# figure: (workload, the contender the target compares with, the factor required or None)
QUEUE_FIGURES = {"queue_atari": ("atari", "mp_queue", 10.0), "queue_atari_deep": ("atari", "mp_queue", None),
                 "queue_control": ("control", "faster_fifo", 2.0)}


def missing(key: str) -> str | None:
    """Why ``key`` cannot run here, or None."""
    for mod in NEEDS[key]:
        if importlib.util.find_spec(mod) is None:
            where = "build it with `make dev`" if mod == "shmreplay" else "pip install faster-fifo (benches/requirements.txt)"
            return f"not installed (no module {mod!r}; {where})"
    if key == "shmreplay":
        try:
            import shmreplay
        except Exception as e:  # noqa: BLE001 - e.g. being rebuilt right now
            return f"cannot be imported ({type(e).__name__}: {e})"
        absent = [n for n in ("Queue", "MinSize", "SampleToInsertRatio", "ShutdownError") if not hasattr(shmreplay, n)]
        if absent:
            return f"this shmreplay has no flow control (no shmreplay.{', shmreplay.'.join(absent)})"
        if "limiter" not in inspect.signature(shmreplay.ReplayBuffer.create).parameters:
            return "ReplayBuffer.create takes no limiter= in this shmreplay"
    return None


def fields_of(wl: Workload) -> dict:
    return {f: (shape, dtype) for f, (shape, dtype) in wl.fields.items()}


def close_buffer(buf: Any) -> None:
    if buf is None:
        return
    try:
        if buf.is_owner:
            buf.unlink()
    except FileNotFoundError:
        pass
    finally:
        buf.close()


# ---------------------------------------------------------------------------------------
# Jobs (each in a fresh process group, like harness.job_entry)
# ---------------------------------------------------------------------------------------


def job_entry(job: dict, conn: Any) -> None:
    os.setpgid(0, 0)
    mp.set_start_method("spawn", force=True)
    try:
        result = {"ok": True, **JOBS[job["kind"]](job)}
    except BaseException:  # noqa: BLE001 - every failure is reported, none stops the run
        result = {"ok": False, "error": traceback.format_exc(limit=8)}
    if "shmreplay" in sys.modules:
        result["shmreplay_kernels"] = sysinfo.kernels_info()
    conn.send(result)
    conn.close()


# ---- figure 1: limiter overhead ----


def make_limiter(kind: str) -> Any:
    import shmreplay

    if kind in ("none", "none_again"):
        return None
    if kind == "min_size":
        return shmreplay.MinSize(1)
    return shmreplay.SampleToInsertRatio(samples_per_insert=RATIO_SPI, min_size=1, error_buffer=RATIO_ERROR_BUFFER)


def limiter_job(job: dict) -> dict:
    """One process, four full control buffers (no limiter twice, MinSize, SampleToInsertRatio);
    each operation is timed on each buffer in turn, ``subrounds`` times, the order rotating.

    Two identical buffers differ by a few per cent (where their pages landed), whatever the
    order they are timed in: the buffers are created in an order that rotates with the
    repetition, and the second unlimited buffer shows that spread (its ratio to the first)."""
    import shmreplay

    wl, cap, window, subrounds = WORKLOADS["control"], job["capacity"], job["window"], job["subrounds"]
    bufs: dict[str, Any] = {}
    try:
        t = time.perf_counter()
        shift = job.get("rep", 0) % len(LIMITERS)
        for v in LIMITERS[shift:] + LIMITERS[:shift]:
            name = f"{job['prefix']}{v}-{uuid.uuid4().hex[:6]}"
            bufs[v] = shmreplay.ReplayBuffer.create(name, capacity=cap, fields=fields_of(wl), limiter=make_limiter(v))
        pool = wl.pool(PREFILL_WID, 4, min(wl.fill_batch, cap))
        for buf in bufs.values():
            for k in range(-(-cap // len(pool[0]["done"]))):
                buf.extend(pool[k % len(pool)])
        harness.prefault_shared()
        filled = time.perf_counter() - t
        one = wl.pool(0, 1, 64, seq0=1000)[0]
        rows = [take_row(one, i) for i in range(64)]
        batches = wl.pool(0, harness.POOL_BATCHES, 64)
        outs = {v: {f: np.empty((32, *shape), dtype) for f, (shape, dtype) in wl.fields.items()} for v in LIMITERS}

        def op_fn(op: str, v: str) -> Callable[[], Any]:
            buf = bufs[v]
            if op == "add":
                add, nxt = buf.add, itertools.cycle(rows).__next__
                return lambda: add(**nxt())
            if op == "extend_b64":
                extend, nxtb = buf.extend, itertools.cycle(batches).__next__
                return lambda: extend(nxtb())
            sample, out = buf.sample, outs[v]
            return lambda: sample(32, out=out)

        us: dict[str, dict[str, list[float]]] = {v: {op: [] for op in OPS} for v in LIMITERS}
        for op in OPS:
            fns = {v: op_fn(op, v) for v in LIMITERS}
            for r in range(subrounds):
                shift = r % len(LIMITERS)
                for v in LIMITERS[shift:] + LIMITERS[:shift]:
                    rate, _ = harness.timed(fns[v], window)
                    us[v][op].append(1e6 / rate)
        med = {v: {op: statistics.median(us[v][op]) for op in OPS} for v in LIMITERS}
        ratio = {v: {op: med[v][op] / med["none"][op] for op in OPS} for v in LIMITERS if v != "none"}
        stats = {v: sysinfo._jsonable(dict(bufs[v].stats())) for v in LIMITERS}
        waited = {v: stats[v].get("insert_wait_s", 0.0) + stats[v].get("sample_wait_s", 0.0) for v in LIMITERS}
        return {"us": us, "median_us": med, "ratio": ratio, "waited_s": waited, "stats": stats, "create_fill_s": filled}
    finally:
        for buf in bufs.values():
            close_buffer(buf)


# ---- figures 2 to 4: producers and consumers through a queue ----


def producer_pool(wl: Workload, wid: int, batch_rows: int) -> list[Batch]:
    """POOL_ROWS template rows of producer ``wid`` (row j as ``wl.rows(wid, j)``), in batches;
    the batch of sequence numbers s..s+batch_rows-1 is template batch (s % POOL_ROWS) / batch_rows
    with the ids stamped in (``stamp``)."""
    rows = wl.rows(wid, np.arange(POOL_ROWS))
    return [{f: np.ascontiguousarray(v[k:k + batch_rows]).copy() for f, v in rows.items()}
            for k in range(0, POOL_ROWS, batch_rows)]


def stamp(wl_name: str, template: Batch, wid: int, seqs: np.ndarray) -> Batch:
    """The template batch with its rows' (producer, sequence number) written in: fresh arrays
    for the id fields, the others shared with the template (never written)."""
    if wl_name == "atari":  # actor = wid already; step = the sequence number
        return dict(template, step=seqs.astype(np.int32))
    obs = template["obs"].copy()  # control: obs[0] = wid + 256 * (seq >> 24), obs[1] = seq & (2**24 - 1)
    obs[:, 0] = wid + 256 * (seqs >> 24)
    obs[:, 1] = seqs & 0xFFFFFF
    return dict(template, obs=obs)


class Checker:
    """Checks the ids of delivered rows, and every ``whole_every``-th batch whole (0: never),
    and remembers which (producer, sequence number) it saw."""

    def __init__(self, wl: Workload, producers: int, whole_every: int = 1) -> None:
        self.wl, self.np, self.whole_every = wl, producers, whole_every
        self.batches = 0
        self.seen = np.zeros(1 << 16, np.bool_)  # index seq * producers + wid
        self.top = -1
        self.rows = self.whole_rows = self.good = self.bad = 0
        self.first_bad = ""
        if wl.name == "control":
            tpl = [wl.rows(w, np.arange(POOL_ROWS)) for w in range(producers)]
            self.tpl = {f: np.concatenate([t[f] for t in tpl]) for f in wl.fields}

    def _ids(self, batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.wl.name == "atari":
            wid = np.asarray(batch["actor"]).astype(np.int64)
            seq = np.asarray(batch["step"]).astype(np.int64)
            return wid, seq, (wid >= 0) & (wid < self.np) & (seq >= 0)
        obs = batch["obs"]
        o0, o1 = obs[:, 0], obs[:, 1]
        with np.errstate(invalid="ignore"):
            ok = (o0 >= 0) & (o0 < 1 << 24) & (o1 >= 0) & (o1 < 1 << 24)  # False for NaN
            hi = np.where(ok, o0, 0).astype(np.int64)
            low = np.where(ok, o1, 0).astype(np.int64)
        wid = hi & 255
        ok &= (wid < self.np) & (hi == o0) & (low == o1)
        return wid, ((hi >> 8) << 24) | low, ok

    def check(self, batch: Batch) -> None:
        n = len(batch["done"])
        wid, seq, ok = self._ids(batch)
        j = seq & (POOL_ROWS - 1)
        self.batches += 1
        whole = self.whole_every > 0 and self.batches % self.whole_every == 0
        if not whole:
            bad = ~ok
        elif self.wl.name == "atari":
            bad = self.wl.bad_rows(dict(batch, step=np.where(ok, j, 0).astype(np.int32))) | ~ok
        else:
            k = np.where(ok, wid * POOL_ROWS + j, 0)
            t = self.tpl
            obs = batch["obs"]
            bad = ~ok
            bad |= (obs[:, 2:] != t["obs"][k, 2:]).any(axis=1)
            bad |= (batch["next_obs"] != t["next_obs"][k]).any(axis=1)
            bad |= (batch["action"] != t["action"][k]).any(axis=1)
            bad |= batch["reward"] != t["reward"][k]
            bad |= batch["done"] != t["done"][k]
        nbad = int(bad.sum())
        self.rows += n
        self.whole_rows += n if whole else 0
        if nbad:
            self.bad += nbad
            if not self.first_bad:
                i = int(bad.argmax())
                self.first_bad = f"{ {f: np.asarray(batch[f][i]).ravel()[:4].tolist() for f in batch} }"
            good = ~bad
            wid, seq = wid[good], seq[good]
        self.good += n - nbad
        if len(seq):
            idx = seq * self.np + wid
            top = int(idx.max())
            if top >= len(self.seen):
                grown = np.zeros(max(2 * len(self.seen), top + 1), np.bool_)
                grown[: len(self.seen)] = self.seen
                self.seen = grown
            self.top = max(self.top, top)
            self.seen[idx] = True

    def summary(self) -> dict:
        return {"checked": self.rows, "checked_whole": self.whole_rows, "good": self.good, "bad": self.bad, "first_bad": self.first_bad,
                "seen_bits": np.packbits(self.seen[: self.top + 1]).tobytes(), "seen_len": self.top + 1}


def union_seen(parts: list[dict]) -> np.ndarray:
    n = max((p["seen_len"] for p in parts), default=0)
    out = np.zeros(n, np.bool_)
    for p in parts:
        if p["seen_len"]:
            out[: p["seen_len"]] |= np.unpackbits(np.frombuffer(p["seen_bits"], np.uint8), count=p["seen_len"]).astype(np.bool_)
    return out


class Ended(Exception):
    """The transport was shut down: the caller stops."""


class ShmQueue:
    """shmreplay ``ReplayBuffer`` with ``sampler=Queue()``: ``extend`` and ``sample(n, out=)``
    with no timeout; ``shutdown()`` ends the run."""

    drains = True  # consumers go on past the deadline until the shutdown

    def __init__(self, buf: Any) -> None:
        self.buf = buf

    @classmethod
    def create(cls, wl: Workload, capacity: int, prefix: str, ctx: Any) -> "ShmQueue":
        import shmreplay

        name = f"{prefix}q-{uuid.uuid4().hex[:8]}"
        return cls(shmreplay.ReplayBuffer.create(name, capacity=capacity, fields=fields_of(wl), sampler=shmreplay.Queue()))

    def handle(self) -> Any:
        return self.buf.name

    @classmethod
    def attach(cls, handle: Any) -> "ShmQueue":
        import shmreplay

        return cls(shmreplay.ReplayBuffer.attach(handle))

    def putter(self, deadline: float) -> Callable[[Batch], None]:
        import shmreplay

        extend, shut = self.buf.extend, shmreplay.ShutdownError

        def put(batch: Batch) -> None:
            try:
                extend(batch)
            except shut:
                raise Ended from None

        return put

    def receiver(self, wl: Workload, n: int, block: int) -> tuple[Callable[[], list], Callable[[list], Batch]]:
        """Samples land in consecutive slices of block arrays, so a block is checked with no copy."""
        import shmreplay

        k = max(1, -(-block // n))
        big = {f: np.empty((k * n, *shape), dtype) for f, (shape, dtype) in wl.fields.items()}
        outs = [{f: a[i * n:(i + 1) * n] for f, a in big.items()} for i in range(k)]
        sample, shut = self.buf.sample, shmreplay.ShutdownError
        state = [0]

        def recv() -> list:
            i = state[0]
            try:
                got = sample(n, out=outs[i])
            except shut:
                raise Ended from None
            state[0] = (i + 1) % k
            return [got]

        def merge(pending: list) -> Batch:
            state[0] = 0  # the block is checked: the next sample starts it again
            return pending[0] if len(pending) == 1 else {f: a[: len(pending) * n] for f, a in big.items()}

        return recv, merge

    def wait_drained(self, timeout: float) -> None:
        """Until fewer rows than a sample are left (the consumers then wait), and a moment more."""
        limit = time.monotonic() + timeout
        while len(self.buf) >= GET_BATCH and time.monotonic() < limit:
            time.sleep(0.01)
        time.sleep(GRACE_S)

    def stop(self) -> None:
        self.buf.shutdown()

    def linger(self, release: Any) -> None:
        pass

    def close(self) -> None:
        close_buffer(self.buf)
        self.buf = None


def _concat(pending: list) -> Batch:
    if len(pending) == 1:
        return pending[0]
    return {f: np.concatenate([p[f] for p in pending]) for f in pending[0]}


class MpQueue:
    """``multiprocessing.Queue`` bounded to the same rows (capacity / 16 batches): producers
    ``put`` batches (dicts of numpy arrays), consumers ``get`` one batch per call."""

    POLL = 0.05
    drains = False  # consumers stop at the deadline

    def __init__(self, q: Any) -> None:
        self.q = q

    @classmethod
    def create(cls, wl: Workload, capacity: int, prefix: str, ctx: Any) -> "MpQueue":
        return cls(ctx.Queue(maxsize=max(1, capacity // PUT_BATCH)))

    def handle(self) -> Any:
        return self.q

    @classmethod
    def attach(cls, handle: Any) -> "MpQueue":
        return cls(handle)

    def putter(self, deadline: float) -> Callable[[Batch], None]:
        q, poll, clock, full = self.q, self.POLL, time.perf_counter, queue.Full

        def put(batch: Batch) -> None:
            while True:
                try:
                    q.put(batch, timeout=poll)
                    return
                except full:
                    if clock() >= deadline:
                        raise Ended from None

        return put

    def receiver(self, wl: Workload, n: int, block: int) -> tuple[Callable[[], list], Callable[[list], Batch]]:
        q, poll, empty = self.q, self.POLL, queue.Empty

        def recv() -> list:
            try:
                return [q.get(timeout=poll)]
            except empty:
                return []

        return recv, _concat

    def wait_drained(self, timeout: float) -> None:
        pass  # consumers stop at the deadline

    def stop(self) -> None:
        pass

    def linger(self, release: Any) -> None:
        """A producer stays until the consumers are done: its feeder thread may be halfway
        through writing a batch into the pipe, and a consumer reading it would wait forever
        for the rest if the producer exited now."""
        release.wait(120)

    def close(self) -> None:
        try:
            self.q.close()
            self.q.cancel_join_thread()  # a producer must not wait at exit to flush a full pipe
        except Exception:  # noqa: BLE001
            pass


class FasterFifo(MpQueue):
    """``faster_fifo.Queue`` sized for the same rows (bytes of a pickled batch per row times
    capacity): producers ``put`` batches, consumers ``get_many`` up to 32 rows (2 batches) per
    call, as ``sample(32)``."""

    @classmethod
    def create(cls, wl: Workload, capacity: int, prefix: str, ctx: Any) -> "FasterFifo":
        import faster_fifo

        batch = stamp(wl.name, producer_pool(wl, 0, PUT_BATCH)[0], 0, np.arange(PUT_BATCH, dtype=np.int64))
        per_row = len(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)) / PUT_BATCH
        size = int(capacity * per_row * 1.1) + (1 << 20)
        return cls(faster_fifo.Queue(max_size_bytes=size))

    def linger(self, release: Any) -> None:
        pass  # put() writes the whole message before it returns

    def receiver(self, wl: Workload, n: int, block: int) -> tuple[Callable[[], list], Callable[[list], Batch]]:
        q, poll, empty, most = self.q, self.POLL, queue.Empty, max(1, n // PUT_BATCH)

        def recv() -> list:
            try:
                return q.get_many(timeout=poll, max_messages_to_get=most)
            except empty:
                return []

        return recv, _concat

    def close(self) -> None:
        pass


TRANSPORTS: dict[str, Any] = {"shmreplay": ShmQueue, "mp_queue": MpQueue, "faster_fifo": FasterFifo}


def producer_main(key: str, handle: Any, wl_name: str, wid: int, batch_rows: int, start: Any, seconds: float, q: Any,
                  release: Any) -> None:
    held: list = []

    def body() -> dict:
        wl = WORKLOADS[wl_name]
        tx = TRANSPORTS[key].attach(handle)
        held.append(tx)
        pool = producer_pool(wl, wid, batch_rows)
        ar = np.arange(batch_rows, dtype=np.int64)
        harness.prefault_shared()
        q.put(("ready", wid))
        start.wait(harness.HARD_LIMIT_S)
        t0 = time.perf_counter()
        deadline = t0 + seconds
        put = tx.putter(deadline)
        seq = calls = 0
        ended = "deadline"
        try:
            while time.perf_counter() < deadline:
                put(stamp(wl_name, pool[calls % len(pool)], wid, seq + ar))
                seq += batch_rows
                calls += 1
        except Ended:
            ended = "shutdown" if key == "shmreplay" else "full at the deadline"
        elapsed = time.perf_counter() - t0
        return {"role": "producer", "wid": wid, "rows": seq, "seconds": elapsed, "ended": ended}

    harness._report(q, body)
    if held:
        held[0].linger(release)
        held[0].close()


def consumer_main(key: str, handle: Any, wl_name: str, cid: int, producers: int, batch: int, whole_every: int,
                  start: Any, seconds: float, q: Any) -> None:
    """Receives and checks rows. The rate counts the rows received until the deadline; a
    shmreplay consumer then goes on taking rows until the job's ``shutdown()`` stops it (it
    is waiting in ``sample`` by then: the producers have stopped)."""

    def body() -> dict:
        wl = WORKLOADS[wl_name]
        tx = TRANSPORTS[key].attach(handle)
        block = CHECK_BLOCK[wl_name]
        recv, merge = tx.receiver(wl, batch, block)
        checker = Checker(wl, producers, whole_every)
        harness.prefault_shared()
        q.put(("ready", 100 + cid))
        start.wait(harness.HARD_LIMIT_S)
        rows = pending_rows = 0
        pending: list = []
        check_s = check_window_s = 0.0
        shut: dict | None = None  # the call that raised ShutdownError: when it started and ended
        window: tuple[int, float] | None = None
        ended = "deadline"
        clock = time.perf_counter
        t0 = clock()
        deadline = t0 + seconds
        waiting_since = 0.0
        try:
            while True:
                waiting_since = time.monotonic()  # (comparable across processes)
                for b in recv():
                    pending.append(b)
                    pending_rows += len(b["done"])
                if pending_rows >= block:
                    rows += pending_rows
                    tc = clock()
                    checker.check(merge(pending))
                    check_s += clock() - tc
                    pending, pending_rows = [], 0
                if window is None and clock() >= deadline:
                    window = (rows + pending_rows, clock() - t0)
                    check_window_s = check_s
                    if not tx.drains:
                        break
        except Ended:
            ended = "shutdown" if clock() >= deadline else "shutdown before the deadline"
            shut = {"call_started": waiting_since, "raised_at": time.monotonic()}
        if window is None:  # waiting in sample() when the deadline passed, or shut down early
            window = (rows + pending_rows, min(clock() - t0, seconds))
            check_window_s = check_s
        if pending:
            rows += pending_rows
            checker.check(merge(pending))
        tx.close()
        return {"role": "consumer", "cid": cid, "rows": window[0], "seconds": window[1], "rows_after_deadline": rows - window[0],
                "check_s": check_window_s, "ended": ended, "shutdown_call": shut, **checker.summary()}

    harness._report(q, body)


def drain(tx: ShmQueue, wl: Workload, producers: int) -> dict:
    """After a shmreplay run: take what is left in the queue (sampling needs no wait after the
    shutdown while rows are there) and check it."""
    buf = tx.buf
    left = len(buf)
    checker = Checker(wl, producers)
    taken, error = 0, ""
    while taken < left:
        n = min(256, left - taken)
        try:
            checker.check(buf.sample(n, timeout=0))
        except Exception as e:  # noqa: BLE001 - reported: rows said to be there could not be taken
            error = f"draining {n} of the {left - taken} rows left: {type(e).__name__}: {e}"
            break
        taken += n
    return {"left": left, "drained": taken, "drain_error": error, "len_after": len(buf), **checker.summary()}


def queue_job(job: dict) -> dict:
    key, wl, cap, seconds = job["contender"], WORKLOADS[job["workload"]], job["capacity"], job["seconds"]
    ctx = mp.get_context("forkserver")  # the job's own, with the library imported once
    ctx.set_forkserver_preload(["harness", "workloads", "flow", *NEEDS[key]])
    tx = TRANSPORTS[key].create(wl, cap, job["prefix"], ctx)
    procs: list = []
    stats: Any = None
    drained: dict | None = None
    stop_s = t_stop = None
    try:
        handle, q, start, release = tx.handle(), ctx.Queue(), ctx.Event(), ctx.Event()
        for wid in range(job["producers"]):
            args = (key, handle, wl.name, wid, job["put_batch"], start, seconds, q, release)
            procs.append(ctx.Process(target=producer_main, args=args, daemon=True))
        for cid in range(job["consumers"]):
            procs.append(ctx.Process(target=consumer_main, args=(key, handle, wl.name, cid, job["producers"], job["get_batch"], job["whole_every"], start, seconds, q), daemon=True))
        for p in procs:
            p.start()
        harness._collect(q, procs, len(procs), "ready", timeout=300)
        start.set()
        # Producers stop at the deadline (one waiting for room gets it: the consumers go on).
        results = harness._collect(q, procs, job["producers"], "done", timeout=seconds + 60)
        tx.wait_drained(60)  # shmreplay: the consumers empty the queue and wait in sample()
        t_stop = time.monotonic()
        tx.stop()  # shmreplay: shutdown(); the consumers waiting must raise ShutdownError
        results += harness._collect(q, procs, len(procs) - len(results), "done", timeout=60)
        stop_s = time.monotonic() - t_stop
        release.set()
        for p in procs:
            p.join(10)
        if key == "shmreplay":
            drained = drain(tx, wl, job["producers"])
            stats = sysinfo._jsonable(dict(tx.buf.stats()))
    finally:
        harness._end(procs)
        tx.close()
    producers = [r for r in results if r["role"] == "producer"]
    consumers = [r for r in results if r["role"] == "consumer"]
    parts = consumers + ([drained] if drained else [])
    seen = union_seen(parts)
    distinct = int(seen.sum())
    good = sum(p["good"] for p in parts)
    produced = sum(r["rows"] for r in producers)
    for r in parts:
        r.pop("seen_bits", None)
    delivered_per_s = sum(r["rows"] / r["seconds"] for r in consumers)
    shut = [r["shutdown_call"] for r in consumers if r["shutdown_call"]]
    woken = [c["raised_at"] - t_stop for c in shut if c["call_started"] < t_stop]
    return {
        "delivered_per_s": delivered_per_s,
        "inserted_per_s": sum(r["rows"] / r["seconds"] for r in producers),
        "gb_per_s": delivered_per_s * wl.row_bytes / 1e9,
        "produced": produced,
        "delivered": sum(r["rows"] for r in consumers),
        "checked": sum(p["checked"] for p in parts),
        "checked_whole": sum(p["checked_whole"] for p in parts),
        "bad": sum(p["bad"] for p in parts),
        "first_bad": next((p["first_bad"] for p in parts if p["first_bad"]), ""),
        "duplicates": good - distinct,
        # shmreplay: every row produced was delivered (in the window or drained after) exactly once
        "lost": produced - distinct if drained is not None else None,
        "left": drained["left"] if drained else None,
        "drain": {k: v for k, v in drained.items() if k != "seen_bits"} if drained else None,
        "check_share": statistics.mean(r["check_s"] / r["seconds"] for r in consumers) if consumers else None,
        "stop_to_done_s": stop_s,
        # consumers waiting in sample() when shutdown() came, and how long they took to raise
        "waiting_at_shutdown": len(woken) if key == "shmreplay" else None,
        "shutdown_wake_s": max(woken) if woken else None,
        "ended": {f"{r['role']}{r.get('wid', r.get('cid'))}": r["ended"] for r in producers + consumers},
        "stats": stats,
        "processes": producers + consumers,
    }


JOBS = {"limiter": limiter_job, "queue": queue_job}


# ---------------------------------------------------------------------------------------
# The orchestrator
# ---------------------------------------------------------------------------------------


@dataclass
class Config:
    reps: int
    limiter_cap: int  # control slots of each of the three buffers of figure 1
    window: float  # timed window of one figure-1 measurement
    subrounds: int  # figure-1 measurements per buffer and operation within a job
    queue_caps: dict  # queue figure -> slots (rows the queue holds)
    seconds: float  # duration of each queue run
    whole_every: int = 8  # consumers check every row's ids, and every n-th batch whole (0: none)


MODES = {
    "full": Config(reps=5, limiter_cap=1_000_000, window=0.2, subrounds=5,
                   queue_caps={"queue_atari": 512, "queue_atari_deep": 20_000, "queue_control": 100_000}, seconds=5.0),
    "quick": Config(reps=1, limiter_cap=100_000, window=0.05, subrounds=3,
                    queue_caps={"queue_atari": 512, "queue_atari_deep": 2_000, "queue_control": 20_000}, seconds=2.0,
                    whole_every=1),
}


def job_groups(cfg: Config, keys: list[str], figs: set[str]) -> list[tuple[str, list[dict]]]:
    groups: list[tuple[str, list[dict]]] = []
    if "limiter_overhead" in figs and "shmreplay" in keys:
        groups.append((f"limiters control {cfg.limiter_cap:,}", [dict(
            kind="limiter", figure="limiter_overhead", contender="shmreplay", workload="control",
            capacity=cfg.limiter_cap, window=cfg.window, subrounds=cfg.subrounds)]))
    for fig, (wl, _, _) in QUEUE_FIGURES.items():
        if fig in figs:
            cap = cfg.queue_caps[fig]
            jobs = [dict(kind="queue", figure=fig, contender=k, workload=wl, capacity=cap, seconds=cfg.seconds,
                         producers=PRODUCERS, consumers=CONSUMERS, put_batch=PUT_BATCH, get_batch=GET_BATCH,
                         whole_every=cfg.whole_every)
                    for k in QUEUE_KEYS if k in keys]
            if jobs:
                groups.append((f"{fig} {cap:,}", jobs))
    return groups


def job_timeout(job: dict) -> float:
    if job["kind"] == "limiter":
        return 300 + len(LIMITERS) * len(OPS) * job["subrounds"] * job["window"] * 2
    return 200 + job["seconds"]


def run_job(job: dict, prefix: str) -> dict:
    """One job in a fresh process group, as the suite runs its own (``run.run_job``)."""
    return run.run_job(job, prefix, entry=job_entry, timeout=job_timeout(job))


# ---------------------------------------------------------------------------------------
# Medians, targets, the table
# ---------------------------------------------------------------------------------------


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(doc: dict) -> None:
    lim_us: dict[tuple, list] = defaultdict(list)
    lim_ratio: dict[tuple, list] = defaultdict(list)
    lim_waited: dict[str, float] = defaultdict(float)
    qd: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    errors = []
    for entry in doc["raw"]:
        job, res = entry["job"], entry["result"]
        if not res["ok"]:
            errors.append({"rep": entry["rep"], "figure": job["figure"], "contender": job["contender"], "error": res["error"]})
            continue
        if job["kind"] == "limiter":
            for v in LIMITERS:
                lim_waited[v] += res["waited_s"][v]
                for op in OPS:
                    lim_us[(v, op)].append(res["median_us"][v][op])
                    if v != "none":
                        lim_ratio[(v, op)].append(res["ratio"][v][op])
        else:
            d = qd[(job["figure"], job["contender"])]
            for f in ("delivered_per_s", "inserted_per_s", "gb_per_s", "check_share", "stop_to_done_s",
                      "waiting_at_shutdown", "shutdown_wake_s"):
                d[f].append(res.get(f))
            for f in ("produced", "delivered", "checked", "checked_whole", "bad", "duplicates", "lost"):
                d[f].append(res[f])
            if res["first_bad"]:
                d["first_bad"].append(res["first_bad"])
            if res.get("drain") and res["drain"].get("drain_error"):
                d["drain_error"].append(res["drain"]["drain_error"])
    lim = []
    for v in LIMITERS:
        if (v, OPS[0]) in lim_us:
            lim.append({"limiter": v, "label": LIMITER_LABELS[v], "reps": len(lim_us[(v, OPS[0])]), "waited_s": lim_waited[v],
                        "us": {op: _median(lim_us[(v, op)]) for op in OPS},
                        "ratio": {op: _median(lim_ratio[(v, op)]) for op in OPS} if v != "none" else None,
                        "all_ratios": {op: lim_ratio[(v, op)] for op in OPS} if v != "none" else None})
    rows_q = []
    for (fig, k), d in qd.items():
        base = QUEUE_FIGURES[fig][1]
        rate = _median(d["delivered_per_s"])
        b = qd.get((fig, base))
        lost = [x for x in d["lost"] if x is not None]
        rows_q.append({
            "figure": fig, "workload": QUEUE_FIGURES[fig][0], "contender": k, "reps": len(d["delivered_per_s"]),
            "delivered_per_s": rate, "inserted_per_s": _median(d["inserted_per_s"]), "gb_per_s": _median(d["gb_per_s"]),
            "vs_baseline": _ratio(rate, _median(b["delivered_per_s"])) if b else None, "baseline": base,
            "check_share": _median(d["check_share"]), "stop_to_done_s": max(d["stop_to_done_s"]),
            "waiting_at_shutdown": None if None in d["waiting_at_shutdown"] else sum(d["waiting_at_shutdown"]),
            "shutdown_wake_s": max((x for x in d["shutdown_wake_s"] if x is not None), default=None),
            "checked": sum(d["checked"]), "checked_whole": sum(d["checked_whole"]), "bad": sum(d["bad"]), "duplicates": sum(d["duplicates"]),
            "lost": sum(lost) if lost else None, "produced": sum(d["produced"]),
            "first_bad": d["first_bad"][0] if d["first_bad"] else "", "drain_errors": d["drain_error"],
            "all_delivered_per_s": d["delivered_per_s"],
        })
    doc["medians"] = {"limiter_overhead": lim, "queue": rows_q}
    doc["errors"] = errors
    doc["targets"] = targets(doc)


def targets(doc: dict) -> list[dict]:
    m, figs, out = doc["medians"], set(doc["config"]["figures"]), []

    def add(name: str, value: Any, op: str, bound: float, unit: str = "x") -> None:
        ok = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append({"target": name, "value": value, "required_text": f"{op} {bound:g}{unit}", "pass": ok})

    if "limiter_overhead" in figs and "shmreplay" in doc["contenders"]:
        cap = doc["config"]["limiter_cap"]
        by = {r["limiter"]: r for r in m["limiter_overhead"]}
        for v in ("min_size", "ratio"):
            for op in OPS:
                r = by.get(v)
                add(f"1. {OP_TITLES[op]}, control {cap:,}: cost with {LIMITER_LABELS[v].split('(')[0]} / without",
                    r and r["ratio"][op], "<=", OVERHEAD_MAX)
    q = {(r["figure"], r["contender"]): r for r in m["queue"]}
    for i, (fig, (wl, base, factor)) in enumerate(QUEUE_FIGURES.items(), start=2):
        if fig not in figs or "shmreplay" not in doc["contenders"]:
            continue
        r = q.get((fig, "shmreplay"))
        if factor is not None:
            add(f"{i}. {fig}: delivered rows/s, shmreplay / {QUEUE_LABELS[base]}", r and r["vs_baseline"], ">=", factor)
        checked = f" (of {r['checked_whole']:,} checked whole)" if r else ""
        out.append({"target": f"{i}. {fig}: bad rows, shmreplay{checked}", "value": r and r["bad"],
                    "required_text": "0", "pass": r and r["bad"] == 0})
        ok = r and r["duplicates"] == 0 and r["lost"] == 0 and not r["drain_errors"]
        out.append({"target": f"{i}. {fig}: rows delivered twice / never (of {r['produced']:,} produced)" if r else f"{i}. {fig}: rows delivered twice / never",
                    "value": r and f"{r['duplicates']:,} / {r['lost']:,}" + (" (drain failed)" if r["drain_errors"] else ""),
                    "required_text": "0 / 0", "pass": ok if r else None})
    return out


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def _woken(r: dict) -> str:
    """Consumers waiting in sample() when shutdown() came (all repetitions), and the slowest to raise."""
    n = r.get("waiting_at_shutdown")
    if n is None:
        return "-"
    wake = r.get("shutdown_wake_s")
    return f"{n} in {wake * 1e3:.1f} ms" if n and wake is not None else str(n)


def table(doc: dict) -> str:
    m, cfg = doc["medians"], doc["config"]
    out = [report.header(doc)]
    if m["limiter_overhead"]:
        reps = max(r["reps"] for r in m["limiter_overhead"])
        out.append(f"\nfigure 1: limiter overhead, control, {cfg['limiter_cap']:,} slots, full, one process: us per call "
                   f"(cost with / without the limiter); medians of {cfg['subrounds']} turns x {reps} repetition(s)")
        body = []
        for r in m["limiter_overhead"]:
            cells = [f"{r['us'][op]:.2f} us" + (f" ({r['ratio'][op]:.3f})" if r["ratio"] else "") for op in OPS]
            body.append([r["label"], *cells, f"{r['waited_s']:.3f}"])
        out.append(report._grid(["limiter", *[OP_TITLES[op] for op in OPS], "waited s"], body))
    order = {k: i for i, k in enumerate(QUEUE_KEYS)}
    for fig, (wl, base, _) in QUEUE_FIGURES.items():
        rows = sorted((r for r in m["queue"] if r["figure"] == fig), key=lambda r: order[r["contender"]])
        if not rows:
            continue
        cap, every = cfg["queue_caps"][fig], cfg["whole_every"]
        whole = {0: "none", 1: "every delivery"}.get(every, f"1 delivery in {every}")
        out.append(f"\nfigure {FIGURES.index(fig) + 1}: {fig}, {cap:,} rows: {PRODUCERS} producers (extend/put {PUT_BATCH} rows) + "
                   f"{CONSUMERS} consumers (sample {GET_BATCH} / get) for {cfg['seconds']:g} s, the ids of every row "
                   f"checked, and whole: {whole}; medians of {max(r['reps'] for r in rows)} repetition(s)")
        body = [[QUEUE_LABELS[r["contender"]], _num(r["delivered_per_s"]), f"{r['gb_per_s']:.2f}", _num(r["inserted_per_s"]),
                 report._fmt_ratio(r["vs_baseline"]) if r["contender"] != base else "(1.00)",
                 "-" if r["check_share"] is None else f"{r['check_share']:.0%}",
                 f"{r['bad']:,} / {r['checked_whole']:,} / {r['checked']:,}", f"{r['duplicates']:,}", _num(r["lost"]), _woken(r)]
                for r in rows]
        out.append(report._grid(["contender", "delivered rows/s", "GB/s", "inserted rows/s", f"vs {base}", "checking",
                                 "bad / whole / ids", "duplicates", "lost", "woken by shutdown"], body))
    if doc["targets"]:
        out.append("\ntargets (flow control, issue 14), shmreplay:")
        out.append(report.targets_grid(doc["targets"]))
    for k, why in doc["skipped"].items():
        out.append(f"\nskipped {QUEUE_LABELS.get(k, k)}: {why}")
    for e in doc["errors"]:
        out.append(f"\nERROR repetition {e['rep'] + 1} {e['figure']} {e['contender']}: {e['error'].strip().splitlines()[-1]}")
    for r in m["queue"]:
        if r["bad"]:
            out.append(f"\nbad rows with {QUEUE_LABELS[r['contender']]} ({r['figure']}): {r['bad']:,}; first: {r['first_bad']}")
        for e in r["drain_errors"]:
            out.append(f"\ndrain error ({r['figure']}): {e}")
    for n in doc["notes"]:
        out.append(f"\nnote: {n}")
    out.append(report.machine_footer(doc["machine"], "faster-fifo"))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, 1 repetition (< 1 min)")
    ap.add_argument("--only", help=f"comma-separated figures: {','.join(FIGURES)} or 1-{len(FIGURES)} (default: all)")
    ap.add_argument("--contenders", help=f"comma-separated, for the queue figures: {','.join(QUEUE_KEYS)} (default: all installed)")
    ap.add_argument("--reps", type=int, help="repetitions (default: 5; quick 1)")
    ap.add_argument("--seconds", type=float, help="duration of each queue run (default: 5; quick 2)")
    ap.add_argument("--whole-every", type=int, metavar="N",
                    help="queue consumers check the ids of every row, and one check in N byte for byte "
                         "(default 8; quick 1; 1: all; 0: ids only)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory (default benches/results)")
    args = ap.parse_args()

    mode = "quick" if args.quick else "full"
    cfg = MODES[mode]
    if args.reps:
        cfg.reps = args.reps
    if args.seconds:
        cfg.seconds = args.seconds
    if args.whole_every is not None:
        if args.whole_every < 0:
            ap.error("--whole-every must be 0 or more")
        cfg.whole_every = args.whole_every
    figs = report.parse_figures(args.only, FIGURES, ap)
    wanted = args.contenders.split(",") if args.contenders else QUEUE_KEYS
    if set(wanted) - set(QUEUE_KEYS):
        ap.error(f"unknown contender(s) {sorted(set(wanted) - set(QUEUE_KEYS))}; choose from {','.join(QUEUE_KEYS)}")
    if "limiter_overhead" in figs and "shmreplay" not in wanted:
        wanted = ["shmreplay", *wanted]  # figure 1 is shmreplay's alone

    skipped: dict[str, str] = {}
    keys = []
    for k in QUEUE_KEYS:
        if k in wanted:
            why = missing(k)
            if why:
                skipped[k] = why
            else:
                keys.append(k)
    for k, why in skipped.items():
        print(f"skipping {QUEUE_LABELS[k]}: {why}", flush=True)
    notes: list[str] = []

    prefix = f"shmflow-{os.getpid()}-{uuid.uuid4().hex[:4]}-"
    started = time.time()
    machine = report.machine_info()
    try:
        machine["versions"]["faster-fifo"] = importlib.metadata.version("faster-fifo")
    except importlib.metadata.PackageNotFoundError:
        machine["versions"]["faster-fifo"] = None
    doc_mode = "flow" + ("-quick" if args.quick else "")
    print(report.header({"mode": doc_mode, "machine": machine}), flush=True)
    groups = job_groups(cfg, keys, figs)
    n_jobs = sum(len(j) for _, j in groups)
    print(f"{mode}: figures {','.join(f for f in FIGURES if f in figs)}; {n_jobs} jobs per repetition, {cfg.reps} repetition(s); "
          f"files in {SHM_DIR} start with {prefix}", flush=True)
    raw = run.run_rounds(cfg.reps, groups, lambda job, rep: run_job(dict(job, rep=rep), prefix), prefix, notes)

    machine["load_avg_end"] = os.getloadavg()
    doc = {
        "suite": "shmreplay flow control benches",
        "mode": doc_mode,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": time.time() - started,
        "machine": machine,
        "config": asdict(cfg) | {"figures": [f for f in FIGURES if f in figs], "limiters": LIMITER_LABELS,
                                 "producers": PRODUCERS, "consumers": CONSUMERS, "put_batch": PUT_BATCH,
                                 "get_batch": GET_BATCH, "check_block": CHECK_BLOCK, "pool_rows": POOL_ROWS},
        "contenders": {k: QUEUE_LABELS[k] for k in keys},
        "skipped": skipped,
        "notes": notes,
        "raw": raw,
    }
    summarise(doc)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{doc_mode}.json")
    report.write_json(doc, path)
    print(table(doc))
    print(f"\nwrote {path}")
    print(f"total {doc['duration_s']:.0f} s")
    leftover = [n for n in os.listdir(SHM_DIR) if prefix in n]
    if leftover:
        print(f"WARNING: left in {SHM_DIR}: {leftover}")
    return 0


if __name__ == "__main__":
    # Run as a script, this file is __main__; the functions that job and child processes run
    # must be pickled as flow.<name>, so the work is done by the module imported by name.
    import flow

    sys.exit(flow.main())
