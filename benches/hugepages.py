"""Do huge pages make ``sample(256)`` cheaper on big buffers? (issue 10; ``huge_pages=True``)

    sudo .venv/bin/python benches/hugepages.py                  # mounts, measures, unmounts
    .venv/bin/python benches/hugepages.py --dir /mnt/huge       # an existing huge=always tmpfs
    sudo .venv/bin/python benches/hugepages.py --keep           # leave the mount in place

A script, not a test. With no ``--dir`` it mounts a tmpfs with ``huge=always`` (root needed)::

    mount -t tmpfs -o size=8G,huge=always tmpfs /mnt/shmreplay-huge

and unmounts it at the end (``--keep``: leave it). At 100k, 1M and 10M slots of the control
workload (workloads.CONTROL: obs/next_obs float32[17], action float32[6], reward float32, done
bool) it creates and fills a buffer with ``path=`` on that tmpfs, on the default /dev/shm, and on
/dev/shm with ``huge_pages=True`` (``MADV_COLLAPSE``: 2 MiB pages without root or a mount);
a *freshly started process* attaches it and times ``buf.sample(256)``, once into reused arrays
(``out=``) and once into fresh arrays, in alternating rounds (µs per call, median of the
rounds). For reference, the same process shape times the plain numpy gather of 256 packed
records (``np.take(records, idx, out=)``, the suite's limit, and ``records[idx]``) from private
memory with 4 KiB pages (``MADV_NOHUGEPAGE``) and with transparent huge pages
(``MADV_HUGEPAGE``), and from a file mapping on each of the two filesystems.

Each process reads ``/proc/self/smaps`` for the mapping it timed and reports how much of it was
mapped with 2 MiB pages (``ShmemPmdMapped`` for tmpfs files, ``AnonHugePages`` for private
memory); ``ShmemHugePages`` in /proc/meminfo is read before and after each buffer is filled.
``--repeat`` sweeps (default 3) give medians and the spread; the load average is printed, since
the numbers of a busy machine are noisy. Writes ``--json`` (default
benches/results/hugepages.json); ``benches/report.py FILE`` prints its table again.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import json
import mmap
import multiprocessing as mp
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import sysinfo  # noqa: E402
from workloads import CONTROL  # noqa: E402

DEFAULT_MOUNT = "/mnt/shmreplay-huge"
HUGE = 2 << 20
SMAPS_KEYS = ("Size", "Rss", "AnonHugePages", "ShmemPmdMapped", "FilePmdMapped")
MEMINFO_KEYS = ("AnonHugePages", "ShmemHugePages", "ShmemPmdMapped", "FileHugePages", "FilePmdMapped")
THP_FILES = ("enabled", "shmem_enabled", "defrag")

# (key, label, memory description template); {huge} and {shm} are the two directories
VARIANTS = [
    ("shmreplay:shm", "shmreplay", "/dev/shm"),
    ("shmreplay:shm+huge_pages", "shmreplay, huge_pages=True", "/dev/shm"),
    ("shmreplay:huge", "shmreplay", "huge tmpfs"),
    ("numpy:private4k", "numpy gather (limit)", "private, MADV_NOHUGEPAGE"),
    ("numpy:privatethp", "numpy gather", "private, MADV_HUGEPAGE"),
    ("numpy:fileshm", "numpy gather", "/dev/shm file"),
    ("numpy:filehuge", "numpy gather", "huge tmpfs file"),
]
LABELS = {k: (a, b) for k, a, b in VARIANTS}


# ---------------------------------------------------------------------------------------
# /proc readers
# ---------------------------------------------------------------------------------------


def meminfo() -> dict[str, int]:
    """The huge-page lines of /proc/meminfo, in kB."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in MEMINFO_KEYS:
                out[key] = int(rest.split()[0])
    return out


