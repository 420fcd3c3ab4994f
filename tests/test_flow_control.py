"""Acceptance tests for flow control (issue 14): rate limiters (``MinSize``,
``SampleToInsertRatio``), the FIFO ``Queue()`` sampler, ``timeout=``, Ctrl-C and ``shutdown()``.

Written blind, from the contract alone:

* counters ``I`` (tickets of admitted inserts), ``S`` (rows admitted to sampling), ``D`` (ring:
  ``max(0, I - capacity)``; queue: rows delivered), size ``I - D``;
* ``CanSample(n) = size >= min_size and I*spi - S - n >= min_diff``;
* ``CanInsert(k) = I + k - D <= min_size or (I + k)*spi - S <= max_diff``;
* a call is admitted whole; a call that could never be allowed raises ``ValueError`` at once;
  a disallowed call with ``timeout=0`` raises ``TimeoutError`` and changes nothing;
* ``shutdown()`` releases every waiter everywhere with ``ShutdownError`` within 100 ms; Ctrl-C
  releases a waiter with ``KeyboardInterrupt`` within 50 ms.

Rows are self-describing (``x`` derives from ``ident``), and in single-writer tests ``ident`` is
the insert ticket, so ``info["key"] == ident``. Child processes are real (``spawn`` and ``fork``),
killed with a real SIGKILL where a test says so; every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import fractions
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import zlib
from statistics import median
from typing import Any, Callable

import numpy as np
import pytest

import shmreplay
from shmreplay import ReplayBuffer

import helpers

# A correct implementation runs each test here in a few seconds; the marker turns a hang into a
# failure instead of a stalled run.
pytestmark = pytest.mark.timeout(120)

INF = math.inf
FIELDS: dict[str, tuple[tuple[int, ...], Any]] = {"ident": ((), np.int64), "x": ((3,), np.float32)}

SHUTDOWN_BOUND = 0.100  # contract: waiters everywhere raise ShutdownError within 100 ms
CTRL_C_BOUND = 0.050  # contract: Ctrl-C raises KeyboardInterrupt within 50 ms
# The two bounds above are checked on the median of a few attempts, or on the best of a few
# rounds: one measurement on a loaded CI machine may include a preemption of the waiter or the
# waker. Every attempt must still end within LATENCY_CEILING, which a hang breaks (a waiter
# that never notices, or sleeps until its timeout). A lost futex wake costs at most one 10 ms
# slice, which no bound here can see; they catch waiters never released and slices grown long.
LATENCY_CEILING = 1.0
START_TIMEOUT = 60.0  # for children to start (spawn imports numpy, shmreplay, pytest)


# =======================================================================================
# Rows, buffers, counters
# =======================================================================================


def make_rows(idents: Any) -> dict[str, np.ndarray]:
    idents = np.asarray(list(idents) if not isinstance(idents, np.ndarray) else idents, dtype=np.int64).reshape(-1)
    f = (idents % (1 << 22)).astype(np.float32)
    return {"ident": idents.copy(), "x": np.stack([f, f * 0.5, -f], axis=1).astype(np.float32)}


def one_row(ident: int) -> dict[str, Any]:
    rows = make_rows([ident])
    return {k: v[0] for k, v in rows.items()}


def rows_ok(batch: dict[str, Any]) -> np.ndarray:
    ident = np.asarray(batch["ident"]).reshape(-1)
    want = make_rows(ident)["x"]
    return np.all(np.asarray(batch["x"]).reshape(ident.shape[0], 3) == want, axis=1)


def create(name: str, capacity: int, **kwargs: Any) -> ReplayBuffer:
    return ReplayBuffer.create(name, capacity=capacity, fields=FIELDS, **kwargs)


def counters(buf: ReplayBuffer) -> dict[str, int]:
    s = buf.stats()
    return {"len": len(buf), "size": s["size"], "inserts": s["inserts"], "samples": s["samples"], "deletes": s["deletes"]}


def snapshot(buf: ReplayBuffer) -> dict[int, tuple]:
    out = {}
    for i in range(buf.capacity):
        try:
            row = buf[i]
        except IndexError:
            continue
        out[i] = (int(row["ident"]), np.asarray(row["x"]).tobytes())
    return out


def STIR(spi: float, min_size: int, eb: Any) -> Any:
    return shmreplay.SampleToInsertRatio(samples_per_insert=spi, min_size=min_size, error_buffer=eb)


def describe(e: BaseException) -> dict[str, Any]:
    return {
        "type": type(e).__name__,
        "shutdown": isinstance(e, shmreplay.ShutdownError),
        "shm": isinstance(e, shmreplay.ShmReplayError),
        "timeout": isinstance(e, TimeoutError),
        "value": isinstance(e, ValueError),
        "empty": isinstance(e, shmreplay.EmptyBufferError),
        "kbi": isinstance(e, KeyboardInterrupt),
        "msg": str(e),
    }


def raises_now(exc: type[BaseException], fn: Callable[[], Any], what: str, bound: float = 0.25) -> BaseException:
    """``fn()`` must raise ``exc`` and do so without waiting (within ``bound`` seconds)."""
    t0 = time.monotonic()
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        dt = time.monotonic() - t0
        assert isinstance(e, exc), f"{what}: raised {type(e).__name__}: {e} (expected {exc.__name__})"
        assert dt < bound, f"{what}: took {dt:.3f}s to raise {exc.__name__} (should not wait)"
        return e
    raise AssertionError(f"{what}: returned (expected {exc.__name__})")


def is_plain_timeout(e: BaseException) -> bool:
    return (
        isinstance(e, TimeoutError)
        and not isinstance(e, shmreplay.ShutdownError)
        and not isinstance(e, shmreplay.EmptyBufferError)
    )


# =======================================================================================
# Child processes: a generic runner talking over a pipe
# =======================================================================================


def _child_main(conn: Any, fn: Callable, args: tuple) -> None:
    # A shell running the tests in the background ignores SIGINT; children must not.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        fn(conn, *args)
    except BaseException:  # noqa: BLE001 - everything goes to the parent
        try:
            conn.send(("err", f"pid {os.getpid()}:\n{traceback.format_exc()}"))
        finally:
            os._exit(1)


class Kid:
    """A child process running top-level ``fn(conn, *args)``."""

    def __init__(self, ctx: Any, fn: Callable, *args: Any, duplex: bool = True) -> None:
        if duplex:
            self.conn, child = ctx.Pipe(duplex=True)
        else:
            self.conn, child = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_child_main, args=(child, fn, args), daemon=True)
        self.proc.start()
        child.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def recv(self, timeout: float = 30.0, expect: str | None = None) -> tuple:
        if not self.conn.poll(timeout):
            raise AssertionError(
                f"child {self.pid} sent nothing within {timeout}s (alive={self.proc.is_alive()}, exit {self.proc.exitcode})"
            )
        try:
            msg = self.conn.recv()
        except EOFError:
            raise AssertionError(f"child {self.pid} exited (code {self.proc.exitcode}) without a word") from None
        if msg[0] == "err":
            raise AssertionError(f"child failed:\n{msg[1]}")
        if expect is not None:
            assert msg[0] == expect, f"child {self.pid}: expected {expect!r}, got {msg!r}"
        return msg

    def send(self, msg: Any) -> None:
        self.conn.send(msg)

    def silent_for(self, seconds: float) -> bool:
        return not self.conn.poll(seconds)

    def kill(self) -> None:
        helpers.kill_and_reap([self.proc])

    def finish(self, timeout: float = 10.0) -> None:
        try:
            self.conn.send(("bye",))
        except (OSError, ValueError):
            pass
        self.proc.join(timeout)
        self.kill()


def kill_all(kids: list[Kid]) -> None:
    helpers.kill_and_reap([k.proc for k in kids])


def _do(buf: ReplayBuffer, op: str, arg: Any, timeout: Any) -> Any:
    if op == "sample":
        batch, info = buf.sample(arg, timeout=timeout, return_info=True)
        assert rows_ok(batch).all(), "torn row sampled"
        return {"ident": batch["ident"].tolist(), "key": [int(k) for k in info["key"]]}
    if op == "extend":
        start, k = arg
        buf.extend(make_rows(range(start, start + k)), timeout=timeout)
        return None
    if op == "add":
        buf.add(**one_row(arg), timeout=timeout)
        return None
    if op == "shutdown":
        buf.shutdown()
        return None
    if op == "can":
        return {"can_sample": [bool(buf.can_sample(n)) for n in arg[0]], "can_insert": [bool(buf.can_insert(k)) for k in arg[1]]}
    raise AssertionError(f"unknown op {op}")


def _c_call(conn: Any, name: str, op: str, arg: Any, timeout: Any) -> None:
    """Attach; then, for each command, send ("ready", t) and run it, reporting
    ("ok", t_end, t_start, payload, counters) or ("raised", t_end, t_start, describe(e), counters).
    Further commands come as ("again", op, arg, timeout); anything else ends the child."""
    buf = ReplayBuffer.attach(name)
    try:
        while True:
            conn.send(("ready", time.monotonic(), os.getpid()))
            t0 = time.monotonic()
            try:
                payload = _do(buf, op, arg, timeout)
                msg: tuple = ("ok", time.monotonic(), t0, payload)
            except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt included
                msg = ("raised", time.monotonic(), t0, describe(e))
            conn.send(msg + (counters(buf),))
            if not conn.poll(60):
                return
            cmd = conn.recv()
            if cmd[0] != "again":
                return
            _, op, arg, timeout = cmd
    finally:
        buf.close()


def start_call(ctx: Any, name: str, op: str, arg: Any, timeout: Any) -> Kid:
    kid = Kid(ctx, _c_call, name, op, arg, timeout)
    kid.recv(START_TIMEOUT, expect="ready")
    return kid


def start_waiter(ctx: Any, name: str, op: str, arg: Any, timeout: Any, settle: float = 0.3) -> Kid:
    """A child blocked in ``op`` (checked: it has not returned after ``settle`` seconds)."""
    kid = start_call(ctx, name, op, arg, timeout)
    if not kid.silent_for(settle):
        msg = kid.conn.recv()
        kid.kill()
        raise AssertionError(f"{op}({arg}) did not wait: {msg}")
    return kid


# =======================================================================================
# 1. Limiter objects and creation-time validation
# =======================================================================================


def test_limiter_objects_are_frozen_value_dataclasses():
    m = shmreplay.MinSize(1_000)
    r = STIR(8.0, 50_000, 2_000)
    q = shmreplay.Queue()
    for obj in (m, r, q):
        assert dataclasses.is_dataclass(obj), type(obj)
        assert pickle.loads(pickle.dumps(obj)) == obj
        assert hash(pickle.loads(pickle.dumps(obj))) == hash(obj)
    assert m == shmreplay.MinSize(1_000) and m != shmreplay.MinSize(999)
    assert r == STIR(8.0, 50_000, 2_000)
    assert r != STIR(8.0, 50_000, 2_001) and r != STIR(4.0, 50_000, 2_000)
    assert q == shmreplay.Queue()
    assert m.min_size == 1_000
    assert (r.samples_per_insert, r.min_size) == (8.0, 50_000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.min_size = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.samples_per_insert = 2.0  # type: ignore[misc]
    # the window: a scalar error buffer around spi*min_size, a pair as given (floats)
    assert (r.min_diff, r.max_diff) == (398_000.0, 402_000.0)
    assert isinstance(r.min_diff, float) and isinstance(r.max_diff, float)
    t = STIR(2.0, 10, (-5, 30))
    assert (t.min_diff, t.max_diff) == (-5.0, 30.0)
    assert isinstance(t.min_diff, float) and isinstance(t.max_diff, float)
    h = STIR(0.5, 4, 1.5)
    assert (h.min_diff, h.max_diff) == (0.5, 3.5)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: shmreplay.MinSize(0), id="MinSize(0)"),
        pytest.param(lambda: shmreplay.MinSize(-3), id="MinSize(-3)"),
        pytest.param(lambda: STIR(0.0, 10, 100), id="spi=0"),
        pytest.param(lambda: STIR(-1.0, 10, 100), id="spi<0"),
        pytest.param(lambda: STIR(float("nan"), 10, 100), id="spi=nan"),
        pytest.param(lambda: STIR(1.0, 0, 100), id="min_size=0"),
        pytest.param(lambda: STIR(1.0, -5, 100), id="min_size<0"),
        # window narrower than 2*max(1, spi)
        pytest.param(lambda: STIR(8.0, 1000, 7.99), id="eb-too-small-spi8"),
        pytest.param(lambda: STIR(0.5, 10, 0.99), id="eb-too-small-spi0.5"),
        pytest.param(lambda: STIR(1.0, 10, (0.0, 1.99)), id="window-1.99"),
        pytest.param(lambda: STIR(3.0, 10, (0.0, 5.5)), id="window-below-2spi"),
        pytest.param(lambda: STIR(1.0, 10, -5), id="negative-eb"),
        pytest.param(lambda: STIR(1.0, 10, (50.0, 10.0)), id="min>max"),
        # min_diff above spi*min_size
        pytest.param(lambda: STIR(1.0, 10, (10.5, 100.0)), id="min_diff>spi*min_size"),
        pytest.param(lambda: STIR(2.0, 10, (21.0, 100.0)), id="min_diff>spi*min_size-spi2"),
        pytest.param(lambda: STIR(1.0, 10, float("nan")), id="eb=nan"),
        pytest.param(lambda: STIR(1.0, 10, (float("nan"), 100.0)), id="min_diff=nan"),
    ],
)
def test_refused_configurations(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: STIR(8.0, 1000, 8.0), id="eb=spi exactly"),
        pytest.param(lambda: STIR(0.5, 10, 1.0), id="window 2 for spi<1"),
        pytest.param(lambda: STIR(1.0, 10, (10.0, 12.0)), id="min_diff=spi*min_size"),
        pytest.param(lambda: STIR(3.0, 10, (0.0, 6.0)), id="window=2spi"),
        pytest.param(lambda: shmreplay.MinSize(1), id="MinSize(1)"),
    ],
)
def test_boundary_configurations_are_accepted(make):
    make()


def test_bad_types_are_type_errors():
    with pytest.raises(TypeError):
        shmreplay.MinSize("10")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        STIR("8", 10, 100)
    with pytest.raises(TypeError):
        STIR(1.0, "10", 100)
    with pytest.raises((TypeError, ValueError)):
        STIR(1.0, 10, "100")
    with pytest.raises((TypeError, ValueError)):
        shmreplay.MinSize(2.5)  # type: ignore[arg-type]


def test_create_refuses_what_depends_on_the_capacity(name_factory):
    for limiter in (shmreplay.MinSize(11), STIR(1.0, 11, 100)):
        name = name_factory()
        with pytest.raises(ValueError):
            create(name, 10, limiter=limiter)
        with pytest.raises(FileNotFoundError):
            ReplayBuffer.attach(name)
    # min_size == capacity is fine
    for limiter in (shmreplay.MinSize(10), STIR(1.0, 10, 100)):
        with create(name_factory(), 10, limiter=limiter) as buf:
            assert buf.limiter == limiter


def test_create_refuses_queue_with_limiter_bad_limiter_and_timeout_field(name_factory):
    name = name_factory()
    with pytest.raises(ValueError):
        create(name, 10, sampler=shmreplay.Queue(), limiter=shmreplay.MinSize(1))
    with pytest.raises(FileNotFoundError):
        ReplayBuffer.attach(name)
    for bad in (5, "MinSize", shmreplay.Queue(), shmreplay.Uniform()):
        name = name_factory()
        with pytest.raises(TypeError):
            create(name, 10, limiter=bad)
        with pytest.raises(FileNotFoundError):
            ReplayBuffer.attach(name)
    for kwargs in ({}, {"limiter": shmreplay.MinSize(1)}, {"sampler": shmreplay.Queue()}):
        name = name_factory()
        with pytest.raises(ValueError):
            ReplayBuffer.create(name, capacity=10, fields={"x": ((), np.int64), "timeout": ((), np.float32)}, **kwargs)
        with pytest.raises(FileNotFoundError):
            ReplayBuffer.attach(name)


# =======================================================================================
# 2. Properties and stats
# =======================================================================================


def _child_describe(conn: Any, name: str) -> None:
    buf = ReplayBuffer.attach(name)
    try:
        conn.send(("ok", buf.limiter, buf.sampler, dict(buf.stats()), bool(buf.can_sample(1))))
    finally:
        buf.close()


@pytest.mark.parametrize("kind", ["none", "minsize", "ratio", "queue"])
def test_limiter_sampler_and_stats_limiter(name_factory, kind):
    cap = 64
    kwargs: dict[str, Any] = {}
    if kind == "minsize":
        kwargs["limiter"] = shmreplay.MinSize(5)
        want = {"kind": "MinSize", "samples_per_insert": 1.0, "min_size": 5, "min_diff": -INF, "max_diff": INF}
    elif kind == "ratio":
        kwargs["limiter"] = STIR(2.5, 8, (4.0, 40.0))
        want = {"kind": "SampleToInsertRatio", "samples_per_insert": 2.5, "min_size": 8, "min_diff": 4.0, "max_diff": 40.0}
    elif kind == "queue":
        kwargs["sampler"] = shmreplay.Queue()
        want = {"kind": "Queue", "samples_per_insert": 1.0, "min_size": 1, "min_diff": 0.0, "max_diff": float(cap)}
    else:
        want = None
    name = name_factory()
    with create(name, cap, **kwargs) as buf:
        s = buf.stats()
        for key in ("deletes", "insert_wait_s", "sample_wait_s", "limiter"):
            assert key in s, f"stats() lacks {key!r}: {sorted(s)}"
        assert s["deletes"] == 0
        assert s["insert_wait_s"] == 0.0 and s["sample_wait_s"] == 0.0
        assert isinstance(s["insert_wait_s"], float) and isinstance(s["sample_wait_s"], float)
        if want is None:
            assert s["limiter"] is None
        else:
            got = dict(s["limiter"])
            assert got == want, got
            for k in ("samples_per_insert", "min_diff", "max_diff"):
                assert isinstance(got[k], float), (k, type(got[k]))
            assert isinstance(got["min_size"], int)
        if kind == "queue":
            assert buf.limiter is None
            assert buf.sampler == shmreplay.Queue()
        elif kind == "none":
            assert buf.limiter is None
            assert buf.sampler != shmreplay.Queue()
        else:
            assert buf.limiter == kwargs["limiter"]
            assert buf.sampler != shmreplay.Queue()
        # another process sees the same
        kid = Kid(multiprocessing.get_context("fork"), _child_describe, name)
        try:
            _, lim, samp, stats, _ = kid.recv(30, expect="ok")
        finally:
            kid.finish()
        assert lim == buf.limiter and samp == buf.sampler
        assert stats["limiter"] == s["limiter"]
        # and a pickled handle too
        other = pickle.loads(pickle.dumps(buf))
        try:
            assert other.limiter == buf.limiter and other.sampler == buf.sampler
        finally:
            other.close()


def test_cli_info_shows_limiter_and_wait_stats(tmp_path):
    with ReplayBuffer.create("ratio", capacity=64, fields=FIELDS, path=tmp_path, limiter=STIR(2.5, 8, (4.0, 40.0))) as buf:
        buf.extend(make_rows(range(3)))
        proc = subprocess.run(
            [sys.executable, "-m", "shmreplay.cli", "info", "ratio", "--path", str(tmp_path)],
            capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        flat = out.lower().replace(" ", "_")
        for needle in ("sampletoinsertratio", "2.5", "40", "insert_wait", "sample_wait", "deletes"):
            assert needle in flat, f"`shmreplay info` lacks {needle!r}:\n{out}"
        proc = subprocess.run(
            [sys.executable, "-m", "shmreplay.cli", "info", "ratio", "--json", "--path", str(tmp_path)],
            capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        st = info["stats"]
        lim = st.get("limiter", info.get("limiter"))  # under stats or beside them
        assert lim is not None, f"`shmreplay info --json` has no limiter: {sorted(info)}"
        assert lim["kind"] == "SampleToInsertRatio"
        assert lim["max_diff"] == 40.0 and lim["min_diff"] == 4.0 and lim["samples_per_insert"] == 2.5
        for key in ("deletes", "insert_wait_s", "sample_wait_s"):
            assert key in st, sorted(st)


# =======================================================================================
# 3. The formulas, call by call, against a model
# =======================================================================================


@dataclasses.dataclass
class Model:
    queue: bool
    cap: int
    spi: float
    min_size: int
    min_diff: float
    max_diff: float
    I: int = 0
    S: int = 0

    @property
    def D(self) -> int:
        return self.S if self.queue else max(0, self.I - self.cap)

    @property
    def size(self) -> int:
        return self.I - self.D

    @property
    def window(self) -> float:
        return self.max_diff - self.min_diff

    def never_sample(self, n: int) -> bool:
        return n > self.window

    def never_insert(self, k: int) -> bool:
        return k * self.spi > self.window

    def can_sample(self, n: int) -> bool:
        return self.size >= self.min_size and self.I * self.spi - self.S - n >= self.min_diff

    def can_insert(self, k: int) -> bool:
        return self.I + k - self.D <= self.min_size or (self.I + k) * self.spi - self.S <= self.max_diff


def model_for(cfg: dict[str, Any]) -> Model:
    cap = cfg["cap"]
    if cfg["kind"] == "queue":
        return Model(True, cap, 1.0, 1, 0.0, float(cap))
    if cfg["kind"] == "minsize":
        return Model(False, cap, 1.0, cfg["min_size"], -INF, INF)
    spi, ms, eb = cfg["spi"], cfg["min_size"], cfg["eb"]
    lo, hi = (float(eb[0]), float(eb[1])) if isinstance(eb, tuple) else (spi * ms - eb, spi * ms + eb)
    return Model(False, cap, spi, ms, lo, hi)


def create_for(name: str, cfg: dict[str, Any]) -> ReplayBuffer:
    if cfg["kind"] == "queue":
        return create(name, cfg["cap"], sampler=shmreplay.Queue())
    if cfg["kind"] == "minsize":
        return create(name, cfg["cap"], limiter=shmreplay.MinSize(cfg["min_size"]))
    return create(name, cfg["cap"], limiter=STIR(cfg["spi"], cfg["min_size"], cfg["eb"]))


FORMULA_CONFIGS = [
    pytest.param({"kind": "minsize", "cap": 8, "min_size": 5}, id="MinSize5-cap8"),
    pytest.param({"kind": "minsize", "cap": 8, "min_size": 8}, id="MinSize8-cap8"),
    pytest.param({"kind": "ratio", "cap": 16, "spi": 2.0, "min_size": 3, "eb": 4.0}, id="spi2-ms3-eb4"),
    pytest.param({"kind": "ratio", "cap": 32, "spi": 0.5, "min_size": 4, "eb": (0.0, 6.0)}, id="spi0.5-ms4-(0,6)"),
    pytest.param({"kind": "ratio", "cap": 6, "spi": 1.5, "min_size": 2, "eb": (-3.0, 5.0)}, id="spi1.5-ms2-(-3,5)-cap6"),
    pytest.param({"kind": "ratio", "cap": 12, "spi": 8.0, "min_size": 10, "eb": 40.0}, id="spi8-ms10-eb40-cap12"),
    pytest.param({"kind": "ratio", "cap": 5, "spi": 0.25, "min_size": 1, "eb": (-2.0, 2.0)}, id="spi0.25-ms1-(-2,2)-cap5"),
    pytest.param({"kind": "ratio", "cap": 20, "spi": 1.0, "min_size": 20, "eb": (5.0, 25.0)}, id="spi1-ms=cap"),
    pytest.param({"kind": "ratio", "cap": 40, "spi": 0.1, "min_size": 10, "eb": (0.0, 3.0)}, id="spi0.1-ms10-(0,3)"),
    pytest.param({"kind": "ratio", "cap": 24, "spi": 3.0, "min_size": 4, "eb": 7.0}, id="spi3-ms4-eb7"),
    pytest.param({"kind": "ratio", "cap": 16, "spi": 1.0, "min_size": 2, "eb": (-INF, 10.0)}, id="spi1-(-inf,10)"),
    pytest.param({"kind": "ratio", "cap": 16, "spi": 2.0, "min_size": 3, "eb": (0.0, INF)}, id="spi2-(0,inf)"),
    pytest.param({"kind": "ratio", "cap": 16, "spi": 0.3, "min_size": 7, "eb": 1.0}, id="spi0.3-ms7-eb1"),
    pytest.param({"kind": "queue", "cap": 5}, id="Queue-cap5"),
    pytest.param({"kind": "queue", "cap": 1}, id="Queue-cap1"),
]


def _pick_n(rng: np.random.Generator, m: Model) -> int:
    cands = [1, 2, 3, int(rng.integers(1, 8))]
    if math.isfinite(m.window):
        w = int(math.floor(m.window))
        cands += [w, w + 1]
        edge = m.I * m.spi - m.S - m.min_diff  # largest n allowed by the difference now
        if 1 <= edge < 1e9:
            cands += [int(math.floor(edge)), int(math.floor(edge)) + 1]
    else:
        cands += [m.cap, m.cap + 3]
    return max(1, int(rng.choice(cands)))


def _pick_k(rng: np.random.Generator, m: Model) -> int:
    cands = [1, 1, 2, int(rng.integers(1, m.cap + 1))]
    if math.isfinite(m.max_diff):
        edge = (m.max_diff + m.S) / m.spi - m.I  # largest k allowed by the difference now
        if edge >= 1:
            cands += [int(math.floor(edge)), int(math.floor(edge)) + 1]
        cands += [max(1, m.min_size + m.D - m.I), m.min_size + m.D - m.I + 1]
        if math.isfinite(m.window):
            kmax = int(math.floor(m.window / m.spi))
            cands += [kmax, kmax + 1]
    limit = m.cap + 1 if m.queue else m.cap  # ring: k <= capacity keeps stats()["inserts"] exact
    return int(min(max(1, int(rng.choice(cands))), limit))


@pytest.mark.parametrize("cfg", FORMULA_CONFIGS)
def test_formulas_call_by_call(name_factory, cfg):
    m = model_for(cfg)
    rng = np.random.default_rng(zlib.crc32(json.dumps(cfg, default=str).encode()))
    outcomes = {"sample_ok": 0, "sample_wait": 0, "insert_ok": 0, "insert_wait": 0, "never": 0}
    delivered = 0  # queue: next ident expected
    with create_for(name_factory(), cfg) as buf:

        def check_state(where: str) -> None:
            c = counters(buf)
            want = {"len": m.size, "size": m.size, "inserts": m.I, "samples": m.S, "deletes": m.D}
            assert c == want, f"{where}: counters {c} != model {want}"

        def probe(where: str) -> None:
            ns = sorted({1, 2, m.cap, *[_pick_n(rng, m) for _ in range(3)]})
            ks = sorted({1, 2, *[_pick_k(rng, m) for _ in range(3)]})
            for n in ns:
                if not m.never_sample(n):
                    assert bool(buf.can_sample(n)) == m.can_sample(n), f"{where}: can_sample({n}) (I={m.I} S={m.S} D={m.D})"
            for k in ks:
                if not m.never_insert(k):
                    assert bool(buf.can_insert(k)) == m.can_insert(k), f"{where}: can_insert({k}) (I={m.I} S={m.S} D={m.D})"

        # an empty buffer: sampling waits (TimeoutError), it is not EmptyBufferError
        check_state("empty")
        probe("empty")
        e = raises_now(TimeoutError, lambda: buf.sample(1, timeout=0), "sample(1) of an empty limited buffer")
        assert is_plain_timeout(e), f"empty limited buffer: {type(e).__name__} (must wait like any disallowed sample)"
        check_state("after the empty sample")

        for step in range(260):
            where = f"step {step} (I={m.I} S={m.S} D={m.D})"
            probe(where)
            before_snap = None
            if rng.random() < 0.5:
                n = _pick_n(rng, m)
                if m.never_sample(n):
                    raises_now(ValueError, lambda: buf.sample(n, timeout=0), f"{where}: sample({n}) can never be allowed")
                    raises_now(ValueError, lambda: buf.sample(n, timeout=None), f"{where}: sample({n}, timeout=None) can never be allowed")
                    outcomes["never"] += 1
                elif m.can_sample(n):
                    batch, info = buf.sample(n, timeout=0, return_info=True)
                    assert rows_ok(batch).all(), f"{where}: torn rows"
                    keys = info["key"].astype(np.int64)
                    assert np.array_equal(keys, batch["ident"]), f"{where}: key != ident"
                    if m.queue:
                        want = np.arange(delivered, delivered + n)
                        assert np.array_equal(batch["ident"], want), f"{where}: queue delivered {batch['ident']} != {want}"
                        delivered += n
                    else:
                        assert keys.min() >= m.I - m.size and keys.max() < m.I, f"{where}: keys {keys} outside the ring"
                    m.S += n
                    outcomes["sample_ok"] += 1
                else:
                    e = raises_now(TimeoutError, lambda: buf.sample(n, timeout=0), f"{where}: disallowed sample({n})")
                    assert is_plain_timeout(e), f"{where}: {type(e).__name__}"
                    outcomes["sample_wait"] += 1
            else:
                k = _pick_k(rng, m)
                rows = make_rows(range(m.I, m.I + k))
                use_add = k == 1 and rng.random() < 0.5
                if not m.queue and rng.random() < 0.3:
                    before_snap = snapshot(buf)
                if m.never_insert(k):
                    raises_now(ValueError, lambda: buf.extend(rows, timeout=0), f"{where}: extend({k}) can never be allowed")
                    raises_now(ValueError, lambda: buf.extend(rows), f"{where}: extend({k}, timeout=None) can never be allowed")
                    outcomes["never"] += 1
                elif m.can_insert(k):
                    if use_add:
                        buf.add(**one_row(m.I), timeout=0)
                    else:
                        buf.extend(rows, timeout=0)
                    m.I += k
                    before_snap = None
                    outcomes["insert_ok"] += 1
                else:
                    fn = (lambda: buf.add(**one_row(m.I), timeout=0)) if use_add else (lambda: buf.extend(rows, timeout=0))
                    e = raises_now(TimeoutError, fn, f"{where}: disallowed insert of {k}")
                    assert is_plain_timeout(e), f"{where}: {type(e).__name__}"
                    outcomes["insert_wait"] += 1
                if before_snap is not None:
                    assert snapshot(buf) == before_snap, f"{where}: a refused insert changed the slots"
            check_state(where + " after the call")

        # every kind of decision was exercised
        assert outcomes["sample_ok"] >= 3 and outcomes["insert_ok"] >= 3, outcomes
        if cfg["kind"] != "minsize" and math.isfinite(m.min_diff):
            assert outcomes["sample_wait"] >= 2, outcomes
        if cfg["kind"] != "minsize" and math.isfinite(m.max_diff):
            assert outcomes["insert_wait"] >= (3 if math.isfinite(m.min_diff) else 1), outcomes


def test_extend_larger_than_the_capacity_counts_every_row(name_factory):
    # spi 0.5, window [-10, 30], capacity 4: extend(10) takes 10 tickets; D = 6.
    with create(name_factory(), 4, limiter=STIR(0.5, 2, (-10.0, 30.0))) as buf:
        buf.extend(make_rows(range(10)), timeout=0)
        s = buf.stats()
        assert len(buf) == 4 and s["size"] == 4
        assert s["deletes"] == 6, s
        # I*spi - S - n >= min_diff  <=>  5 - n >= -10  <=>  n <= 15
        assert buf.can_sample(15) and not buf.can_sample(16)
        buf.sample(15, timeout=0)
        raises_now(TimeoutError, lambda: buf.sample(1, timeout=0), "sample after S=15")
        # the next insert is ticket 10 at slot 2
        buf.add(**one_row(10), timeout=0)
        assert int(buf[10 % 4]["ident"]) == 10
        assert buf.stats()["deletes"] == 7
    with create(name_factory(), 4, limiter=shmreplay.MinSize(4)) as buf:
        buf.extend(make_rows(range(9)))
        assert buf.stats()["deletes"] == 5
        assert buf.can_sample(4)
        buf.sample(10, timeout=0)


# =======================================================================================
# 4. No limiter: today's behaviour
# =======================================================================================


def test_without_a_limiter_nothing_waits(shm_name):
    with create(shm_name, 4) as buf:
        for timeout in (None, 0, 5.0):
            raises_now(shmreplay.EmptyBufferError, lambda: buf.sample(1, timeout=timeout), f"empty, timeout={timeout}")
        assert buf.can_insert(1) and buf.can_insert(100)
        t0 = time.monotonic()
        for i in range(40):  # laps the ring: never waits
            buf.add(**one_row(i), timeout=None)
        buf.extend(make_rows(range(40, 44)), timeout=0)
        assert time.monotonic() - t0 < 2.0
        assert buf.can_sample(1) and buf.can_sample(1000)
        buf.sample(1000, timeout=0)
        s = buf.stats()
        assert s["limiter"] is None
        assert s["inserts"] == 44 and s["samples"] == 1000 and len(buf) == 4
        assert s["deletes"] == 40
        assert s["insert_wait_s"] == 0.0 and s["sample_wait_s"] == 0.0
        buf.shutdown()  # nothing waits: later calls that need not wait still succeed
        buf.add(**one_row(44))
        buf.sample(3)


# =======================================================================================
# 5. Timeouts
# =======================================================================================

BAD_TIMEOUTS = [
    pytest.param(-1, ValueError, id="-1"),
    pytest.param(-0.001, ValueError, id="-0.001"),
    pytest.param(float("nan"), ValueError, id="nan"),
    pytest.param(float("-inf"), ValueError, id="-inf"),
    pytest.param("1", TypeError, id="str"),
    pytest.param([1.0], TypeError, id="list"),
    pytest.param(1 + 0j, TypeError, id="complex"),
]


@pytest.mark.parametrize("timeout, exc", BAD_TIMEOUTS)
@pytest.mark.parametrize("kind", ["ratio", "queue", "none"])
def test_bad_timeouts_are_refused_and_change_nothing(name_factory, kind, timeout, exc):
    kwargs = {"ratio": {"limiter": STIR(1.0, 1, (0.0, 10.0))}, "queue": {"sampler": shmreplay.Queue()}, "none": {}}[kind]
    with create(name_factory(), 8, **kwargs) as buf:
        buf.extend(make_rows(range(3)))
        before = counters(buf)
        snap = snapshot(buf)
        for what, fn in (
            ("sample", lambda: buf.sample(1, timeout=timeout)),
            ("add", lambda: buf.add(**one_row(3), timeout=timeout)),
            ("extend", lambda: buf.extend(make_rows(range(3, 5)), timeout=timeout)),
        ):
            e = raises_now(exc, fn, f"{what}(timeout={timeout!r})")
            if exc is ValueError:
                assert not isinstance(e, TypeError)
            assert counters(buf) == before, f"{what}(timeout={timeout!r}) changed the counters"
            assert snapshot(buf) == snap
        # the next calls behave as if nothing happened: FIFO continues at ident 0 / ticket 3
        buf.add(**one_row(3), timeout=0)
        batch, info = buf.sample(2, timeout=0, return_info=True)
        if kind == "queue":
            assert batch["ident"].tolist() == [0, 1] and info["key"].tolist() == [0, 1]
        else:
            assert int(buf[3]["ident"]) == 3


def test_real_number_timeouts_are_accepted(shm_name):
    with create(shm_name, 8, limiter=shmreplay.MinSize(2)) as buf:
        for t in (0, 0.0, -0.0, np.float64(0.0), np.int64(0), np.float32(0.01), 0.01):
            raises_now(TimeoutError, lambda: buf.sample(1, timeout=t), f"timeout={t!r}")
        buf.extend(make_rows(range(2)), timeout=np.float64(1.5))
        buf.add(**one_row(2), timeout=np.int32(3))
        assert buf.sample(2, timeout=np.float64(0.0))["ident"].shape == (2,)


def test_a_fraction_is_a_real_number_timeout(shm_name):
    """``timeout`` is "None or a real number >= 0": numbers.Real includes Fraction."""
    with create(shm_name, 8, limiter=shmreplay.MinSize(2)) as buf:
        raises_now(TimeoutError, lambda: buf.sample(1, timeout=fractions.Fraction(1, 50)), "timeout=Fraction(1, 50)")
        raises_now(ValueError, lambda: buf.sample(1, timeout=fractions.Fraction(-1, 50)), "timeout=Fraction(-1, 50)")


def _timed_out_after(call: Callable[[], Any]) -> float:
    """How long ``call`` took to raise TimeoutError."""
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        call()
    return time.monotonic() - t0


def _assert_timeout_kept(took: list[float]) -> None:
    """A 0.3 s timeout ends near 0.3 s: preemption only lengthens a wait, so the shortest of
    the attempts is held to 0.6 s (a timeout rounded up to a second would fail it)."""
    assert min(took) <= 0.6, f"timeout=0.3 raised after {[f'{t:.3f}' for t in took]} s"


def _num_in(msg: str, value: float) -> bool:
    v = int(value) if float(value).is_integer() else value
    return re.search(rf"(?<![\d.]){re.escape(str(v))}(?:\.0+)?(?![\d])", msg) is not None


def test_positive_timeout_waits_raises_timeout_error_with_state_and_changes_nothing(name_factory):
    # sample side: capacity 13, window [-17, 35], I=29 (D=16, size 13), S=41
    with create(name_factory(), 13, limiter=STIR(1.0, 2, (-17.0, 35.0))) as buf:
        for lo, hi in ((0, 13), (13, 26), (26, 29)):
            buf.extend(make_rows(range(lo, hi)), timeout=0)
        buf.sample(20, timeout=0)
        buf.sample(21, timeout=0)
        before = counters(buf)
        assert before == {"len": 13, "size": 13, "inserts": 29, "samples": 41, "deletes": 16}, before
        w0 = buf.stats()["sample_wait_s"]
        assert not buf.can_sample(6)  # 29 - 41 - 6 = -18 < -17
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as ei:
            buf.sample(6, timeout=0.3)
        dt = time.monotonic() - t0
        assert is_plain_timeout(ei.value), type(ei.value)
        assert 0.28 <= dt <= 2.0, f"sample(6, timeout=0.3) raised after {dt:.3f}s"  # slack for a loaded machine
        msg = str(ei.value)
        for label, v in (("size", 13), ("I", 29), ("S", 41), ("D", 16), ("min_diff", -17.0), ("max_diff", 35.0)):
            assert _num_in(msg, v), f"TimeoutError message lacks {label}={v}: {msg!r}"
        assert counters(buf) == before
        w1 = buf.stats()["sample_wait_s"]
        assert 0.25 <= w1 - w0 <= dt + 0.1, f"sample_wait_s grew by {w1 - w0:.3f}s for a {dt:.3f}s wait"
        _assert_timeout_kept([dt] + [_timed_out_after(lambda: buf.sample(6, timeout=0.3)) for _ in range(2)])

    # insert side: capacity 11, I=34 (D=23, size 11), S=5; extend(7): 41 - 5 = 36 > 35
    with create(name_factory(), 11, limiter=STIR(1.0, 2, (-17.0, 35.0))) as buf:
        for lo, hi in ((0, 11), (11, 22), (22, 33), (33, 34)):
            buf.extend(make_rows(range(lo, hi)), timeout=0)
        buf.sample(5, timeout=0)
        before = counters(buf)
        assert before == {"len": 11, "size": 11, "inserts": 34, "samples": 5, "deletes": 23}, before
        snap = snapshot(buf)
        w0 = buf.stats()["insert_wait_s"]
        assert not buf.can_insert(7) and buf.can_insert(6)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as ei:
            buf.extend(make_rows(range(34, 41)), timeout=0.3)
        dt = time.monotonic() - t0
        assert is_plain_timeout(ei.value), type(ei.value)
        assert 0.28 <= dt <= 2.0, f"extend(timeout=0.3) raised after {dt:.3f}s"  # slack for a loaded machine
        msg = str(ei.value)
        for label, v in (("size", 11), ("I", 34), ("S", 5), ("D", 23), ("min_diff", -17.0), ("max_diff", 35.0)):
            assert _num_in(msg, v), f"TimeoutError message lacks {label}={v}: {msg!r}"
        assert counters(buf) == before, "a timed-out extend inserted something"
        assert snapshot(buf) == snap, "a timed-out extend wrote slots"
        w1 = buf.stats()["insert_wait_s"]
        assert 0.25 <= w1 - w0 <= dt + 0.1, f"insert_wait_s grew by {w1 - w0:.3f}s for a {dt:.3f}s wait"
        _assert_timeout_kept([dt] + [_timed_out_after(lambda: buf.extend(make_rows(range(34, 41)), timeout=0.3)) for _ in range(2)])
        assert counters(buf) == before and snapshot(buf) == snap
        # the ticket counter did not move: the next rows are tickets 34..39 at their slots
        buf.extend(make_rows(range(34, 40)), timeout=0)
        for t in range(34, 40):
            assert int(buf[t % 11]["ident"]) == t
        assert buf.stats()["inserts"] == 40


def test_queue_timed_out_extend_takes_no_ticket(shm_name):
    with create(shm_name, 4, sampler=shmreplay.Queue()) as buf:
        buf.extend(make_rows(range(3)))
        before = counters(buf)
        with pytest.raises(TimeoutError):
            buf.extend(make_rows(range(100, 102)), timeout=0.2)  # 3 + 2 > 4: nothing inserted
        with pytest.raises(TimeoutError):
            buf.extend(make_rows(range(100, 102)), timeout=0)
        assert counters(buf) == before
        buf.add(**one_row(3), timeout=0)
        batch, info = buf.sample(4, timeout=0, return_info=True)
        assert batch["ident"].tolist() == [0, 1, 2, 3]
        assert info["key"].tolist() == [0, 1, 2, 3]
        buf.extend(make_rows(range(4, 8)), timeout=0)
        batch, info = buf.sample(4, timeout=0, return_info=True)
        assert batch["ident"].tolist() == [4, 5, 6, 7] and info["key"].tolist() == [4, 5, 6, 7]
        assert len(buf) == 0


def test_timeout_zero_never_waits(shm_name):
    with create(shm_name, 8, limiter=shmreplay.MinSize(5)) as buf:
        t0 = time.monotonic()
        for _ in range(50):
            with pytest.raises(TimeoutError):
                buf.sample(1, timeout=0)
        assert time.monotonic() - t0 < 0.5, "50 sample(timeout=0) calls took too long: they waited"


# =======================================================================================
# 6. Queue mode, one process
# =======================================================================================


def test_queue_basics(shm_name):
    with create(shm_name, 5, sampler=shmreplay.Queue()) as buf:
        assert len(buf) == 0 and not buf.can_sample(1) and buf.can_insert(5)
        for i in range(3):
            buf.add(**one_row(i))
        buf.extend(make_rows(range(3, 5)))
        assert len(buf) == 5
        assert not buf.can_insert(1) and buf.can_sample(5)
        raises_now(TimeoutError, lambda: buf.add(**one_row(99), timeout=0), "add to a full queue")
        raises_now(ValueError, lambda: buf.extend(make_rows(range(6)), timeout=0), "extend above capacity")
        raises_now(ValueError, lambda: buf.extend(make_rows(range(6))), "extend above capacity, timeout=None")
        raises_now(ValueError, lambda: buf.sample(6), "sample above capacity, timeout=None")
        raises_now(ValueError, lambda: buf.sample(0, timeout=0), "sample(0)")
        assert len(buf) == 5
        batch, info = buf.sample(2, return_info=True)
        assert batch["ident"].tolist() == [0, 1] and info["key"].tolist() == [0, 1]
        assert info["key"].dtype == np.uint64
        assert len(buf) == 3 and buf.can_insert(2) and not buf.can_insert(3)
        buf.extend(make_rows(range(5, 7)))
        batch, info = buf.sample(5, return_info=True)
        assert batch["ident"].tolist() == [2, 3, 4, 5, 6] and info["key"].tolist() == [2, 3, 4, 5, 6]
        assert rows_ok(batch).all()
        assert len(buf) == 0
        e = raises_now(TimeoutError, lambda: buf.sample(1, timeout=0), "sample of an empty queue")
        assert is_plain_timeout(e)
        s = buf.stats()
        assert (s["inserts"], s["samples"], s["deletes"], s["size"]) == (7, 7, 7, 0), s
        # laps of the ring: rows never overwritten before delivery
        nxt = 7
        for lap in range(6):
            buf.extend(make_rows(range(nxt, nxt + 5)), timeout=0)
            raises_now(TimeoutError, lambda: buf.add(**one_row(-1), timeout=0), "full")
            got = buf.sample(3)["ident"].tolist() + buf.sample(2)["ident"].tolist()
            assert got == list(range(nxt, nxt + 5)), (lap, got)
            nxt += 5


def test_queue_sample_takes_all_or_none_and_bad_input_takes_nothing(shm_name):
    with create(shm_name, 8, sampler=shmreplay.Queue()) as buf:
        buf.extend(make_rows(range(3)))
        with pytest.raises(TimeoutError):
            buf.sample(4, timeout=0.2)
        assert len(buf) == 3
        # bad out= arrays: refused before anything is taken
        bad_out = {"ident": np.zeros(2, np.int64), "x": np.zeros((2, 3), np.float32)}
        with pytest.raises(ValueError):
            buf.sample(3, out=bad_out)
        bad_out = {"ident": np.zeros(3, np.int32), "x": np.zeros((3, 3), np.float32)}
        with pytest.raises(ValueError):
            buf.sample(3, out=bad_out)
        for bad_n, exc in ((0, ValueError), (-1, ValueError), (1.5, TypeError), ("2", TypeError)):
            with pytest.raises(exc):
                buf.sample(bad_n)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            buf.sample(2, return_info="yes")  # type: ignore[arg-type]
        assert len(buf) == 3 and buf.stats()["samples"] == 0
        # bad inserts take no ticket
        with pytest.raises(ValueError):
            buf.extend({"ident": np.arange(2), "x": np.zeros((3, 3), np.float32)})
        with pytest.raises(ValueError):
            buf.extend({"ident": np.arange(2)})
        with pytest.raises((ValueError, TypeError)):
            buf.add(ident=5, x=np.zeros(3, np.float32), bogus=1)
        with pytest.raises(TypeError):
            buf.extend({"ident": np.arange(2.0) + 0.5, "x": np.zeros((2, 3), np.float32)})
        assert len(buf) == 3 and buf.stats()["inserts"] == 3
        out = {"ident": np.zeros(3, np.int64), "x": np.zeros((3, 3), np.float32)}
        got, info = buf.sample(3, out=out, return_info=True)
        assert got["ident"] is out["ident"] or np.shares_memory(got["ident"], out["ident"])
        assert out["ident"].tolist() == [0, 1, 2] and info["key"].tolist() == [0, 1, 2]
        buf.add(**one_row(3))
        batch, info = buf.sample(1, return_info=True)
        assert batch["ident"].tolist() == [3] and info["key"].tolist() == [3]


def test_queue_refuses_priority_features(shm_name):
    with create(shm_name, 8, sampler=shmreplay.Queue()) as buf:
        buf.extend(make_rows(range(4)))
        before = counters(buf)
        with pytest.raises(TypeError):
            buf.add(**one_row(4), priority=1.0)
        with pytest.raises(TypeError):
            buf.extend(make_rows(range(4, 6)), priority=1.0)
        with pytest.raises(TypeError):
            buf.sample(2, beta=0.4)
        with pytest.raises(TypeError):
            buf.update_priorities(np.array([0], np.uint64), np.array([1.0]))
        with pytest.raises(TypeError):
            buf.priorities(np.array([0], np.uint64))
        assert counters(buf) == before
        assert buf.sample(4)["ident"].tolist() == [0, 1, 2, 3]


def test_queue_waiting_extend_is_admitted_whole(shm_name):
    with create(shm_name, 8, sampler=shmreplay.Queue()) as buf:
        buf.extend(make_rows(range(6)))
        other = ReplayBuffer.attach(shm_name)
        res: dict[str, Any] = {}

        def producer() -> None:
            try:
                other.extend(make_rows(range(6, 10)), timeout=10.0)
                res["ok"] = time.monotonic()
            except BaseException as e:  # noqa: BLE001
                res["err"] = e

        th = threading.Thread(target=producer, daemon=True)
        th.start()
        try:
            time.sleep(0.3)
            assert not res, res
            assert len(buf) == 6 and buf.stats()["inserts"] == 6, "a waiting extend inserted part of its rows"
            assert buf.sample(1)["ident"].tolist() == [0]
            time.sleep(0.3)
            assert not res, "extend(4) proceeded with room for 3 only"
            assert len(buf) == 5 and buf.stats()["inserts"] == 6
            t_room = time.monotonic()
            assert buf.sample(1)["ident"].tolist() == [1]
            th.join(5)
            assert "ok" in res, res
            assert res["ok"] - t_room < 0.5, f"the waiting extend took {res['ok'] - t_room:.3f}s to notice room"
            batch, info = buf.sample(8, timeout=0, return_info=True)
            assert batch["ident"].tolist() == list(range(2, 10))
            assert info["key"].tolist() == list(range(2, 10))
            assert buf.stats()["insert_wait_s"] >= 0.5
        finally:
            th.join(15)
            other.close()


def test_queue_threads_deliver_every_row_exactly_once(shm_name):
    n_per = 1500
    with create(shm_name, 16, sampler=shmreplay.Queue()) as buf:
        results: dict[str, Any] = {}
        errors: list[str] = []
        done_producing = threading.Event()

        def producer(pid: int) -> None:
            h = ReplayBuffer.attach(shm_name)
            try:
                rng = np.random.default_rng(pid)
                seq = 0
                while seq < n_per:
                    k = min(int(rng.integers(1, 6)), n_per - seq)
                    h.extend(make_rows(pid * 1_000_000 + np.arange(seq, seq + k)), timeout=20)
                    seq += k
            except BaseException:  # noqa: BLE001
                errors.append(traceback.format_exc())
            finally:
                h.close()

        def consumer(cid: int) -> None:
            h = ReplayBuffer.attach(shm_name) if cid else buf
            got_keys: list[np.ndarray] = []
            got_ids: list[np.ndarray] = []
            try:
                rng = np.random.default_rng(100 + cid)
                while True:
                    draining = done_producing.is_set()
                    n = 1 if draining else int(rng.integers(1, 8))
                    try:
                        batch, info = h.sample(n, timeout=0.2, return_info=True)
                    except TimeoutError:
                        if draining:
                            break
                        continue
                    k = info["key"].astype(np.int64)
                    assert np.all(np.diff(k) == 1), f"non-consecutive keys in one batch: {k}"
                    assert rows_ok(batch).all()
                    got_keys.append(k)
                    got_ids.append(batch["ident"].copy())
            except BaseException:  # noqa: BLE001
                errors.append(traceback.format_exc())
            finally:
                results[f"c{cid}"] = (got_keys, got_ids)
                if cid:
                    h.close()

        producers = [threading.Thread(target=producer, args=(p,), daemon=True) for p in (1, 2)]
        consumers = [threading.Thread(target=consumer, args=(c,), daemon=True) for c in (0, 1)]
        for t in producers + consumers:
            t.start()
        for t in producers:
            t.join(60)
        done_producing.set()
        for t in consumers:
            t.join(60)
        assert not errors, "\n".join(errors)
        keys = np.concatenate([k for c in results.values() for k in c[0]])
        ids = np.concatenate([i for c in results.values() for i in c[1]])
        assert sorted(keys.tolist()) == list(range(2 * n_per)), "keys are not exactly the tickets 0..I-1"
        order = np.argsort(keys)
        ids = ids[order]
        for p in (1, 2):
            mine = ids[ids // 1_000_000 == p] % 1_000_000
            assert mine.tolist() == list(range(n_per)), f"producer {p}: not delivered once each, in order"
        for cid, (ks, _) in results.items():
            flat = np.concatenate(ks) if ks else np.array([], np.int64)
            assert np.all(np.diff(flat) > 0), f"consumer {cid} got keys out of order"
        assert len(buf) == 0


# =======================================================================================
# 7. Waiting across processes, threads, wait stats
# =======================================================================================


def test_waiting_sample_is_released_by_an_insert_in_another_process(shm_name, mp_ctx):
    with create(shm_name, 16, limiter=shmreplay.MinSize(3)) as buf:
        buf.extend(make_rows(range(2)))
        w0 = buf.stats()["sample_wait_s"]
        kid = start_waiter(mp_ctx, shm_name, "sample", 2, None)
        try:
            assert counters(buf)["samples"] == 0
            t_ins = time.monotonic()
            buf.add(**one_row(2))
            msg = kid.recv(5)
            assert msg[0] == "ok", msg
            t_end, t_start, payload = msg[1], msg[2], msg[3]
            # woken, not left waiting (the time includes scheduling both processes on a loaded machine)
            assert t_end - t_ins < LATENCY_CEILING, f"the waiter took {t_end - t_ins:.3f}s to see the insert"
            assert set(payload["ident"]) <= {0, 1, 2}
            assert buf.stats()["samples"] == 2
            grew = buf.stats()["sample_wait_s"] - w0
            assert grew >= (t_ins - t_start) - 0.05, f"sample_wait_s grew {grew:.3f}s for a {(t_end - t_start):.3f}s wait"
        finally:
            kid.finish()


def test_waiting_insert_is_released_by_a_sample_in_another_process(shm_name, mp_ctx):
    # spi 2, window [0, 10], min_size 1: after 5 rows, (I+1)*2 - S = 12 > 10
    with create(shm_name, 16, limiter=STIR(2.0, 1, (0.0, 10.0))) as buf:
        buf.extend(make_rows(range(5)))
        assert not buf.can_insert(1)
        w0 = buf.stats()["insert_wait_s"]
        kid = start_waiter(mp_ctx, shm_name, "extend", (5, 2), None)
        try:
            assert buf.stats()["inserts"] == 5 and len(buf) == 5
            buf.sample(3)  # (5+2)*2 - 3 = 11 > 10: still blocked
            assert kid.silent_for(0.3), "extend(2) proceeded while (I+2)*spi - S = 11 > max_diff"
            assert buf.stats()["inserts"] == 5
            t_s = time.monotonic()
            buf.sample(1)  # 14 - 4 = 10: allowed
            msg = kid.recv(5)
            assert msg[0] == "ok", msg
            assert msg[1] - t_s < LATENCY_CEILING, f"the waiter took {msg[1] - t_s:.3f}s to see the sample"
            assert buf.stats()["inserts"] == 7
            assert [int(buf[i]["ident"]) for i in range(7)] == list(range(7))
            assert buf.stats()["insert_wait_s"] - w0 >= 0.5
        finally:
            kid.finish()


def test_queue_waiting_consumer_gets_exactly_n_rows_in_order(shm_name, mp_ctx):
    with create(shm_name, 8, sampler=shmreplay.Queue()) as buf:
        kid = start_waiter(mp_ctx, shm_name, "sample", 4, None)
        try:
            for i in range(3):
                buf.add(**one_row(i))
                assert kid.silent_for(0.1), f"sample(4) returned with {i + 1} rows"
            assert len(buf) == 3
            t = time.monotonic()
            buf.add(**one_row(3))
            msg = kid.recv(5)
            assert msg[0] == "ok", msg
            assert msg[1] - t < LATENCY_CEILING, f"the consumer took {msg[1] - t:.3f}s to see the fourth row"
            assert msg[3]["ident"] == [0, 1, 2, 3] and msg[3]["key"] == [0, 1, 2, 3]
            assert len(buf) == 0
        finally:
            kid.finish()


@pytest.mark.parametrize("same_handle", [True, False], ids=["same-handle", "own-handle"])
def test_a_thread_waiting_in_sample_does_not_block_other_threads(shm_name, same_handle):
    with create(shm_name, 16, limiter=shmreplay.MinSize(4)) as buf:
        waiter_buf = buf if same_handle else ReplayBuffer.attach(shm_name)
        res: dict[str, Any] = {}

        def waiter() -> None:
            try:
                res["batch"] = waiter_buf.sample(2, timeout=5.0)
            except BaseException as e:  # noqa: BLE001
                res["err"] = e
            res["t"] = time.monotonic()

        th = threading.Thread(target=waiter, daemon=True)
        th.start()
        try:
            time.sleep(0.2)
            # The main thread runs at all only if the waiter released the GIL.
            lat = []
            for i in range(4):
                t0 = time.monotonic()
                buf.add(**one_row(i))
                lat.append(time.monotonic() - t0)
            t_last = time.monotonic()
            th.join(6)
            assert max(lat) < 0.5, f"add() latencies {lat}: a thread waiting in sample() blocked this thread"
            assert "batch" in res, f"the waiting sample failed: {res.get('err')!r}"
            assert res["t"] - t_last < 0.5
        finally:
            th.join(10)
            if not same_handle:
                waiter_buf.close()


@pytest.mark.parametrize("kind", ["queue", "ring"])
def test_a_thread_waiting_in_add_does_not_block_sampling_threads(shm_name, kind):
    kwargs = {"sampler": shmreplay.Queue()} if kind == "queue" else {"limiter": STIR(1.0, 1, (0.0, 4.0))}
    with create(shm_name, 4 if kind == "queue" else 16, **kwargs) as buf:
        buf.extend(make_rows(range(4)))  # queue: full; ring: (4 + 1) - 0 > 4
        res: dict[str, Any] = {}
        ticks = [0]

        def waiter() -> None:
            try:
                buf.add(**one_row(4), timeout=5.0)
                res["ok"] = time.monotonic()
            except BaseException as e:  # noqa: BLE001
                res["err"] = e

        th = threading.Thread(target=waiter, daemon=True)
        th.start()
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 0.4:
                ticks[0] += 1
                time.sleep(0.005)
            # ~80 ticks when the main thread runs freely; a GIL held by the waiting add() leaves it at
            # most one or two (a loaded machine may still cost some ticks, hence the low bar)
            assert ticks[0] > 5, f"the main thread ran {ticks[0]} times in 0.4 s while add() waited: GIL held"
            t1 = time.monotonic()
            got = buf.sample(2, timeout=1.0)["ident"].tolist()
            assert time.monotonic() - t1 < 0.5
            if kind == "queue":
                assert got == [0, 1]
            th.join(5)
            assert "ok" in res, res
            if kind == "queue":
                assert buf.sample(3)["ident"].tolist() == [2, 3, 4]
            else:
                assert int(buf[4]["ident"]) == 4
        finally:
            th.join(10)


# =======================================================================================
# 8. Ctrl-C
# =======================================================================================

CTRL_C_CASES = [
    pytest.param("minsize", "sample", 2, id="sample-minsize"),
    pytest.param("minsize-timeout", "sample", 2, id="sample-minsize-timeout30"),
    pytest.param("ratio", "extend", (5, 2), id="extend-ratio"),
    pytest.param("ratio-add", "add", 5, id="add-ratio"),
    pytest.param("queue", "sample", 3, id="sample-empty-queue"),
    pytest.param("queue-full", "add", 100, id="add-full-queue"),
]


def _prepare(name: str, kind: str) -> ReplayBuffer:
    if kind.startswith("minsize"):
        buf = create(name, 16, limiter=shmreplay.MinSize(3))
        buf.extend(make_rows(range(2)))
    elif kind.startswith("ratio"):
        buf = create(name, 16, limiter=STIR(2.0, 1, (0.0, 10.0)))
        buf.extend(make_rows(range(5)))  # (5 + 1) * 2 > 10: an add waits
    elif kind == "queue":
        buf = create(name, 4, sampler=shmreplay.Queue())
        buf.extend(make_rows(range(2)))
    else:
        buf = create(name, 4, sampler=shmreplay.Queue())
        buf.extend(make_rows(range(4)))
    return buf


@pytest.mark.parametrize("kind, op, arg", CTRL_C_CASES)
def test_ctrl_c_interrupts_a_waiting_call_quickly_and_changes_nothing(shm_name, kind, op, arg):
    ctx = multiprocessing.get_context("fork")
    buf = _prepare(shm_name, kind)
    try:
        before = counters(buf)
        latencies = []
        first_timeout = 30.0 if kind.endswith("timeout") else None
        kid = start_waiter(ctx, shm_name, op, arg, first_timeout)
        try:
            for attempt in range(3):
                t_sig = time.monotonic()
                os.kill(kid.pid, signal.SIGINT)
                msg = kid.recv(5)
                assert msg[0] == "raised" and msg[3]["kbi"], f"SIGINT gave {msg}"
                latencies.append(msg[1] - t_sig)
                assert latencies[-1] < LATENCY_CEILING, f"KeyboardInterrupt {latencies[-1]:.3f}s after SIGINT"
                assert counters(buf) == before, f"an interrupted {op} changed the counters"
                assert msg[4] == before, f"the child's counters after KeyboardInterrupt: {msg[4]}"
                if attempt < 2:
                    kid.send(("again", op, arg, first_timeout))  # the handle keeps working: wait again
                    kid.recv(10, expect="ready")
                    assert kid.silent_for(0.2), f"{op} did not wait again after KeyboardInterrupt"
            # finally the call succeeds once allowed (nothing half-registered is left)
            if kind == "queue-full":
                kid.send(("again", op, arg, 5.0))
                kid.recv(10, expect="ready")
                assert kid.silent_for(0.2)
                assert buf.sample(1)["ident"].tolist() == [0]
                msg = kid.recv(5)
                assert msg[0] == "ok", msg
                assert buf.sample(4, return_info=True)[1]["key"].tolist() == [1, 2, 3, 4]
            elif kind == "queue":
                kid.send(("again", op, arg, 5.0))
                kid.recv(10, expect="ready")
                assert kid.silent_for(0.2)
                buf.add(**one_row(2))
                msg = kid.recv(5)
                assert msg[0] == "ok", msg
                assert msg[3]["ident"] == [0, 1, 2] and msg[3]["key"] == [0, 1, 2]
            elif kind.startswith("minsize"):
                kid.send(("again", op, arg, 5.0))
                kid.recv(10, expect="ready")
                buf.add(**one_row(2))
                assert kid.recv(5)[0] == "ok"
            elif kind == "ratio-add":
                kid.send(("again", op, arg, 5.0))
                kid.recv(10, expect="ready")
                buf.sample(2)  # (5+1)*2 - 2 = 10
                assert kid.recv(5)[0] == "ok"
                assert [int(buf[i]["ident"]) for i in range(6)] == list(range(6))
            else:
                kid.send(("again", op, arg, 5.0))
                kid.recv(10, expect="ready")
                buf.sample(4)  # (5+2)*2 - 4 = 10
                assert kid.recv(5)[0] == "ok"
                assert [int(buf[i]["ident"]) for i in range(7)] == list(range(7))
        finally:
            kid.finish()
        # the contract on the median of the attempts: one may be preempted on a loaded machine
        assert median(latencies) < CTRL_C_BOUND, f"KeyboardInterrupt latencies {[f'{x * 1000:.1f} ms' for x in latencies]}"
    finally:
        buf.close()


def test_ctrl_c_in_a_spawned_child(shm_name):
    ctx = multiprocessing.get_context("spawn")
    with create(shm_name, 16, limiter=shmreplay.MinSize(3)) as buf:
        kid = start_waiter(ctx, shm_name, "sample", 1, None)
        latencies = []
        try:
            for attempt in range(3):
                t_sig = time.monotonic()
                os.kill(kid.pid, signal.SIGINT)
                msg = kid.recv(5)
                assert msg[0] == "raised" and msg[3]["kbi"], msg
                latencies.append(msg[1] - t_sig)
                assert latencies[-1] < LATENCY_CEILING, f"KeyboardInterrupt {latencies[-1]:.3f}s after SIGINT"
                assert buf.stats()["samples"] == 0
                if attempt < 2:
                    kid.send(("again", "sample", 1, None))
                    kid.recv(10, expect="ready")
                    assert kid.silent_for(0.2), "sample(1) did not wait again after KeyboardInterrupt"
        finally:
            kid.finish()
        assert median(latencies) < CTRL_C_BOUND, f"KeyboardInterrupt latencies {[f'{x * 1000:.1f} ms' for x in latencies]}"


# =======================================================================================
# 9. shutdown()
# =======================================================================================


def _assert_shutdown_msg(msg: tuple, t0: float, what: str) -> float:
    """The waiter raised ShutdownError, within LATENCY_CEILING of ``t0``; returns how long after."""
    assert msg[0] == "raised", f"{what}: {msg}"
    d = msg[3]
    assert d["shutdown"] and d["shm"], f"{what}: raised {d['type']}: {d['msg']} (expected ShutdownError)"
    latency = msg[1] - t0
    assert latency < LATENCY_CEILING, f"{what}: ShutdownError {latency * 1000:.1f} ms after shutdown()"
    return latency


def _assert_shutdown_latencies(latencies: dict[str, float]) -> None:
    """The 100 ms contract, on the median of waiters of one kind released by one shutdown():
    one may be preempted on a loaded machine (each one is held to LATENCY_CEILING on its own)."""
    shown = {what: f"{dt * 1000:.1f} ms" for what, dt in latencies.items()}
    assert median(latencies.values()) <= SHUTDOWN_BOUND, f"ShutdownError after shutdown(): {shown}"


@pytest.mark.parametrize("who", ["parent", "child"])
def test_shutdown_releases_every_waiter_everywhere(name_factory, mp_ctx, who):
    """Every waiter (4 processes, a thread) raises ShutdownError within 100 ms. A round passes
    when its slowest waiter does; a loaded machine may preempt one round, so up to 3 rounds
    on fresh buffers (a kind of waiter that is slow every time fails them all)."""
    rounds = []
    for _ in range(3):
        rounds.append(_shutdown_round(name_factory(), mp_ctx, who))
        if max(rounds[-1].values()) <= SHUTDOWN_BOUND:
            return
    shown = [{what: f"{dt * 1000:.1f} ms" for what, dt in r.items()} for r in rounds]
    pytest.fail(f"no round released every waiter within {SHUTDOWN_BOUND * 1000:.0f} ms: {shown}")


def _shutdown_round(shm_name: str, mp_ctx: Any, who: str) -> dict[str, float]:
    """One shutdown() of waiters everywhere, and what holds after it; returns each waiter's
    latency (each already held to LATENCY_CEILING)."""
    # spi 1, window [0, 10]; I = 7: sample(8) waits (7 - 8 < 0), extend(5) waits (12 > 10)
    with create(shm_name, 32, limiter=STIR(1.0, 1, (0.0, 10.0))) as buf:
        buf.extend(make_rows(range(7)))
        before = counters(buf)
        specs = [("sample", 8, None), ("extend", (100, 5), None), ("sample", 8, 30.0), ("extend", (200, 4), 20.0)]
        kids: list[Kid] = []
        thread_res: dict[str, Any] = {}
        other = ReplayBuffer.attach(shm_name)
        shutter = None
        try:
            for op, arg, timeout in specs:
                kids.append(start_call(mp_ctx, shm_name, op, arg, timeout))
            if who == "child":
                shutter = start_call(mp_ctx, shm_name, "can", ([1], [1]), None)
                shutter.recv(10, expect="ok")

            def thread_waiter() -> None:
                try:
                    other.sample(9, timeout=None)
                    thread_res["ok"] = time.monotonic()
                except BaseException as e:  # noqa: BLE001
                    thread_res["exc"] = e
                    thread_res["t"] = time.monotonic()

            th = threading.Thread(target=thread_waiter, daemon=True)
            th.start()
            time.sleep(0.4)
            for kid, spec in zip(kids, specs):
                assert kid.silent_for(0.01), f"{spec} did not wait"
            assert not thread_res
            if who == "parent":
                t0 = time.monotonic()
                buf.shutdown()
            else:
                assert shutter is not None
                shutter.send(("again", "shutdown", None, None))
                shutter.recv(10, expect="ready")
                done = shutter.recv(10)
                assert done[0] == "ok", done
                t0 = done[2]  # taken in the shutter right before its shutdown()
            latencies = {}
            for kid, spec in zip(kids, specs):
                latencies[f"waiter {spec}"] = _assert_shutdown_msg(kid.recv(5), t0, f"waiter {spec}")
            th.join(5)
            assert "exc" in thread_res, thread_res
            assert isinstance(thread_res["exc"], shmreplay.ShutdownError), repr(thread_res["exc"])
            latencies["thread"] = thread_res["t"] - t0
            assert latencies["thread"] < LATENCY_CEILING, f"thread: {latencies['thread'] * 1000:.1f} ms"
            assert counters(buf) == before, "a call released by shutdown changed the counters"
            # later calls that cannot proceed: ShutdownError at once, whatever the timeout
            for timeout in (None, 0, 5.0):
                raises_now(shmreplay.ShutdownError, lambda: buf.sample(8, timeout=timeout), f"sample(8, timeout={timeout})", 0.1)
                raises_now(shmreplay.ShutdownError, lambda: buf.extend(make_rows(range(7, 12)), timeout=timeout), f"extend(5, timeout={timeout})", 0.1)
            # a call that could never be allowed is still a ValueError
            raises_now(ValueError, lambda: buf.sample(11), "sample(11) > window")
            assert counters(buf) == before
            # calls that need not wait still succeed
            assert buf.sample(3, timeout=None)["ident"].shape == (3,)  # 7 - 0 - 3 >= 0
            buf.add(**one_row(7), timeout=None)  # 8 - 3 <= 10
            assert buf.stats()["inserts"] == 8 and buf.stats()["samples"] == 3
            # the same holds in every process, newly attached ones included
            late = start_call(mp_ctx, shm_name, "sample", 9, None)  # 8 - 3 - 9 < 0
            try:
                msg = late.recv(5)
                assert msg[0] == "raised" and msg[3]["shutdown"], msg
                # a handle that waited would wait for ever (timeout None); the time includes scheduling
                assert msg[1] - msg[2] < LATENCY_CEILING, f"a newly attached handle waited {msg[1] - msg[2]:.3f}s before ShutdownError"
                late.send(("again", "sample", 9, 0))
                late.recv(5, expect="ready")
                msg = late.recv(5)
                assert msg[0] == "raised" and msg[3]["shutdown"], msg
                late.send(("again", "sample", 2, None))
                late.recv(5, expect="ready")
                msg = late.recv(5)
                assert msg[0] == "ok", msg
                late.send(("again", "add", 8, None))
                late.recv(5, expect="ready")
                assert late.recv(5)[0] == "ok"
            finally:
                late.finish()
            assert buf.stats()["inserts"] == 9 and buf.stats()["samples"] == 5
        finally:
            kill_all(kids)
            if shutter is not None:
                shutter.finish()
            other.close()
    return latencies


def test_shutdown_releases_queue_waiters_and_lets_a_learner_drain(shm_name, mp_ctx):
    with create(shm_name, 6, sampler=shmreplay.Queue()) as buf:
        consumers: list[Kid] = []
        try:
            for _ in range(3):
                consumers.append(start_waiter(mp_ctx, shm_name, "sample", 2, None))
            t0 = time.monotonic()
            buf.shutdown()
            _assert_shutdown_latencies(
                {f"queue consumer {i}": _assert_shutdown_msg(c.recv(5), t0, f"queue consumer {i}") for i, c in enumerate(consumers)}
            )
        finally:
            for c in consumers:
                c.finish()
        # after shutdown: inserts that fit and samples that are available still succeed
        buf.extend(make_rows(range(6)), timeout=None)
        producer = start_call(mp_ctx, shm_name, "add", 6, None)  # full: cannot proceed
        try:
            msg = producer.recv(5)
            assert msg[0] == "raised" and msg[3]["shutdown"], msg
            assert msg[1] - msg[2] < LATENCY_CEILING, f"a full queue's add waited {msg[1] - msg[2]:.3f}s before ShutdownError"
        finally:
            producer.finish()
        assert buf.sample(4, timeout=None)["ident"].tolist() == [0, 1, 2, 3]
        raises_now(shmreplay.ShutdownError, lambda: buf.sample(3, timeout=None), "sample(3) with 2 left", 0.1)
        raises_now(shmreplay.ShutdownError, lambda: buf.sample(3, timeout=0), "sample(3, timeout=0) with 2 left", 0.1)
        assert len(buf) == 2
        batch, info = buf.sample(2, timeout=0, return_info=True)
        assert batch["ident"].tolist() == [4, 5] and info["key"].tolist() == [4, 5]
        raises_now(shmreplay.ShutdownError, lambda: buf.sample(1), "sample of a drained queue", 0.1)
        buf.add(**one_row(6))
        assert buf.sample(1)["ident"].tolist() == [6]


def _c_hammer(conn: Any, name: str, role: str, wid: int, stop: Any) -> None:
    """Producer or consumer on a queue until ShutdownError or ``stop``; reports every success."""
    buf = ReplayBuffer.attach(name)
    rng = np.random.default_rng(wid)
    seq = 0
    conn.send(("ready",))
    outcome = "stopped"
    deadline = time.monotonic() + 30
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                if role == "p":
                    k = int(rng.integers(1, 5))
                    buf.extend(make_rows(wid * 1_000_000 + np.arange(seq, seq + k)), timeout=None)
                    seq += k
                    conn.send(("ins", k))
                else:
                    n = int(rng.integers(1, 5))
                    batch, info = buf.sample(n, timeout=None, return_info=True)
                    conn.send(("got", info["key"].astype(np.int64), batch["ident"].copy()))
            except shmreplay.ShutdownError:
                outcome = "shutdown"
                break
    finally:
        conn.send(("end", outcome, seq))
        buf.close()


def test_after_shutdown_every_reported_success_happened(shm_name):
    """Producers and consumers hammer a queue while it is shut down: every insert reported as a
    success is in the counters, every row delivered was inserted, nothing twice."""
    ctx = multiprocessing.get_context("fork")
    with create(shm_name, 8, sampler=shmreplay.Queue()) as buf:
        stop = ctx.Event()
        kids = [Kid(ctx, _c_hammer, shm_name, role, wid, stop, duplex=False) for role, wid in (("p", 1), ("p", 2), ("c", 3), ("c", 4))]
        inserted = 0
        keys: list[np.ndarray] = []
        ids: list[np.ndarray] = []
        ended = {}
        try:
            for k in kids:
                k.recv(START_TIMEOUT, expect="ready")
            conns = {k.conn: i for i, k in enumerate(kids)}

            def pump(until: float) -> None:
                nonlocal inserted
                while time.monotonic() < until and len(ended) < len(kids):
                    for c in multiprocessing.connection.wait(list(conns), timeout=0.02):
                        msg = c.recv()
                        if msg[0] == "ins":
                            inserted += msg[1]
                        elif msg[0] == "got":
                            keys.append(msg[1])
                            ids.append(msg[2])
                        elif msg[0] == "end":
                            ended[conns[c]] = msg[1]
                            del conns[c]
                        else:
                            raise AssertionError(msg)

            pump(time.monotonic() + 1.0)
            buf.shutdown()
            pump(time.monotonic() + 0.5)
            stop.set()
            pump(time.monotonic() + 10)
            assert len(ended) == 4, f"children did not end: {ended}"
        finally:
            stop.set()
            kill_all(kids)
        s = buf.stats()
        assert s["inserts"] == inserted, f"stats inserts {s['inserts']} != successes reported {inserted}"
        got_keys = np.concatenate(keys) if keys else np.array([], np.int64)
        got_ids = np.concatenate(ids) if ids else np.array([], np.int64)
        assert len(set(got_keys.tolist())) == got_keys.size, "a row was delivered twice"
        assert s["samples"] == got_keys.size, f"stats samples {s['samples']} != rows reported {got_keys.size}"
        # drain the rest (need not wait): everything inserted is delivered exactly once
        rest = len(buf)
        assert rest == inserted - got_keys.size
        if rest:
            batch, info = buf.sample(rest, timeout=0, return_info=True)
            got_keys = np.concatenate([got_keys, info["key"].astype(np.int64)])
            got_ids = np.concatenate([got_ids, batch["ident"]])
        assert sorted(got_keys.tolist()) == list(range(inserted))
        order = np.argsort(got_keys)
        got_ids = got_ids[order]
        for p in (1, 2):
            mine = got_ids[got_ids // 1_000_000 == p] % 1_000_000
            assert mine.tolist() == list(range(mine.size)), f"producer {p}: not FIFO / not exactly once"


# =======================================================================================
# 10. Waiters SIGKILLed while waiting
# =======================================================================================


def _timed_ops(buf: ReplayBuffer, n: int, start: int) -> tuple[float, list[float]]:
    """``n`` add+sample pairs that need not wait: the total time and each pair's."""
    each = []
    t0 = time.monotonic()
    for i in range(n):
        t = time.monotonic()
        buf.add(**one_row(start + i), timeout=0)
        buf.sample(1, timeout=0)
        each.append(time.monotonic() - t)
    return time.monotonic() - t0, each


