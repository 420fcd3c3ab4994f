"""What runs inside the measurement processes.

``job_entry`` is the target of every job process the orchestrator (run.py) starts: it makes
itself a process-group leader (so the orchestrator can end the job and everything it started
with one ``killpg`` of its own child's id), runs one job and sends back a dict.

Jobs:

* ``single``: one contender, one workload, one capacity, in one process: create, fill to
  capacity (untimed), then insert one row per call and batches of 64, then sample 32 and 256.
* ``concurrent``: the job process creates and fills the buffer, then ``writers`` writer
  processes and ``samplers`` sampler processes attach and run for a fixed time; samplers check
  every sampled row (``validate``) and count the torn ones.
* ``scale``: create and fill, then a fresh process attaches and times ``sample(256)``; it and a
  baseline process (same imports, no buffer) report their descriptors and mappings.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from typing import Any, Callable

import contenders
import sysinfo
from workloads import WORKLOADS, take_row

POOL_BATCHES = 4  # distinct prepared batches a writer cycles through
HARD_LIMIT_S = 600  # no child loop runs longer than this, whatever happens to its parent


def fd_maps() -> tuple[int, int]:
    """(open file descriptors, shared memory mappings) of this process.

    Only shared mappings count (segments, semaphores, memory-mapped files: what a buffer or a
    lock adds); private heap mappings come and go with malloc and would only add noise.
    """
    with open("/proc/self/maps") as f:
        shared = sum(1 for line in f if line.split(None, 2)[1][3] == "s")
    return len(os.listdir("/proc/self/fd")), shared


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_libc: Any = None


def prefault_shared() -> int:
    """Map every page of this process's large shared mappings now (``MADV_POPULATE_WRITE``).

    A process that attaches a segment otherwise takes a page fault per 4 KiB page it touches
    first; shmreplay pre-populates its own mapping on attach, so every contender gets the same
    before a timed phase. Returns the bytes populated (0 where the kernel cannot).
    """
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    total = 0
    with open("/proc/self/maps") as f:
        lines = f.read().splitlines()
    for line in lines:
        parts = line.split()
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if parts[1][3] == "s" and parts[1][1] == "w" and end - start >= 1 << 20:
            if _libc.madvise(start, end - start, _MADV_POPULATE_WRITE) == 0:
                total += end - start
    return total


def timed(fn: Callable[[], Any], seconds: float, finish: Callable[[], Any] | None = None) -> tuple[float, int]:
    """Calls per second of ``fn`` over about ``seconds`` (after one warm-up call)."""
    fn()
    if finish:
        finish()
    calls = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        fn()
        calls += 1
        if calls >= 3 and time.perf_counter() >= deadline:
            break
    if finish:
        finish()
    return calls / (time.perf_counter() - t0), calls


def measure(c: Any, op: str, batch_size: int, data: list, seconds: float) -> dict:
    """Rows/s of each variant of ``op``; the figure is the best countable variant for the
    limit, the only variant for everybody else."""
    variants = {}
    for name, fn in c.ops(op, batch_size, data).items():
        rate, calls = timed(fn, seconds, finish=c.flush if op != "sample" else None)
        variants[name] = {"rows_per_s": rate * batch_size, "calls": calls}
    counted = {k: v["rows_per_s"] for k, v in variants.items() if not k.startswith("info:")}
    best = max(counted, key=counted.__getitem__)
    out = {"rows_per_s": counted[best], "variant": best or None}
    if len(variants) > 1:
        out["variants"] = variants
    return out


# ---------------------------------------------------------------------------------------
# The job process
# ---------------------------------------------------------------------------------------


def job_entry(job: dict, conn: Any) -> None:
    os.setpgid(0, 0)
    mp.set_start_method("spawn", force=True)  # also for libraries that use the default context
    try:
        result = {"ok": True, **JOBS[job["kind"]](job)}
    except BaseException:  # noqa: BLE001 - every failure is reported, none stops the suite
        result = {"ok": False, "error": traceback.format_exc(limit=6)}
    if "shmreplay" in sys.modules:  # the copy kernels of the process that measured shmreplay
        result["shmreplay_kernels"] = sysinfo.kernels_info()
    conn.send(result)
    conn.close()


def single_job(job: dict) -> dict:
    wl, cap, seconds = WORKLOADS[job["workload"]], job["capacity"], job["seconds"]
    cls = contenders.load(job["contender"])
    fds0, maps0 = fd_maps()
    t = time.perf_counter()
    c = cls.create(wl, cap, job["prefix"], "solo")
    try:
        created = time.perf_counter() - t
        c.fill(cap)
        prefault_shared()
        filled = time.perf_counter() - t - created
        fds1, maps1 = fd_maps()
        batch = wl.pool(0, 1, 64, seq0=1000)[0]
        batches = [c.prepare(b) for b in wl.pool(0, POOL_BATCHES, 64)]
        rows = [c.prepare_row(take_row(batch, i)) for i in range(64)]
        scenarios = {
            "insert_b1": measure(c, "add", 1, rows, seconds),
            "insert_b64": measure(c, "extend", 64, batches, seconds),
        }
        c.start_sampling()
        for b in job["sample_batches"]:
            scenarios[f"sample_b{b}"] = measure(c, "sample", b, [], seconds)
        return {
            "scenarios": scenarios,
            "create_s": created,
            "fill_s": filled,
            "fds": fds1 - fds0,
            "maps": maps1 - maps0,
        }
    finally:
        c.close()


# ---- concurrent: writers and samplers in their own processes ----


def _report(q: Any, fn: Callable[[], dict]) -> None:
    try:
        q.put(("done", fn()))
    except BaseException:  # noqa: BLE001
        q.put(("err", traceback.format_exc(limit=6)))


def writer_main(key: str, handle: Any, wl_name: str, wid: int, batch_rows: int, start: Any, seconds: float, q: Any) -> None:
    def body() -> dict:
        wl = WORKLOADS[wl_name]
        c = contenders.load(key).attach(handle, "writer")
        pool = [c.prepare(b) for b in wl.pool(wid, POOL_BATCHES, batch_rows)]
        prefault_shared()
        q.put(("ready", wid))
        start.wait(HARD_LIMIT_S)
        rows = calls = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            n = c.extend(pool[calls % POOL_BATCHES])
            rows += batch_rows if n is None else n
            calls += 1
        elapsed = time.perf_counter() - t0
        c.close()
        return {"role": "writer", "rows": rows, "seconds": elapsed}

    _report(q, body)


def sampler_main(key: str, handle: Any, wl_name: str, sid: int, batch_size: int, validate: bool, start: Any, seconds: float, q: Any) -> None:
    def body() -> dict:
        wl = WORKLOADS[wl_name]
        c = contenders.load(key).attach(handle, "sampler")
        prefault_shared()
        q.put(("ready", sid))
        start.wait(HARD_LIMIT_S)
        rows = torn = 0
        first_torn = ""
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            got = c.sample(batch_size)
            rows += batch_size
            if validate:
                batch = c.to_numpy(got)
                bad = wl.bad_rows(batch)
                if bad.any():
                    torn += int(bad.sum())
                    if not first_torn:
                        i = int(bad.argmax())
                        first_torn = f"{ {f: batch[f][i].ravel()[:4].tolist() for f in batch} }"
        elapsed = time.perf_counter() - t0
        c.close()
        return {"role": "sampler", "rows": rows, "seconds": elapsed, "torn": torn, "first_torn": first_torn}

    _report(q, body)


def _collect(q: Any, procs: list, n: int, kind: str, timeout: float) -> list:
    """``n`` messages of ``kind`` from the children; raises on a child's error or a timeout."""
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        try:
            status, payload = q.get(timeout=0.5)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(got)}/{n} children reported {kind!r} within {timeout:.0f}s") from None
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a child process died (exit codes {dead})")
            continue
        if status == "err":
            raise RuntimeError(f"child failed:\n{payload}")
        if status == kind:
            got.append(payload)
    return got