def smaps(select: Callable[[int, int, str], bool]) -> dict[str, Any]:
    """Sums of :data:`SMAPS_KEYS` (kB) over this process's mappings that ``select(start, end,
    path)`` picks, with their ``KernelPageSize`` and ``THPeligible`` values."""
    tot: dict[str, Any] = {k: 0 for k in SMAPS_KEYS}
    tot.update(mappings=0, KernelPageSize=set(), THPeligible=set())
    on = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                start, end = (int(x, 16) for x in head[0].split("-"))
                on = select(start, end, head[5].strip() if len(head) > 5 else "")
                tot["mappings"] += on
                continue
            if not on:
                continue
            key, _, rest = line.partition(":")
            if key in SMAPS_KEYS:
                tot[key] += int(rest.split()[0])
            elif key in ("KernelPageSize", "THPeligible"):
                tot[key].add(rest.split()[0])
    tot["KernelPageSize"] = sorted(tot["KernelPageSize"])
    tot["THPeligible"] = sorted(tot["THPeligible"])
    return tot


def thp_settings() -> dict[str, str]:
    out = {}
    for name in THP_FILES:
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
                text = f.read().strip()
            out[name] = next((w[1:-1] for w in text.split() if w.startswith("[")), text)
        except OSError:
            out[name] = "unavailable"
    return out


def mount_of(path: str) -> dict[str, str] | None:
    """The /proc/mounts entry (fs type, options) of the filesystem holding ``path``."""
    path = os.path.realpath(path)
    best = None
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype, opts = line.split()[:4]
            mnt = mnt.replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and (best is None or len(mnt) >= len(best["mountpoint"])):
                best = {"mountpoint": mnt, "fstype": fstype, "options": opts}
    return best


def huge_option(mount: dict | None) -> str:
    if not mount or mount["fstype"] != "tmpfs":
        return "not tmpfs"
    return next((o.split("=", 1)[1] for o in mount["options"].split(",") if o.startswith("huge=")), "never (default)")


# ---------------------------------------------------------------------------------------
# Measuring (in a fresh process each time)
# ---------------------------------------------------------------------------------------


def per_call_us(fn: Callable[[], Any], seconds: float) -> float:
    calls = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        fn()
        calls += 1
        if calls >= 20 and time.perf_counter() >= deadline:
            return (time.perf_counter() - t0) / calls * 1e6


def rounds_of(fns: dict[str, Callable[[], Any]], rounds: int, seconds: float) -> dict[str, dict]:
    """Alternating timed rounds of each function: their medians and every round (µs/call)."""
    for fn in fns.values():  # warm-up: caches, allocator, lazily bound code
        for _ in range(20):
            fn()
    got: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for k in order:
            got[k].append(per_call_us(fns[k], seconds))
    return {k: {"us": statistics.median(v), "rounds": v} for k, v in got.items()}


def record_dtype() -> np.dtype:
    """Packed records of the control fields (165 B): what the suite's limit gathers."""
    return np.dtype([(f, dt, shape) for f, (shape, dt) in CONTROL.fields.items()])


def probe_shmreplay(name: str, directory: str, batch: int, rounds: int, seconds: float) -> dict:
    """Attach (a fresh process) and time sample(batch) with out= and with fresh arrays."""
    import shmreplay

    buf = shmreplay.ReplayBuffer.attach(name, path=directory)
    try:
        out = buf.sample(batch)
        times = rounds_of({"out": lambda: buf.sample(batch, out=out), "fresh": lambda: buf.sample(batch)}, rounds, seconds)
        seg = os.path.realpath(buf.path)
        maps = smaps(lambda s, e, p: p == seg)
        return {"times": times, "smaps": maps, "meminfo": meminfo(), "record_bytes": buf.record_bytes,
                "segment_bytes": buf.nbytes, "kernels": sysinfo.kernels_info()}
    finally:
        buf.close()


def _gather(records: np.ndarray, batch: int, rounds: int, seconds: float) -> dict:
    cap = len(records)
    rng = np.random.default_rng()
    out = np.empty(batch, records.dtype)
    return rounds_of({
        "out": lambda: np.take(records, rng.integers(0, cap, batch), out=out, mode="clip"),
        "fresh": lambda: records[rng.integers(0, cap, batch)],
    }, rounds, seconds)


