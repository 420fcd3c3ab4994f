"""Where prioritized replay's time goes when memory is not the problem (issue 11's targets 1-2).

    .venv/bin/python benches/prioritized_floor.py            # about 1 minute
    .venv/bin/python benches/prioritized_floor.py --seconds 3 --reps 5

``benches/prioritized.py`` times shmreplay at 1M slots, where every draw is a cache miss. This
script asks what is left when nothing misses, in one process, each figure the median of
``--reps`` rounds of ``--seconds``:

1. ``sample(256, beta=0.4, return_info=True, out=)`` against the uniform sampler's
   ``sample(256, return_info=True, out=)`` at 10k control slots (2 MB of rows and a 4-level
   tree: everything stays in the caches) and at 1M: the ratio at 10k is the descent's and the
   weights' own cost, which no memory layout can take away.
2. ``update_priorities`` of 256 keys: keys never issued (refused before the tree: the fixed cost
   of a call: checks, fixed point, sort), the same 256 keys again and again with new priorities
   (every line the update touches stays in cache), and keys drawn from a pool of 64 samples
   (what ``prioritized.py`` times), next to cpprb's ``PrioritizedReplayBuffer.update_priorities``
   on the same pool when cpprb is installed.

Prints a table; writes ``--json`` (default benches/results/prioritized_floor.json).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
import uuid
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import report  # noqa: E402
import sysinfo  # noqa: E402
from workloads import CONTROL  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 256
KEY_POOL = 64


def timed(fn: Callable[[], Any], seconds: float, reps: int) -> float:
    """Median over ``reps`` rounds of µs per call."""
    fn()
    rounds = []
    for _ in range(reps):
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(50):
                fn()
            calls += 50
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(rounds)


def filled(capacity: int, prioritized: bool) -> Any:
    import shmreplay

    kw = {"sampler": shmreplay.Prioritized(alpha=0.6, eps=1e-6)} if prioritized else {}
    buf = shmreplay.ReplayBuffer.create(f"floor-{uuid.uuid4().hex[:8]}", capacity=capacity, fields=dict(CONTROL.fields), **kw)
    rng = np.random.default_rng(0)
    for start in range(0, capacity, 8192):
        n = min(8192, capacity - start)
        rows = CONTROL.make(np.zeros(n, np.int64), np.arange(start, start + n))
        if prioritized:
            buf.extend(rows, priority=rng.random(n) * 10)
        else:
            buf.extend(rows)
    return buf


def sampling(capacity: int, seconds: float, reps: int) -> dict:
    out = {}
    for kind in ("uniform", "prioritized"):
        buf = filled(capacity, kind == "prioritized")
        try:
            if kind == "prioritized":
                rows, _ = buf.sample(BATCH, beta=0.4, return_info=True)
                out[kind] = timed(lambda: buf.sample(BATCH, beta=0.4, return_info=True, out=rows), seconds, reps)
            else:
                rows = buf.sample(BATCH)
                out[kind] = timed(lambda: buf.sample(BATCH, return_info=True, out=rows), seconds, reps)
        finally:
            buf.unlink()
            buf.close()
    out["ratio"] = out["prioritized"] / out["uniform"]
    return out


def updating(capacity: int, seconds: float, reps: int) -> dict:
    rng = np.random.default_rng(1)
    prios = [rng.random(BATCH) * 10 for _ in range(7)]
    out: dict[str, Any] = {}
    buf = filled(capacity, True)
    try:
        pool = [buf.sample(BATCH, return_info=True)[1]["key"].copy() for _ in range(KEY_POOL)]
        never = [np.arange(capacity * 4, capacity * 4 + BATCH, dtype=np.uint64)]
        for name, keys in (("keys never issued", never), ("the same 256 keys", pool[:1]), ("keys from a pool of 64 samples", pool)):
            cycle = zip(itertools.cycle(keys), itertools.cycle(prios))
            out[name] = timed(lambda: buf.update_priorities(*next(cycle)), seconds, reps)
    finally:
        buf.unlink()
        buf.close()
    try:
        import cpprb
    except ImportError:
        return out
    rb = cpprb.PrioritizedReplayBuffer(capacity, {"obs": {"shape": 17}, "act": {"shape": 6}, "rew": {}, "done": {}}, alpha=0.6, eps=1e-6)
    for start in range(0, capacity, 8192):
        n = min(8192, capacity - start)
        rb.add(obs=np.zeros((n, 17), np.float32), act=np.zeros((n, 6), np.float32), rew=np.zeros(n), done=np.zeros(n),
               priorities=rng.random(n) * 10)
    indexes = [rb.sample(BATCH, beta=0.4)["indexes"].copy() for _ in range(KEY_POOL)]
    cycle = zip(itertools.cycle(indexes), itertools.cycle(prios))
    out["cpprb, indexes from a pool of 64 samples"] = timed(lambda: rb.update_priorities(*next(cycle)), seconds, reps)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1.0, help="per round (default 1)")
    ap.add_argument("--reps", type=int, default=3, help="rounds per figure (default 3)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "prioritized_floor.json"))
    args = ap.parse_args()
    cpu = sysinfo.cpu_info()
    load = os.getloadavg()
    print(f"cpu: {sysinfo.describe_cpu(cpu)}; load average {load[0]:.2f} at start", flush=True)
    sample = {cap: sampling(cap, args.seconds, args.reps) for cap in (10_000, 1_000_000)}
    update = updating(1_000_000, args.seconds, args.reps)
    print(f"\n1. sample({BATCH}), control rows, µs per call (median of {args.reps} rounds of {args.seconds:g} s)")
    print(f"{'slots':>10}  {'uniform':>8}  {'prioritized':>11}  {'ratio':>6}")
    for cap, r in sample.items():
        print(f"{cap:>10,}  {r['uniform']:8.1f}  {r['prioritized']:11.1f}  {r['ratio']:5.2f}x")
    print(f"\n2. update_priorities({BATCH}) at 1,000,000 slots, µs per call")
    for name, us in update.items():
        print(f"  {name:<42} {us:8.1f}")
    doc = {
        "suite": "prioritized floor", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu": cpu["model_name"], "cpu_info": cpu, "shmreplay_kernels": sysinfo.kernels_info(),
                    "kernel": os.uname().release, "numpy": np.__version__, "load_avg_start": load,
                    "load_avg_end": os.getloadavg()},
        "config": {"seconds": args.seconds, "reps": args.reps, "batch": BATCH},
        "sample_us": {str(k): v for k, v in sample.items()}, "update_us": update,
    }
    report.save(doc, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