def test_a_waiter_killed_while_waiting_leaves_nothing_behind(shm_name, mp_ctx):
    # the baseline: the same calls on a like buffer that never had a waiter, timed the same way
    with create(shm_name + "-base", 64, limiter=shmreplay.MinSize(6)) as base:
        base.extend(make_rows(range(6)))
        base_total, base_each = _timed_ops(base, 500, 6)
        base.unlink()
    with create(shm_name, 64, limiter=shmreplay.MinSize(6)) as buf:
        buf.extend(make_rows(range(2)))
        victims = [start_waiter(mp_ctx, shm_name, "sample", 1, None) for _ in range(2)]
        for v in victims:
            v.kill()
        assert counters(buf)["samples"] == 0
        buf.add(**one_row(2))
        # a new waiter still waits (not released by a stale registration) and is woken at once
        kid = start_waiter(mp_ctx, shm_name, "sample", 3, None)
        try:
            t = time.monotonic()
            buf.extend(make_rows(range(3, 6)))
            msg = kid.recv(5)
            assert msg[0] == "ok", msg
            assert msg[1] - t < LATENCY_CEILING, f"wake took {msg[1] - t:.3f}s after waiters were killed"
        finally:
            kid.finish()
        assert buf.stats()["samples"] == 3
        # calls that need not wait are not slowed by the dead waiters: compared with the baseline
        # (a call that slept a slice for them, or scanned for them every time, would be many times
        # slower; one preempted call among 500 is not), and none may stall for long
        total, each = _timed_ops(buf, 500, 6)
        shown = (
            f"500 add+sample took {total:.3f}s (median {median(each) * 1e6:.0f} us, worst {max(each) * 1000:.1f} ms);"
            f" baseline {base_total:.3f}s (median {median(base_each) * 1e6:.0f} us, worst {max(base_each) * 1000:.1f} ms)"
        )
        assert median(each) <= 3 * median(base_each) + 0.001, shown
        assert total <= 3 * base_total + 0.5, shown
        assert max(each) < LATENCY_CEILING, shown


