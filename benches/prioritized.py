"""Prioritized replay: shmreplay's ``Prioritized`` sampler against cpprb (and TorchRL).

    .venv/bin/python benches/prioritized.py              # every figure, 5 repetitions (~8 min on 2 cores)
    .venv/bin/python benches/prioritized.py --quick      # smoke run: small sizes, 1 repetition (< 1 min)
    .venv/bin/python benches/prioritized.py --only sample,update --reps 3
    .venv/bin/python benches/prioritized.py --only concurrent --seconds 5 --contenders shmreplay,cpprb

Figures (``--only`` takes their names or numbers, default all):

1. ``sample``: prioritized ``sample(32)`` and ``sample(256)`` (beta 0.4) from a full buffer of
   1M control rows with random priorities (alpha 0.6): shmreplay ``Prioritized``, cpprb
   ``PrioritizedReplayBuffer``, TorchRL ``PrioritizedReplayBuffer``; and shmreplay's uniform
   sampling of the same data (the cost of prioritizing).
2. ``update``: ``update_priorities`` of 256 sampled rows, same buffers.
3. ``concurrent``: atari, 20k slots: 2 writer processes (extend 64 rows with priorities) and 1
   learner process (sample 32, check every row, update the 32 priorities) for ``--seconds``;
   shmreplay against cpprb ``MPPrioritizedReplayBuffer``, then shmreplay with 2 learners (cpprb's
   MP buffer allows one learner only).
4. ``scale``: prioritized ``sample(256)`` at 10M control slots against 100k, in a freshly
   attached process (skipped when /dev/shm or memory cannot hold 10M slots).

Every measurement runs in a fresh process group, contenders take turns (the order rotates from
repetition to repetition) and the report gives medians over ``--reps``. A contender whose package
is missing, or a shmreplay without ``shmreplay.Prioritized``, is skipped with a message. Prints
a table (CPU and copy kernels first, targets last) and writes ``prioritized[-quick].json`` to
``--out`` (default benches/results/). See benches/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import itertools
import multiprocessing as mp
import os
import shutil
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
import sysinfo  # noqa: E402
import run  # noqa: E402
from run import SHM_DIR  # noqa: E402
from workloads import PREFILL_WID, WORKLOADS, Batch, Workload  # noqa: E402

ALPHA = 0.6
BETA = 0.4
EPS = 1e-6
PRIO_DTYPE = np.float32  # priorities as a learner has them (|TD errors| from float32 tensors)
SEED = 12345
KEY_POOL = 16  # distinct key batches an update loop cycles through
# Priority arrays it pairs them with: one more than the key batches, so a key batch never gets
# the values it already holds (both libraries skip work for an unchanged value: repeating
# values would time that shortcut, not an update).
PRIO_POOL = KEY_POOL + 1
WRITER_BATCH = 64
LEARNER_BATCH = 32
SAMPLE_BATCHES = [32, 256]
UPDATE_BATCH = 256
SCALE_BATCH = 256

FIGURES = ["sample", "update", "concurrent", "scale"]  # --only: these names, or 1-4


def random_priorities(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` priorities uniform in (0, 1]."""
    return (1.0 - rng.random(n, dtype=np.float32)).astype(PRIO_DTYPE, copy=False)


# ---------------------------------------------------------------------------------------
# Contenders: one small adapter per library (libraries are imported only where they are used)
# ---------------------------------------------------------------------------------------


class Adapter:
    """A prioritized replay buffer under test.

    ``create`` in the owning process (``multiprocess``: the kind other processes can use),
    ``handle()`` goes to other processes as a ``Process`` argument, where ``attach(handle)``
    opens it. ``sampler(n)`` returns the zero-argument call that is timed (the library's own
    call, nothing around it); ``keys(got)`` is what ``updater()`` takes to update the sampled
    rows' priorities; ``rows(got)`` are the sampled rows as numpy arrays (for the torn-row check).
    """

    key = ""
    label = ""
    needs: tuple[str, ...] = ()
    attachable = False  # another process can attach it (scale: timed in a fresh process)
    multiprocess = False  # has a version that writer and learner processes share
    prioritized = True

    def __init__(self, wl: Workload, capacity: int, obj: Any) -> None:
        self.wl, self.capacity, self.obj = wl, capacity, obj

    @classmethod
    def create(cls, wl: Workload, capacity: int, prefix: str, multiprocess: bool) -> "Adapter":
        raise NotImplementedError

    def handle(self) -> Any:
        return (self.wl.name, self.capacity, self.obj)

    @classmethod
    def attach(cls, handle: Any) -> "Adapter":
        wl_name, capacity, obj = handle
        return cls(WORKLOADS[wl_name], capacity, obj)

    def prepare(self, batch: Batch) -> Any:
        return batch

    def prepare_prio(self, p: np.ndarray) -> Any:
        return p

    def extend(self, batch: Any, prio: Any) -> None:
        raise NotImplementedError

    def sampler(self, n: int) -> Callable[[], Any]:
        raise NotImplementedError

    def keys(self, got: Any) -> Any:
        raise NotImplementedError

    def copy_keys(self, keys: Any) -> Any:
        return np.array(keys, copy=True)

    def rows(self, got: Any) -> Batch:
        return got

    def updater(self) -> Callable[[Any, Any], Any] | None:
        return None

    def stats(self) -> dict | None:
        return None

    def close(self) -> None:
        self.obj = None


