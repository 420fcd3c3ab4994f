"""Shared helpers for the shmreplay test suite.

Everything a child process runs lives here as a top-level function, so that the
``spawn`` start method can pickle it by reference (``helpers.<name>``).

Two families of deterministic data:

* ``rows_for_keys(fields, keys)``: for ANY schema, the content of the row whose insert
  ticket is ``key``. Used where a single process (or one writer at a time) inserts rows in
  order, so ticket k holds ``rows_for_keys(fields, [k])``.
* ``make_records(wid, seqs, frame)`` / ``validate_records(batch)``: self-validating
  Atari-like records for concurrent writers, where tickets are interleaved. Every field is
  derived from (writer id, sequence number), so a torn or mixed row is detected from the
  row alone.
"""

from __future__ import annotations

import os
import queue as queue_mod
import signal
import time
import traceback
from typing import Any, Callable, Iterable, Mapping

import numpy as np

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "shmreplay."

SUPPORTED_DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
]

ATARI_FRAME = (4, 84, 84)


def atari_fields(frame: tuple[int, ...] = ATARI_FRAME) -> dict[str, tuple[tuple[int, ...], Any]]:
    return {
        "obs": (frame, np.uint8),
        "action": ((), np.int32),
        "reward": ((), np.float32),
        "next_obs": (frame, np.uint8),
        "done": ((), np.bool_),
    }


def control_fields() -> dict[str, tuple[tuple[int, ...], Any]]:
    """A small MuJoCo-like schema: 184 bytes per record (each field padded to 8)."""
    return {
        "obs": ((17,), np.float32),
        "action": ((6,), np.float32),
        "reward": ((), np.float32),
        "next_obs": ((17,), np.float32),
        "done": ((), np.bool_),
    }