def test_queue_waiters_killed_while_waiting_take_nothing(shm_name, mp_ctx):
    with create(shm_name, 4, sampler=shmreplay.Queue()) as buf:
        buf.extend(make_rows(range(4)))
        producer = start_waiter(mp_ctx, shm_name, "add", 100, None)  # full queue
        producer.kill()
        batch, info = buf.sample(4, timeout=0, return_info=True)
        assert batch["ident"].tolist() == [0, 1, 2, 3]
        consumer = start_waiter(mp_ctx, shm_name, "sample", 2, None)  # empty queue
        consumer.kill()
        buf.extend(make_rows(range(4, 6)), timeout=0)
        batch, info = buf.sample(2, timeout=0, return_info=True)
        assert batch["ident"].tolist() == [4, 5], "rows went to a killed consumer"
        assert info["key"].tolist() == [4, 5], "a killed waiting producer left a gap in the tickets"
        buf.extend(make_rows(range(6, 10)), timeout=0)
        assert buf.sample(4, timeout=0, return_info=True)[1]["key"].tolist() == [6, 7, 8, 9]
        s = buf.stats()
        assert (s["inserts"], s["samples"], len(buf)) == (10, 10, 0)


# =======================================================================================
# 11. Producers dying mid-write (test hook) and SIGKILLed at random
# =======================================================================================