def probe_numpy_private(cap: int, huge: bool, batch: int, rounds: int, seconds: float) -> dict:
    """A private anonymous mapping, 2 MiB aligned, with MADV_HUGEPAGE or MADV_NOHUGEPAGE."""
    dt = record_dtype()
    nbytes = cap * dt.itemsize
    m = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    offset = -base % HUGE
    raw = np.frombuffer(m, np.uint8, count=nbytes, offset=offset)
    raw[:] = 0x5A  # touch every page now (the faults allocate the 4 KiB or 2 MiB pages)
    records = raw.view(dt)
    times = _gather(records, batch, rounds, seconds)
    lo, hi = base + offset, base + offset + nbytes
    maps = smaps(lambda s, e, p: s < hi and e > lo)
    return {"times": times, "smaps": maps, "meminfo": meminfo(), "record_bytes": dt.itemsize}


def probe_numpy_file(path: str, cap: int, batch: int, rounds: int, seconds: float) -> dict:
    """A shared mapping of a file (on /dev/shm or the huge tmpfs), prefaulted like shmreplay's."""
    dt = record_dtype()
    nbytes = cap * dt.itemsize
    fd = os.open(path, os.O_RDWR)
    try:
        m = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
    try:
        m.madvise(23, 0, nbytes)  # MADV_POPULATE_WRITE (Linux >= 5.14), as shmreplay on attach
    except OSError:
        pass
    records = np.frombuffer(m, dt, count=cap)
    times = _gather(records, batch, rounds, seconds)
    real = os.path.realpath(path)
    maps = smaps(lambda s, e, p: p == real)
    return {"times": times, "smaps": maps, "meminfo": meminfo(), "record_bytes": dt.itemsize}


def in_fresh_process(fn: Callable[..., dict], *args: Any) -> dict:
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(fn, *args).result(timeout=600)


# ---------------------------------------------------------------------------------------
# Buffers and files to measure (in this process)
# ---------------------------------------------------------------------------------------


def fill_buffer(buf: Any, cap: int) -> None:
    pool = CONTROL.pool(0, 4, min(cap, 1 << 16))
    n = i = 0
    while n < cap:
        b = pool[i % len(pool)]
        take = min(cap - n, len(b["done"]))
        buf.extend(b if take == len(b["done"]) else {k: v[:take] for k, v in b.items()})
        n += take
        i += 1


def measure_shmreplay(directory: str, cap: int, args: argparse.Namespace, huge_pages: bool = False) -> dict:
    import shmreplay

    before = meminfo()
    t0 = time.perf_counter()
    buf = shmreplay.ReplayBuffer.create(None, capacity=cap, fields=dict(CONTROL.fields), path=directory, huge_pages=huge_pages)
    created = time.perf_counter() - t0
    try:
        fill_buffer(buf, cap)
        after = meminfo()
        res = in_fresh_process(probe_shmreplay, buf.name, directory, args.batch, args.rounds, args.seconds)
        res["create_fill_s"] = time.perf_counter() - t0
        res["create_s"] = created
        res["ShmemHugePages_added_kb"] = after["ShmemHugePages"] - before["ShmemHugePages"]
        return res
    finally:
        buf.unlink()
        buf.close()


def measure_numpy_file(directory: str, cap: int, args: argparse.Namespace) -> dict:
    path = os.path.join(directory, f"shmreplay-hugepages-{os.getpid()}.records")
    nbytes = cap * record_dtype().itemsize
    before = meminfo()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
            with mmap.mmap(fd, nbytes) as m:
                np.frombuffer(m, np.uint8)[:] = 0x5A
        finally:
            os.close(fd)
        after = meminfo()
        res = in_fresh_process(probe_numpy_file, path, cap, args.batch, args.rounds, args.seconds)
        res["ShmemHugePages_added_kb"] = after["ShmemHugePages"] - before["ShmemHugePages"]
        return res
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def measure(key: str, cap: int, dirs: dict[str, str], args: argparse.Namespace) -> dict:
    if key == "shmreplay:shm":
        return measure_shmreplay(dirs["shm"], cap, args)
    if key == "shmreplay:shm+huge_pages":
        return measure_shmreplay(dirs["shm"], cap, args, huge_pages=True)
    if key == "shmreplay:huge":
        return measure_shmreplay(dirs["huge"], cap, args)
    if key == "numpy:private4k":
        return in_fresh_process(probe_numpy_private, cap, False, args.batch, args.rounds, args.seconds)
    if key == "numpy:privatethp":
        return in_fresh_process(probe_numpy_private, cap, True, args.batch, args.rounds, args.seconds)
    if key == "numpy:fileshm":
        return measure_numpy_file(dirs["shm"], cap, args)
    if key == "numpy:filehuge":
        return measure_numpy_file(dirs["huge"], cap, args)
    raise KeyError(key)