def normalize_fields(fields: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    out = {}
    for name, (shape, dtype) in fields.items():
        if isinstance(shape, (int, np.integer)):
            shape = (int(shape),)
        out[name] = (tuple(int(s) for s in shape), np.dtype(dtype))
    return out


def padded(nbytes: int) -> int:
    return (nbytes + 7) // 8 * 8


def expected_record_bytes(fields: Mapping[str, Any]) -> int:
    total = 0
    for shape, dtype in normalize_fields(fields).values():
        total += padded(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    return total


def segment_path(name: str, directory: str | os.PathLike[str] | None = None) -> str:
    return os.path.join(str(directory) if directory is not None else SHM_DIR, SEGMENT_PREFIX + name)


# ---------------------------------------------------------------------------------------
# Deterministic rows keyed by insert ticket (any schema)
# ---------------------------------------------------------------------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser on a uint64 array (wraps silently on arrays)."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def rows_for_keys(fields: Mapping[str, Any], keys: Iterable[int]) -> dict[str, np.ndarray]:
    """Row content for the given insert tickets: dict field -> array (N, *shape) of the
    field's exact dtype. Deterministic in (key, field position, element position)."""
    nf = normalize_fields(fields)
    keys = np.asarray(list(keys) if not isinstance(keys, np.ndarray) else keys, dtype=np.uint64)
    n = keys.shape[0]
    out: dict[str, np.ndarray] = {}
    for fi, (name, (shape, dtype)) in enumerate(nf.items()):
        size = int(np.prod(shape, dtype=np.int64))
        elem = np.arange(size, dtype=np.uint64)
        salt = np.uint64(((fi * 0x10001 + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        seed = keys[:, None] * np.uint64(0x100000001B3) + salt
        h = splitmix64(seed + elem[None, :])  # (n, size)
        if dtype.kind == "b":
            vals = (h & np.uint64(1)).astype(np.bool_)
        elif dtype.kind in "iu":
            bits = dtype.itemsize * 8
            mask = np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
            vals = (h & mask).astype(np.dtype(f"u{dtype.itemsize}")).view(dtype)
        elif dtype.kind == "f":
            vals = (((h % np.uint64(1 << 20)).astype(np.float64) - float(1 << 19)) / 64.0).astype(dtype)
        else:  # pragma: no cover - test schemas only use supported dtypes
            raise AssertionError(f"unsupported dtype in test schema: {dtype}")
        out[name] = np.ascontiguousarray(vals.reshape((n, *shape)))
    return out


def row_for_key(fields: Mapping[str, Any], key: int) -> dict[str, np.ndarray]:
    rows = rows_for_keys(fields, [key])
    return {k: v[0] for k, v in rows.items()}


def take_row(rows: Mapping[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {k: v[i] for k, v in rows.items()}


def assert_row_equal(actual: Mapping[str, Any], expected: Mapping[str, np.ndarray], where: str = "") -> None:
    assert set(actual) == set(expected), f"{where}: fields {sorted(actual)} != {sorted(expected)}"
    for name, exp in expected.items():
        got = np.asarray(actual[name])
        assert got.dtype == exp.dtype, f"{where}: field {name!r} dtype {got.dtype} != {exp.dtype}"
        assert got.shape == exp.shape, f"{where}: field {name!r} shape {got.shape} != {exp.shape}"
        assert np.array_equal(got, exp), f"{where}: field {name!r} content differs"


def assert_slots_hold_keys(buf: Any, fields: Mapping[str, Any], keys: Iterable[int]) -> None:
    """Each key k must be readable at slot k % capacity with content rows_for_keys(k)."""
    cap = buf.capacity
    for k in keys:
        assert_row_equal(buf[k % cap], row_for_key(fields, k), where=f"slot {k % cap} (key {k})")


def snapshot_slots(buf: Any) -> dict[int, dict[str, np.ndarray]]:
    """Copies of every readable slot (never-written slots are absent)."""
    snap = {}
    for i in range(buf.capacity):
        try:
            row = buf[i]
        except IndexError:
            continue
        snap[i] = {k: np.array(v, copy=True) for k, v in row.items()}
    return snap


# ---------------------------------------------------------------------------------------
# Self-validating records for concurrent writers
# ---------------------------------------------------------------------------------------


def record_fields(frame: tuple[int, ...] = ATARI_FRAME) -> dict[str, tuple[tuple[int, ...], Any]]:
    fields = atari_fields(frame)
    fields["step"] = ((), np.int64)
    return fields


def _frame_words(frame: tuple[int, ...]) -> int:
    nbytes = int(np.prod(frame))
    assert nbytes % 8 == 0, "record frames must be a multiple of 8 bytes"
    return nbytes // 8


def _pattern(wids: np.ndarray, seqs: np.ndarray, nwords: int) -> np.ndarray:
    """(N, nwords) uint64: word j of the frame of (wid, seq)."""
    h = splitmix64((wids.astype(np.uint64) << np.uint64(40)) ^ seqs.astype(np.uint64))
    j = np.arange(nwords, dtype=np.uint64) * _GOLDEN
    return h[:, None] ^ j[None, :]


def make_records(wid: int, seqs: Iterable[int], frame: tuple[int, ...] = ATARI_FRAME) -> dict[str, np.ndarray]:
    """Records (batch form) for writer ``wid`` and the given sequence numbers."""
    seqs = np.asarray(list(seqs) if not isinstance(seqs, np.ndarray) else seqs, dtype=np.int64)
    n = seqs.shape[0]
    wids = np.full(n, wid, dtype=np.int64)
    nwords = _frame_words(frame)
    obs = _pattern(wids, seqs, nwords).view(np.uint8).reshape((n, *frame))
    next_obs = _pattern(wids, seqs + 1, nwords).view(np.uint8).reshape((n, *frame))
    return {
        "obs": obs,
        "action": wids.astype(np.int32),
        "reward": (seqs % 1000).astype(np.float32),
        "next_obs": next_obs,
        "done": (seqs % 7) == 0,
        "step": seqs.copy(),
    }


def validate_records(batch: Mapping[str, np.ndarray], n_writers: int | None = None) -> tuple[int, str]:
    """Return (number of bad rows, description of the first bad row)."""
    obs = np.asarray(batch["obs"])
    n = obs.shape[0]
    if n == 0:
        return 0, ""
    frame = obs.shape[1:]
    nwords = _frame_words(frame)
    wids = np.asarray(batch["action"]).astype(np.int64).reshape(n)
    seqs = np.asarray(batch["step"]).astype(np.int64).reshape(n)
    bad = np.zeros(n, dtype=bool)
    bad |= seqs < 0
    bad |= wids < 0
    if n_writers is not None:
        bad |= wids >= n_writers
    safe_w = np.where(bad, 0, wids)
    safe_s = np.where(bad, 0, seqs)
    exp_obs = _pattern(safe_w, safe_s, nwords)
    exp_next = _pattern(safe_w, safe_s + 1, nwords)
    got_obs = np.ascontiguousarray(obs).reshape(n, -1).view(np.uint64)
    got_next = np.ascontiguousarray(np.asarray(batch["next_obs"])).reshape(n, -1).view(np.uint64)
    bad |= ~np.all(got_obs == exp_obs, axis=1)
    bad |= ~np.all(got_next == exp_next, axis=1)
    bad |= np.asarray(batch["reward"]).reshape(n) != (safe_s % 1000).astype(np.float32)
    bad |= np.asarray(batch["done"]).reshape(n) != ((safe_s % 7) == 0)
    nbad = int(bad.sum())
    if not nbad:
        return 0, ""
    i = int(np.argmax(bad))
    desc = (
        f"row {i}: action={wids[i]} step={seqs[i]} reward={np.asarray(batch['reward']).reshape(n)[i]} "
        f"done={np.asarray(batch['done']).reshape(n)[i]} "
        f"obs_ok={bool(np.all(got_obs[i] == exp_obs[i]))} next_obs_ok={bool(np.all(got_next[i] == exp_next[i]))}"
    )
    return nbad, desc


def stack_rows(rows: list[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    keys = list(rows[0])
    return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in keys}


# ---------------------------------------------------------------------------------------
# Running functions in child processes (no hangs: timeouts everywhere, kill in finally)
# ---------------------------------------------------------------------------------------


def _child_entry(q: Any, fn_name: str, args: tuple) -> None:
    try:
        result = globals()[fn_name](*args)
        q.put(("ok", result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        q.put(("err", traceback.format_exc()))
        raise SystemExit(1)


class Child:
    """A child process running ``helpers.<fn>(*args)`` and reporting through a queue."""

    def __init__(self, ctx: Any, fn: Callable, *args: Any) -> None:
        self.ctx = ctx
        self.q = ctx.Queue()
        self.proc = ctx.Process(target=_child_entry, args=(self.q, fn.__name__, args), daemon=True)

    def start(self) -> "Child":
        self.proc.start()
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def result(self, timeout: float = 60.0) -> Any:
        """Wait for the child's report, then for its exit; raise on failure or timeout."""
        try:
            try:
                status, payload = self.q.get(timeout=timeout)
            except queue_mod.Empty:
                alive = self.proc.is_alive()
                raise AssertionError(
                    f"child {self.proc.pid} sent no result within {timeout}s "
                    f"(alive={alive}, exitcode={self.proc.exitcode})"
                ) from None
            self.proc.join(timeout)
            if status == "err":
                raise AssertionError(f"child {self.proc.pid} failed:\n{payload}")
            assert not self.proc.is_alive(), f"child {self.proc.pid} did not exit"
            assert self.proc.exitcode == 0, f"child exit code {self.proc.exitcode}"
            return payload
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        if self.proc.pid is not None:
            self.proc.join(10)
        self.q.close()
        self.q.join_thread()


def run_in_child(ctx: Any, fn: Callable, *args: Any, timeout: float = 60.0) -> Any:
    child = Child(ctx, fn, *args).start()
    return child.result(timeout)


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------
# Child-process bodies (top-level so that spawn can pickle them by reference)
# ---------------------------------------------------------------------------------------


def _attach(name: str, path: str | None) -> Any:
    import shmreplay

    return shmreplay.ReplayBuffer.attach(name, path=path)


def child_write_keys(name: str, path: str | None, fields: Mapping[str, Any], start: int, n: int) -> int:
    """Attach by name and insert rows for keys start..start+n-1 (half via add, half via extend)."""
    buf = _attach(name, path)
    try:
        rows = rows_for_keys(fields, range(start, start + n))
        half = n // 2
        for i in range(half):
            buf.add(**take_row(rows, i))
        buf.extend({k: v[half:] for k, v in rows.items()})
        return len(buf)
    finally:
        buf.close()


def child_check_keys(name: str, path: str | None, fields: Mapping[str, Any], keys: list[int]) -> int:
    """Attach by name; every key must be at slot key % capacity; sampling must agree."""
    buf = _attach(name, path)
    try:
        assert not buf.is_owner
        assert_slots_hold_keys(buf, fields, keys)
        batch, info = buf.sample(64, return_info=True)
        exp = rows_for_keys(fields, info["key"])
        assert np.array_equal(info["key"] % np.uint64(buf.capacity), info["index"].astype(np.uint64))
        assert set(int(k) for k in info["key"]) <= set(keys)
        for f in exp:
            assert np.array_equal(batch[f], exp[f]), f
        return len(buf)
    finally:
        buf.close()


def child_huge_page_bytes(name: str, path: str | None, fields: Mapping[str, Any], keys: list[int]) -> int | None:
    """Attach by name, check the rows (as child_check_keys), report the 2 MiB-mapped bytes."""
    buf = _attach(name, path)
    try:
        assert_slots_hold_keys(buf, fields, keys)
        return buf.huge_page_bytes()
    finally:
        buf.close()


def child_use_handle(buf: Any, fields: Mapping[str, Any], check_keys: list[int], write_start: int, n: int, close: bool) -> dict:
    """Use a handle received from the parent (inherited by fork or pickled by spawn)."""
    assert not buf.closed
    assert_slots_hold_keys(buf, fields, check_keys)
    rows = rows_for_keys(fields, range(write_start, write_start + n))
    buf.extend(rows)
    batch, info = buf.sample(16, return_info=True)
    exp = rows_for_keys(fields, info["key"])
    for f in exp:
        assert np.array_equal(batch[f], exp[f]), f
    out = {"len": len(buf), "pid": os.getpid(), "is_owner": buf.is_owner, "name": buf.name, "path": buf.path}
    if close:
        buf.close()
    return out


def child_unpickle_and_use(data: bytes, fields: Mapping[str, Any], check_keys: list[int], write_start: int, n: int) -> dict:
    import pickle

    buf = pickle.loads(data)
    try:
        return child_use_handle(buf, fields, check_keys, write_start, n, False)
    finally:
        buf.close()


def child_create_fill_hold(name: str, fields: Mapping[str, Any], capacity: int, n: int, ready: Any, release: Any) -> None:
    """Create a buffer (as its owner), fill n rows, signal, wait (bounded), exit the with-block."""
    import shmreplay

    with shmreplay.ReplayBuffer.create(name, capacity=capacity, fields=fields) as buf:
        buf.extend(rows_for_keys(fields, range(n)))
        ready.set()
        release.wait(60)


def child_attach_and_hold(name: str, path: str | None, ready: Any, release: Any, close: bool) -> int:
    """Attach, signal ``ready``, wait for ``release`` (bounded), then optionally close."""
    buf = _attach(name, path)
    ready.set()
    release.wait(60)
    if close:
        buf.close()
    return os.getpid()


def child_attach_and_sleep(name: str, path: str | None, ready: Any) -> None:
    """Attach, signal ``ready`` and sleep until killed (bounded)."""
    buf = _attach(name, path)  # noqa: F841 - kept alive on purpose
    ready.set()
    time.sleep(120)


def child_hammer_extend(name: str, path: str | None, frame: tuple[int, ...], wid: int, batch_rows: int) -> None:
    """Write one precomputed batch of large records forever (until killed).

    Each extend copies many megabytes, so a SIGKILL very likely lands mid-copy.
    """
    buf = _attach(name, path)
    recs = make_records(wid, range(batch_rows), frame)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        buf.extend(recs)


def child_verify_after_kill(name: str, path: str | None, n_writers: int, fresh_wid: int) -> dict:
    """After writers were SIGKILLed: sampling must neither hang nor return a torn row, and
    a new writer must be able to (re)write every slot, including one left in progress."""
    buf = _attach(name, path)
    try:
        cap = buf.capacity
        # A writer killed while overwriting a slot leaves that slot without a record until the
        # next writer of the slot takes it over: at most one slot per killed writer.
        assert cap - n_writers <= len(buf) <= cap, f"len {len(buf)}, capacity {cap}"
        for _ in range(20):
            batch, info = buf.sample(32, return_info=True)
            nbad, desc = validate_records(batch, n_writers=n_writers)
            assert nbad == 0, f"torn row sampled after writer death: {desc}"
            assert np.array_equal(info["key"] % np.uint64(cap), info["index"].astype(np.uint64))
        frame = tuple(batch["obs"].shape[1:])
        recs = make_records(fresh_wid, range(2 * cap), frame)
        buf.extend(recs)
        assert len(buf) == cap, f"len {len(buf)} != capacity {cap} after a full rewrite"
        seen = []
        for i in range(cap):
            row = buf[i]
            one = {k: np.asarray(v)[None] for k, v in row.items()}
            nbad, desc = validate_records(one, n_writers=fresh_wid + 1)
            assert nbad == 0, f"slot {i} invalid after rewrite: {desc}"
            assert int(np.asarray(row["action"])) == fresh_wid, f"slot {i} not rewritten (action={row['action']})"
            seen.append(int(np.asarray(row["step"])))
        assert sorted(seen) == list(range(cap, 2 * cap)), sorted(seen)
        batch = buf.sample(64)
        nbad, desc = validate_records(batch, n_writers=fresh_wid + 1)
        assert nbad == 0, desc
        assert np.all(batch["action"] == fresh_wid)
        return dict(buf.stats())
    finally:
        buf.close()


def concurrent_writer(
    name: str,
    path: str | None,
    wid: int,
    frame: tuple[int, ...],
    stop: Any,
    progress: Any,
    q: Any,
) -> None:
    """Write self-validating records (alternating add and small extends) until ``stop``."""
    try:
        buf = _attach(name, path)
        seq = 0
        deadline = time.monotonic() + 120  # hard bound whatever the parent does
        rng = np.random.default_rng(wid)
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
        buf.close()
        q.put(("ok", ("writer", wid, seq)))
    except BaseException:  # noqa: BLE001
        q.put(("err", f"writer {wid}:\n{traceback.format_exc()}"))


SINGLE_READS_PER_BATCH = 8


def concurrent_sampler(
    name: str,
    path: str | None,
    sid: int,
    n_writers: int,
    batch_size: int,
    stop: Any,
    progress: Any,
    torn: Any,
    q: Any,
) -> None:
    """Sample (and read single slots) until ``stop``; count every torn or mixed row."""
    try:
        buf = _attach(name, path)
        cap = buf.capacity
        rng = np.random.default_rng(1000 + sid)
        sampled = 0
        bad_total = 0
        first_bad = ""
        bad_keys = 0
        index_errors = 0
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            if len(buf) == 0:
                time.sleep(0.001)
                continue
            batch, info = buf.sample(batch_size, return_info=True)
            if info["index"].shape != (batch_size,) or not np.array_equal(
                info["key"] % np.uint64(cap), info["index"].astype(np.uint64)
            ):
                bad_keys += 1
            nbad, desc = validate_records(batch, n_writers=n_writers)
            sampled += batch_size
            if nbad:
                bad_total += nbad
                first_bad = first_bad or f"sample: {desc}"
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
                    sampled += 1
                    if nbad:
                        bad_total += nbad
                        first_bad = first_bad or f"buf[{i}]: {desc}"
            progress.value = sampled
            torn.value = bad_total
        stats = dict(buf.stats())
        buf.close()
        q.put(("ok", ("sampler", sid, sampled, bad_total, first_bad, bad_keys, index_errors, stats)))
    except BaseException:  # noqa: BLE001
        q.put(("err", f"sampler {sid}:\n{traceback.format_exc()}"))


def streaming_writer(
    name: str,
    path: str | None,
    wid: int,
    frame: tuple[int, ...],
    batch_rows: int,
    stop: Any,
    progress: Any,
    q: Any,
) -> None:
    """Extend one precomputed batch of records over and over until ``stop``: almost all of
    this process's time is spent inside slot copies."""
    try:
        buf = _attach(name, path)
        recs = make_records(wid, range(batch_rows), frame)
        calls = 0
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            buf.extend(recs)
            calls += 1
            progress.value = calls * batch_rows
        buf.close()
        q.put(("ok", ("writer", wid, calls * batch_rows)))
    except BaseException:  # noqa: BLE001
        q.put(("err", f"writer {wid}:\n{traceback.format_exc()}"))


def slot_reader(
    name: str,
    path: str | None,
    sid: int,
    n_writers: int,
    stop: Any,
    progress: Any,
    torn: Any,
    q: Any,
) -> None:
    """Read single slots (``buf[i]``) of a fully written ring until ``stop``: each read must
    return a consistent copy, whatever the writers are doing to that slot."""
    try:
        buf = _attach(name, path)
        cap = buf.capacity
        rng = np.random.default_rng(2000 + sid)
        reads = bad_total = 0
        first_bad = ""
        deadline = time.monotonic() + 120
        while len(buf) < cap and time.monotonic() < deadline:
            time.sleep(0.001)
        while not stop.is_set() and time.monotonic() < deadline:
            idx = rng.integers(0, cap, size=64).tolist()
            rows = [buf[i] for i in idx]  # back to back: most of the time is spent in reads
            batch = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
            nbad, desc = validate_records(batch, n_writers=n_writers)
            if nbad:
                bad_total += nbad
                first_bad = first_bad or f"buf[i] for i in {idx}: {desc}"
            reads += 64
            progress.value = reads
            torn.value = bad_total
        buf.close()
        q.put(("ok", ("sampler", sid, reads, bad_total, first_bad, 0, 0, {})))
    except BaseException:  # noqa: BLE001
        q.put(("err", f"reader {sid}:\n{traceback.format_exc()}"))


def kill_and_reap(procs: Iterable[Any], timeout: float = 10.0) -> None:
    for p in procs:
        if p.pid is not None and p.is_alive():
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        if p.pid is not None:
            p.join(timeout)


# ---------------------------------------------------------------------------------------
# Running a function in a forked child (no pickling of the function: closures are fine)
# ---------------------------------------------------------------------------------------


def run_forked(fn: Callable[[], Any], timeout: float = 60.0, *, as_user: tuple[int, int] | None = None) -> Any:
    """Runs ``fn()`` in an ``os.fork()`` child and returns its (pickled) result.

    With ``as_user=(uid, gid)`` the child first drops every privilege to that user (root
    only). The child leaves with ``os._exit`` (no atexit handlers, no finalizers of objects
    inherited from the parent). An exception in the child is re-raised here as an
    AssertionError carrying the child's traceback; a child that does not answer within
    ``timeout`` seconds is killed and reported.
    """
    import pickle
    import select

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 0
        try:
            os.close(r)
            if as_user is not None:
                uid, gid = as_user
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            payload = pickle.dumps(("ok", fn()))
        except BaseException:  # noqa: BLE001 - everything goes to the parent
            payload = pickle.dumps(("err", traceback.format_exc()))
            status = 1
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(w, view):]
        finally:
            os._exit(status)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"forked child {pid} did not finish within {timeout}s")
            ready, _, _ = select.select([r], [], [], left)
            if ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(r)
        if time.monotonic() >= deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, wait_status = os.waitpid(pid, 0)
    if not chunks:
        raise AssertionError(f"forked child {pid} died without an answer (wait status {wait_status:#x})")
    status, value = pickle.loads(b"".join(chunks))
    if status == "err":
        raise AssertionError(f"forked child {pid} failed:\n{value}")
    return value


def open_fds() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def segment_mappings(marker: str = "shmreplay.") -> int:
    """Lines of /proc/self/maps that map a segment file (deleted or not)."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if marker in line)


def child_pickle_cycles_and_extend(buf: Any, fields: Mapping[str, Any], start: int, n: int, cycles: int) -> dict:
    """Spawned child given a pickled handle: re-pickles it ``cycles`` times (each an attach
    and a close), inserts keys start..start+n-1, and reports its own descriptor growth."""
    import gc
    import pickle

    fds = open_fds()
    for _ in range(cycles):
        pickle.loads(pickle.dumps(buf)).close()
    buf.extend(rows_for_keys(fields, range(start, start + n)))
    gc.collect()
    out = {"pid": os.getpid(), "fds": open_fds() - fds, "attached": buf.stats()["attached"], "owner": buf.is_owner}
    buf.close()
    return out


def default_sigint() -> None:
    """``Popen(preexec_fn=...)`` for children that a test interrupts with SIGINT: a shell that runs
    the tests in the background ignores SIGINT, and children would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# ---------------------------------------------------------------------------------------
# Stopping a writer inside a write (test hook), full descriptor tables, process states
# ---------------------------------------------------------------------------------------

#: Where the test hook can stop a writer: "copy" (after the first half of the first row's
#: record bytes were stored: mid-copy for certain, whatever the record size) and "count"
#: (after the first row's commit, before that row is counted in ``len``).
HOOK_STAGES = ("copy", "count")


class HookUnavailable(AssertionError):
    """This build has no test hook for the stage a test needs (an AssertionError: the test
    fails, it is not skipped, until the core that provides it is built)."""


def has_stage_hook() -> bool:
    """True once the core exposes ``_core._test_extend_pausing(raw, columns, on_pause, stage)``."""
    import shmreplay

    return hasattr(shmreplay._core, "_test_extend_pausing")


def hook_columns(buf: Any, batch: Mapping[str, Any]) -> list[np.ndarray]:
    """``batch`` as the hook takes it: one C-contiguous array per field, in field order, of the
    field's exact dtype, with a leading row dimension."""
    columns = []
    for name, (shape, dtype) in buf.fields.items():
        column = np.ascontiguousarray(np.asarray(batch[name]), dtype=dtype)
        if column.shape[1:] != tuple(shape):
            raise ValueError(f"field {name!r}: rows of shape {column.shape[1:]}, expected {shape}")
        columns.append(column)
    if len({c.shape[0] for c in columns}) != 1:
        raise ValueError("fields have different numbers of rows")
    return columns


def extend_pausing(buf: Any, batch: Mapping[str, Any], on_pause: Callable[[int], Any], stage: str = "copy") -> int:
    """Inserts ``batch`` through the test hook: ``on_pause(slot)`` is called (with the GIL) once,
    at ``stage`` of the first row, with that row's slot still claimed. Returns the row count.

    Uses ``_core._test_extend_pausing`` when the build has it, else the older
    ``RawBuffer.extend_pausing`` (which stops after the first *field* of the first row, i.e.
    stage "copy" only; any other stage raises :class:`HookUnavailable`).
    """
    import shmreplay

    if stage not in HOOK_STAGES:
        raise ValueError(f"unknown hook stage {stage!r} (expected one of {HOOK_STAGES})")
    columns = hook_columns(buf, batch)
    hook = getattr(shmreplay._core, "_test_extend_pausing", None)
    if hook is not None:
        return hook(buf._raw, columns, on_pause, stage)
    if stage != "copy":
        raise HookUnavailable(
            f"this build has no test hook for stage {stage!r}: it needs "
            "shmreplay._core._test_extend_pausing (only RawBuffer.extend_pausing, stage 'copy', exists)"
        )
    return buf._raw.extend_pausing(columns, on_pause)


def fill_fd_table(headroom: int = 8) -> list[int]:
    """Fills this process's descriptor table: lowers RLIMIT_NOFILE to a few above the highest
    open descriptor, then opens /dev/null until EMFILE. Returns the descriptors it opened; from
    here on every open(), socket(), pidfd_open()... of this process fails with EMFILE."""
    import errno
    import resource

    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, highest + headroom), hard))
    fds: list[int] = []
    while True:
        try:
            fds.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as e:
            if e.errno != errno.EMFILE:
                raise
            break
        if len(fds) > 1 << 16:  # pragma: no cover - the limit did not take
            raise AssertionError("could not fill the descriptor table")
    try:
        os.close(os.open(os.devnull, os.O_RDONLY))
    except OSError as e:
        assert e.errno == errno.EMFILE, e
    else:  # pragma: no cover
        raise AssertionError("the descriptor table is not full")
    return fds


def proc_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (R, S, T, Z, ...) or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rfind(")") + 2 :].split()[0]


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (gone, or a zombie nobody reaped yet)."""
    return proc_state(pid) in (None, "Z", "X", "x")


def stop_process(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP ``pid`` and wait until the kernel reports it stopped."""
    os.kill(pid, signal.SIGSTOP)
    if not wait_until(lambda: proc_state(pid) in ("T", "t"), timeout):
        raise AssertionError(f"process {pid} did not stop (state {proc_state(pid)})")


def child_paused_writer(
    name: str,
    path: str | None,
    batch: Mapping[str, np.ndarray],
    stage: str,
    conn: Any,
    release: Any,
    linger: Any,
    fill_fds: bool,
) -> None:
    """Child: attaches and inserts ``batch`` through the test hook, stopping at ``stage`` of the
    first row. There it sends ``("paused", slot, pid, fds_opened)`` on ``conn`` and then waits
    for a message on the ``release`` connection (None: until killed). Once the insert returns
    it sends ``("done", rows, stats)`` and, if ``linger`` is a connection, stays alive (holding
    its handle) until a message or EOF arrives there. With ``fill_fds`` its descriptor table is
    full (EMFILE) before it writes.

    Waits are on pipes, never on multiprocessing locks: the parent SIGSTOPs this process at
    arbitrary moments, and a lock held by a stopped process would block the parent."""
    try:
        buf = _attach(name, path)
        fds = fill_fd_table() if fill_fds else []

        def pause(slot: int) -> None:
            conn.send(("paused", int(slot), os.getpid(), len(fds)))
            if release is None:
                time.sleep(300)  # until killed (the test kills it long before)
                os._exit(3)
            if not release.poll(120):
                os._exit(3)

        rows = extend_pausing(buf, batch, pause, stage)
        conn.send(("done", rows, dict(buf.stats())))
        if linger is not None:
            linger.poll(120)
    except BaseException:  # noqa: BLE001 - everything goes to the parent
        try:
            conn.send(("err", traceback.format_exc()))
        finally:
            os._exit(1)


class PausedWriter:
    """A writer process stopped by the test hook inside its first row (see `child_paused_writer`).

    ``resumable=True`` lets :meth:`resume` finish the insert; otherwise the writer waits until
    killed. ``linger=True`` keeps it alive (holding its handle) after the insert finished.
    """

    def __init__(
        self,
        ctx: Any,
        name: str,
        path: str | os.PathLike[str] | None,
        batch: Mapping[str, np.ndarray],
        stage: str = "copy",
        *,
        resumable: bool = False,
        linger: bool = False,
        fill_fds: bool = False,
    ) -> None:
        self.ctx = ctx
        self.conn, child_end = ctx.Pipe(duplex=False)
        release_end, self.release = ctx.Pipe(duplex=False) if resumable else (None, None)
        linger_end, self.linger = ctx.Pipe(duplex=False) if linger else (None, None)
        args = (name, None if path is None else str(path), dict(batch), stage, child_end, release_end, linger_end, fill_fds)
        self.proc = ctx.Process(target=child_paused_writer, args=args, daemon=True)
        self.slot: int | None = None
        self.fds_opened = 0
        self.done: tuple | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> "PausedWriter":
        """Starts the writer and returns once it is stopped inside the write."""
        self.proc.start()
        try:
            msg = self._recv(timeout)
            if msg[0] != "paused":
                raise AssertionError(f"the writer never reached the hook: {msg}")
            _, self.slot, _pid, self.fds_opened = msg
        except BaseException:
            self.kill()
            raise
        return self

    def _recv(self, timeout: float) -> tuple:
        if not wait_until(lambda: self.conn.poll() or not self.proc.is_alive(), timeout):
            raise AssertionError(f"writer {self.proc.pid} sent nothing within {timeout}s")
        if not self.conn.poll(1.0):
            raise AssertionError(f"writer {self.proc.pid} exited (code {self.proc.exitcode}) without a word")
        msg = self.conn.recv()
        if msg[0] == "err":
            raise AssertionError(f"writer {self.proc.pid} failed:\n{msg[1]}")
        return msg

    def stop(self) -> None:
        stop_process(self.pid)

    def cont(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def resume(self) -> None:
        """Lets a resumable writer finish its insert (continuing it if it was stopped)."""
        assert self.release is not None, "not resumable"
        self.release.send("go")
        self.cont()

    def wait_done(self, timeout: float = 30.0) -> tuple:
        """``("done", rows, stats)`` once the resumed insert returned."""
        if self.done is None:
            self.done = self._recv(timeout)
        return self.done

    def kill(self) -> None:
        if self.proc.pid is None:
            return
        if self.proc.is_alive():
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.join(30)
        assert not self.proc.is_alive(), f"writer {self.proc.pid} survived SIGKILL"


def child_insert_reporting(name: str, path: str | None, batch: Mapping[str, np.ndarray], conn: Any, fill_fds: bool) -> None:
    """Child: attaches, fills its own descriptor table first if ``fill_fds`` (EMFILE), then
    inserts ``batch``. Sends ``("inserting", fds_opened, t)`` right before the insert and
    ``("done", t, stats)`` or ``("raised", "Type: message", t)`` after it."""
    try:
        buf = _attach(name, path)
        fds = fill_fd_table() if fill_fds else []
        conn.send(("inserting", len(fds), time.monotonic()))
        try:
            buf.extend(dict(batch))
        except Exception as e:  # noqa: BLE001
            conn.send(("raised", f"{type(e).__name__}: {e}", time.monotonic()))
            return
        conn.send(("done", time.monotonic(), dict(buf.stats())))
    except BaseException:  # noqa: BLE001
        try:
            conn.send(("err", traceback.format_exc()))
        finally:
            os._exit(1)


def intervals_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """True if the closed intervals a and b (CLOCK_MONOTONIC times, comparable across the
    processes of one machine) share an instant."""
    return a[0] <= b[1] and b[0] <= a[1]