@pytest.mark.parametrize("stage", ["copy", "count"])
def test_queue_producer_dead_mid_write_is_skipped_and_committed_rows_kept(shm_name, stage):
    ctx = multiprocessing.get_context("fork")
    with create(shm_name, 8, sampler=shmreplay.Queue()) as buf:
        buf.extend(make_rows(range(3)))  # tickets 0..2
        writer = helpers.PausedWriter(ctx, shm_name, None, make_rows([100, 101, 102]), stage).start()  # 3..5
        try:
            buf.extend(make_rows([6, 7]))  # tickets 6, 7
            got = buf.sample(3, timeout=1.0)["ident"].tolist()
            assert got == [0, 1, 2]
            early: list[int] = []
            if stage == "copy":
                with pytest.raises(TimeoutError):
                    buf.sample(1, timeout=0.3)  # ticket 3 is being written by a live writer: wait
            else:
                try:
                    early = buf.sample(1, timeout=0.3)["ident"].tolist()  # committed row 100 may go
                except TimeoutError:
                    pass
                assert early in ([], [100]), early
                with pytest.raises(TimeoutError):
                    buf.sample(1, timeout=0.3)  # ticket 4 not written, writer alive
        finally:
            writer.kill()
        rest, info = [], []
        while True:
            try:
                b, i = buf.sample(1, timeout=2.0, return_info=True)
            except TimeoutError:
                break
            rest += b["ident"].tolist()
            info += i["key"].tolist()
        want = ([] if stage == "copy" or early else [100]) + [6, 7]
        assert rest == want, f"after the writer died: delivered {rest} (keys {info}), expected {want}"
        assert info[-2:] == [6, 7]
        # the skipped tickets do not keep room: the whole ring is usable again
        assert len(buf) == 0, f"len {len(buf)} after every row was delivered"
        buf.extend(make_rows(range(8, 16)), timeout=0)
        assert buf.sample(8, timeout=0)["ident"].tolist() == list(range(8, 16))