# ---------------------------------------------------------------------------------------
# Summary and table
# ---------------------------------------------------------------------------------------


def huge_kb(res: dict) -> int:
    s = res["smaps"]
    return s["ShmemPmdMapped"] + s["AnonHugePages"] + s["FilePmdMapped"]


def summarise(doc: dict) -> None:
    rows = []
    for cap in doc["config"]["caps"]:
        for key in doc["config"]["variants"]:
            runs = [r for r in doc["raw"] if r["capacity"] == cap and r["variant"] == key]
            ok = [r["result"] for r in runs if "error" not in r]
            if not runs:
                continue
            row: dict[str, Any] = {"capacity": cap, "variant": key, "repeats": len(ok), "errors": [r["error"] for r in runs if "error" in r]}
            for kind in ("out", "fresh"):
                xs = [r["times"][kind]["us"] for r in ok]
                row[f"{kind}_us"] = statistics.median(xs) if xs else None
                row[f"{kind}_us_all"] = xs
            if ok:
                last = ok[-1]["smaps"]
                row["mapping_mb"] = last["Size"] / 1024
                row["huge_mb"] = [huge_kb(r) / 1024 for r in ok]
                row["KernelPageSize"] = last["KernelPageSize"]
                row["THPeligible"] = last["THPeligible"]
                row["record_bytes"] = ok[-1]["record_bytes"]
                if "create_s" in ok[-1]:
                    row["create_s"] = statistics.median(r["create_s"] for r in ok)
                if "ShmemHugePages_added_kb" in ok[-1]:
                    row["ShmemHugePages_added_mb"] = [r["ShmemHugePages_added_kb"] / 1024 for r in ok]
            rows.append(row)
    doc["medians"] = rows


def _us(row: dict, kind: str) -> str:
    v, xs = row[f"{kind}_us"], row[f"{kind}_us_all"]
    if v is None:
        return "failed"
    return f"{v:.1f}" + (f" [{min(xs):.1f}-{max(xs):.1f}]" if len(xs) > 1 else "")