def _end(procs: list) -> None:
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)


def _children_context(key: str) -> Any:
    """Start method for a job's children: a forkserver (the job's own) that has imported the
    contender once, so N children do not each pay its import (torch takes seconds)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["harness", contenders.module_name(key)])
    return ctx


def concurrent_job(job: dict) -> dict:
    key, wl, cap, seconds = job["contender"], WORKLOADS[job["workload"]], job["capacity"], job["seconds"]
    c = contenders.load(key).create(wl, cap, job["prefix"], "shared")
    ctx = _children_context(key)
    procs: list = []
    try:
        c.fill(cap)
        handle, q, start = c.handle(), ctx.Queue(), ctx.Event()
        for wid in range(job["writers"]):
            args = (key, handle, wl.name, wid, job["writer_batch"], start, seconds, q)
            procs.append(ctx.Process(target=writer_main, args=args, daemon=True))
        for sid in range(job["samplers"]):
            args = (key, handle, wl.name, sid, job["sample_batch"], job["validate"], start, seconds, q)
            procs.append(ctx.Process(target=sampler_main, args=args, daemon=True))
        for p in procs:
            p.start()
        _collect(q, procs, len(procs), "ready", timeout=300)
        start.set()
        results = _collect(q, procs, len(procs), "done", timeout=seconds + 120)
    finally:
        _end(procs)
        c.close()
    writers = [r for r in results if r["role"] == "writer"]
    samplers = [r for r in results if r["role"] == "sampler"]
    inserts = sum(r["rows"] / r["seconds"] for r in writers)
    sampled = sum(r["rows"] / r["seconds"] for r in samplers)
    return {
        "inserts_per_s": inserts,
        "sampled_per_s": sampled,
        "rows_per_s": inserts + sampled,
        "torn": sum(r.get("torn", 0) for r in samplers),
        "checked": sum(r["rows"] for r in samplers) if job["validate"] else 0,
        "first_torn": next((r["first_torn"] for r in samplers if r.get("first_torn")), ""),
        "processes": results,
    }


# ---- scale: descriptors, mappings and sample cost in an attached process ----


def probe_main(key: str, handle: Any, batch_size: int, seconds: float, q: Any) -> None:
    """With ``handle`` None: only the baseline counts of a process with the same imports."""

    def body() -> dict:
        cls = contenders.load(key)
        if handle is None:
            fds, maps = fd_maps()
            return {"fds": fds, "maps": maps}
        c = cls.attach(handle, "sampler")
        fds, maps = fd_maps()
        prefault_shared()
        rate, calls = timed(lambda: c.sample(batch_size), seconds)
        c.close()
        return {"fds": fds, "maps": maps, "rows_per_s": rate * batch_size, "calls": calls}

    _report(q, body)


def scale_job(job: dict) -> dict:
    key, wl, cap = job["contender"], WORKLOADS[job["workload"]], job["capacity"]
    c = contenders.load(key).create(wl, cap, job["prefix"], "shared")
    ctx = _children_context(key)
    out: dict = {}
    try:
        c.fill(cap)
        q = ctx.Queue()
        for name, handle in (("baseline", None), ("attached", c.handle())):
            p = ctx.Process(target=probe_main, args=(key, handle, job["sample_batch"], job["seconds"], q), daemon=True)
            p.start()
            try:
                out[name] = _collect(q, [p], 1, "done", timeout=job["seconds"] + 120)[0]
            finally:
                _end([p])
    finally:
        c.close()
    b = job["sample_batch"]
    return {
        "rows_per_s": out["attached"]["rows_per_s"],
        "sample_us": b / out["attached"]["rows_per_s"] * 1e6,
        "fds": out["attached"]["fds"] - out["baseline"]["fds"],
        "maps": out["attached"]["maps"] - out["baseline"]["maps"],
    }


JOBS = {"single": single_job, "concurrent": concurrent_job, "scale": scale_job}