QBLOB = 16384
QFIELDS: dict[str, tuple[tuple[int, ...], Any]] = {"pid": ((), np.int32), "seq": ((), np.int64), "blob": ((QBLOB,), np.uint8)}
_QPAT = np.arange(QBLOB, dtype=np.int64)


def q_rows(pid: int, seqs: Any, blob_len: int = QBLOB) -> dict[str, np.ndarray]:
    seqs = np.asarray(list(seqs) if not isinstance(seqs, np.ndarray) else seqs, dtype=np.int64)
    pat = _QPAT if blob_len == QBLOB else np.arange(blob_len, dtype=np.int64)
    blob = ((seqs[:, None] * 131 + pid * 7 + pat[None, :]) % 251).astype(np.uint8)
    return {"pid": np.full(seqs.shape[0], pid, np.int32), "seq": seqs, "blob": blob}


def q_torn(batch: dict[str, np.ndarray]) -> int:
    pid = batch["pid"].astype(np.int64)
    seq = batch["seq"].astype(np.int64)
    pat = np.arange(batch["blob"].shape[1], dtype=np.int64)
    want = ((seq[:, None] * 131 + pid[:, None] * 7 + pat[None, :]) % 251).astype(np.uint8)
    return int((~np.all(batch["blob"] == want, axis=1)).sum())