def _grid(headers: list[str], rows: list[list[str]], right_from: int = 2) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i >= right_from else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def table(doc: dict) -> str:
    cfg, mi = doc["config"], doc["machine"]
    out = [
        f"shmreplay huge pages: control rows ({CONTROL.row_bytes} B of data), sample({cfg['batch']}) in a freshly started process; "
        f"us per call, median of {cfg['rounds']} rounds of {cfg['seconds']:g} s, then median [min-max] of {cfg['repeat']} sweep(s)",
        f"cpu: {sysinfo.describe_cpu(mi['cpu_info'])}",
        f"copy kernels: {sysinfo.describe_kernels(mi['shmreplay_kernels'], mi['SHMREPLAY_COPY_KERNEL'])}",
        f"kernel {mi['kernel']}, {mi['cores_usable']} cores, {mi['memory_gb']} GB; THP " + ", ".join(f"{k}={v}" for k, v in mi["thp"].items()),
        f"huge tmpfs: {doc['dirs']['huge']} ({doc['mounts']['huge']['options'] if doc['mounts']['huge'] else '?'}); "
        f"/dev/shm: huge={huge_option(doc['mounts']['shm'])}",
        f"load average (1/5/15 min): {' '.join(f'{x:.2f}' for x in mi['load_avg_start'])} at start, "
        f"{' '.join(f'{x:.2f}' for x in mi.get('load_avg_end', [float('nan')] * 3))} at end",
        "",
    ]
    body = []
    by = {(r["capacity"], r["variant"]): r for r in doc["medians"]}
    for cap in cfg["caps"]:
        for key in cfg["variants"]:
            r = by.get((cap, key))
            if not r:
                continue
            what, mem = LABELS[key]
            if r["repeats"]:
                mapped = f"{min(r['huge_mb']):,.0f} of {r['mapping_mb']:,.0f} MiB"
                added = r.get("ShmemHugePages_added_mb")
                file_huge = f"{min(added):,.0f} MiB" if added is not None else "-"
            else:
                mapped = file_huge = "-"
            create = f"{r['create_s']:.2f}" if "create_s" in r else "-"
            body.append([f"{cap:,}", what, mem, f"{r.get('record_bytes', '?')} B", _us(r, "out"), _us(r, "fresh"), mapped, file_huge, create])
        body.append([""] * 9)
    if body:
        body.pop()
    out.append(_grid(["slots", "what", "memory", "record", "out= us/call", "fresh us/call", "2 MiB-mapped (smaps)", "ShmemHugePages +", "create s"], body, right_from=3))
    gains = []
    for cap in cfg["caps"]:
        for a, b, what in (("shmreplay:shm", "shmreplay:huge", "shmreplay"), ("shmreplay:shm", "shmreplay:shm+huge_pages", "shmreplay huge_pages=True"),
                           ("numpy:private4k", "numpy:privatethp", "numpy private"),
                           ("numpy:fileshm", "numpy:filehuge", "numpy file")):
            ra, rb = by.get((cap, a)), by.get((cap, b))
            if ra and rb and ra["out_us"] and rb["out_us"]:
                gains.append(f"{what} {cap:,}: {ra['out_us'] / rb['out_us']:.2f}x")
    if gains:
        out.append("\nhuge pages vs 4 KiB pages, out= (time with 4 KiB / time with 2 MiB): " + "; ".join(gains))
    errs = [f"{r['capacity']:,} {r['variant']}: {e.strip().splitlines()[-1]}" for r in doc["medians"] for e in r["errors"]]
    for e in errs:
        out.append(f"ERROR {e}")
    out.append("\ncommands:")
    for c in doc["commands"]:
        out.append(f"  {c}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="use this existing tmpfs (mounted with huge=always) instead of mounting one")
    ap.add_argument("--mount-point", default=DEFAULT_MOUNT, help=f"where to mount the huge tmpfs (default {DEFAULT_MOUNT})")
    ap.add_argument("--size", default="8G", help="size= of the mounted tmpfs (default 8G)")
    ap.add_argument("--keep", action="store_true", help="leave the mounted tmpfs in place at the end")
    ap.add_argument("--shm-dir", default="/dev/shm", help="the default-pages directory to compare with (default /dev/shm)")
    ap.add_argument("--caps", default="100000,1000000,10000000", help="comma-separated capacities (default 100000,1000000,10000000)")
    ap.add_argument("--variants", default=",".join(k for k, _, _ in VARIANTS), help=f"comma-separated, of: {','.join(k for k, _, _ in VARIANTS)}")
    ap.add_argument("--batch", type=int, default=256, help="sample batch size (default 256)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per figure in each process (default 5)")
    ap.add_argument("--seconds", type=float, default=0.2, help="length of one round (default 0.2)")
    ap.add_argument("--repeat", type=int, default=3, help="sweeps over everything; medians across them (default 3)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "hugepages.json"), help="results file (default benches/results/hugepages.json)")
    args = ap.parse_args()
    caps = [int(c.replace("_", "")) for c in args.caps.split(",")]
    variants = args.variants.split(",")
    if set(variants) - set(LABELS):
        ap.error(f"unknown variant(s) {sorted(set(variants) - set(LABELS))}")

    commands = [" ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), os.path.relpath(__file__), *sys.argv[1:]])]
    mounted = created_dir = False
    if args.dir:
        huge_dir = args.dir
        if huge_option(mount_of(huge_dir)) not in ("always", "within_size"):
            print(f"warning: {huge_dir} is not on a tmpfs mounted with huge=always (mount: {mount_of(huge_dir)})", flush=True)
    else:
        huge_dir = args.mount_point
        if os.path.ismount(huge_dir):
            ap.error(f"{huge_dir} is already a mount point: pass --dir {huge_dir} to use it, or unmount it")
        if not os.path.isdir(huge_dir):
            os.makedirs(huge_dir)
            created_dir = True
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={args.size},huge=always", "tmpfs", huge_dir]
        commands.insert(0, " ".join(cmd))
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            if created_dir:
                os.rmdir(huge_dir)
            print(f"could not mount ({' '.join(cmd)}): {r.stderr.strip()}\n"
                  "run as root, or mount a huge=always tmpfs yourself and pass --dir", file=sys.stderr)
            return 1
        mounted = True
    dirs = {"shm": args.shm_dir, "huge": huge_dir}

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    cpu = sysinfo.cpu_info()
    machine = {
        "cpu": cpu["model_name"], "cpu_info": cpu, "shmreplay_kernels": sysinfo.kernels_info(),
        "SHMREPLAY_COPY_KERNEL": sysinfo.copy_kernel_env(), "kernel": os.uname().release,
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "thp": thp_settings(), "numpy": np.__version__, "load_avg_start": os.getloadavg(),
    }
    doc: dict[str, Any] = {
        "suite": "shmreplay hugepages",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "config": {"caps": caps, "variants": variants, "batch": args.batch, "rounds": args.rounds,
                   "seconds": args.seconds, "repeat": args.repeat},
        "dirs": dirs,
        "mounts": {k: mount_of(d) for k, d in dirs.items()},
        "commands": commands,
        "raw": [],
    }
    print(f"cpu: {sysinfo.describe_cpu(cpu)}\nTHP: {machine['thp']}; huge tmpfs {huge_dir}: {doc['mounts']['huge']}", flush=True)
    t0 = time.monotonic()
    try:
        for rep in range(args.repeat):
            for cap in caps:
                shift = rep % len(variants)  # rotate who goes first
                for key in variants[shift:] + variants[:shift]:
                    entry: dict[str, Any] = {"repeat": rep, "capacity": cap, "variant": key}
                    try:
                        res = measure(key, cap, dirs, args)
                        entry["result"] = res
                        msg = f"out= {res['times']['out']['us']:7.1f} us, fresh {res['times']['fresh']['us']:7.1f} us, 2 MiB-mapped {huge_kb(res) / 1024:,.0f} of {res['smaps']['Size'] / 1024:,.0f} MiB"
                    except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
                        entry["error"] = f"{type(e).__name__}: {e}"
                        msg = "FAILED " + entry["error"]
                    doc["raw"].append(entry)
                    print(f"[{time.monotonic() - t0:6.1f} s] sweep {rep + 1} {cap:>10,} {key:<17} {msg}", flush=True)
    except KeyboardInterrupt:
        doc["interrupted"] = True
        print("interrupted: partial results", flush=True)
    finally:
        if mounted and not args.keep:
            cmd = ["umount", huge_dir]
            r = subprocess.run(cmd, capture_output=True, text=True)
            doc["commands"].append(" ".join(cmd))
            if r.returncode:
                print(f"WARNING: {' '.join(cmd)} failed: {r.stderr.strip()}", file=sys.stderr)
            elif created_dir:
                os.rmdir(huge_dir)
        elif mounted:
            doc["commands"].append(f"(kept) umount {huge_dir}")
    machine["load_avg_end"] = os.getloadavg()
    doc["duration_s"] = time.monotonic() - t0
    summarise(doc)
    print()
    print(table(doc))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json + ".tmp", "w") as f:
            json.dump(doc, f, indent=1, default=str)
        os.replace(args.json + ".tmp", args.json)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
