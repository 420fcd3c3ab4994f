"""The shmreplay benchmark suite: shmreplay against the memory-copy limit and its peers.

    .venv/bin/python benches/run.py            # full suite (< 15 min on 2 cores)
    .venv/bin/python benches/run.py --quick    # smoke run (< 2 min)
    .venv/bin/python benches/run.py --only shmreplay,numpy_lock --workloads control

Every measurement runs in a fresh process group (a job); contenders take turns within each
round, rounds repeat, and the report gives medians and ratios to the limit measured in the same
run. Prints a table and writes ``<mode>.json`` and ``<mode>.png`` to ``--out``
(default benches/results/). See benches/README.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
import uuid
from typing import Any, Callable
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import contenders  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402

SHM_DIR = "/dev/shm"
WORKLOAD_NAMES = ["atari", "control"]
SCENARIOS = ["single", "concurrent", "parallel", "scale"]


class BudgetSpent(Exception):
    pass


@dataclass
class Config:
    reps: int
    seconds: float  # timed window of each single-process figure
    single: list[tuple[str, int, list[str] | None]]  # (workload, capacity, contenders; None: all)
    concurrent: list[tuple[str, int]]
    conc_seconds: float
    parallel: list[tuple[str, int]]  # 2 writers only / 2 samplers only
    parallel_contenders: list[str]
    scale_caps: list[int]
    scale_contenders: list[str]
    budget_s: float  # no job starts after this, nor a round that would likely end past it
    skip_concurrent: list[str] = field(default_factory=list)  # too slow to start for this mode
    sample_batches: list[int] = field(default_factory=lambda: [32, 256])
    writer_batch: int = 64
    conc_sample_batch: dict[str, int] = field(default_factory=lambda: {"atari": 32, "control": 256})


# At the big capacities (5.65 GB Atari rings, 10M control slots) creating and filling a buffer
# dominates a job, so only these run there unless --all-capacities is given.
BIG = ["shmreplay", "limit", "numpy_lock"]

MODES = {
    "quick": Config(
        reps=1,
        seconds=0.25,
        single=[("atari", 20_000, None), ("control", 1_000_000, None)],
        concurrent=[("atari", 20_000)],
        conc_seconds=1.5,
        parallel=[],
        parallel_contenders=[],
        scale_caps=[100_000, 1_000_000],
        scale_contenders=["shmreplay"],
        budget_s=110,
        skip_concurrent=["torchrl"],  # three fresh torch processes take 20-40 s to start
    ),
    "full": Config(
        reps=3,
        seconds=0.3,
        single=[("atari", 20_000, None), ("atari", 100_000, BIG), ("control", 1_000_000, None), ("control", 10_000_000, BIG)],
        concurrent=[("atari", 20_000)],
        conc_seconds=2.5,
        parallel=[("atari", 20_000)],
        parallel_contenders=["limit", "shmreplay"],
        scale_caps=[100_000, 1_000_000, 10_000_000],
        scale_contenders=["shmreplay", "numpy_lock"],
        budget_s=840,
    ),
}


def job_groups(cfg: Config, keys: list[str], workloads: set[str], kinds: set[str]) -> list[tuple[str, list[dict]]]:
    """The jobs of one round, grouped so that contenders take turns on the same measurement."""
    groups = []

    def add(title: str, base: dict, among: list[str]) -> None:
        jobs = [dict(base, contender=k) for k in keys if k in among]
        if jobs:
            groups.append((title, jobs))

    if "single" in kinds:
        for wl, cap, among in cfg.single:
            if wl in workloads:
                base = dict(kind="single", scenario="single", workload=wl, capacity=cap, seconds=cfg.seconds, sample_batches=cfg.sample_batches)
                add(f"single {wl} {cap:,}", base, keys if among is None else among)
    conc = dict(kind="concurrent", seconds=cfg.conc_seconds, writer_batch=cfg.writer_batch)
    if "concurrent" in kinds:
        for wl, cap in cfg.concurrent:
            if wl in workloads:
                base = dict(conc, scenario="concurrent", workload=wl, capacity=cap, writers=2, samplers=1, sample_batch=cfg.conc_sample_batch[wl], validate=True)
                add(f"concurrent {wl} {cap:,}", base, [k for k in keys if k not in cfg.skip_concurrent])
    if "parallel" in kinds:
        for wl, cap in cfg.parallel:
            if wl in workloads:
                common = dict(conc, workload=wl, capacity=cap, validate=False, sample_batch=256)
                add(f"2 writers {wl}", dict(common, scenario="insert_b64_x2", writers=2, samplers=0), cfg.parallel_contenders)
                add(f"2 samplers {wl}", dict(common, scenario="sample_b256_x2", writers=0, samplers=2), cfg.parallel_contenders)
    if "scale" in kinds and "control" in workloads:
        for cap in cfg.scale_caps:
            base = dict(kind="scale", scenario="scale", workload="control", capacity=cap, seconds=cfg.seconds, sample_batch=256)
            add(f"scale control {cap:,}", base, cfg.scale_contenders)
    return groups


def job_timeout(job: dict) -> float:
    big = job["capacity"] * harness.WORKLOADS[job["workload"]].row_bytes > 2e9
    return (240 if big else 120) + (job["seconds"] if job["kind"] == "concurrent" else 0)


def cleanup(prefix: str) -> list[str]:
    """Removes whatever this run left in /dev/shm (segments, torchrl files); returns the names."""
    left = [n for n in os.listdir(SHM_DIR) if prefix in n]
    for name in left:
        path = os.path.join(SHM_DIR, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    return left


def run_rounds(
    reps: int,
    groups: list[tuple[str, list[dict]]],
    run: Callable[[dict, int], dict],
    prefix: str,
    notes: list[str],
) -> list[dict]:
    """Runs every job of ``groups`` (``[(title, jobs)]``) ``reps`` times through ``run(job,
    rep)``, the jobs of a group taking turns (who goes first rotates from repetition to
    repetition), printing a line per job. Ctrl-C keeps the partial results (and says so in
    ``notes``); what the jobs left under ``prefix`` is removed either way. Returns ``[{rep, job,
    result}]``."""
    raw: list[dict] = []
    t0 = time.monotonic()
    try:
        for rep in range(reps):
            for title, jobs in groups:
                shift = rep % len(jobs)
                for job in jobs[shift:] + jobs[:shift]:
                    res = run(job, rep)
                    raw.append({"rep": rep, "job": job, "result": res})
                    status = "ok" if res["ok"] else "FAILED: " + res["error"].strip().splitlines()[-1]
                    print(f"[{time.monotonic() - t0:6.1f} s] rep {rep + 1} {title:<26} {job['contender']:<17} "
                          f"{res['wall_s']:5.1f} s  {status}", flush=True)
    except KeyboardInterrupt:
        notes.append("interrupted (Ctrl-C): partial results")
        print("\ninterrupted: writing partial results", flush=True)
    finally:
        cleanup(prefix)
    return raw


def run_job(
    job: dict,
    prefix: str,
    entry: Callable[[dict, Any], None] = harness.job_entry,
    timeout: float | None = None,
) -> dict:
    """Runs one job (``entry(job, pipe end)``, by default the suite's) in a fresh process group
    for at most ``timeout`` seconds (default: ``job_timeout(job)``); always ends the group and
    removes its files."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=entry, args=(dict(job, prefix=prefix), send))
    t0 = time.monotonic()
    proc.start()
    send.close()
    timeout = job_timeout(job) if timeout is None else timeout
    try:
        if recv.poll(timeout):
            result = recv.recv()
        else:
            result = {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    except EOFError:
        proc.join(5)
        result = {"ok": False, "error": f"the job process died (exit code {proc.exitcode})"}
    finally:
        proc.join(10)
        try:
            if proc.pid is not None:  # never 0: that would be our own group
                os.killpg(proc.pid, signal.SIGKILL)  # the job's own group: its leftovers
        except (ProcessLookupError, PermissionError):
            pass
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        recv.close()
        leftovers = cleanup(prefix)
    result["wall_s"] = time.monotonic() - t0
    if leftovers:
        result["leftovers_removed"] = leftovers
    return result


def redo_report(path: str) -> int:
    with open(path) as f:
        doc = json.load(f)
    report.summarise(doc)
    report.write_json(doc, path)
    png = os.path.splitext(path)[0] + ".png"
    note = report.chart(doc, png)
    print(report.table(doc))
    print(f"\nrewrote {path}" + (f" and {png}" if not note else f" ({note})"))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small capacities, one round (< 2 min)")
    ap.add_argument("--only", help=f"comma-separated contenders (the limit is always measured): {','.join(contenders.ORDER)}")
    ap.add_argument("--workloads", help=f"comma-separated: {','.join(WORKLOAD_NAMES)} (default: both)")
    ap.add_argument("--scenarios", help=f"comma-separated: {','.join(SCENARIOS)} (default: all)")
    ap.add_argument("--reps", type=int, help="rounds (default: quick 1, full 3)")
    ap.add_argument("--all-capacities", action="store_true", help=f"every contender at every capacity (default at the big ones: {','.join(BIG)})")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory (default benches/results)")
    ap.add_argument("--report", metavar="JSON", help="measure nothing: redo the table, targets and chart of a results file")
    args = ap.parse_args()
    if args.report:
        return redo_report(args.report)

    mode = "quick" if args.quick else "full"
    cfg = MODES[mode]
    if args.reps:
        cfg.reps = args.reps
    if args.all_capacities:
        cfg.single = [(wl, cap, None) for wl, cap, _ in cfg.single]
    wanted = args.only.split(",") if args.only else contenders.ORDER
    unknown = set(wanted) - set(contenders.ORDER)
    if unknown:
        ap.error(f"unknown contender(s) {sorted(unknown)}; choose from {contenders.ORDER}")
    workloads = set(args.workloads.split(",")) if args.workloads else set(WORKLOAD_NAMES)
    kinds = set(args.scenarios.split(",")) if args.scenarios else set(SCENARIOS)
    for what, got, known in (("workload", workloads, WORKLOAD_NAMES), ("scenario", kinds, SCENARIOS)):
        if got - set(known):
            ap.error(f"unknown {what}(s) {sorted(got - set(known))}; choose from {','.join(known)}")

    skipped = {}
    keys = []
    for k in contenders.ORDER:
        if k in wanted or k == "limit":
            why = contenders.missing(k)
            if why:
                skipped[k] = why
            else:
                keys.append(k)
    for k, why in skipped.items():
        print(f"skipping {contenders.label(k)}: {why}", flush=True)
    notes = [f"{mode} mode: {contenders.label(k)} is not run in the concurrent scenario (slow to start); the full suite runs it"
             for k in cfg.skip_concurrent if k in keys and "concurrent" in kinds]

    prefix = f"shmbench-{os.getpid()}-{uuid.uuid4().hex[:4]}-"
    groups = job_groups(cfg, keys, workloads, kinds)
    n_jobs = sum(len(j) for _, j in groups)
    started = time.time()
    machine = report.machine_info()
    print(report.header({"mode": mode, "machine": machine}), flush=True)
    print(f"{mode} suite: {n_jobs} jobs per round, {cfg.reps} round(s); files in {SHM_DIR} start with {prefix}", flush=True)
    raw: list[dict] = []
    t0 = time.monotonic()
    last_round = 0.0
    try:
        for rep in range(cfg.reps):
            if rep and time.monotonic() - t0 + last_round > cfg.budget_s:
                notes.append(f"stopped after {rep} round(s): another would pass the {cfg.budget_s:.0f} s budget")
                print(notes[-1], flush=True)
                break
            r0 = time.monotonic()
            for title, jobs in groups:
                shift = rep % len(jobs)  # rotate who goes first in each round
                for job in jobs[shift:] + jobs[:shift]:
                    if time.monotonic() - t0 > cfg.budget_s:
                        raise BudgetSpent(f"time budget of {cfg.budget_s:.0f} s spent in round {rep + 1}: later jobs not run")
                    res = run_job(job, prefix)
                    raw.append({"rep": rep, "job": job, "result": res})
                    status = "ok" if res["ok"] else "FAILED: " + res["error"].strip().splitlines()[-1]
                    print(f"[{time.monotonic() - t0:6.1f} s] round {rep + 1} {title:<24} {job['contender']:<11} {res['wall_s']:5.1f} s  {status}", flush=True)
            last_round = time.monotonic() - r0
    except BudgetSpent as e:
        notes.append(str(e))
        print(notes[-1], flush=True)
    except KeyboardInterrupt:
        notes.append("interrupted (Ctrl-C): partial results")
        print("\ninterrupted: writing partial results", flush=True)
    finally:
        cleanup(prefix)

    machine["load_avg_end"] = os.getloadavg()
    doc = {
        "suite": "shmreplay benches",
        "mode": mode,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": time.time() - started,
        "machine": machine,
        "config": asdict(cfg),
        "contenders": {k: contenders.label(k) for k in keys},
        "skipped": skipped,
        "notes": notes,
        "raw": raw,
    }
    report.summarise(doc)
    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = os.path.join(args.out, f"{mode}.json"), os.path.join(args.out, f"{mode}.png")
    report.write_json(doc, json_path)
    chart_note = report.chart(doc, png_path)
    print(report.table(doc))
    print(f"\nwrote {json_path}" + (f" and {png_path}" if not chart_note else f" ({chart_note})"))
    print(f"total {doc['duration_s']:.0f} s")
    leftover = [n for n in os.listdir(SHM_DIR) if prefix in n]
    if leftover:
        print(f"WARNING: left in {SHM_DIR}: {leftover}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