def _c_q_producer(conn: Any, name: str, pid: int, seed: int, committed: Any, stop: Any) -> None:
    buf = ReplayBuffer.attach(name)
    rng = np.random.default_rng(seed)
    conn.send(("ready",))
    seq = 0
    deadline = time.monotonic() + 40
    while not stop.value and time.monotonic() < deadline:
        k = int(rng.integers(1, 9))
        try:
            buf.extend(q_rows(pid, range(seq, seq + k)), timeout=0.2)
        except TimeoutError:
            continue
        seq += k
        committed.value = seq
    conn.send(("done", seq))
    buf.close()


def _c_q_consumer(conn: Any, name: str, seed: int, drain: Any, max_n: int = 12) -> None:
    buf = ReplayBuffer.attach(name)
    rng = np.random.default_rng(seed)
    conn.send(("ready",))
    torn = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        draining = drain.value
        n = 1 if draining else int(rng.integers(1, max_n + 1))
        try:
            batch, info = buf.sample(n, timeout=0.3 if draining else 0.2, return_info=True)
        except TimeoutError:
            if draining:
                break
            continue
        torn += q_torn(batch)
        conn.send(("batch", info["key"].astype(np.int64), batch["pid"].astype(np.int64), batch["seq"].astype(np.int64)))
    conn.send(("done", torn))
    buf.close()


