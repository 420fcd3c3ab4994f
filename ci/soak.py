#!/usr/bin/env python3
"""shmreplay soak: a bounded run of writers that are SIGKILLed and restarted, samplers that
check every row they read, and stale-segment garbage collection; then a full read-back of
the buffer and leak checks. Not a CI test: run it with ``ci/soak.sh --minutes 10``.

One supervisor process (this one) creates the main buffer and starts ``--writers`` writer
processes and ``--samplers`` sampler processes, each with a randomly chosen start method
(``fork`` or ``spawn``) and either the supervisor's own handle (inherited by fork, pickled by
spawn) or an ``attach`` by name. While the soak runs, the supervisor:

* SIGKILLs a random writer every 0.5-3 s and starts a replacement (a new *generation* of that
  writer). Most kills land wherever the writer happens to be; when the build has the hidden
  test hook ``shmreplay._core._test_extend_pausing`` (builds with the cargo feature
  ``test-hooks``, as ``make dev`` makes), about one kill in five is forced to land in the middle of
  a record copy (the writer is paused while it holds a slot busy);
* SIGKILLs a random sampler every 8-25 s and starts a replacement;
* every 3-8 s, starts one or two short-lived processes that each create a small side buffer
  (or are killed while creating a larger one), SIGKILLs them, calls ``shmreplay.gc(path)``
  and checks that every stale side buffer and ``.creating`` leftover is gone while the live
  main buffer is neither returned nor removed;
* watches progress: no insert for 30 s, a child that stops making progress for 30 s, or a
  child that dies on its own is a failure (reported, never waited on forever).

Every row is self-validating: all its fields derive from (writer id, generation, sequence
number), which the row itself carries, so a torn or mixed row is detected from the row alone.

At the end it stops every child, reads back every slot with ``buf[i]`` and validates each
row, checks ``stats()``, then overwrites the whole ring once from the supervisor and checks
that every slot a killed writer left busy was recovered (``recovered`` grew by exactly that
number) and that the ring holds exactly the new rows. Finally it unlinks the buffer and checks
for leaks: the supervisor's file descriptors and segment mappings (vs. before the soak), the
segment files it created, and child processes (zombies or still running).

Output: a human-readable summary and one line ``SOAK-RESULT {json}``. Exit code 0 iff ok,
1 on a failure, 130 when interrupted (Ctrl-C stops everything and removes the buffers).

Segments live in a private directory (default: a fresh ``/dev/shm/soak-shmreplay-*``
directory, removed at the end) so that ``gc`` only ever judges this soak's segments and
never those of other users of the machine; ``--path DIR`` overrides it.

The soak pins the build it tests: at start it copies the installed ``shmreplay`` package
(Python sources and the compiled extension) to a private directory and imports it from there,
in the supervisor and in every child, so that rebuilding the extension while the soak runs
(``make dev``) cannot mix two builds in one run. ``--no-snapshot`` turns that off.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import mmap
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from types import MappingProxyType
from typing import Any

import numpy as np


def _snapshot_package() -> str | None:
    """Copies the installed shmreplay package to a private directory placed first on
    ``sys.path`` (spawned children inherit it), without importing it; returns the directory."""
    import importlib.util

    spec = importlib.util.find_spec("shmreplay")
    if spec is None or not spec.submodule_search_locations:
        return None
    src = list(spec.submodule_search_locations)[0]
    snap = tempfile.mkdtemp(prefix="soak-shmreplay-pkg-")
    shutil.copytree(src, os.path.join(snap, "shmreplay"), ignore=shutil.ignore_patterns("__pycache__"))
    import atexit

    atexit.register(shutil.rmtree, snap, True)  # also after --help or an argument error
    sys.path.insert(0, snap)
    global SNAPSHOT_SOURCE
    SNAPSHOT_SOURCE = src
    return snap


SNAPSHOT: str | None = None
SNAPSHOT_SOURCE: str | None = None
if __name__ == "__main__" and "--no-snapshot" not in sys.argv[1:]:
    SNAPSHOT = _snapshot_package()

import shmreplay  # noqa: E402

# ---------------------------------------------------------------------------------------
# Self-validating rows: every field derives from (wid, gen, seq), carried by the row itself
# ---------------------------------------------------------------------------------------

FRAME = (4, 42, 42)  # 7,056 bytes: a multiple of 8
NWORDS = int(np.prod(FRAME)) // 8
FIELDS: dict[str, tuple[tuple[int, ...], Any]] = {
    "obs": (FRAME, np.uint8),
    "action": ((), np.int32),  # writer id
    "gen": ((), np.int32),  # writer generation (restart number of that writer id)
    "reward": ((), np.float32),
    "done": ((), np.bool_),
    "step": ((), np.int64),  # sequence number within (writer id, generation)
}
SIDE_FIELDS: dict[str, tuple[tuple[int, ...], Any]] = {"obs": (FRAME, np.uint8), "step": ((), np.int64)}

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)
_C_WID = _U64(0xD6E8FEB86659FD93)
_C_GEN = _U64(0xA0761D6478BD642F)
_WORD_SALT = np.arange(NWORDS, dtype=np.uint64) * _GOLDEN


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> _U64(30))) * _M1
        z = (z ^ (z >> _U64(27))) * _M2
        return z ^ (z >> _U64(31))


def _row_hash(wids: np.ndarray, gens: np.ndarray, seqs: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        base = _splitmix64(wids.astype(np.uint64) * _C_WID ^ gens.astype(np.uint64) * _C_GEN)
        return _splitmix64(base ^ seqs.astype(np.uint64))


def _frames(h: np.ndarray) -> np.ndarray:
    """(n, NWORDS) uint64 words of the frames of rows with hashes ``h``."""
    return h[:, None] ^ _WORD_SALT[None, :]


def _reward(seqs: np.ndarray, gens: np.ndarray) -> np.ndarray:
    return ((seqs % 1000) + (gens % 8) * 0.125).astype(np.float32)  # exact in float32


def _done(seqs: np.ndarray, gens: np.ndarray) -> np.ndarray:
    return (seqs + gens) % 7 == 0


def make_rows(wid: int, gen: int, start: int, n: int) -> dict[str, np.ndarray]:
    """Rows seq = start .. start+n-1 of writer ``wid``, generation ``gen`` (batch form)."""
    seqs = np.arange(start, start + n, dtype=np.int64)
    wids = np.full(n, wid, dtype=np.int64)
    gens = np.full(n, gen, dtype=np.int64)
    obs = _frames(_row_hash(wids, gens, seqs)).view(np.uint8).reshape((n, *FRAME))
    return {
        "obs": obs,
        "action": wids.astype(np.int32),
        "gen": gens.astype(np.int32),
        "reward": _reward(seqs, gens),
        "done": _done(seqs, gens),
        "step": seqs,
    }


def validate_rows(batch: dict[str, Any], max_wid: int) -> tuple[np.ndarray, str]:
    """(bad-row mask, description of the first bad row) of a batch of rows."""
    obs = np.ascontiguousarray(np.asarray(batch["obs"]))
    n = obs.shape[0]
    wids = np.asarray(batch["action"]).astype(np.int64).reshape(n)
    gens = np.asarray(batch["gen"]).astype(np.int64).reshape(n)
    seqs = np.asarray(batch["step"]).astype(np.int64).reshape(n)
    reward = np.asarray(batch["reward"]).reshape(n)
    done = np.asarray(batch["done"]).reshape(n)
    bad = (wids < 0) | (wids > max_wid) | (gens < 0) | (seqs < 0)
    sw, sg, ss = (np.where(bad, 0, a) for a in (wids, gens, seqs))
    got = obs.reshape(n, -1).view(np.uint64)
    frame_ok = np.all(got == _frames(_row_hash(sw, sg, ss)), axis=1)
    bad |= ~frame_ok
    bad |= reward != _reward(ss, sg)
    bad |= done != _done(ss, sg)
    if not bad.any():
        return bad, ""
    i = int(np.argmax(bad))
    desc = (
        f"{int(bad.sum())} bad row(s) of {n}; first: row {i}: wid={wids[i]} gen={gens[i]} seq={seqs[i]} "
        f"reward={reward[i]!r} done={done[i]!r} frame_ok={bool(frame_ok[i])}"
    )
    return bad, desc


def stack_rows(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


# ---------------------------------------------------------------------------------------
# Shared counters: one row of int64 per child process, in a file every child maps by path.
# A SIGKILLed child cannot corrupt them (aligned 8-byte stores) and its last values remain.
# ---------------------------------------------------------------------------------------

NCOL = 16
(PID, KIND, STARTED, PROGRESS, CALLS, TORN, BEAT, ORPHAN_READS, RESERVED, KEY_ERRORS,
 PAUSE_REQ, PAUSED, EXITED, ERRORS, CHECKED, SLOW_READS) = range(NCOL)
# Row 0 is global: column 0 is the stop flag.
STOP = 0
KIND_WRITER, KIND_SAMPLER, KIND_SIDE = 1, 2, 3


class Counters:
    def __init__(self, path: str, rows: int | None = None) -> None:
        if rows is not None:
            with open(path, "wb") as f:
                f.truncate(rows * NCOL * 8)
        fd = os.open(path, os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        self.a = np.frombuffer(self._mm, dtype=np.int64).reshape(-1, NCOL)
        self.rows = self.a.shape[0]

    def close(self) -> None:
        del self.a
        self._mm.close()


# ---------------------------------------------------------------------------------------
# Child processes (top level, so that spawn can pickle them by reference)
# ---------------------------------------------------------------------------------------


def _child(role: str, ctr_path: str, row: int, errdir: str, sup_pid: int, lifetime: float, *args: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ctr = Counters(ctr_path)
    c = ctr.a
    c[row, PID] = os.getpid()
    deadline = time.monotonic() + lifetime  # hard bound whatever happens to the supervisor

    def keep_going() -> bool:
        return c[0, STOP] == 0 and os.getppid() == sup_pid and time.monotonic() < deadline

    try:
        {"writer": _writer, "sampler": _sampler, "side": _side}[role](c, row, keep_going, errdir, *args)
        c[row, EXITED] = 1
    except BaseException:  # noqa: BLE001 - everything goes to the supervisor
        c[row, ERRORS] += 1
        with open(os.path.join(errdir, f"error-{row}.txt"), "a") as f:
            f.write(f"{role} pid {os.getpid()} (counter row {row}):\n{traceback.format_exc()}\n")
        os._exit(1)


def _open(buf: Any, name: str, path: str) -> Any:
    return buf if buf is not None else shmreplay.ReplayBuffer.attach(name, path=path)


def _writer(c: np.ndarray, row: int, keep_going: Any, errdir: str, buf: Any, name: str, path: str,
            wid: int, gen: int, seed: int) -> None:
    buf = _open(buf, name, path)
    rng = np.random.default_rng(seed)
    hook = getattr(shmreplay._core, "_test_extend_pausing", None)
    pausing = None if hook is None else (lambda columns, on_pause: hook(buf._raw, columns, on_pause, "copy"))
    order = list(buf.fields)
    c[row, BEAT] = time.monotonic_ns()  # before STARTED: the supervisor reads them in that order
    c[row, STARTED] = 1
    seq = 0
    while keep_going():
        if c[row, PAUSE_REQ] and pausing is not None:
            # Forced mid-copy kill: pause after half of the first row is copied, with the slot
            # still busy; the supervisor SIGKILLs us during the sleep.
            n = int(rng.integers(2, 64))
            rows = make_rows(wid, gen, seq, n)

            def on_pause(slot: int) -> None:
                c[row, PAUSED] = slot + 1
                time.sleep(60)

            pausing([np.ascontiguousarray(rows[f]) for f in order], on_pause)
            c[row, PAUSE_REQ] = 0  # not killed after all (supervisor gave up): carry on
            seq += n
        elif rng.random() < 0.3:
            rows = make_rows(wid, gen, seq, 1)
            if rng.random() < 0.5:
                buf.add(**{k: v[0] for k, v in rows.items()})  # numpy scalars and arrays
            else:  # Python scalars
                buf.add(obs=rows["obs"][0], action=wid, gen=gen, reward=float(rows["reward"][0]),
                        done=bool(rows["done"][0]), step=seq)
            seq += 1
        else:
            n = int(math.exp(rng.uniform(0.0, math.log(257.0))))  # 1..256, log-uniform
            rows = make_rows(wid, gen, seq, n)
            # a plain dict of arrays, or any other Mapping (the general path)
            buf.extend(rows if rng.random() < 0.7 else MappingProxyType(rows))
            seq += n
        c[row, PROGRESS] = seq
        c[row, CALLS] += 1
        c[row, BEAT] = time.monotonic_ns()
    buf.close()


def _record_bad(errdir: str, row: int, what: str, desc: str, batch: dict[str, np.ndarray], extra: dict) -> None:
    stem = os.path.join(errdir, f"torn-{row}-{time.monotonic_ns()}")
    with open(stem + ".txt", "w") as f:
        f.write(f"sampler pid {os.getpid()} (counter row {row}) {what}: {desc}\n")
        for k, v in extra.items():
            f.write(f"{k}: {v}\n")
    np.savez(stem + ".npz", **batch, **{f"info_{k}": np.asarray(v) for k, v in extra.items()})


def _sampler(c: np.ndarray, row: int, keep_going: Any, errdir: str, buf: Any, name: str, path: str,
             max_wid: int, seed: int) -> None:
    buf = _open(buf, name, path)
    rng = np.random.default_rng(seed)
    cap = buf.capacity
    c[row, BEAT] = time.monotonic_ns()  # before STARTED: the supervisor reads them in that order
    c[row, STARTED] = 1
    dumps = 0
    reuse = {f: np.empty((64, *shape), dtype) for f, (shape, dtype) in buf.fields.items()}
    while keep_going():
        if len(buf) == 0:
            time.sleep(0.01)
            c[row, BEAT] = time.monotonic_ns()
            continue
        use_out = rng.random() < 0.3
        bs = 64 if use_out else int(rng.integers(16, 129))
        try:
            batch, info = buf.sample(bs, return_info=True, out=reuse if use_out else None)
        except TimeoutError as e:  # no consistent row for 10 s: a hang-like failure
            c[row, ERRORS] += 1
            with open(os.path.join(errdir, f"error-{row}.txt"), "a") as f:
                f.write(f"sampler pid {os.getpid()}: sample({bs}) raised TimeoutError: {e}\n")
            continue
        bad, desc = validate_rows(batch, max_wid)
        keys_bad = int(np.count_nonzero(info["key"] % np.uint64(cap) != info["index"].astype(np.uint64)))
        nbad = int(bad.sum())
        if (nbad or keys_bad) and dumps < 5:
            dumps += 1
            _record_bad(errdir, row, f"sample({bs})", desc or "key/index mismatch", batch,
                        {"index": info["index"], "key": info["key"], "bad": bad})
        checked = bs
        # single-slot reads of random slots, possibly being written right now
        singles, where = [], []
        for i in rng.integers(0, cap, size=8).tolist():
            full = len(buf) == cap  # before the read: a slot of a full ring is never unwritten
            try:
                singles.append(buf[i])
                where.append(i)
            except IndexError:
                # "holds no record": on a full ring, only a slot whose writer died mid-copy
                if full:
                    c[row, ORPHAN_READS] += 1
            except TimeoutError as e:
                if "died" in str(e):
                    c[row, ORPHAN_READS] += 1  # builds before b3d4302 raised this for a dead writer
                else:
                    # busy for 5 s with its writer alive: the writer was descheduled mid-copy
                    # (or is being paused by the supervisor for a forced mid-copy kill)
                    c[row, SLOW_READS] += 1
        if singles:
            one = stack_rows(singles)
            sbad, sdesc = validate_rows(one, max_wid)
            if sbad.any():
                nbad += int(sbad.sum())
                if dumps < 5:
                    dumps += 1
                    _record_bad(errdir, row, "buf[i]", sdesc, one, {"slots": np.asarray(where), "bad": sbad})
            checked += len(singles)
        # report (plain int64 stores: a kill at any point leaves the last values)
        c[row, TORN] += nbad
        c[row, KEY_ERRORS] += keys_bad
        c[row, CHECKED] += checked
        c[row, CALLS] += 1
        c[row, BEAT] = time.monotonic_ns()
    buf.close()


def _side(c: np.ndarray, row: int, keep_going: Any, errdir: str, path: str, name: str, capacity: int) -> None:
    c[row, STARTED] = 1  # about to create: a kill from now on may land mid-create
    buf = shmreplay.ReplayBuffer.create(name, capacity=capacity, fields=SIDE_FIELDS, path=path)
    buf.extend({"obs": np.zeros((4, *FRAME), np.uint8), "step": np.arange(4)})
    c[row, PAUSED] = 1  # created: from now on it is a complete segment held by a live process
    while keep_going():
        time.sleep(0.05)
    buf.close()  # only reached if the supervisor vanished (never unlinks: it is stale then)


# ---------------------------------------------------------------------------------------
# Supervisor
# ---------------------------------------------------------------------------------------


class Failure(Exception):
    pass


class Stop(Exception):
    """SIGTERM/SIGHUP: stop like Ctrl-C."""


def _build_info() -> dict[str, Any]:
    """Which build is soaked: the extension's sha256 and the checkout's commit."""
    import hashlib
    import subprocess

    so = shmreplay._core.__file__ or ""
    with open(so, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    source = os.path.join(SNAPSHOT_SOURCE, os.path.basename(so)) if SNAPSHOT_SOURCE else so
    info: dict[str, Any] = {"extension": source, "sha256": digest, "snapshot": SNAPSHOT is not None}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=20)
        # uncommitted changes to what goes into the build (not tests, benches, docs)
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "crates/*/src", "crates/*/Cargo.toml",
                                "Cargo.toml", "Cargo.lock", "pyproject.toml", "python/shmreplay"],
                               capture_output=True, text=True, timeout=20)
        info["git_commit"] = head.stdout.strip() or None
        info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _mappings(markers: list[str]) -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if any(m in line for m in markers))


def _children_of(pid: int) -> list[tuple[int, str, str]]:
    """(pid, state, comm) of the processes whose parent is ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append((int(entry), fields[0], comm))
    return out


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("State:")), "?")
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read().strip()
        return f"state={state} wchan={wchan or '-'}"
    except OSError as e:
        return f"(no /proc entry: {e.strerror})"