class ShmPrioritized(Adapter):
    """shmreplay ``ReplayBuffer`` with ``sampler=Prioritized(alpha, eps)``; samples into reused
    arrays (``out=``), as the suite does."""

    key = "shmreplay"
    label = "shmreplay Prioritized"
    needs = ("shmreplay",)
    attachable = True
    multiprocess = True

    @staticmethod
    def make(name: str, capacity: int, fields: dict) -> Any:
        import shmreplay

        sampler = shmreplay.Prioritized(alpha=ALPHA, eps=EPS)  # stratified (the default)
        return shmreplay.ReplayBuffer.create(name, capacity=capacity, fields=fields, sampler=sampler)

    @classmethod
    def create(cls, wl: Workload, capacity: int, prefix: str, multiprocess: bool) -> "Adapter":
        fields = {f: (shape, dtype) for f, (shape, dtype) in wl.fields.items()}
        return cls(wl, capacity, cls.make(f"{prefix}{uuid.uuid4().hex[:8]}", capacity, fields))

    def handle(self) -> Any:
        return (self.wl.name, self.capacity, self.obj.name)

    @classmethod
    def attach(cls, handle: Any) -> "Adapter":
        import shmreplay

        wl_name, capacity, name = handle
        return cls(WORKLOADS[wl_name], capacity, shmreplay.ReplayBuffer.attach(name))

    def extend(self, batch: Any, prio: Any) -> None:
        self.obj.extend(batch, priority=prio)

    def sampler(self, n: int) -> Callable[[], Any]:
        buf = self.obj
        out, _ = buf.sample(n, beta=BETA, return_info=True)
        return lambda: buf.sample(n, beta=BETA, return_info=True, out=out)

    def keys(self, got: Any) -> Any:
        return got[1]["key"]

    def rows(self, got: Any) -> Batch:
        return got[0]

    def updater(self) -> Callable[[Any, Any], Any] | None:
        return self.obj.update_priorities

    def stats(self) -> dict | None:
        return sysinfo._jsonable(dict(self.obj.stats()))

    def close(self) -> None:
        buf, self.obj = self.obj, None
        if buf is None:
            return
        try:
            if buf.is_owner:
                buf.unlink()
        except FileNotFoundError:
            pass
        finally:
            buf.close()


class ShmUniform(ShmPrioritized):
    """The same shmreplay buffer with the default (uniform) sampler: the reference for what
    prioritizing costs. Priorities given to ``extend`` are ignored."""

    key = "shmreplay_uniform"
    label = "shmreplay uniform (reference)"
    prioritized = False

    @staticmethod
    def make(name: str, capacity: int, fields: dict) -> Any:
        import shmreplay

        return shmreplay.ReplayBuffer.create(name, capacity=capacity, fields=fields)

    def extend(self, batch: Any, prio: Any) -> None:
        self.obj.extend(batch)

    def sampler(self, n: int) -> Callable[[], Any]:
        buf = self.obj
        out = buf.sample(n)
        return lambda: buf.sample(n, return_info=True, out=out)

    def updater(self) -> Callable[[Any, Any], Any] | None:
        return None


class Cpprb(Adapter):
    """cpprb ``PrioritizedReplayBuffer`` (one process) or ``MPPrioritizedReplayBuffer`` (shared
    ctypes; explorers add, a single learner samples and updates)."""

    key = "cpprb"
    label = "cpprb PrioritizedReplayBuffer"
    mp_label = "cpprb MPPrioritizedReplayBuffer"
    needs = ("cpprb",)
    multiprocess = True

    @classmethod
    def create(cls, wl: Workload, capacity: int, prefix: str, multiprocess: bool) -> "Adapter":
        from cpprb import MPPrioritizedReplayBuffer, PrioritizedReplayBuffer

        env = {f: {"shape": shape or 1, "dtype": dtype} for f, (shape, dtype) in wl.fields.items()}
        if multiprocess:
            rb = MPPrioritizedReplayBuffer(capacity, env, alpha=ALPHA, eps=EPS, ctx=mp.get_context("spawn"))
        else:
            rb = PrioritizedReplayBuffer(capacity, env, alpha=ALPHA, eps=EPS)
        return cls(wl, capacity, rb)

    def extend(self, batch: Any, prio: Any) -> None:
        self.obj.add(**batch, priorities=prio)

    def sampler(self, n: int) -> Callable[[], Any]:
        rb = self.obj
        return lambda: rb.sample(n, beta=BETA)

    def keys(self, got: Any) -> Any:
        return got["indexes"]

    def rows(self, got: Any) -> Batch:
        n = len(got["indexes"])
        return {f: np.asarray(got[f]).reshape((n, *shape)) for f, (shape, _) in self.wl.fields.items()}

    def updater(self) -> Callable[[Any, Any], Any] | None:
        return self.obj.update_priorities