class Collector:
    """Reads consumers' batches as they come (so that no pipe fills up)."""

    def __init__(self) -> None:
        self.conns: dict[Any, str] = {}
        self.batches: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        self.done: dict[str, int] = {}

    def add(self, kid: Kid, label: str) -> None:
        self.conns[kid.conn] = label

    def forget(self, kid: Kid) -> None:
        """After ``kid`` was killed and reaped: keep every batch it managed to report."""
        label = self.conns.pop(kid.conn, None)
        while label is not None and kid.conn.poll(0):
            try:
                msg = kid.conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "batch":
                self.batches.append((label, msg[1], msg[2], msg[3]))

    def pump(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while True:
            left = until - time.monotonic()
            if left <= 0 or not self.conns:
                return
            for c in multiprocessing.connection.wait(list(self.conns), timeout=min(left, 0.02)):
                label = self.conns[c]
                try:
                    msg = c.recv()
                except EOFError:
                    del self.conns[c]
                    continue
                if msg[0] == "batch":
                    self.batches.append((label, msg[1], msg[2], msg[3]))
                elif msg[0] == "done":
                    self.done[label] = msg[1]
                    del self.conns[c]
                elif msg[0] == "err":
                    raise AssertionError(msg[1])


def _check_delivery(col: Collector) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """No row twice, keys increasing within each batch and per consumer; returns all
    (key, pid, seq) sorted by key."""
    per_consumer: dict[str, list[np.ndarray]] = {}
    for label, k, _, _ in col.batches:
        assert np.all(np.diff(k) > 0), f"{label}: keys of one batch out of order: {k}"
        per_consumer.setdefault(label, []).append(k)
    for label, ks in per_consumer.items():
        flat = np.concatenate(ks)
        assert np.all(np.diff(flat) > 0), f"{label}: later batches got earlier keys"
    keys = np.concatenate([b[1] for b in col.batches])
    pids = np.concatenate([b[2] for b in col.batches])
    seqs = np.concatenate([b[3] for b in col.batches])
    assert np.unique(keys).size == keys.size, "a key was delivered twice"
    pairs = pids * (1 << 40) + seqs
    assert np.unique(pairs).size == pairs.size, "a row was delivered twice"
    order = np.argsort(keys, kind="stable")
    return keys[order], pids[order], seqs[order]


def test_queue_three_producers_two_consumers_producers_sigkilled(shm_name):
    ctx = multiprocessing.get_context("fork")
    rng = np.random.default_rng(int(time.time()) % 100_000)
    seed_info = f"(kill schedule seed {rng.bit_generator.state['state']['state'] % 10**8})"
    with ReplayBuffer.create(shm_name, capacity=48, fields=QFIELDS, sampler=shmreplay.Queue()) as buf:
        stop, drain = ctx.RawValue("i", 0), ctx.RawValue("i", 0)
        producers: dict[int, tuple[Kid, Any]] = {}
        consumers: list[Kid] = []
        killed: dict[int, int] = {}
        col = Collector()
        all_kids: list[Kid] = []

        def start_producer(pid: int) -> None:
            committed = ctx.RawValue("q", 0)
            kid = Kid(ctx, _c_q_producer, shm_name, pid, 1000 + pid, committed, stop, duplex=False)
            all_kids.append(kid)
            kid.recv(START_TIMEOUT, expect="ready")
            producers[pid] = (kid, committed)

        try:
            for c in range(2):
                kid = Kid(ctx, _c_q_consumer, shm_name, 50 + c, drain, duplex=False)
                all_kids.append(kid)
                kid.recv(START_TIMEOUT, expect="ready")
                consumers.append(kid)
                col.add(kid, f"consumer{c}")
            for p in range(3):
                start_producer(p)
            next_pid = 3
            for _ in range(3):
                col.pump(float(rng.uniform(0.6, 1.6)))
                victim = int(rng.choice(sorted(producers)))
                kid, committed = producers.pop(victim)
                kid.kill()
                killed[victim] = int(committed.value)
                start_producer(next_pid)
                next_pid += 1
            col.pump(1.0)
            stop.value = 1
            finished: dict[int, int] = {}
            for pid, (kid, committed) in producers.items():
                deadline = time.monotonic() + 15
                while not kid.conn.poll(0):
                    col.pump(0.05)
                    assert time.monotonic() < deadline, f"producer {pid} did not stop"
                msg = kid.recv(1, expect="done")
                finished[pid] = msg[1]
            drain.value = 1
            col.pump(30)
            assert len(col.done) == 2, f"consumers did not finish draining {seed_info}"
            # whatever the consumers left (they give up after 0.3 s without rows)
            leftovers = []
            while True:
                try:
                    b, i = buf.sample(1, timeout=1.0, return_info=True)
                except TimeoutError:
                    break
                leftovers.append(("parent", i["key"].astype(np.int64), b["pid"].astype(np.int64), b["seq"].astype(np.int64)))
            col.batches.extend(leftovers)
        finally:
            stop.value = 1
            drain.value = 1
            kill_all(all_kids)
        assert sum(col.done.values()) == 0, f"torn rows delivered {seed_info}"
        keys, pids, seqs = _check_delivery(col)
        assert len(buf) == 0, f"len {len(buf)} after draining {seed_info}"
        for pid in set(pids.tolist()) | set(finished) | set(killed):
            mine = seqs[pids == pid]
            assert np.all(np.diff(mine) > 0), f"producer {pid}: delivered out of FIFO order {seed_info}"
            if pid in finished:
                assert mine.tolist() == list(range(finished[pid])), (
                    f"surviving producer {pid}: committed {finished[pid]} rows, delivered {mine.size} "
                    f"(missing {sorted(set(range(finished[pid])) - set(mine.tolist()))[:10]}) {seed_info}"
                )
            else:
                m = mine.size
                assert mine.tolist() == list(range(m)), f"killed producer {pid}: delivered rows are not a prefix {seed_info}"
                assert killed[pid] <= m <= killed[pid] + 8, (
                    f"killed producer {pid}: committed at least {killed[pid]} rows, {m} delivered {seed_info}"
                )
        assert len(keys) > 200, f"only {len(keys)} rows went through {seed_info}"


def _c_simple_producer(conn: Any, name: str, stop: Any, committed: Any, blob_len: int = QBLOB, max_k: int = 5) -> None:
    buf = ReplayBuffer.attach(name)
    conn.send(("ready",))
    seq = 0
    rng = np.random.default_rng(7)
    deadline = time.monotonic() + 30
    while not stop.value and time.monotonic() < deadline:
        k = int(rng.integers(1, max_k + 1))
        try:
            buf.extend(q_rows(0, range(seq, seq + k), blob_len), timeout=0.2)
        except TimeoutError:
            continue
        seq += k
        committed.value = seq
    conn.send(("done", seq))
    buf.close()


def test_queue_consumers_sigkilled_lose_at_most_what_they_took(shm_name):
    ctx = multiprocessing.get_context("fork")
    with ReplayBuffer.create(shm_name, capacity=32, fields=QFIELDS, sampler=shmreplay.Queue()) as buf:
        stop, drain = ctx.RawValue("i", 0), ctx.RawValue("i", 0)
        committed = ctx.RawValue("q", 0)
        col = Collector()
        all_kids: list[Kid] = []
        kills = 0
        try:
            prod = Kid(ctx, _c_simple_producer, shm_name, stop, committed, duplex=False)
            all_kids.append(prod)
            prod.recv(START_TIMEOUT, expect="ready")
            cons = []
            for c in range(2):
                k = Kid(ctx, _c_q_consumer, shm_name, 60 + c, drain, duplex=False)
                all_kids.append(k)
                k.recv(START_TIMEOUT, expect="ready")
                col.add(k, f"c{c}")
                cons.append(k)
            rng = np.random.default_rng()
            for r in range(3):
                col.pump(float(rng.uniform(0.4, 0.9)))
                victim = cons.pop(0)
                victim.kill()
                col.forget(victim)
                kills += 1
                k = Kid(ctx, _c_q_consumer, shm_name, 70 + r, drain, duplex=False)
                all_kids.append(k)
                k.recv(START_TIMEOUT, expect="ready")
                col.add(k, f"c{2 + r}")
                cons.append(k)
            col.pump(0.5)
            stop.value = 1
            deadline = time.monotonic() + 15
            while not prod.conn.poll(0):
                col.pump(0.05)
                assert time.monotonic() < deadline
            total = prod.recv(1, expect="done")[1]
            drain.value = 1
            col.pump(30)
            while True:
                try:
                    b, i = buf.sample(1, timeout=1.0, return_info=True)
                except TimeoutError:
                    break
                col.batches.append(("parent", i["key"].astype(np.int64), b["pid"].astype(np.int64), b["seq"].astype(np.int64)))
        finally:
            stop.value = 1
            drain.value = 1
            kill_all(all_kids)
        keys, pids, seqs = _check_delivery(col)
        assert np.all(np.diff(seqs) > 0), "rows delivered out of FIFO order"
        assert np.array_equal(keys, seqs), "keys are not the insert tickets (single producer)"
        missing = sorted(set(range(total)) - set(seqs.tolist()))
        # each killed consumer may have taken (and lost) one batch: a run of consecutive rows
        runs = []
        for s in missing:
            if runs and runs[-1][1] == s - 1:
                runs[-1][1] = s
            else:
                runs.append([s, s])
        assert len(runs) <= kills and all(b - a + 1 <= 12 for a, b in runs), f"lost rows {runs} with {kills} consumer kills"
        assert len(buf) == 0
        assert total > 100


# =======================================================================================
# 12. Actors and a learner holding the ratio
# =======================================================================================

RATIO_SPI, RATIO_MIN, RATIO_EB = 8.0, 1000, 2000.0
RATIO_K, RATIO_N = 16, 64


def _c_actor(conn: Any, name: str, aid: int, stop: Any) -> None:
    buf = ReplayBuffer.attach(name)
    conn.send(("ready",))
    seq = 0
    deadline = time.monotonic() + 40
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            buf.extend(make_rows(aid * 1_000_000_000 + np.arange(seq, seq + RATIO_K)), timeout=0.2)
        except TimeoutError:
            continue
        seq += RATIO_K
    conn.send(("done", seq))
    buf.close()


def _c_learner(conn: Any, name: str, stop: Any, exact: bool) -> None:
    buf = ReplayBuffer.attach(name)
    lo, hi = RATIO_SPI * RATIO_MIN - RATIO_EB, RATIO_SPI * RATIO_MIN + RATIO_EB
    slack = 2 * RATIO_K * RATIO_SPI  # rows admitted by the 2 actors but possibly not yet counted
    conn.send(("ready",))
    sampled = checks = torn = 0
    bad: list[Any] = []
    deadline = time.monotonic() + 40
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            batch = buf.sample(RATIO_N, timeout=0.2)
        except TimeoutError:
            continue
        sampled += RATIO_N
        torn += int((~rows_ok(batch)).sum())
        s = buf.stats()
        d = s["inserts"] * RATIO_SPI - s["samples"]
        checks += 1
        if exact and s["samples"] != sampled:
            bad.append(("S", s["samples"], sampled))
        # With one learner, S is exact here and I only lags by the actors' rows in flight. With
        # two, stats() reads I and S at different instants while the other learner samples (as
        # much as the actors insert meanwhile): only a loose bound holds.
        other = 0 if exact else RATIO_EB
        if not (lo - slack - other <= d <= hi + other):
            bad.append(("diff", s["inserts"], s["samples"], d))
    conn.send(("done", sampled, checks, torn, bad[:5], len(bad)))
    buf.close()


@pytest.mark.parametrize("learners", [1, 2])
def test_two_actors_and_learners_hold_the_ratio(shm_name, learners):
    ctx = multiprocessing.get_context("spawn")
    lo, hi = RATIO_SPI * RATIO_MIN - RATIO_EB, RATIO_SPI * RATIO_MIN + RATIO_EB
    with create(shm_name, 5000, limiter=STIR(RATIO_SPI, RATIO_MIN, RATIO_EB)) as buf:
        stop = ctx.Event()
        kids = [Kid(ctx, _c_actor, shm_name, a, stop, duplex=False) for a in (1, 2)]
        kids += [Kid(ctx, _c_learner, shm_name, stop, learners == 1, duplex=False) for _ in range(learners)]
        bad_parent = []
        checks = 0
        try:
            for k in kids:
                k.recv(START_TIMEOUT, expect="ready")
            # stats() reads I and S at different instants (the monitor may be preempted between)
            slack = RATIO_EB / 2
            t_end = time.monotonic() + 7.0
            while time.monotonic() < t_end:
                time.sleep(0.1)
                s = buf.stats()
                checks += 1
                if s["samples"] > 0:
                    d = s["inserts"] * RATIO_SPI - s["samples"]
                    if not (lo - slack <= d <= hi + slack):
                        bad_parent.append((s["inserts"], s["samples"], d))
                elif s["inserts"] > RATIO_MIN + 2 * RATIO_K:
                    # nothing sampled yet: inserts stop where the window does
                    if s["inserts"] * RATIO_SPI > max(hi, RATIO_SPI * RATIO_MIN) + slack:
                        bad_parent.append((s["inserts"], 0, "no samples"))
            stop.set()
            results = [k.recv(20, expect="done") for k in kids]
        finally:
            stop.set()
            kill_all(kids)
        s = buf.stats()
        for learner in results[2:]:
            assert learner[3] == 0, "torn rows sampled"
            assert learner[5] == 0, f"a learner saw the ratio outside the window {learner[5]} times: {learner[4]}"
        assert not bad_parent, f"monitor saw the ratio outside the window: {bad_parent[:5]}"
        assert s["samples"] == sum(r[1] for r in results[2:])
        learner = results[2]
        assert s["inserts"] == results[0][1] + results[1][1]
        d = s["inserts"] * RATIO_SPI - s["samples"]
        assert lo <= d <= hi, f"final I*spi - S = {d} outside [{lo}, {hi}] (I={s['inserts']}, S={s['samples']})"
        assert learner[2] >= 50 and s["inserts"] > RATIO_MIN + 500, f"too little progress: {s}"
        assert s["insert_wait_s"] + s["sample_wait_s"] > 0.1, s
        assert s["deletes"] == max(0, s["inserts"] - 5000)


# =======================================================================================
# 13. Limiters with the prioritized sampler, bad input with a limiter
# =======================================================================================


def test_limiter_with_the_prioritized_sampler(shm_name):
    with create(shm_name, 16, sampler=shmreplay.Prioritized(), limiter=STIR(1.0, 2, (0.0, 6.0))) as buf:
        raises_now(TimeoutError, lambda: buf.sample(1, timeout=0), "empty")
        buf.extend(make_rows(range(3)), priority=2.0)
        batch, info = buf.sample(3, timeout=0, return_info=True)
        assert rows_ok(batch).all() and info["weight"].shape == (3,)
        raises_now(TimeoutError, lambda: buf.sample(1, timeout=0), "3 - 3 - 1 < 0")
        assert buf.stats()["samples"] == 3 and buf.stats()["limiter"]["kind"] == "SampleToInsertRatio"
        raises_now(ValueError, lambda: buf.sample(7), "n > window")


def test_bad_input_on_a_limited_buffer_changes_nothing(shm_name):
    # spi 2, window [0, 10]: I = 4 leaves room for exactly one more row
    with create(shm_name, 16, limiter=STIR(2.0, 1, (0.0, 10.0))) as buf:
        buf.extend(make_rows(range(4)))
        before = counters(buf)
        snap = snapshot(buf)
        bad_calls = [
            lambda: buf.extend({"ident": np.arange(4, 5)}),
            lambda: buf.extend({"ident": np.arange(4, 5), "x": np.zeros((2, 3), np.float32)}),
            lambda: buf.add(ident=4),
            lambda: buf.add(ident=4, x=np.zeros(4, np.float32)),
            lambda: buf.add(**one_row(4), timeout=-1),
            lambda: buf.sample(0),
            lambda: buf.sample(-2),
            lambda: buf.sample(11),  # n > window: never allowed
            lambda: buf.extend(make_rows(range(4, 10))),  # 6 * 2 > window
            lambda: buf.sample(2, out={"ident": np.zeros(3, np.int64), "x": np.zeros((3, 3), np.float32)}),
        ]
        for i, fn in enumerate(bad_calls):
            with pytest.raises((ValueError, TypeError)):
                fn()
            assert counters(buf) == before, f"bad call {i} changed the counters"
            assert snapshot(buf) == snap, f"bad call {i} changed the slots"
            assert buf.can_insert(1) and not buf.can_insert(2), f"bad call {i} moved the limiter"
        buf.add(**one_row(4), timeout=0)
        assert int(buf[4]["ident"]) == 4


# =======================================================================================
# 14. More adversarial cases
# =======================================================================================


def test_a_limited_sample_never_hangs_on_a_dead_writers_slot(shm_name):
    """MinSize(1): the only admitted row belongs to a writer killed mid-copy. A sample is
    admitted by the counts but no row exists: it must end (not hang), take nothing, and the
    buffer must work normally once a row is written."""
    ctx = multiprocessing.get_context("fork")
    with create(shm_name, 8, limiter=shmreplay.MinSize(1)) as buf:
        writer = helpers.PausedWriter(ctx, shm_name, None, make_rows([0]), "copy").start()
        writer.kill()
        t0 = time.monotonic()
        try:
            batch = buf.sample(1, timeout=1.0)
        except (TimeoutError, shmreplay.EmptyBufferError) as e:
            dt = time.monotonic() - t0
            assert dt < 3.0, f"{type(e).__name__} after {dt:.2f}s"
            assert buf.stats()["samples"] == 0, "a sample that raised counted its rows in S"
        else:
            raise AssertionError(f"sample returned a row no one wrote: {batch}")
        buf.add(**one_row(1))
        t0 = time.monotonic()
        batch = buf.sample(4, timeout=2.0)
        assert time.monotonic() - t0 < 1.0
        assert batch["ident"].tolist() == [1, 1, 1, 1] and rows_ok(batch).all()


def test_queue_consumer_already_waiting_is_released_when_the_producer_dies(shm_name):
    ctx = multiprocessing.get_context("fork")
    with create(shm_name, 8, sampler=shmreplay.Queue()) as buf:
        writer = helpers.PausedWriter(ctx, shm_name, None, make_rows([100, 101, 102]), "copy").start()  # tickets 0..2
        res: dict[str, Any] = {}
        th = None
        try:
            buf.extend(make_rows([3, 4]))  # tickets 3, 4
            other = ReplayBuffer.attach(shm_name)

            def consumer() -> None:
                try:
                    b, i = other.sample(2, timeout=10.0, return_info=True)
                    res["rows"] = (b["ident"].tolist(), i["key"].tolist())
                except BaseException as e:  # noqa: BLE001
                    res["err"] = e
                res["t"] = time.monotonic()

            th = threading.Thread(target=consumer, daemon=True)
            th.start()
            time.sleep(0.4)
            assert not res, f"the consumer did not wait for the live producer's rows: {res}"
            t_kill = time.monotonic()
            writer.kill()
            th.join(8)
            assert "rows" in res, res
            assert res["rows"] == ([3, 4], [3, 4]), res["rows"]
            assert res["t"] - t_kill < 0.5, f"released {res['t'] - t_kill:.3f}s after the producer died"
            assert len(buf) == 0
        finally:
            writer.kill()
            if th is not None:
                th.join(15)
                other.close()


def test_shutdown_persists_after_every_handle_is_closed(shm_name):
    buf = create(shm_name, 8, limiter=shmreplay.MinSize(4))
    try:
        buf.extend(make_rows(range(2)))
        buf.shutdown()
        buf.close()
        again = ReplayBuffer.attach(shm_name)
        try:
            raises_now(shmreplay.ShutdownError, lambda: again.sample(1), "sample after reattach", 0.1)
            raises_now(shmreplay.ShutdownError, lambda: again.sample(1, timeout=0), "sample(timeout=0) after reattach", 0.1)
            again.extend(make_rows(range(2, 4)))  # need not wait
            assert again.sample(2, timeout=None)["ident"].shape == (2,)
            assert again.stats()["samples"] == 2
        finally:
            again.close()
    finally:
        try:
            shmreplay.remove(shm_name)
        except FileNotFoundError:
            pass


def _c_inherited(conn: Any, buf: ReplayBuffer) -> None:
    conn.send(("ready", time.monotonic()))
    t0 = time.monotonic()
    try:
        buf.sample(1, timeout=0.3)
        conn.send(("unexpected",))
    except TimeoutError:
        conn.send(("timed-out", time.monotonic() - t0))
    conn.send(("waiting", time.monotonic()))
    batch = buf.sample(2, timeout=10.0)
    conn.send(("ok", time.monotonic(), batch["ident"].tolist()))


def test_inherited_and_pickled_handles_wait_and_count_their_wait_time(shm_name, mp_ctx):
    with create(shm_name, 16, limiter=shmreplay.MinSize(3)) as buf:
        buf.extend(make_rows(range(2)))
        kid = Kid(mp_ctx, _c_inherited, buf)  # fork: inherited; spawn: pickled (re-attached)
        try:
            kid.recv(START_TIMEOUT, expect="ready")
            msg = kid.recv(5)
            assert msg[0] == "timed-out", msg
            assert 0.28 <= msg[1] < 1.0, msg
            w = buf.stats()["sample_wait_s"]
            assert w >= 0.28, f"sample_wait_s {w:.3f}s after a child's 0.3 s wait timed out"
            t_wait = kid.recv(5, expect="waiting")[1]
            assert kid.silent_for(0.3)
            t = time.monotonic()
            buf.add(**one_row(2))
            msg = kid.recv(5, expect="ok")
            assert msg[1] - t < LATENCY_CEILING, f"the child took {msg[1] - t:.3f}s to see the insert"
            assert set(msg[2]) <= {0, 1, 2}
            assert buf.stats()["samples"] == 2
            w2 = buf.stats()["sample_wait_s"]
            assert w2 - w >= (t - t_wait) - 0.05, f"sample_wait_s grew {w2 - w:.3f}s for a {msg[1] - t_wait:.3f}s wait"
        finally:
            kid.kill()


def test_concurrent_extends_that_lap_each_other_keep_the_limiter_exact(shm_name):
    """Two threads extending 3 rows at a time into a 4-slot ring: the rows of one may be
    overwritten by the other's before they are written. Every ticket still counts in I."""
    with create(shm_name, 4, limiter=STIR(1.0, 1, (-2000.0, 2000.0))) as buf:
        errors: list[str] = []
        start = threading.Barrier(2)

        def writer(base: int) -> None:
            h = ReplayBuffer.attach(shm_name)
            try:
                start.wait(10)
                for j in range(200):
                    h.extend(make_rows(base + np.arange(j * 3, j * 3 + 3)), timeout=5)
            except BaseException:  # noqa: BLE001
                errors.append(traceback.format_exc())
            finally:
                h.close()

        ths = [threading.Thread(target=writer, args=(b,)) for b in (0, 10_000)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(30)
        assert not errors, errors
        s = buf.stats()
        assert s["deletes"] == 1196, s
        # I = 1200 tickets: I*spi - S - n >= -2000  <=>  n <= 3200 with S = 0
        assert buf.can_sample(3200) and not buf.can_sample(3201), (
            f"the limiter does not count I = 1200 (stats: inserts {s['inserts']}, superseded {s['superseded']})"
        )


@pytest.mark.parametrize("timeout", [1e20, float("inf"), 10**12, 10**20], ids=["1e20", "inf", "int-1e12", "int-1e20"])
def test_huge_timeouts_wait_like_none(shm_name, timeout):
    with create(shm_name, 8, limiter=shmreplay.MinSize(2)) as buf:
        buf.add(**one_row(0))
        res: dict[str, Any] = {}

        def waiter() -> None:
            try:
                res["ident"] = buf.sample(2, timeout=timeout)["ident"].tolist()
            except BaseException as e:  # noqa: BLE001
                res["err"] = e

        th = threading.Thread(target=waiter, daemon=True)
        th.start()
        try:
            time.sleep(0.3)
            assert not res, f"timeout={timeout!r}: {res}"
            buf.add(**one_row(1))
            th.join(5)
            assert "ident" in res, f"timeout={timeout!r}: {res}"
        finally:
            if th.is_alive():
                buf.shutdown()
            th.join(10)


def test_can_sample_and_can_insert_refuse_bad_sizes(shm_name):
    with create(shm_name, 8, limiter=STIR(1.0, 1, (0.0, 10.0))) as buf:
        buf.extend(make_rows(range(3)))
        before = counters(buf)
        for bad in (-1, 1.5, "2", None):
            with pytest.raises((ValueError, TypeError)):
                buf.can_sample(bad)  # type: ignore[arg-type]
            with pytest.raises((ValueError, TypeError)):
                buf.can_insert(bad)  # type: ignore[arg-type]
        assert counters(buf) == before


def test_fork_while_a_thread_waits(shm_name):
    """A thread waits in sample(); the process forks a child that inserts through the inherited
    handle and exits. The waiting thread is released, and later waits still work."""
    with create(shm_name, 16, limiter=shmreplay.MinSize(3)) as buf:
        buf.add(**one_row(0))
        res: dict[str, Any] = {}

        def waiter(key: str, n: int) -> None:
            try:
                res[key] = buf.sample(n, timeout=10.0)["ident"].tolist()
            except BaseException as e:  # noqa: BLE001
                res[key] = e
            res[key + "_t"] = time.monotonic()

        th = threading.Thread(target=waiter, args=("a", 1), daemon=True)
        th.start()
        time.sleep(0.2)
        assert not res

        def child() -> int:
            buf.extend(make_rows(range(1, 3)))
            return len(buf)

        t = time.monotonic()
        assert helpers.run_forked(child, 30) == 3
        th.join(5)
        assert isinstance(res.get("a"), list), res
        assert res["a_t"] - t < 2.0
        # the buffer still works for waiters after the child is gone
        with create(shm_name + "-b", 16, limiter=shmreplay.MinSize(5)) as b2:
            b2.extend(make_rows(range(4)))
            th2 = threading.Thread(target=lambda: res.__setitem__("b", b2.sample(1, timeout=10.0)["ident"].tolist()), daemon=True)
            th2.start()
            time.sleep(0.2)
            assert "b" not in res
            t = time.monotonic()
            b2.add(**one_row(4))
            th2.join(5)
            assert "b" in res and time.monotonic() - t < 1.0
        assert buf.sample(2, timeout=0)["ident"].shape == (2,)


def test_one_insert_releases_every_waiting_sampler(shm_name, mp_ctx):
    with create(shm_name, 16, limiter=shmreplay.MinSize(1)) as buf:
        kids = [start_call(mp_ctx, shm_name, "sample", 1, None) for _ in range(3)]
        try:
            for k in kids:
                assert k.silent_for(0.2)
            t = time.monotonic()
            buf.add(**one_row(0))
            released = []
            for k in kids:
                msg = k.recv(5)
                assert msg[0] == "ok", msg
                released.append(msg[1] - t)
                assert released[-1] < LATENCY_CEILING, f"a waiter was released {released[-1]:.3f}s after the insert"
            # Woken by the insert, not found by a slice running out: the median of the three
            # waiters (one may be preempted).
            assert median(released) < 0.1, f"waiters released after {released}"
            assert buf.stats()["samples"] == 3
        finally:
            kill_all(kids)


def test_queue_one_extend_feeds_every_waiting_consumer(shm_name, mp_ctx):
    with create(shm_name, 16, sampler=shmreplay.Queue()) as buf:
        kids = [start_call(mp_ctx, shm_name, "sample", 2, None) for _ in range(3)]
        try:
            for k in kids:
                assert k.silent_for(0.2)
            t = time.monotonic()
            buf.extend(make_rows(range(6)))
            got, released = [], []
            for k in kids:
                msg = k.recv(5)
                assert msg[0] == "ok", msg
                released.append(msg[1] - t)
                assert released[-1] < LATENCY_CEILING, f"a consumer was released {released[-1]:.3f}s after the extend"
                assert msg[3]["key"][1] == msg[3]["key"][0] + 1
                got += msg[3]["ident"]
            assert sorted(got) == list(range(6))
            assert median(released) < 0.1, f"consumers released after {released}"
            assert len(buf) == 0
        finally:
            kill_all(kids)


def _c_loop(conn: Any, name: str, op: str, size: int, calls: int) -> None:
    buf = ReplayBuffer.attach(name)
    conn.send(("ready",))
    t0 = time.monotonic()
    for j in range(calls):
        if op == "sample":
            buf.sample(size, timeout=None)
        else:
            buf.extend(make_rows(np.arange(j * size, (j + 1) * size)), timeout=None)
    conn.send(("done", time.monotonic() - t0))
    buf.close()


def test_mixed_batch_sizes_within_the_window_never_deadlock(shm_name):
    """spi 1, window [0, 10]: a learner sampling 6 and an actor inserting 4 (6 + 4 <= 10)
    always leave one of them allowed, so both finish (timeout=None)."""
    ctx = multiprocessing.get_context("fork")
    with create(shm_name, 64, limiter=STIR(1.0, 1, (0.0, 10.0))) as buf:
        learner = Kid(ctx, _c_loop, shm_name, "sample", 6, 200, duplex=False)
        actor = Kid(ctx, _c_loop, shm_name, "extend", 4, 300, duplex=False)
        try:
            learner.recv(START_TIMEOUT, expect="ready")
            actor.recv(START_TIMEOUT, expect="ready")
            actor.recv(20, expect="done")
            learner.recv(20, expect="done")
        finally:
            kill_all([learner, actor])
        s = buf.stats()
        assert (s["inserts"], s["samples"]) == (1200, 1200), s
        assert s["insert_wait_s"] > 0 and s["sample_wait_s"] > 0, s


def _c_racer(conn: Any, name: str, role: str, seed: int, stop: Any, progress: Any, slot: int) -> None:
    """Calls with tiny timeouts; reports what every *successful* call did (and, as it goes, its
    count of timeouts in ``progress[slot]``)."""
    buf = ReplayBuffer.attach(name)
    rng = np.random.default_rng(seed)
    conn.send(("ready",))
    rows = 0
    keys: list[np.ndarray] = []
    timeouts = 0
    seq = 0
    deadline = time.monotonic() + 30
    while not stop.value and time.monotonic() < deadline:
        t = float(rng.choice([0.0, 0.0005, 0.001, 0.003]))
        try:
            if role == "sampler":
                n = int(rng.integers(1, 4))
                _, info = buf.sample(n, timeout=t, return_info=True)
                rows += n
                keys.append(info["key"].astype(np.int64))
            else:
                k = int(rng.integers(1, 4))
                buf.extend(make_rows(seed * 1_000_000 + np.arange(seq, seq + k)), timeout=t)
                seq += k
                rows += k
        except TimeoutError:
            timeouts += 1
            progress[slot] = timeouts
    conn.send(("done", rows, np.concatenate(keys) if keys else np.array([], np.int64), timeouts))
    buf.close()


@pytest.mark.parametrize("kind, cap", [("queue", 8), ("ratio", 64), ("ratio", 8)])
def test_timeouts_racing_with_wakes_never_half_succeed(shm_name, kind, cap):
    """Tiny timeouts racing with the other side: a call that timed out took nothing, one that
    returned took everything (counters equal the sums of the successes; queue rows once)."""
    ctx = multiprocessing.get_context("fork")
    kwargs = {"sampler": shmreplay.Queue()} if kind == "queue" else {"limiter": STIR(1.0, 1, (0.0, 6.0))}
    with create(shm_name, cap, **kwargs) as buf:
        stop = ctx.RawValue("i", 0)
        progress = ctx.RawArray("q", 4)
        kids = [Kid(ctx, _c_racer, shm_name, role, seed, stop, progress, slot, duplex=False)
                for slot, (role, seed) in enumerate((("sampler", 1), ("sampler", 2), ("inserter", 3), ("inserter", 4)))]
        try:
            for k in kids:
                k.recv(START_TIMEOUT, expect="ready")
            # race for 2 s, and on (a loaded machine runs fewer calls) until the race has produced
            # the timeouts asserted below; the children give up after 30 s
            t0 = time.monotonic()
            time.sleep(2.0)
            while sum(progress) <= 50 and time.monotonic() - t0 < 25.0:
                time.sleep(0.1)
            stop.value = 1
            res = [k.recv(20, expect="done") for k in kids]
        finally:
            stop.value = 1
            kill_all(kids)
        sampled = res[0][1] + res[1][1]
        inserted = res[2][1] + res[3][1]
        assert sum(r[3] for r in res) > 50, "the race never produced timeouts"
        s = buf.stats()
        # stats()["inserts"] counts committed rows. In a ring, a writer descheduled between taking
        # its ticket and claiming the slot may be lapped by the other writer (the samplers keep
        # the limiter open) and its row superseded, whatever the capacity; a queue never
        # overwrites an undelivered row. Nobody dies, so no row is lost.
        assert s["inserts"] + s["superseded"] + s["lost"] == inserted, f"stats {s} != successful inserts {inserted}"
        assert s["lost"] == 0, f"no writer died, yet rows were lost: {s}"
        if kind == "queue":
            assert s["inserts"] == inserted, f"stats inserts {s['inserts']} != successful inserts {inserted}"
        assert s["samples"] == sampled, f"stats samples {s['samples']} != successful samples {sampled}"
        if kind == "queue":
            keys = np.concatenate([res[0][2], res[1][2]])
            assert np.unique(keys).size == keys.size, "a row was delivered twice"
            assert len(buf) == inserted - sampled
            if len(buf):
                keys = np.concatenate([keys, buf.sample(len(buf), timeout=0, return_info=True)[1]["key"].astype(np.int64)])
            assert sorted(keys.tolist()) == list(range(inserted)), "rows lost: a timed-out sample took rows"
        else:
            # the limiter counts every ticket: with I = inserted, S = sampled, window [0, 6]
            d = inserted - sampled
            assert 0 <= d <= 6, (inserted, sampled, s)
            if d >= 1:
                assert buf.can_sample(d), f"can_sample({d}) refused with I={inserted} S={sampled} ({s})"
            assert not buf.can_sample(d + 1), f"can_sample({d + 1}) allowed with I={inserted} S={sampled}"
            assert buf.can_insert(6 - d) if d < 6 else True, f"can_insert({6 - d}) refused ({s})"
            assert not buf.can_insert(7 - d), f"can_insert({7 - d}) allowed ({s})"


def test_closed_handles_refuse_flow_control_calls(shm_name):
    with create(shm_name, 8, limiter=shmreplay.MinSize(2)) as buf:
        other = ReplayBuffer.attach(shm_name)
        other.close()
        for what, fn in (
            ("can_sample", lambda: other.can_sample(1)),
            ("can_insert", lambda: other.can_insert(1)),
            ("sample", lambda: other.sample(1, timeout=0)),
            ("add", lambda: other.add(**one_row(0), timeout=0)),
            ("shutdown", lambda: other.shutdown()),
        ):
            raises_now(ValueError, fn, f"{what} on a closed handle")
        # the closed handle's shutdown did nothing
        buf.extend(make_rows(range(2)))
        assert buf.sample(1, timeout=0)["ident"].shape == (1,)
        buf.add(**one_row(2))
        peek = ReplayBuffer.inspect(shm_name)
        st = peek.stats if isinstance(getattr(peek, "stats", None), dict) else None
        if st is not None:
            assert st.get("limiter", {}).get("kind") == "MinSize"


def test_closing_a_handle_while_another_thread_waits_on_it_does_not_crash():
    """Runs in a forked child (a crash must not take pytest down): one thread waits in
    sample(timeout=None) on a handle, another closes that handle. The waiter must end (with
    an exception) or close must refuse; the process must not die."""
    name = f"fc-close-{os.getpid()}-{time.monotonic_ns()}"

    def body() -> dict:
        buf = create(name, 8, limiter=shmreplay.MinSize(2))
        waiter_handle = ReplayBuffer.attach(name)
        res: dict[str, Any] = {}

        def waiter() -> None:
            try:
                waiter_handle.sample(1, timeout=None)
                res["waiter"] = "returned"
            except BaseException as e:  # noqa: BLE001
                res["waiter"] = f"{type(e).__name__}: {e}"

        th = threading.Thread(target=waiter, daemon=True)
        th.start()
        time.sleep(0.3)
        try:
            waiter_handle.close()
            res["close"] = "ok"
        except BaseException as e:  # noqa: BLE001
            res["close"] = f"{type(e).__name__}: {e}"
        th.join(3)
        if th.is_alive():
            buf.extend(make_rows(range(2)))  # let it go if close waited for it
            th.join(3)
        res["alive"] = th.is_alive()
        # the buffer is unharmed
        buf.extend(make_rows(range(2, 4)))
        res["sample"] = buf.sample(2, timeout=1.0)["ident"].shape[0]
        buf.unlink()
        buf.close()
        return res

    try:
        res = helpers.run_forked(body, 30)
    finally:
        try:
            shmreplay.remove(name)
        except FileNotFoundError:
            pass
    assert not res["alive"], f"the waiter never ended after its handle was closed: {res}"
    assert res["sample"] == 2, res


def _c_benign_signal(conn: Any, name: str) -> None:
    got: list[float] = []
    signal.signal(signal.SIGUSR1, lambda *_: got.append(time.monotonic()))
    buf = ReplayBuffer.attach(name)
    conn.send(("ready", time.monotonic()))
    try:
        ident = buf.sample(2, timeout=None)["ident"].tolist()
        conn.send(("ok", time.monotonic(), ident, got))
    except BaseException as e:  # noqa: BLE001
        conn.send(("raised", time.monotonic(), describe(e), got))
    buf.close()


def test_a_signal_whose_handler_does_not_raise_does_not_end_the_wait(shm_name):
    ctx = multiprocessing.get_context("fork")
    with create(shm_name, 8, limiter=shmreplay.MinSize(2)) as buf:
        kid = Kid(ctx, _c_benign_signal, shm_name)
        try:
            kid.recv(START_TIMEOUT, expect="ready")
            assert kid.silent_for(0.3)
            t_sig = time.monotonic()
            os.kill(kid.pid, signal.SIGUSR1)
            assert kid.silent_for(0.4), f"a signal handled without an exception ended the wait: {kid.conn.recv()}"
            t_ext = time.monotonic()
            buf.extend(make_rows(range(2)))
            msg = kid.recv(5)
            assert msg[0] == "ok", msg
            # the handler ran during the wait (a slice after the signal), not only once the wait
            # ended; the 0.4 s of silence above is its margin for scheduling on a loaded machine
            assert msg[3] and t_sig <= msg[3][0] < t_ext, f"the handler ran {msg[3]} (signal at {t_sig}, extend at {t_ext})"
            assert buf.stats()["samples"] == 2
        finally:
            kid.kill()


BIG_BLOB = 1 << 18  # 256 KiB rows: consumers spend long enough copying to overlap and be killed


def test_queue_consumers_killed_while_copying_big_rows(shm_name):
    """Three consumers of 256 KiB rows (copies overlap), one SIGKILLed every ~0.25 s and
    replaced: no row twice, FIFO, the queue never stalls, and only rows a killed consumer had
    taken (one batch per kill, consecutive) are missing."""
    ctx = multiprocessing.get_context("fork")
    fields = {"pid": ((), np.int32), "seq": ((), np.int64), "blob": ((BIG_BLOB,), np.uint8)}
    max_n = 4
    with ReplayBuffer.create(shm_name, capacity=24, fields=fields, sampler=shmreplay.Queue()) as buf:
        stop, drain = ctx.RawValue("i", 0), ctx.RawValue("i", 0)
        committed = ctx.RawValue("q", 0)
        col = Collector()
        all_kids: list[Kid] = []
        kills = 0
        rng = np.random.default_rng()
        try:
            prod = Kid(ctx, _c_simple_producer, shm_name, stop, committed, BIG_BLOB, 4, duplex=False)
            all_kids.append(prod)
            prod.recv(START_TIMEOUT, expect="ready")
            cons = []
            for c in range(3):
                k = Kid(ctx, _c_q_consumer, shm_name, 80 + c, drain, max_n, duplex=False)
                all_kids.append(k)
                k.recv(START_TIMEOUT, expect="ready")
                col.add(k, f"c{c}")
                cons.append(k)
            for r in range(10):
                col.pump(float(rng.uniform(0.1, 0.4)))
                victim = cons.pop(int(rng.integers(0, len(cons))))
                victim.kill()
                col.forget(victim)
                kills += 1
                k = Kid(ctx, _c_q_consumer, shm_name, 90 + r, drain, max_n, duplex=False)
                all_kids.append(k)
                k.recv(START_TIMEOUT, expect="ready")
                col.add(k, f"c{3 + r}")
                cons.append(k)
            col.pump(0.3)
            stop.value = 1
            deadline = time.monotonic() + 15
            while not prod.conn.poll(0):
                col.pump(0.05)
                assert time.monotonic() < deadline, "the producer did not stop"
            total = prod.recv(1, expect="done")[1]
            drain.value = 1
            col.pump(30)
            assert len(col.done) == 3, f"consumers did not finish: {col.done}"
            while True:
                try:
                    b, i = buf.sample(1, timeout=1.0, return_info=True)
                except TimeoutError:
                    break
                col.batches.append(("parent", i["key"].astype(np.int64), b["pid"].astype(np.int64), b["seq"].astype(np.int64)))
        finally:
            stop.value = 1
            drain.value = 1
            kill_all(all_kids)
        assert sum(col.done.values()) == 0, "torn rows delivered"
        keys, pids, seqs = _check_delivery(col)
        assert np.all(np.diff(seqs) > 0), "rows delivered out of FIFO order"
        assert np.array_equal(keys, seqs), "keys are not the insert tickets (single producer)"
        missing = sorted(set(range(total)) - set(seqs.tolist()))
        runs: list[list[int]] = []
        for m in missing:
            if runs and runs[-1][1] == m - 1:
                runs[-1][1] = m
            else:
                runs.append([m, m])
        assert len(runs) <= kills and all(b - a + 1 <= max_n for a, b in runs), f"lost rows {runs} with {kills} kills"
        assert len(buf) == 0
        assert total > 50, total


# =======================================================================================
# Hostile segment contents
# =======================================================================================


def _slot_word_offset(buf: ReplayBuffer, index: int) -> int:
    """Byte offset of slot ``index``'s version word in the segment file (layout/mod.rs: the
    "slots" entry of the section directory; the word starts each slot)."""
    import struct

    with open(buf.path, "rb") as fh:
        header = fh.read(512)
    for i in range(8):
        tag, offset, length, _ = struct.unpack_from("<8sQQQ", header, 136 + 32 * i)
        if tag == b"slots\0\0\0":
            return offset + index * (length // buf.capacity)
    raise AssertionError("no slots section")


@pytest.mark.parametrize("forged", ["newer ticket", "no ticket"])
def test_a_damaged_slot_word_in_a_queue_is_skipped_not_waited_for(name_factory, forged: str) -> None:
    """A queue slot whose version word was overwritten (by a stray process of the same user)
    never hangs a consumer: a word naming a newer ticket while the head has not moved, or no
    ticket at all (not claimed by any live producer), makes its ticket skipped, and the rows
    around it are delivered in order."""
    import struct

    buf = create(name_factory(), 8, sampler=shmreplay.Queue())
    try:
        buf.extend(make_rows(range(3)))
        # ticket 1 lives in slot 1: (ticket + 1) << 12 is its committed word (protocol/slot.rs)
        word = ((1 + 8 * 5 + 1) << 12) if forged == "newer ticket" else 0b1110
        with open(buf.path, "r+b") as fh:
            fh.seek(_slot_word_offset(buf, 1))
            fh.write(struct.pack("<Q", word))
        started = time.monotonic()
        batch, info = buf.sample(2, timeout=5, return_info=True)
        assert time.monotonic() - started < 2
        assert batch["ident"].tolist() == [0, 2] and info["key"].tolist() == [0, 2]
        assert rows_ok(batch).all()
        assert len(buf) == 0 and buf.stats()["deletes"] == 3
        buf.extend(make_rows(range(3, 11)))
        # A word naming a future ticket keeps its slot until the ring gets there: the row of
        # ticket 9 (slot 1 again) is dropped as superseded, and skipped. A word naming none is
        # taken over by the next producer of the slot.
        expected = [t for t in range(3, 11) if forged == "no ticket" or t != 9]
        batch = buf.sample(len(expected), timeout=5)
        assert batch["ident"].tolist() == expected and rows_ok(batch).all()
        assert not buf.can_sample(1)
    finally:
        buf.close()
        buf.unlink()
