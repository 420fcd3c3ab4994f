"""How fast can this machine copy bytes at all? The ceiling under every throughput target that
is bound by copying rows (issues 11 and 14).

    .venv/bin/python benches/copy_ceiling.py              # 1 and 2 processes, 1 GiB arrays, 3 s each
    .venv/bin/python benches/copy_ceiling.py --size-mb 64 --seconds 2

One process, then two at once (this machine has two cores), each copies a private array of
``--size-mb`` into another with ``np.copyto`` (memcpy) for ``--seconds``; the figure is the bytes
copied per second, summed over the processes. Out-of-cache sizes (the default 1 GiB) are what a
replay buffer's rows see. Then it turns the two-process figure into the most rows per second any
shared-memory design could move, since each row must be copied at least:

* once for ``concurrent`` of ``benches/prioritized.py`` (a row is either inserted or sampled);
* twice for ``queue_atari`` of ``benches/flow.py`` (a producer copies it in, a consumer out);

and sets those next to what the targets ask, from the baselines in the results files of those
benches (``--prioritized``, ``--flow``; skipped if missing). Writes ``--json`` (default
benches/results/copy_ceiling.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import report  # noqa: E402
import sysinfo  # noqa: E402
from workloads import ATARI  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ATARI_ROW = ATARI.row_bytes


def copier(size: int, seconds: float, start: Any, out: Any) -> None:
    src = np.full(size, 0x5A, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault both in before the clock starts
    start.wait()
    copied, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        np.copyto(dst, src)
        copied += size
    out.put(copied / (time.perf_counter() - t0))


def measure(procs: int, size: int, seconds: float) -> list[float]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=copier, args=(size, seconds, start, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    try:
        return [out.get(timeout=seconds + 120) for _ in ps]
    finally:
        for p in ps:
            p.join(10)
            if p.is_alive():
                p.kill()


def baseline(path: str, pick: Any) -> float | None:
    try:
        with open(path) as f:
            return float(pick(json.load(f)))
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024, help="array size per process (default 1024)")
    ap.add_argument("--seconds", type=float, default=3.0, help="copying time per measurement (default 3)")
    ap.add_argument("--prioritized", default=os.path.join(HERE, "results", "prioritized.json"))
    ap.add_argument("--flow", default=os.path.join(HERE, "results", "flow.json"))
    ap.add_argument("--json", default=os.path.join(HERE, "results", "copy_ceiling.json"))
    args = ap.parse_args()
    size = args.size_mb << 20
    cpu = sysinfo.cpu_info()
    print(f"cpu: {sysinfo.describe_cpu(cpu)}; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    rates = {n: measure(n, size, args.seconds) for n in (1, 2)}
    for n, r in rates.items():
        print(f"{n} process(es) copying {args.size_mb} MiB arrays: {sum(r) / 1e9:.1f} GB/s in all "
              f"({', '.join(f'{x / 1e9:.1f}' for x in r)})")
    ceiling = sum(rates[2])
    cpprb = baseline(args.prioritized, lambda d: next(
        r["rows_per_s"] for r in d["medians"]["concurrent"] if r["contender"] == "cpprb" and r["learners"] == 1))
    mpq = baseline(args.flow, lambda d: next(
        r["delivered_per_s"] for r in d["medians"]["queue"] if r["figure"] == "queue_atari" and r["contender"] == "mp_queue"))
    checks = [
        ("prioritized concurrent, atari: >= 3x cpprb MPPrioritizedReplayBuffer", 1, 3.0, cpprb, args.prioritized),
        ("queue_atari: >= 10x multiprocessing.Queue", 2, 10.0, mpq, args.flow),
    ]
    targets = []
    print(f"\nrows/s that copying alone allows with two processes ({ceiling / 1e9:.1f} GB/s; atari row {ATARI_ROW:,} B):")
    for what, copies, factor, base, source in checks:
        most = ceiling / (copies * ATARI_ROW)
        entry: dict[str, Any] = {"target": what, "copies_per_row": copies, "ceiling_rows_per_s": most}
        if base is None:
            print(f"  {what}: at most {most:,.0f} rows/s ({copies} copies a row); no baseline in {source}")
        else:
            need = factor * base
            entry |= {"baseline_rows_per_s": base, "needed_rows_per_s": need, "ceiling_vs_baseline": most / base}
            print(f"  {what}: needs {need:,.0f} rows/s; copying alone allows {most:,.0f} "
                  f"({most / base:.2f}x the baseline of {base:,.0f} rows/s from {os.path.relpath(source)})")
        targets.append(entry)
    doc = {
        "suite": "copy ceiling", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu": cpu["model_name"], "cpu_info": cpu, "kernel": os.uname().release, "numpy": np.__version__,
                    "load_avg_end": os.getloadavg()},
        "config": {"size_mb": args.size_mb, "seconds": args.seconds},
        "gb_per_s": {str(n): [x / 1e9 for x in r] for n, r in rates.items()}, "targets": targets,
    }
    report.save(doc, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