class TorchRL(Adapter):
    """TorchRL ``PrioritizedReplayBuffer(storage=LazyTensorStorage(capacity))`` of TensorDicts,
    one torch thread. Its sum tree lives in one process: single-process figures only."""

    key = "torchrl"
    label = "TorchRL PrioritizedReplayBuffer"
    needs = ("torch", "tensordict", "torchrl")

    @classmethod
    def create(cls, wl: Workload, capacity: int, prefix: str, multiprocess: bool) -> "Adapter":
        import torch
        from torchrl.data import LazyTensorStorage, PrioritizedReplayBuffer

        if multiprocess:
            raise NotImplementedError("TorchRL's PrioritizedSampler is not shared between processes")
        torch.set_num_threads(1)
        rb = PrioritizedReplayBuffer(alpha=ALPHA, beta=BETA, eps=EPS, storage=LazyTensorStorage(capacity))
        return cls(wl, capacity, rb)

    def prepare(self, batch: Batch) -> Any:
        import torch
        from tensordict import TensorDict

        n = len(batch["done"])
        return TensorDict({f: torch.from_numpy(np.ascontiguousarray(v)) for f, v in batch.items()}, batch_size=[n])

    def prepare_prio(self, p: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(np.ascontiguousarray(p))

    def extend(self, batch: Any, prio: Any) -> None:
        index = self.obj.extend(batch)
        self.obj.update_priority(index, prio)

    def sampler(self, n: int) -> Callable[[], Any]:
        rb = self.obj
        return lambda: rb.sample(n, return_info=True)

    def keys(self, got: Any) -> Any:
        return got[1]["index"]

    def copy_keys(self, keys: Any) -> Any:
        return keys.clone()

    def rows(self, got: Any) -> Batch:
        return {f: got[0][f].numpy() for f in self.wl.fields}

    def updater(self) -> Callable[[Any, Any], Any] | None:
        return self.obj.update_priority


ADAPTERS: dict[str, type[Adapter]] = {a.key: a for a in (ShmPrioritized, ShmUniform, Cpprb, TorchRL)}
ORDER = list(ADAPTERS)


def missing(key: str) -> str | None:
    """Why ``key`` cannot run here, or None (like ``contenders.missing``, plus shmreplay's API)."""
    for mod in ADAPTERS[key].needs:
        if importlib.util.find_spec(mod) is None:
            where = "build it with `make dev`" if mod == "shmreplay" else "see benches/requirements.txt"
            return f"not installed (no module {mod!r}; {where})"
    if key == "shmreplay":
        try:
            import shmreplay
        except Exception as e:  # noqa: BLE001 - e.g. being rebuilt right now
            return f"cannot be imported ({type(e).__name__}: {e})"
        if not hasattr(shmreplay, "Prioritized"):
            return "this shmreplay has no Prioritized sampler (shmreplay.Prioritized); prioritized figures not measured"
        if "sampler" not in inspect.signature(shmreplay.ReplayBuffer.create).parameters:
            return "ReplayBuffer.create takes no sampler= in this shmreplay; prioritized figures not measured"
    if key == "shmreplay_uniform":
        try:
            import shmreplay  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"cannot be imported ({type(e).__name__}: {e})"
    return None


def label(key: str, multiprocess: bool = False) -> str:
    a = ADAPTERS[key]
    return getattr(a, "mp_label", a.label) if multiprocess else a.label


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


def fill(a: Adapter, capacity: int, seed: int) -> None:
    """Untimed: ``capacity`` rows (whole batches of the workload's fill size), random priorities;
    the same rows and priorities for every contender."""
    wl = a.wl
    rows = min(wl.fill_batch, capacity)
    pool = [a.prepare(b) for b in wl.pool(PREFILL_WID, 4, rows)]
    rng = np.random.default_rng(seed)
    for k in range(-(-capacity // rows)):
        a.extend(pool[k % len(pool)], a.prepare_prio(random_priorities(rng, rows)))


def _figure(rate: float, calls: int, batch: int) -> dict:
    return {"rows_per_s": rate * batch, "us_per_call": 1e6 / rate, "calls": calls}


def single_job(job: dict) -> dict:
    """Figures 1 and 2 in one process: create, fill, time sample(b) and update_priorities(256)."""
    A, wl, cap, window = ADAPTERS[job["contender"]], WORKLOADS[job["workload"]], job["capacity"], job["window"]
    t = time.perf_counter()
    a = A.create(wl, cap, job["prefix"], multiprocess=False)
    try:
        created = time.perf_counter() - t
        fill(a, cap, SEED)
        harness.prefault_shared()
        filled = time.perf_counter() - t - created
        figs: dict[str, dict] = {}
        extra: dict[str, Any] = {}
        for b in job["sample_batches"]:
            fn = a.sampler(b)
            if b == job["sample_batches"][0] and A.key.startswith("shmreplay"):
                extra["info_fields"] = sorted(fn()[1])  # what sample(return_info=True) returns
            figs[f"sample_b{b}"] = _figure(*harness.timed(fn, window), b)
        upd = a.updater()
        b = job["update_batch"]
        if b and upd is not None:
            draw = a.sampler(b)
            rng = np.random.default_rng(SEED + 1)
            keys = [a.copy_keys(a.keys(draw())) for _ in range(KEY_POOL)]
            prios = [a.prepare_prio(random_priorities(rng, b)) for _ in range(PRIO_POOL)]
            applied = upd(keys[0], prios[0])
            extra["update_returned"] = applied if applied is None else int(applied)
            cycle = zip(itertools.cycle(keys), itertools.cycle(prios))
            figs[f"update_b{b}"] = _figure(*harness.timed(lambda: upd(*next(cycle)), window), b)
        return {"figures": figs, "create_s": created, "fill_s": filled, "stats": a.stats(), **extra}
    finally:
        a.close()


# ---- figure 3: writers and learners in their own processes ----


def writer_main(key: str, handle: Any, wid: int, batch_rows: int, start: Any, seconds: float, q: Any) -> None:
    def body() -> dict:
        a = ADAPTERS[key].attach(handle)
        pool = [a.prepare(b) for b in a.wl.pool(wid, harness.POOL_BATCHES, batch_rows)]
        rng = np.random.default_rng(SEED + 100 + wid)
        prios = [a.prepare_prio(random_priorities(rng, batch_rows)) for _ in pool]
        extend = a.extend
        harness.prefault_shared()
        q.put(("ready", wid))
        start.wait(harness.HARD_LIMIT_S)
        rows = calls = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            k = calls % harness.POOL_BATCHES
            extend(pool[k], prios[k])
            rows += batch_rows
            calls += 1
        elapsed = time.perf_counter() - t0
        a.close()
        return {"role": "writer", "rows": rows, "seconds": elapsed}

    harness._report(q, body)


def learner_main(key: str, handle: Any, lid: int, batch: int, start: Any, seconds: float, q: Any) -> None:
    """sample(batch), check every row (workloads.bad_rows), update the batch's priorities."""

    def body() -> dict:
        a = ADAPTERS[key].attach(handle)
        wl = a.wl
        sample, update = a.sampler(batch), a.updater()
        assert update is not None
        rng = np.random.default_rng(SEED + 200 + lid)
        prios = [a.prepare_prio(random_priorities(rng, batch)) for _ in range(PRIO_POOL)]
        harness.prefault_shared()
        q.put(("ready", 100 + lid))
        start.wait(harness.HARD_LIMIT_S)
        rows = torn = calls = 0
        applied: int | None = 0
        first_torn = ""
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            got = sample()
            batch_np = a.rows(got)
            bad = wl.bad_rows(batch_np)
            if bad.any():
                torn += int(bad.sum())
                if not first_torn:
                    i = int(bad.argmax())
                    first_torn = f"{ {f: batch_np[f][i].ravel()[:4].tolist() for f in batch_np} }"
            n = update(a.keys(got), prios[calls % PRIO_POOL])
            applied = None if n is None or applied is None else applied + int(n)
            rows += batch
            calls += 1
        elapsed = time.perf_counter() - t0
        a.close()
        return {"role": "learner", "rows": rows, "updates": rows, "applied": applied, "seconds": elapsed,
                "torn": torn, "first_torn": first_torn}

    harness._report(q, body)


def concurrent_job(job: dict) -> dict:
    key, wl, cap, seconds = job["contender"], WORKLOADS[job["workload"]], job["capacity"], job["seconds"]
    A = ADAPTERS[key]
    a = A.create(wl, cap, job["prefix"], multiprocess=True)
    ctx = mp.get_context("forkserver")  # the job's own, with the library imported once
    ctx.set_forkserver_preload(["harness", "workloads", "prioritized", *A.needs[:1]])
    procs: list = []
    stats = None
    try:
        fill(a, cap, SEED)
        handle, q, start = a.handle(), ctx.Queue(), ctx.Event()
        for wid in range(job["writers"]):
            procs.append(ctx.Process(target=writer_main, args=(key, handle, wid, job["writer_batch"], start, seconds, q), daemon=True))
        for lid in range(job["learners"]):
            procs.append(ctx.Process(target=learner_main, args=(key, handle, lid, job["learner_batch"], start, seconds, q), daemon=True))
        for p in procs:
            p.start()
        harness._collect(q, procs, len(procs), "ready", timeout=300)
        start.set()
        results = harness._collect(q, procs, len(procs), "done", timeout=seconds + 120)
        stats = a.stats()
    finally:
        harness._end(procs)
        a.close()
    writers = [r for r in results if r["role"] == "writer"]
    learners = [r for r in results if r["role"] == "learner"]
    inserts = sum(r["rows"] / r["seconds"] for r in writers)
    sampled = sum(r["rows"] / r["seconds"] for r in learners)
    applied = [r["applied"] for r in learners]
    return {
        "inserts_per_s": inserts,
        "sampled_per_s": sampled,
        "rows_per_s": inserts + sampled,
        "updates_per_s": sum(r["updates"] / r["seconds"] for r in learners),
        "applied_fraction": None if None in applied else sum(applied) / max(1, sum(r["updates"] for r in learners)),
        "torn": sum(r["torn"] for r in learners),
        "checked": sum(r["rows"] for r in learners),
        "first_torn": next((r["first_torn"] for r in learners if r["first_torn"]), ""),
        "stats": stats,
        "processes": results,
    }


# ---- figure 4: sample(256) cost against capacity ----


def probe_main(key: str, handle: Any, batch: int, window: float, q: Any) -> None:
    def body() -> dict:
        a = ADAPTERS[key].attach(handle)
        harness.prefault_shared()
        rate, calls = harness.timed(a.sampler(batch), window)
        a.close()
        return _figure(rate, calls, batch)

    harness._report(q, body)


def scale_job(job: dict) -> dict:
    """Create and fill; shmreplay is timed in a freshly attached process (as the suite's scale
    scenario), a library that cannot be attached in the process that filled it."""
    A, wl, cap, b, window = ADAPTERS[job["contender"]], WORKLOADS[job["workload"]], job["capacity"], job["batch"], job["window"]
    t = time.perf_counter()
    a = A.create(wl, cap, job["prefix"], multiprocess=False)
    try:
        fill(a, cap, SEED)
        filled = time.perf_counter() - t
        if A.attachable:
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            p = ctx.Process(target=probe_main, args=(A.key, a.handle(), b, window, q), daemon=True)
            p.start()
            try:
                res = harness._collect(q, [p], 1, "done", timeout=window + 120)[0]
            finally:
                harness._end([p])
            res["where"] = "fresh attached process"
        else:
            res = _figure(*harness.timed(a.sampler(b), window), b)
            res["where"] = "filling process"
        return {**res, "create_fill_s": filled, "stats": a.stats()}
    finally:
        a.close()


JOBS = {"single": single_job, "concurrent": concurrent_job, "scale": scale_job}


# ---------------------------------------------------------------------------------------
# The orchestrator
# ---------------------------------------------------------------------------------------


@dataclass
class Config:
    reps: int
    window: float  # timed window of each single-process figure
    single_cap: int
    conc_cap: int
    conc_seconds: float
    scale_caps: list[int]
    scale_window: float


MODES = {
    "full": Config(reps=5, window=0.5, single_cap=1_000_000, conc_cap=20_000, conc_seconds=10.0,
                   scale_caps=[100_000, 10_000_000], scale_window=1.0),
    "quick": Config(reps=1, window=0.15, single_cap=100_000, conc_cap=2_000, conc_seconds=2.0,
                    scale_caps=[10_000, 100_000], scale_window=0.2),
}

SINGLE_KEYS = ["shmreplay", "shmreplay_uniform", "cpprb", "torchrl"]
CONC_KEYS = ["shmreplay", "cpprb"]
SCALE_KEYS = ["shmreplay", "shmreplay_uniform", "cpprb"]
NOT_APPLICABLE = {
    ("cpprb", 2): "MPPrioritizedReplayBuffer allows a single learner (sample/update_priorities from one process)",
    ("torchrl", 1): "TorchRL's PrioritizedSampler (its sum tree) is not shared between processes",
    ("torchrl", 2): "TorchRL's PrioritizedSampler (its sum tree) is not shared between processes",
}


def mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def room_for(key: str, wl: Workload, cap: int) -> str | None:
    """Why a buffer of ``cap`` rows does not fit here (None: it does). Generous estimates:
    rows of data plus per-slot header and priority tree (shmreplay, in /dev/shm), rows plus
    segment trees (cpprb, private memory); both also need the memory itself."""
    need = cap * (wl.row_bytes + 64)
    avail = mem_available()
    if ADAPTERS[key].attachable:
        free = shutil.disk_usage(SHM_DIR).free
        if free < need:
            return f"{SHM_DIR} has {free / 1e9:.2f} GB free, {cap:,} {wl.name} slots need about {need / 1e9:.2f} GB"
    if avail < need + (512 << 20):
        return f"{avail / 1e9:.2f} GB of memory available, {cap:,} {wl.name} slots need about {need / 1e9:.2f} GB"
    return None


def job_groups(cfg: Config, keys: list[str], figs: set[str], notes: list[str]) -> list[tuple[str, list[dict]]]:
    groups: list[tuple[str, list[dict]]] = []

    def add(title: str, base: dict, among: list[str]) -> None:
        jobs = [dict(base, contender=k) for k in among if k in keys]
        if jobs:
            groups.append((title, jobs))

    if figs & {"sample", "update"}:
        base = dict(kind="single", workload="control", capacity=cfg.single_cap, window=cfg.window,
                    sample_batches=SAMPLE_BATCHES if "sample" in figs else [],
                    update_batch=UPDATE_BATCH if "update" in figs else 0)
        among = SINGLE_KEYS if "sample" in figs else [k for k in SINGLE_KEYS if ADAPTERS[k].prioritized]
        add(f"control {cfg.single_cap:,}", base, among)
    if "concurrent" in figs:
        for learners in (1, 2):
            base = dict(kind="concurrent", workload="atari", capacity=cfg.conc_cap, seconds=cfg.conc_seconds,
                        writers=2, learners=learners, writer_batch=WRITER_BATCH, learner_batch=LEARNER_BATCH)
            among = [k for k in CONC_KEYS if (k, learners) not in NOT_APPLICABLE]
            add(f"atari {cfg.conc_cap:,} 2W+{learners}L", base, among)
    if "scale" in figs:
        wl = WORKLOADS["control"]
        for cap in cfg.scale_caps:
            among = []
            for k in SCALE_KEYS:
                why = room_for(k, wl, cap) if k in keys else None
                if why:
                    notes.append(f"scale: {label(k)} at {cap:,} slots skipped: {why}")
                    print(f"skipping {label(k)} at {cap:,} control slots: {why}", flush=True)
                else:
                    among.append(k)
            base = dict(kind="scale", workload="control", capacity=cap, batch=SCALE_BATCH, window=cfg.scale_window)
            add(f"scale control {cap:,}", base, among)
    return groups


def job_timeout(job: dict) -> float:
    big = job["capacity"] * WORKLOADS[job["workload"]].row_bytes > 1e9
    return (300 if big else 150) + job.get("seconds", 0)


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
    single: dict[tuple, list] = defaultdict(list)
    conc: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    scale: dict[tuple, list] = defaultdict(list)
    errors = []
    for entry in doc["raw"]:
        job, res = entry["job"], entry["result"]
        k = job["contender"]
        if not res["ok"]:
            errors.append({"rep": entry["rep"], "kind": job["kind"], "capacity": job["capacity"], "contender": k,
                           "learners": job.get("learners"), "error": res["error"]})
            continue
        if job["kind"] == "single":
            for fig, r in res["figures"].items():
                single[(job["capacity"], fig, k)].append(r["rows_per_s"])
        elif job["kind"] == "concurrent":
            d = conc[(job["capacity"], job["learners"], k)]
            for f in ("inserts_per_s", "sampled_per_s", "rows_per_s", "updates_per_s", "applied_fraction", "torn", "checked"):
                d[f].append(res[f])
            if res["first_torn"]:
                d["first_torn"].append(res["first_torn"])
        else:
            scale[(k, job["capacity"])].append(res["us_per_call"])

    rows_single = []
    for (cap, fig, k), xs in single.items():
        med = _median(xs)
        b = int(fig.split("_b")[1])
        rows_single.append({"capacity": cap, "figure": fig, "contender": k, "reps": len(xs), "rows_per_s": med,
                            "us_per_call": 1e6 * b / med if med else None,
                            "vs_cpprb": _ratio(med, _median(single.get((cap, fig, "cpprb"), []))),
                            "all_rows_per_s": xs})
    rows_conc = []
    for (cap, learners, k), d in conc.items():
        total = _median(d["rows_per_s"]) or 0.0
        cp = conc.get((cap, 1, "cpprb"))
        cp_total = _median(cp["rows_per_s"]) if cp else None
        rows_conc.append({
            "capacity": cap, "learners": learners, "contender": k, "reps": len(d["rows_per_s"]),
            "inserts_per_s": _median(d["inserts_per_s"]), "sampled_per_s": _median(d["sampled_per_s"]),
            "rows_per_s": total, "gb_per_s": total * WORKLOADS["atari"].row_bytes / 1e9,
            "updates_per_s": _median(d["updates_per_s"]), "applied_fraction": _median(d["applied_fraction"]),
            "vs_cpprb_1_learner": _ratio(total, cp_total),
            "torn_rows": sum(d["torn"]), "checked_rows": sum(d["checked"]),
            "first_torn": d["first_torn"][0] if d["first_torn"] else "", "all_rows_per_s": d["rows_per_s"],
        })
    for (k, learners), why in NOT_APPLICABLE.items():
        if k in doc["contenders"] and rows_conc:
            rows_conc.append({"capacity": rows_conc[0]["capacity"], "learners": learners, "contender": k, "not_applicable": why})
    rows_scale = []
    for (k, cap), xs in sorted(scale.items()):
        smallest = min(c for (kk, c) in scale if kk == k)
        us = _median(xs)
        rows_scale.append({"contender": k, "capacity": cap, "reps": len(xs), "sample_us": us,
                           "cost_vs_smallest": _ratio(us, _median(scale[(k, smallest)])) if cap != smallest else None,
                           "all_sample_us": xs})
    doc["medians"] = {"single": rows_single, "concurrent": rows_conc, "scale": rows_scale}
    doc["errors"] = errors
    doc["targets"] = targets(doc)


def targets(doc: dict) -> list[dict]:
    """The prioritized-replay targets of the figures run, each with the measured value (None:
    not measured, e.g. shmreplay without ``Prioritized``, or a capacity that did not fit)."""
    m, cfg, out = doc["medians"], doc["config"], []
    figs = set(cfg["figures"])

    def add(name: str, value: Any, op: str, bound: float, unit: str = "x") -> None:
        ok = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append({"target": name, "value": value, "required_text": f"{op} {bound:g}{unit}", "pass": ok})

    single = {(r["capacity"], r["figure"], r["contender"]): r["rows_per_s"] for r in m["single"]}
    cap = cfg["single_cap"]
    get = lambda fig, k: single.get((cap, fig, k))  # noqa: E731
    if "sample" in figs:
        for b in SAMPLE_BATCHES:
            add(f"1. sample({b}), control {cap:,}: shmreplay / cpprb", _ratio(get(f"sample_b{b}", "shmreplay"), get(f"sample_b{b}", "cpprb")), ">=", 2.0)
        for b in SAMPLE_BATCHES:  # cost per call, prioritized over uniform = uniform rate / prioritized rate
            add(f"1. sample({b}), control {cap:,}: prioritized cost / uniform cost",
                _ratio(get(f"sample_b{b}", "shmreplay_uniform"), get(f"sample_b{b}", "shmreplay")), "<=", 1.5)
    if "update" in figs:
        fig = f"update_b{UPDATE_BATCH}"
        add(f"2. update_priorities({UPDATE_BATCH}), control {cap:,}: shmreplay / cpprb", _ratio(get(fig, "shmreplay"), get(fig, "cpprb")), ">=", 2.0)
    if "concurrent" in figs:
        conc = {(r["learners"], r["contender"]): r for r in m["concurrent"] if "not_applicable" not in r}
        one = conc.get((1, "shmreplay"))
        add(f"3. concurrent atari {cfg['conc_cap']:,}, 2 writers + 1 learner: aggregate shmreplay / cpprb MP",
            one and one["vs_cpprb_1_learner"], ">=", 3.0)
        for learners in (1, 2):
            r = conc.get((learners, "shmreplay"))
            checked = f" (of {r['checked_rows']:,} checked)" if r else ""
            out.append({"target": f"3. concurrent atari, {learners} learner(s): torn rows, shmreplay{checked}",
                        "value": r and r["torn_rows"], "required_text": "0", "pass": r and r["torn_rows"] == 0})
    if "scale" in figs:
        us = {r["capacity"]: r["sample_us"] for r in m["scale"] if r["contender"] == "shmreplay"}
        lo, hi = min(cfg["scale_caps"]), max(cfg["scale_caps"])
        add(f"4. prioritized sample({SCALE_BATCH}) cost at {hi:,} vs {lo:,} slots", _ratio(us.get(hi), us.get(lo)), "<=", 2.0)
    return out


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def _rate(x: float | None) -> str:
    return "-" if x is None else report._rate(x, "control")


def table(doc: dict) -> str:
    m, cfg = doc["medians"], doc["config"]
    out = [report.header(doc)]
    order = {k: i for i, k in enumerate(ORDER)}
    if m["single"]:
        caps = sorted({r["capacity"] for r in m["single"]})
        for cap in caps:
            rows: dict[str, dict[str, dict]] = {}
            for r in m["single"]:
                if r["capacity"] == cap:
                    rows.setdefault(r["contender"], {})[r["figure"]] = r
            figs = [f for f in [f"sample_b{b}" for b in SAMPLE_BATCHES] + [f"update_b{UPDATE_BATCH}"] if any(f in v for v in rows.values())]
            reps = max(r["reps"] for v in rows.values() for r in v.values())
            out.append(f"\nfigures 1-2: control, {cap:,} slots, full, random priorities (alpha {ALPHA}, beta {BETA}): "
                       f"rows/s, us per call, (ratio to cpprb); medians of {reps} repetition(s)")
            body = []
            for k in sorted(rows, key=lambda k: order[k]):
                cells = []
                for f in figs:
                    r = rows[k].get(f)
                    cells.append("-" if r is None else f"{_rate(r['rows_per_s'])} {_num(r['us_per_call'], '{:.1f}')} us {report._fmt_ratio(r['vs_cpprb'])}")
                body.append([label(k)] + cells)
            titles = {f"sample_b{b}": f"sample({b})" for b in SAMPLE_BATCHES} | {f"update_b{UPDATE_BATCH}": f"update_priorities({UPDATE_BATCH})"}
            out.append(report._grid(["contender"] + [titles[f] for f in figs], body))
    if m["concurrent"]:
        cap = m["concurrent"][0]["capacity"]
        out.append(f"\nfigure 3: concurrent atari, {cap:,} slots: 2 writer processes (extend {WRITER_BATCH} rows with priorities) + learner "
                   f"process(es) (sample {LEARNER_BATCH}, check every row, update {LEARNER_BATCH} priorities) for {cfg['conc_seconds']:g} s; "
                   "aggregate = inserted + sampled rows/s")
        body, na = [], []
        for r in sorted(m["concurrent"], key=lambda r: (r["learners"], order[r["contender"]])):
            name = label(r["contender"], multiprocess=True)
            if "not_applicable" in r:
                na.append(f"{name}, {r['learners']} learner(s): not applicable ({r['not_applicable']})")
                continue
            applied = r["applied_fraction"]
            body.append([name, str(r["learners"]), _num(r["inserts_per_s"]), _num(r["sampled_per_s"]), _num(r["rows_per_s"]),
                         f"{r['gb_per_s']:.2f}", report._fmt_ratio(r["vs_cpprb_1_learner"]), _num(r["updates_per_s"]),
                         "-" if applied is None else f"{applied:.1%}", f"{r['torn_rows']:,} / {r['checked_rows']:,}"])
        out.append(report._grid(["contender", "learners", "inserts/s", "sampled rows/s", "aggregate rows/s", "GB/s",
                                 "vs cpprb 1L", "updates/s", "updates applied", "torn / checked"], body))
        out.extend(na)
    if m["scale"]:
        out.append(f"\nfigure 4: sample({SCALE_BATCH}) cost against capacity (control); shmreplay timed in a freshly attached process")
        body = [[label(r["contender"]), f"{r['capacity']:,}", _num(r["sample_us"], "{:.1f}"), report._fmt_ratio(r["cost_vs_smallest"])]
                for r in sorted(m["scale"], key=lambda r: (order[r["contender"]], r["capacity"]))]
        out.append(report._grid(["contender", "capacity", "us/sample", "vs smallest"], body))
    if doc["targets"]:
        out.append("\ntargets (prioritized replay), shmreplay:")
        out.append(report.targets_grid(doc["targets"]))
    for k, why in doc["skipped"].items():
        out.append(f"\nskipped {label(k)}: {why}")
    for e in doc["errors"]:
        what = f"{e['kind']} {e['capacity']:,}" + (f" {e['learners']}L" if e.get("learners") else "")
        out.append(f"\nERROR repetition {e['rep'] + 1} {what} {e['contender']}: {e['error'].strip().splitlines()[-1]}")
    for r in m["concurrent"]:
        if r.get("torn_rows"):
            out.append(f"\ntorn rows with {label(r['contender'], True)}, {r['learners']} learner(s): {r['torn_rows']:,}; first: {r['first_torn']}")
    for n in doc["notes"]:
        out.append(f"\nnote: {n}")
    out.append(report.machine_footer(doc["machine"], "cpprb"))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, 1 repetition (< 1 min)")
    ap.add_argument("--only", help=f"comma-separated figures: {','.join(FIGURES)} or 1-{len(FIGURES)} (default: all)")
    ap.add_argument("--contenders", help=f"comma-separated: {','.join(ORDER)} (default: all installed)")
    ap.add_argument("--reps", type=int, help="repetitions (default: 5; quick 1)")
    ap.add_argument("--seconds", type=float, help="duration of each concurrent run (default: 10; quick 2)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory (default benches/results)")
    args = ap.parse_args()

    mode = "quick" if args.quick else "full"
    cfg = MODES[mode]
    if args.reps:
        cfg.reps = args.reps
    if args.seconds:
        cfg.conc_seconds = args.seconds
    figs = report.parse_figures(args.only, FIGURES, ap)
    wanted = args.contenders.split(",") if args.contenders else ORDER
    if set(wanted) - set(ORDER):
        ap.error(f"unknown contender(s) {sorted(set(wanted) - set(ORDER))}; choose from {','.join(ORDER)}")

    skipped: dict[str, str] = {}
    keys = []
    for k in ORDER:
        if k in wanted:
            why = missing(k)
            if why:
                skipped[k] = why
            else:
                keys.append(k)
    for k, why in skipped.items():
        print(f"skipping {label(k)}: {why}", flush=True)
    notes: list[str] = []
    if "torchrl" in keys and "concurrent" in figs:
        notes.append(f"{label('torchrl')} is not in figure 3: {NOT_APPLICABLE[('torchrl', 1)]}")

    prefix = f"shmprio-{os.getpid()}-{uuid.uuid4().hex[:4]}-"
    started = time.time()
    machine = report.machine_info()
    doc_mode = "prioritized" + ("-quick" if args.quick else "")
    print(report.header({"mode": doc_mode, "machine": machine}), flush=True)
    groups = job_groups(cfg, keys, figs, notes)
    n_jobs = sum(len(j) for _, j in groups)
    print(f"{mode}: figures {','.join(f for f in FIGURES if f in figs)}; {n_jobs} jobs per repetition, {cfg.reps} repetition(s); "
          f"files in {SHM_DIR} start with {prefix}", flush=True)
    raw = run.run_rounds(cfg.reps, groups, lambda job, rep: run_job(job, prefix), prefix, notes)

    machine["load_avg_end"] = os.getloadavg()
    doc = {
        "suite": "shmreplay prioritized replay benches",
        "mode": doc_mode,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": time.time() - started,
        "machine": machine,
        "config": asdict(cfg) | {"figures": [f for f in FIGURES if f in figs], "alpha": ALPHA, "beta": BETA, "eps": EPS,
                                 "priority_dtype": np.dtype(PRIO_DTYPE).name, "sample_batches": SAMPLE_BATCHES,
                                 "update_batch": UPDATE_BATCH, "writer_batch": WRITER_BATCH, "learner_batch": LEARNER_BATCH,
                                 "scale_batch": SCALE_BATCH},
        "contenders": {k: label(k) for k in keys},
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
    # must be pickled as prioritized.<name>, so the work is done by the module imported by name.
    import prioritized

    sys.exit(prioritized.main())