class Child:
    def __init__(self, kind: str, idx: int, gen: int, row: int, proc: Any, method: str, handle: str) -> None:
        self.kind, self.idx, self.gen, self.row = kind, idx, gen, row
        self.proc, self.method, self.handle = proc, method, handle
        self.launched = time.monotonic()
        self.killed = False
        self.reported = False  # a failure about this child was reported already
        self.progress_at_last_kill = 0

    def __repr__(self) -> str:
        return f"{self.kind} {self.idx}/gen {self.gen} (pid {self.proc.pid}, {self.method}, {self.handle})"


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.sup_pid = os.getpid()
        self.prefix = f"soak{os.getpid()}-{os.urandom(3).hex()}"
        self.main_name = f"{self.prefix}-main"
        self.duration = args.minutes * 60.0
        self.ctx = {"fork": mp.get_context("fork"), "spawn": mp.get_context("spawn")}
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.children: list[Child] = []  # live (not yet reaped) children
        self.next_row = 1
        self.counts = dict(writers_started=0, writers_killed=0, samplers_started=0, samplers_killed=0,
                           forced_midcopy_kills=0, side_buffers_created=0, side_killed_mid_create=0,
                           side_buffers_gc_removed=0, creating_leftovers_removed=0, gc_rounds=0,
                           foreign_gc_removed=0, gc_live_removed=0, fork_started=0, spawn_started=0, kills_checked_progress=0)
        self.kill_progress_failures = 0
        self.final: dict[str, Any] = {}
        self.leaks: dict[str, int] = {}
        self.buf: Any = None
        self.ctr: Counters | None = None
        self.tmpdir: str | None = None
        self.own_dir = False
        self.dir = ""
        self.side_names: list[str] = []
        self.interrupted = False
        self.t0 = time.monotonic()
        self.run_seconds = 0.0
        self.sampler_totals_final = (0, 0)
        self.sampler_orphan_reads = 0
        self.sampler_slow_reads = 0
        self.run_started = 0.0
        self.tracker_pid: int | None = None
        self.build: dict[str, Any] = {}

    # ---- helpers ----

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f} s] {msg}", flush=True)

    def fail(self, msg: str) -> None:
        self.failures.append(msg)
        self.log(f"FAILURE: {msg}")

    def seg(self, name: str) -> str:
        return os.path.join(self.dir, "shmreplay." + name)

    def our_files(self, directory: str) -> list[str]:
        try:
            entries = os.listdir(directory)
        except FileNotFoundError:
            return []
        return sorted(e for e in entries if self.prefix in e)

    def stats(self) -> dict[str, int]:
        return dict(self.buf.stats())

    def start(self, kind: str, idx: int, gen: int, *args: Any, lifetime: float | None = None) -> Child:
        assert self.ctr is not None
        if self.next_row >= self.ctr.rows:
            raise Failure("out of counter rows (raise the table size)")
        row = self.next_row
        self.next_row += 1
        method = self.rng.choice(["fork", "spawn"])
        handle = "-"
        if kind in ("writer", "sampler"):
            # the supervisor's handle (inherited by fork, pickled/re-attached by spawn) or attach by name
            use_own = self.rng.random() < 0.5
            handle = ("inherited" if method == "fork" else "pickled") if use_own else "attach"
            args = (self.buf if use_own else None, *args)
        self.ctr.a[row, KIND] = {"writer": KIND_WRITER, "sampler": KIND_SAMPLER, "side": KIND_SIDE}[kind]
        life = lifetime if lifetime is not None else self.duration + 600
        proc = self.ctx[method].Process(
            target=_child, args=(kind, self.ctr_path, row, self.tmpdir, self.sup_pid, life, *args), daemon=False
        )
        proc.start()
        self.counts[f"{method}_started"] += 1
        child = Child(kind, idx, gen, row, proc, method, handle)
        self.children.append(child)
        return child

    def start_writer(self, wid: int, gen: int) -> Child:
        self.counts["writers_started"] += 1
        return self.start("writer", wid, gen, self.main_name, self.dir, wid, gen, self.rng.getrandbits(32))

    def start_sampler(self, sid: int, gen: int) -> Child:
        self.counts["samplers_started"] += 1
        return self.start("sampler", sid, gen, self.main_name, self.dir, self.args.writers - 1, self.rng.getrandbits(32))

    def kill(self, child: Child) -> None:
        child.killed = True
        try:
            os.kill(child.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.reap(child, timeout=20)

    def reap(self, child: Child, timeout: float) -> None:
        child.proc.join(timeout)
        if child.proc.exitcode is None:
            self.fail(f"{child} did not exit within {timeout:.0f} s of being killed/stopped: {_proc_state(child.proc.pid)}")
            return  # left in self.children: counted as a leak at the end
        child.proc.close()
        self.children.remove(child)

    def errors_of(self, child: Child) -> str:
        path = os.path.join(self.tmpdir or "", f"error-{child.row}.txt")
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return ("(no error report: it failed before its body ran, e.g. while unpickling its "
                    "arguments; its traceback is on stderr)")

    def c(self, child: Child, col: int) -> int:
        assert self.ctr is not None
        return int(self.ctr.a[child.row, col])

    # ---- phases ----

    def setup(self) -> None:
        args = self.args
        # The resource tracker (started by the first spawn) keeps a pipe open in this process:
        # start it first so that it is part of the baseline.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        self.tracker_pid = getattr(resource_tracker._resource_tracker, "_pid", None)
        if args.path:
            self.dir = os.path.abspath(args.path)
        else:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self.dir = tempfile.mkdtemp(prefix="soak-shmreplay-", dir=base)
            self.own_dir = True
        self.markers = [os.path.join(self.dir, "shmreplay."), os.path.join(self.dir, ".shmreplay."), self.prefix]
        self.build = _build_info()
        self.baseline = {"fds": _fd_count(), "mappings": _mappings(self.markers)}
        self.tmpdir = tempfile.mkdtemp(prefix=f"{self.prefix}-ctl-")
        self.ctr_path = os.path.join(self.tmpdir, "counters")
        self.ctr = Counters(self.ctr_path, rows=4000 + int(self.duration * 6))
        self.buf = shmreplay.ReplayBuffer.create(
            self.main_name, capacity=args.capacity, fields=FIELDS, path=self.dir
        )
        self.log(
            f"main buffer {self.main_name!r} in {self.dir}: {args.capacity:,} slots x "
            f"{self.buf.record_bytes:,} B = {self.buf.nbytes / 1e6:.1f} MB; "
            f"{args.writers} writer(s), {args.samplers} sampler(s), {args.minutes:g} min, seed {args.seed}"
        )
        self.has_gc = hasattr(shmreplay, "gc")
        self.has_pausing = hasattr(shmreplay._core, "_test_extend_pausing")
        if not self.has_gc:
            msg = "shmreplay.gc is missing from this build"
            if args.no_gc:
                self.notes.append(msg + " (--no-gc: gc rounds skipped)")
            else:
                self.fail(msg + " (pass --no-gc to soak without it)")
        if not self.has_pausing:
            self.notes.append("the build has no test-hooks feature: no forced mid-copy kills")

    def run(self) -> None:
        args = self.args
        writers = [self.start_writer(w, 0) for w in range(args.writers)]
        samplers = [self.start_sampler(s, 0) for s in range(args.samplers)]
        gens_w = [0] * args.writers
        gens_s = [0] * args.samplers
        start = time.monotonic()
        end = start + self.duration
        now = start
        next_wkill = now + self.rng.uniform(0.5, 3.0)
        next_skill = now + self.rng.uniform(8.0, 25.0)
        next_gc = now + self.rng.uniform(2.0, 5.0)
        next_status = now + 10.0
        last_inserts, last_insert_change = self.stats()["inserts"], now
        inserts_at_last_kill: int | None = None
        while not self.failures and now < end:
            time.sleep(0.02)
            now = time.monotonic()
            # unexpected deaths, stalls
            for ch in writers + samplers:
                if not ch.proc.is_alive():
                    ch.reported = True
                    self.fail(f"{ch} exited on its own (exit code {ch.proc.exitcode}): {self.errors_of(ch)}")
                elif self.c(ch, ERRORS):
                    self.fail(f"{ch} reported an error: {self.errors_of(ch)}")
                elif not self.c(ch, STARTED) or not self.c(ch, BEAT):
                    if now - ch.launched > 60:
                        self.fail(f"{ch} did not start within 60 s: {_proc_state(ch.proc.pid)}")
                elif not self.c(ch, PAUSE_REQ) and (time.monotonic_ns() - self.c(ch, BEAT)) / 1e9 > 30:
                    self.fail(f"{ch} made no progress for 30 s (hang?): {_proc_state(ch.proc.pid)}")
            inserts = self.stats()["inserts"]
            if inserts != last_inserts:
                last_inserts, last_insert_change = inserts, now
            elif now - last_insert_change > 30:
                self.fail(f"no insert for 30 s (inserts stuck at {inserts:,}); writers: "
                          + "; ".join(f"{w}: {_proc_state(w.proc.pid)}" for w in writers))
            if self.failures:
                break
            if now >= next_wkill:
                # only a writer that made progress since the last kill: each kill interrupts real work
                ready = [w for w in writers if self.c(w, PROGRESS) > w.progress_at_last_kill]
                if not ready:
                    next_wkill = now + 0.05
                else:
                    victim = self.rng.choice(ready)
                    forced = self.has_pausing and self.rng.random() < 0.2
                    if forced:
                        self.ctr.a[victim.row, PAUSE_REQ] = 1
                        t = time.monotonic()
                        while not self.c(victim, PAUSED) and time.monotonic() - t < 20 and victim.proc.is_alive():
                            time.sleep(0.002)
                        if self.c(victim, PAUSED):
                            self.counts["forced_midcopy_kills"] += 1
                        else:
                            self.notes.append(f"{victim} did not reach the pause point in 20 s; killed anyway")
                    self.kill(victim)
                    self.counts["writers_killed"] += 1
                    inserts = self.stats()["inserts"]
                    if inserts_at_last_kill is not None:
                        self.counts["kills_checked_progress"] += 1
                        if inserts <= inserts_at_last_kill:
                            self.kill_progress_failures += 1
                            self.fail(f"inserts did not grow between two writer kills ({inserts_at_last_kill:,} -> {inserts:,})")
                    inserts_at_last_kill = inserts
                    i = writers.index(victim)
                    gens_w[i] += 1
                    writers[i] = self.start_writer(victim.idx, gens_w[i])
                    for w in writers:
                        w.progress_at_last_kill = self.c(w, PROGRESS)
                    next_wkill = time.monotonic() + self.rng.uniform(0.5, 3.0)
            if now >= next_skill and samplers:
                ready = [s for s in samplers if self.c(s, STARTED)]
                if ready:
                    victim = self.rng.choice(ready)
                    self.kill(victim)
                    self.counts["samplers_killed"] += 1
                    i = samplers.index(victim)
                    gens_s[i] += 1
                    samplers[i] = self.start_sampler(victim.idx, gens_s[i])
                next_skill = time.monotonic() + self.rng.uniform(8.0, 25.0)
            if now >= next_gc and self.has_gc and not args.no_gc:
                self.gc_round()
                next_gc = time.monotonic() + self.rng.uniform(3.0, 8.0)
                # a gc round blocks this loop for a while: don't count that as a stall
                last_insert_change = max(last_insert_change, time.monotonic() - 1)
            if now >= next_status:
                self.status(writers, samplers)
                next_status = now + 10.0
        self.run_seconds = time.monotonic() - start
        self.status(writers, samplers)

    def status(self, writers: list[Child], samplers: list[Child]) -> None:
        s = self.stats()
        checked, torn = self.sampler_totals()
        self.log(
            f"inserts {s['inserts']:,} | sampled+checked {checked:,} rows, torn {torn} | "
            f"writers killed {self.counts['writers_killed']} (forced mid-copy {self.counts['forced_midcopy_kills']}), "
            f"samplers killed {self.counts['samplers_killed']} | recovered {s['recovered']} | "
            f"gc removed {self.counts['side_buffers_gc_removed']} side buffer(s)"
        )

    def sampler_totals(self) -> tuple[int, int]:
        assert self.ctr is not None
        a = self.ctr.a[: self.next_row]
        is_s = a[:, KIND] == KIND_SAMPLER
        return int(a[is_s, CHECKED].sum()), int(a[is_s, TORN].sum())

    def gc_round(self) -> None:
        assert self.ctr is not None
        self.counts["gc_rounds"] += 1
        names, sides = [], []
        for _ in range(self.rng.choice([1, 1, 2])):
            name = f"{self.prefix}-side{len(self.side_names)}"
            self.side_names.append(name)
            mid_create = self.rng.random() < 0.3
            cap = 4096 if mid_create else 64  # 4096 x 7 KB: creating takes long enough to be interrupted
            ch = self.start("side", len(self.side_names), 0, self.dir, name, cap, lifetime=120)
            names.append(name)
            sides.append((ch, mid_create))
        for ch, mid_create in sides:
            col = STARTED if mid_create else PAUSED
            t = time.monotonic()
            while not self.c(ch, col) and ch.proc.is_alive() and time.monotonic() - t < 60:
                time.sleep(0.005)
            if not self.c(ch, col):
                self.fail(f"side {ch} did not get ready within 60 s (alive={ch.proc.is_alive()}): {self.errors_of(ch)}")
            if mid_create:
                time.sleep(self.rng.uniform(0.0, 0.03))
            self.kill(ch)
            if mid_create and not self.c(ch, PAUSED):
                self.counts["side_killed_mid_create"] += 1
            elif self.c(ch, PAUSED):
                self.counts["side_buffers_created"] += 1
        stale = {n for n in names if os.path.exists(self.seg(n))}
        leftovers_before = [e for e in os.listdir(self.dir) if e.startswith(".shmreplay.") and e.endswith(".creating")
                            and any(e.startswith(f".shmreplay.{n}.") for n in names)]
        try:
            removed = list(shmreplay.gc(path=self.dir))
        except Exception as e:  # noqa: BLE001
            self.fail(f"shmreplay.gc(path={self.dir!r}) raised {type(e).__name__}: {e}")
            return
        if self.main_name in removed or not os.path.exists(self.seg(self.main_name)):
            self.counts["gc_live_removed"] += 1
            self.fail(f"gc removed the live main buffer (returned {removed})")
        try:
            self.buf.stats()
        except Exception as e:  # noqa: BLE001
            self.fail(f"main buffer unusable after gc: {e!r}")
        missing = stale - set(removed)
        if missing:
            self.fail(f"gc did not return/remove stale side buffer(s) {sorted(missing)} (returned {removed})")
        left = [e for e in os.listdir(self.dir) if any(f"shmreplay.{n}" in e for n in names)]
        if left:
            self.fail(f"files of killed side buffers left after gc: {left}")
        self.counts["side_buffers_gc_removed"] += len(stale & set(removed))
        self.counts["creating_leftovers_removed"] += len(leftovers_before) if not left else 0
        foreign = [n for n in removed if n not in names]
        if foreign:
            self.counts["foreign_gc_removed"] += len(foreign)
            self.notes.append(f"gc also removed buffers that are not this soak's: {foreign}")

    def final_midcopy_kill(self) -> None:
        """Leaves one slot busy for the final read-back: a writer is killed mid-copy as the
        others are told to stop (they rarely overwrite that slot before they do)."""
        assert self.ctr is not None
        writers = [ch for ch in self.children if ch.kind == "writer" and self.c(ch, STARTED) and ch.proc.is_alive()]
        if not self.has_pausing or not writers:
            return
        victim = self.rng.choice(writers)
        self.ctr.a[victim.row, PAUSE_REQ] = 1
        t = time.monotonic()
        while not self.c(victim, PAUSED) and time.monotonic() - t < 20 and victim.proc.is_alive():
            time.sleep(0.002)
        self.ctr.a[0, STOP] = 1
        if self.c(victim, PAUSED):
            self.counts["forced_midcopy_kills"] += 1
            self.final["final_midcopy_slot"] = self.c(victim, PAUSED) - 1
            self.log(f"{victim} killed while copying into slot {self.final['final_midcopy_slot']}")
        self.kill(victim)
        self.counts["writers_killed"] += 1

    def stop_children(self) -> None:
        if self.ctr is not None:
            self.ctr.a[0, STOP] = 1
        deadline = time.monotonic() + 30
        for ch in list(self.children):
            ch.proc.join(max(0.1, deadline - time.monotonic()))
            if ch.proc.exitcode is None:
                if not self.interrupted and ch.kind != "side":
                    self.fail(f"{ch} did not stop within 30 s of being asked (hang?): {_proc_state(ch.proc.pid)}")
                self.kill(ch)
            else:
                if ch.proc.exitcode != 0 and not self.interrupted and not ch.reported:
                    self.fail(f"{ch} exited with code {ch.proc.exitcode} when stopped: {self.errors_of(ch)}")
                self.reap(ch, 5)

    def final_check(self) -> None:
        buf, cap = self.buf, self.args.capacity
        before = self.stats()
        self.final["stats_after_run"] = before
        if any(ch.kind in ("writer", "sampler") for ch in self.children):
            self.fail("children still alive at the final check")
        live = buf.processes()
        if live != [os.getpid()]:
            self.fail(f"processes() lists {live}, expected only the supervisor {os.getpid()}")
        # 1. every slot, as it was left by writers killed at random moments
        t = time.monotonic()
        rows, orphaned, unwritten, other_errors = [], [], 0, []
        # After laps and laps, every slot was written at least once (len() no longer counts a
        # slot left mid-overwrite by a killed writer, so it cannot tell).
        full = before["inserts"] >= 3 * cap
        for i in range(cap):
            try:
                rows.append(buf[i])
            except IndexError:  # no record: never written, or its writer died mid-copy
                if full:  # every slot of a full ring was written: its writer died mid-copy
                    orphaned.append(i)
                else:
                    unwritten += 1
            except TimeoutError as e:
                if "died" in str(e):
                    orphaned.append(i)
                else:
                    other_errors.append(f"buf[{i}]: {e}")
        torn = 0
        seen: set[tuple[int, int, int]] = set()
        dups = 0
        for lo in range(0, len(rows), 4096):
            batch = stack_rows(rows[lo: lo + 4096])
            bad, desc = validate_rows(batch, self.args.writers - 1)
            if bad.any():
                torn += int(bad.sum())
                self.fail(f"final read-back: torn rows: {desc}")
            for key in zip(batch["action"].tolist(), batch["gen"].tolist(), batch["step"].tolist()):
                dups += key in seen
                seen.add(key)
        if dups:
            self.fail(f"final read-back: {dups} row(s) found in two slots")
        if other_errors:
            self.fail(f"final read-back: {len(other_errors)} unexpected errors, first: {other_errors[0]}")
        if unwritten and before["inserts"] >= 3 * cap:
            self.fail(f"final read-back: {unwritten} slot(s) never written although {before['inserts']:,} inserts")
        self.final.update(rows_final_checked=len(rows), final_torn=torn, orphaned_slots=len(orphaned),
                          unwritten_slots=unwritten, readback_s=round(time.monotonic() - t, 2))
        self.log(f"final read-back: {len(rows):,} rows intact of {cap:,} slots, {len(orphaned)} slot(s) left "
                 f"busy by killed writers {orphaned[:10]}, {unwritten} never written, torn {torn}")
        last = self.final.get("final_midcopy_slot")
        if last is not None:
            self.final["final_midcopy_slot_busy"] = last in orphaned
        if full and len(buf) != cap - len(orphaned):
            self.fail(f"len(buf) = {len(buf)} with {len(orphaned)} slot(s) left mid-overwrite "
                      f"(capacity {cap}): the size must count exactly the slots holding a record")
        # 2. one more lap from here: every busy slot must be taken over, and the ring then holds
        #    exactly the new rows
        heal = self.args.writers  # a writer id no soak writer uses
        for lo in range(0, cap, 2048):
            buf.extend(make_rows(heal, 0, lo, min(2048, cap - lo)))
        after = self.stats()
        self.final["stats_after_heal"] = after
        if full and after["recovered"] - before["recovered"] != len(orphaned):
            self.fail(f"overwriting the ring recovered {after['recovered'] - before['recovered']} slot(s), "
                      f"expected {len(orphaned)} (the busy slots left by killed writers)")
        rows = [buf[i] for i in range(cap)]
        steps = []
        for lo in range(0, cap, 4096):
            batch = stack_rows(rows[lo: lo + 4096])
            bad, desc = validate_rows(batch, heal)
            if bad.any():
                self.fail(f"after the last lap: bad rows: {desc}")
            if np.any(batch["action"] != heal):
                self.fail("after the last lap: a slot still holds an older row")
            steps.append(batch["step"])
        if sorted(np.concatenate(steps).tolist()) != list(range(cap)):
            self.fail("after the last lap: the ring does not hold each new row exactly once")
        self.final["heal_recovered"] = after["recovered"] - before["recovered"]
        self.log(f"last lap: {cap:,} rows written from the supervisor, {self.final['heal_recovered']} busy slot(s) "
                 f"recovered, every slot re-read and valid")

    def cleanup(self) -> None:
        """Stops and reaps everything, removes every file this soak made (also after a failure)."""
        for ch in list(self.children):
            if ch.proc.exitcode is None:
                self.kill(ch)
            else:
                self.reap(ch, 5)
        if self.buf is not None:
            try:
                self.buf.unlink()
            except FileNotFoundError:
                self.fail("the main buffer was already gone at the end")
            except Exception as e:  # noqa: BLE001
                self.fail(f"unlink of the main buffer failed: {e!r}")
            self.buf.close()
            self.buf = None
        for name in self.side_names:  # only after a failure would any be left
            for e in os.listdir(self.dir) if os.path.isdir(self.dir) else []:
                if f"shmreplay.{name}" in e:
                    self.notes.append(f"removed leftover {e}")
                    os.unlink(os.path.join(self.dir, e))
        if self.ctr is not None:
            self.ctr.close()
            self.ctr = None
        if self.tmpdir:
            evidence = [e for e in os.listdir(self.tmpdir) if e.startswith(("torn-", "error-"))]
            if evidence:  # keep what a failure left for whoever reproduces it
                keep = os.path.join(tempfile.gettempdir(), f"soak-evidence-{self.prefix}")
                os.makedirs(keep, exist_ok=True)
                for e in evidence:
                    shutil.move(os.path.join(self.tmpdir, e), os.path.join(keep, e))
                self.notes.append(f"error reports and torn-row dumps kept in {keep}")
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def leak_check(self) -> None:
        files = self.our_files(self.dir)
        if self.dir != "/dev/shm":
            files += self.our_files("/dev/shm")
        self.leaks["files"] = len(files)
        if files:
            self.fail(f"segment files left: {files}")
            for e in files:  # don't leave them behind for others
                for d in (self.dir, "/dev/shm"):
                    try:
                        os.unlink(os.path.join(d, e))
                    except OSError:
                        pass
        if self.own_dir:
            try:
                os.rmdir(self.dir)
            except OSError as e:
                self.fail(f"cannot remove the soak directory {self.dir}: {e}")
                shutil.rmtree(self.dir, ignore_errors=True)
        kids = [k for k in _children_of(os.getpid()) if k[0] != self.tracker_pid]
        self.leaks["zombies"] = sum(1 for k in kids if k[1] == "Z")
        self.leaks["children"] = sum(1 for k in kids if k[1] != "Z")
        if kids:
            self.fail(f"child processes left (pid, state, comm): {kids}")
            for pid, _, _ in kids:  # ours: don't leave them running or unreaped
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except OSError:
                    pass
        self.leaks["fds"] = _fd_count() - self.baseline["fds"]
        self.leaks["mappings"] = _mappings(self.markers) - self.baseline["mappings"]
        if self.leaks["fds"]:
            self.fail(f"file descriptors: {self.leaks['fds']:+d} vs before the soak: {sorted(os.listdir('/proc/self/fd'))}")
        if self.leaks["mappings"]:
            self.fail(f"segment mappings: {self.leaks['mappings']:+d} vs before the soak")

    def summary(self) -> dict[str, Any]:
        checked, torn = self.sampler_totals_final
        st = self.final.get("stats_after_run", {})
        ok = not self.failures and not self.interrupted
        res = {
            "command": "ci/soak.sh " + " ".join(sys.argv[1:]),
            "build": self.build,
            "minutes": self.args.minutes,
            "seed": self.args.seed,
            "capacity": self.args.capacity,
            "writers": self.args.writers,
            "samplers": self.args.samplers,
            "duration_s": round(self.run_seconds, 1),
            "writers_killed": self.counts["writers_killed"],
            "forced_midcopy_kills": self.counts["forced_midcopy_kills"],
            "samplers_killed": self.counts["samplers_killed"],
            "writers_started": self.counts["writers_started"],
            "samplers_started": self.counts["samplers_started"],
            "start_methods": {"fork": self.counts["fork_started"], "spawn": self.counts["spawn_started"]},
            "rows_inserted": st.get("inserts"),
            "kills_with_progress_checked": self.counts["kills_checked_progress"],
            "rows_sampled_checked": checked,
            "rows_final_checked": self.final.get("rows_final_checked", 0),
            "torn_rows": torn + self.final.get("final_torn", 0),
            "recovered_slots": st.get("recovered"),
            "orphaned_slots_at_end": self.final.get("orphaned_slots"),
            "heal_recovered": self.final.get("heal_recovered"),
            "superseded": st.get("superseded"),
            "retries": st.get("retries"),
            "samples": st.get("samples"),
            "sampler_orphan_reads": self.sampler_orphan_reads,
            "sampler_slow_reads": self.sampler_slow_reads,
            "gc_rounds": self.counts["gc_rounds"],
            "side_buffers_created": self.counts["side_buffers_created"],
            "side_killed_mid_create": self.counts["side_killed_mid_create"],
            "side_buffers_gc_removed": self.counts["side_buffers_gc_removed"],
            "gc_removed_live_buffer": self.counts["gc_live_removed"],
            "creating_leftovers_removed": self.counts["creating_leftovers_removed"],
            "leaks": {k: self.leaks.get(k) for k in ("fds", "mappings", "files", "zombies", "children")},
            "interrupted": self.interrupted,
            "failures": self.failures,
            "notes": self.notes,
            "ok": ok,
        }
        return res


def print_summary(res: dict[str, Any]) -> None:
    lk = res["leaks"]
    lines = [
        "",
        "shmreplay soak summary",
        "----------------------",
        f"command          {res['command']}",
        f"build            {res['build'].get('git_commit')}{' (+ uncommitted changes)' if res['build'].get('git_dirty') else ''}, "
        f"extension sha256 {res['build'].get('sha256')}",
        f"duration         {res['duration_s']} s (capacity {res['capacity']:,}, {res['writers']} writers, "
        f"{res['samplers']} samplers, seed {res['seed']})",
        f"writers          {res['writers_started']} started, {res['writers_killed']} SIGKILLed "
        f"({res['forced_midcopy_kills']} forced mid-copy)",
        f"samplers         {res['samplers_started']} started, {res['samplers_killed']} SIGKILLed",
        f"start methods    fork {res['start_methods']['fork']}, spawn {res['start_methods']['spawn']}",
        f"rows inserted    {res['rows_inserted']:,}" if res["rows_inserted"] is not None else "rows inserted    -",
        f"rows checked     {res['rows_sampled_checked']:,} sampled, {res['rows_final_checked']:,} in the final read-back",
        f"torn rows        {res['torn_rows']}",
        f"recovered slots  {res['recovered_slots']} during the run, {res['heal_recovered']} by the last lap "
        f"({res['orphaned_slots_at_end']} left busy at the end)",
        f"retries          {res['retries']}   superseded {res['superseded']}",
        f"sampler buf[i]   {res['sampler_orphan_reads']} reads of slots left busy by killed writers (no record: "
        f"IndexError, as documented), {res['sampler_slow_reads']} of slots busy > 5 s under a live writer",
        f"gc               {res['gc_rounds']} rounds, {res['side_buffers_gc_removed']} stale side buffers removed "
        f"({res['side_buffers_created']} created, {res['side_killed_mid_create']} killed mid-create, "
        f"{res['creating_leftovers_removed']} .creating leftovers), "
        + ("live buffer never removed" if not res["gc_removed_live_buffer"] else
           f"LIVE BUFFER REMOVED {res['gc_removed_live_buffer']} time(s)"),
        f"leaks            fds {lk['fds']}, mappings {lk['mappings']}, files {lk['files']}, "
        f"zombies {lk['zombies']}, children {lk['children']}",
    ]
    for n in res["notes"]:
        lines.append(f"note             {n}")
    for f in res["failures"]:
        lines.append(f"FAILURE          {f}")
    lines.append(f"result           {'OK' if res['ok'] else ('INTERRUPTED' if res['interrupted'] else 'FAILED')}")
    print("\n".join(lines), flush=True)
    print("SOAK-RESULT " + json.dumps(res, sort_keys=False), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="ci/soak.sh")
    p.add_argument("--minutes", type=float, default=10.0, help="how long to soak (fractions allowed; default 10)")
    p.add_argument("--seed", type=int, default=None, help="seed of the supervisor's choices (default: random)")
    p.add_argument("--capacity", type=int, default=20_000, help="slots of the main buffer (default 20000)")
    p.add_argument("--writers", type=int, default=2, help="writer processes (default 2)")
    p.add_argument("--samplers", type=int, default=1, help="sampler processes (default 1)")
    p.add_argument("--path", default=None, help="segment directory (default: a private directory in /dev/shm)")
    p.add_argument("--no-gc", action="store_true", help="skip the gc rounds (for builds without shmreplay.gc)")
    p.add_argument("--no-snapshot", action="store_true",
                   help="import shmreplay where it is installed instead of from a private copy")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.capacity < 1 or args.writers < 1 or args.samplers < 0:
        p.error("need --minutes > 0, --capacity >= 1, --writers >= 1, --samplers >= 0")
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")

    def on_term(signum: int, frame: Any) -> None:
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C stops the soak cleanly, even when started from a shell that ignores SIGINT in
    # background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, on_term)
    soak = Soak(args)
    # Global watchdog: if the supervisor itself ever hangs (it should not: every wait is bounded),
    # dump its stack and exit; children notice their parent is gone and stop by themselves.
    faulthandler.dump_traceback_later(soak.duration + 900, exit=True)
    try:
        try:
            soak.setup()
            if not soak.failures:
                soak.run_started = time.monotonic()
                soak.run()
        except (KeyboardInterrupt, Stop) as e:
            soak.interrupted = True
            if soak.run_started:
                soak.run_seconds = time.monotonic() - soak.run_started
            soak.log(f"interrupted ({type(e).__name__} {e}): stopping everything")
        except Failure as e:
            soak.fail(str(e))
        except Exception:  # noqa: BLE001
            soak.fail("supervisor error:\n" + traceback.format_exc())
        # From here on, Ctrl-C must not cut the cleanup short (it is bounded).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if not soak.interrupted and not soak.failures and soak.ctr is not None:
            soak.final_midcopy_kill()
        soak.stop_children()
        soak.sampler_totals_final = soak.sampler_totals() if soak.ctr is not None else (0, 0)
        soak.sampler_orphan_reads = int(soak.ctr.a[: soak.next_row, ORPHAN_READS].sum()) if soak.ctr else 0
        soak.sampler_slow_reads = int(soak.ctr.a[: soak.next_row, SLOW_READS].sum()) if soak.ctr else 0
        if soak.ctr is not None:
            a = soak.ctr.a[: soak.next_row]
            samp = a[:, KIND] == KIND_SAMPLER
            if a[samp, KEY_ERRORS].sum():
                soak.fail(f"samplers saw {int(a[samp, KEY_ERRORS].sum())} row(s) with key % capacity != index")
            if soak.sampler_totals_final[1]:
                soak.fail(f"samplers saw {soak.sampler_totals_final[1]} torn row(s); dumps in the soak's error files")
                for fn in sorted(os.listdir(soak.tmpdir))[:5]:
                    if fn.startswith("torn-") and fn.endswith(".txt"):
                        with open(os.path.join(soak.tmpdir, fn)) as f:
                            soak.notes.append(f.read().strip())
            del a, samp  # no view of the counters may outlive them (they are unmapped in cleanup)
        if soak.buf is not None and "stats_after_run" not in soak.final:
            soak.final["stats_after_run"] = soak.stats()
        if soak.buf is not None and not soak.interrupted:
            try:
                soak.final_check()
            except Exception:  # noqa: BLE001
                soak.fail("final check error:\n" + traceback.format_exc())
        soak.cleanup()
        soak.leak_check()
    finally:
        faulthandler.cancel_dump_traceback_later()
        if SNAPSHOT:
            shutil.rmtree(SNAPSHOT, ignore_errors=True)
    res = soak.summary()
    print_summary(res)
    if soak.interrupted:
        return 130
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
