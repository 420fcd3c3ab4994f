"""Episode streams (issue 12): ``EpisodeBuffer`` against the gather limit and cpprb.

    .venv/bin/python benches/episodes.py              # every figure, 3 repetitions (about 8 min on 2 cores)
    .venv/bin/python benches/episodes.py --quick      # smoke run: small sizes, 1 repetition (< 2 min)
    .venv/bin/python benches/episodes.py --only sample,step --reps 5
    .venv/bin/python benches/episodes.py --only concurrent --seconds 20

Atari items everywhere: 84x84 uint8 frames (``obs``), int32 ``action``, float32 ``reward``;
``frame_stack=4``, ``n_step=3``, ``gamma=0.99``. Figures (``--only`` takes names or numbers):

1. ``sample``: ``sample(32, out=)`` from a full buffer of 100k frames written by one writer of 8
   envs (episodes of 100-899 steps): items/s and output bytes/s, against the *gather limit*
   (``np.take(frames, idx, axis=0, out=, mode="clip")`` of the same 32 x 8 random 7,056-byte
   frames from a packed frame array in a SharedMemory segment: target >= 70 %) and against cpprb's
   single-process ``ReplayBuffer`` with ``Nstep``/``stack_compress`` (target >= 2x).
2. ``sequences``: ``sample_sequences(32, 80, out=)`` from a buffer of 1M frames, frame_stack 4
   (R2D2's setting: 73 MB per batch) and 1, each against the gather limit of its output frames
   (32 x 81 x 4 and 32 x 81 random frames from a 1M-frame segment): target >= 50 %.
3. ``step``: ``step()`` of a writer of 8 envs (pre-generated frames, terminations 1/500) into a
   buffer that wraps: env steps/s, target >= 100k.
4. ``concurrent``: 2 writer processes x 8 envs and 1 learner process (``sample(32, out=)``) for
   ``--seconds``; every frame carries (writer, env, episode, position), actions and rewards are
   functions of them, so the learner checks every item whole: stack order and padding, one
   episode for every frame of both stacks, the n-step return, discount and flags. Target: 0
   wrong items.
5. ``memory``: the segment of an EpisodeBuffer of 1M Atari steps (created for real), against
   the transition layout (``ReplayBuffer`` with obs and next_obs 4x84x84, from the bytes per slot
   of small buffers) and cpprb (resident memory its arrays take at two sizes, per slot x 1M).
   Target <= 7.3e9 bytes.

Every measurement runs in a fresh process group (``run.run_job``), contenders take turns (the
order rotates from repetition to repetition) and the report gives medians over ``--reps``. Prints
a table (CPU and copy kernels first, targets last) and writes ``episodes[-quick].json`` to
``--out`` (default benches/results/). See benches/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
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

FIGURES = ["sample", "sequences", "step", "concurrent", "memory"]  # --only: these names, or 1-5

# ---- the items ----
FRAME = (84, 84)
FRAME_BYTES = 84 * 84
WORDS = FRAME_BYTES // 8  # a frame as 882 uint64 words
FIELDS = {"obs": (FRAME, np.uint8), "action": ((), np.int32), "reward": ((), np.float32)}
FRAME_STACK = 4
N_STEP = 3
GAMMA = 0.99
NUM_ENVS = 8
BATCH = 32
SEQ_LENGTH = 80
EP_LEN = (100, 900)  # episode lengths of the fills: uniform in [100, 900) steps
TERMINATION_P = 1 / 500  # figure 3
POOL = 64  # pre-generated step batches a writer cycles through

# ---- targets ----
SAMPLE_VS_LIMIT = 0.70
SAMPLE_VS_CPPRB = 2.0
SEQ_VS_LIMIT = 0.50
STEP_MIN = 100_000
MEMORY_MAX = 7.3e9
MEMORY_STEPS = 1_000_000

SAMPLE_KEYS = ["shmreplay", "limit", "cpprb", "cpprb_next_of"]
SEQ_KEYS = ["shmreplay_fs4", "shmreplay_fs1", "limit"]
MEM_KEYS = ["shmreplay", "cpprb"]
LABELS = {
    "shmreplay": "shmreplay EpisodeBuffer",
    "limit": "gather limit (np.take, out=)",
    "cpprb": "cpprb ReplayBuffer, Nstep + stack_compress obs, next_obs",
    "cpprb_next_of": "cpprb ReplayBuffer, next_of + stack_compress + Nstep",
    "shmreplay_fs4": "shmreplay EpisodeBuffer, frame_stack 4",
    "shmreplay_fs1": "shmreplay EpisodeBuffer, frame_stack 1",
    "memcpy": "memcpy (info, not a gather)",
}
NEEDS = {"shmreplay": "shmreplay", "shmreplay_fs4": "shmreplay", "shmreplay_fs1": "shmreplay", "limit": None,
         "cpprb": "cpprb", "cpprb_next_of": "cpprb"}
# cpprb's stack_compress needs the stack on the last axis: its items are (84, 84, 4) stacks
# (the same bytes as (4, 84, 84)).
CPPRB_STACK = (84, 84, FRAME_STACK)


def missing(key: str) -> str | None:
    """Why ``key`` cannot run here, or None."""
    mod = NEEDS[key]
    if mod is None:
        return None
    if importlib.util.find_spec(mod) is None:
        where = "build it with `make dev`" if mod == "shmreplay" else "pip install cpprb (benches/requirements.txt)"
        return f"not installed (no module {mod!r}; {where})"
    if mod == "shmreplay":
        try:
            import shmreplay
        except Exception as e:  # noqa: BLE001 - e.g. being rebuilt right now
            return f"cannot be imported ({type(e).__name__}: {e})"
        if not hasattr(shmreplay, "EpisodeBuffer"):
            return "this shmreplay has no EpisodeBuffer"
    return None


def shm_room(nbytes: int) -> str | None:
    """Why a segment of ``nbytes`` would not fit in /dev/shm or in memory now, or None."""
    st = os.statvfs(SHM_DIR)
    free = st.f_bavail * st.f_frsize
    avail = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    margin = 1 << 30
    if free < nbytes + margin:
        return f"{SHM_DIR} has {free / 1e9:.1f} GB free, {nbytes / 1e9:.1f} GB (+1 GB) needed"
    if avail is not None and avail < nbytes + margin:
        return f"{avail / 1e9:.1f} GB of memory available, {nbytes / 1e9:.1f} GB (+1 GB) needed"
    return None


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


def create_buffer(prefix: str, tag: str, capacity: int, frame_stack: int = FRAME_STACK) -> Any:
    import shmreplay

    return shmreplay.EpisodeBuffer.create(
        f"{prefix}{tag}-{uuid.uuid4().hex[:6]}", capacity=capacity, fields=FIELDS, observation="obs",
        reward="reward", frame_stack=frame_stack, stack_padding="first", n_step=N_STEP, gamma=GAMMA)


def turns(fn: Callable[[], Any], window: float, n: int) -> list[float]:
    """Calls/s of ``fn`` over ``n`` windows of ``window`` seconds."""
    return [harness.timed(fn, window)[0] for _ in range(n)]


def random_pool(seed: int) -> dict[str, np.ndarray]:
    """``POOL`` step batches of ``NUM_ENVS`` random frames, actions and rewards."""
    rng = np.random.default_rng(seed)
    return {
        "obs": rng.integers(0, 256, (POOL, NUM_ENVS, *FRAME), dtype=np.uint8),
        "action": rng.integers(0, 18, (POOL, NUM_ENVS), dtype=np.int32),
        "reward": rng.standard_normal((POOL, NUM_ENVS)).astype(np.float32),
    }


def fill(buf: Any, frames: int, seed: int) -> dict:
    """Writes about ``frames`` frames with one writer of ``NUM_ENVS`` envs (random frames,
    episodes of ``EP_LEN`` steps, gymnasium autoreset); returns what it wrote."""
    rng = np.random.default_rng(seed + 1)
    pool = random_pool(seed)
    w = buf.writer(NUM_ENVS)
    w.reset(obs=pool["obs"][0])
    remaining = rng.integers(*EP_LEN, NUM_ENVS)
    ended = np.zeros(NUM_ENVS, np.bool_)
    no = np.zeros(NUM_ENVS, np.bool_)
    episodes = 0
    t0 = time.perf_counter()
    calls = -(-max(0, frames - NUM_ENVS) // NUM_ENVS)
    for i in range(calls):
        if ended.any():  # this call writes o_0 of their next episode
            remaining[ended] = rng.integers(*EP_LEN, int(ended.sum()))
            episodes += int(ended.sum())
        remaining[~ended] -= 1
        term = ~ended & (remaining == 0)
        k = i % POOL
        w.step(obs=pool["obs"][k], action=pool["action"][k], reward=pool["reward"][k], terminated=term, truncated=no)
        ended = term
    return {"frames": NUM_ENVS * (calls + 1), "episodes_ended": episodes, "fill_s": time.perf_counter() - t0}


class Frames:
    """A packed frame array in a SharedMemory segment (the limit's store), filled with random frames."""

    def __init__(self, prefix: str, frames: int, seed: int) -> None:
        from multiprocessing import shared_memory

        self.shm = shared_memory.SharedMemory(name=f"{prefix}frames-{uuid.uuid4().hex[:6]}", create=True, size=frames * FRAME_BYTES)
        self.frames = np.ndarray((frames, FRAME_BYTES), np.uint8, buffer=self.shm.buf)
        pool = np.random.default_rng(seed).integers(0, 256, (4096, FRAME_BYTES), dtype=np.uint8)
        for i in range(0, frames, len(pool)):
            n = min(len(pool), frames - i)
            self.frames[i:i + n] = pool[:n]

    def gather(self, n: int, seed: int) -> dict[str, Callable[[], Any]]:
        """Ways of gathering ``n`` random frames: ``take`` (counted), the others ``info:``."""
        frames, cap = self.frames, len(self.frames)
        rng = np.random.default_rng(seed)
        out = np.empty((n, FRAME_BYTES), np.uint8)
        take, integers = np.take, rng.integers
        start = max(0, cap // 2 - n)
        return {
            "take": lambda: take(frames, integers(0, cap, n), axis=0, out=out, mode="clip"),
            "info:fancy": lambda: frames[integers(0, cap, n)],
            "info:memcpy": lambda: np.copyto(out, frames[start:start + n]) if n <= cap else None,
        }

    def close(self) -> None:
        self.frames = None  # type: ignore[assignment]
        try:
            self.shm.close()
        except BufferError:
            pass
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass


def rates_of(variants: dict[str, Callable[[], Any]], window: float, n: int) -> dict[str, list[float]]:
    """Calls/s of every variant, ``n`` windows each, the variants taking turns."""
    out: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(n):
        keys = list(variants)
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            out[k].append(harness.timed(variants[k], window)[0])
    return out


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


# ---- figure 1: sample(32) ----


def cpprb_buffer(key: str, capacity: int) -> Any:
    """cpprb ``ReplayBuffer`` for n-step, 4-stacked Atari items.

    ``cpprb``: obs and next_obs both declared and both ``stack_compress``-ed (cpprb's ``Nstep``
    turns ``next_of`` off: "Nstep is not support next_of yet"), so ``sample`` returns what
    ``EpisodeBuffer.sample`` does. ``cpprb_next_of``: the arguments as the issue names them,
    ``next_of="obs", stack_compress="obs", Nstep=...``: its ``sample`` returns no ``next_obs``."""
    import cpprb

    stack = {"shape": CPPRB_STACK, "dtype": np.uint8}
    env_dict: dict[str, dict] = {"obs": dict(stack), "act": {"dtype": np.int32}, "rew": {"dtype": np.float32},
                                 "done": {"dtype": np.float32}}
    nstep = {"size": N_STEP, "gamma": GAMMA, "rew": "rew", "next": "next_obs"}
    if key == "cpprb":
        env_dict["next_obs"] = dict(stack)
        return cpprb.ReplayBuffer(capacity, env_dict, stack_compress=["obs", "next_obs"], Nstep=nstep)
    if key == "cpprb_next_of":
        return cpprb.ReplayBuffer(capacity, env_dict, next_of="obs", stack_compress="obs", Nstep=nstep)
    if key == "cpprb_1step":  # memory only: next_of + stack_compress without Nstep
        return cpprb.ReplayBuffer(capacity, env_dict, next_of="obs", stack_compress="obs")
    raise ValueError(key)


def cpprb_fill(rb: Any, steps: int, seed: int) -> dict:
    """Whole episodes (lengths ``EP_LEN``) of sliding-window stacks of random frames, the first
    frame repeated before the start, one ``add`` and ``on_episode_end`` per episode."""
    from numpy.lib.stride_tricks import sliding_window_view

    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, (509, *FRAME), dtype=np.uint8)
    t0 = time.perf_counter()
    added = episodes = 0
    while added < steps:
        length = int(rng.integers(*EP_LEN))
        idx = (int(rng.integers(0, len(pool))) + np.arange(length + 1)) % len(pool)
        frames = pool[np.concatenate([np.repeat(idx[:1], FRAME_STACK - 1), idx])]  # (length + 4, 84, 84)
        stacks = sliding_window_view(frames, FRAME_STACK, axis=0)  # (length + 1, 84, 84, 4): frames t-3..t
        done = np.zeros(length, np.float32)
        done[-1] = 1
        rb.add(obs=stacks[:length], next_obs=stacks[1:], act=np.arange(length, dtype=np.int32),
               rew=np.ones(length, np.float32), done=done)
        rb.on_episode_end()
        added += length
        episodes += 1
    return {"steps": added, "episodes": episodes, "fill_s": time.perf_counter() - t0, "stored": int(rb.get_stored_size())}


def sample_job(job: dict) -> dict:
    key, cap, window, n = job["contender"], job["capacity"], job["window"], job["turns"]
    seed = 1000 + job.get("rep", 0)
    if key == "shmreplay":
        buf = create_buffer(job["prefix"], "s", cap)
        try:
            filled = fill(buf, cap + cap // 10, seed)
            harness.prefault_shared()
            out = {k: np.empty(s, d) for k, (s, d) in buf.sample_layout(BATCH).items()}
            out2 = {k: np.empty(s, d) for k, (s, d) in buf.sample_layout(BATCH).items()}
            sample = buf.sample
            variants = {
                "out": lambda: sample(BATCH, out=out),
                "info:fresh": lambda: sample(BATCH),
                "info:out+return_info": lambda: sample(BATCH, out=out2, return_info=True),
            }
            rates = rates_of(variants, window, n)
            return {"calls_per_s": statistics.median(rates["out"]), "rates": rates,
                    "bytes_per_call": sum(a.nbytes for a in out.values()),
                    "frame_bytes_per_call": out["obs"].nbytes + out["next_obs"].nbytes,
                    "shapes": {k: list(a.shape) for k, a in out.items()}, "nbytes": buf.nbytes,
                    "fill": filled, "stats": sysinfo._jsonable(dict(buf.stats()))}
        finally:
            close_buffer(buf)
    if key == "limit":
        store = Frames(job["prefix"], cap, seed)
        try:
            harness.prefault_shared()
            rates = rates_of(store.gather(BATCH * 2 * FRAME_STACK, seed), window, n)
            return {"calls_per_s": statistics.median(rates["take"]), "rates": rates,
                    "bytes_per_call": BATCH * 2 * FRAME_STACK * FRAME_BYTES,
                    "frame_bytes_per_call": BATCH * 2 * FRAME_STACK * FRAME_BYTES, "frames": cap}
        finally:
            store.close()
    rb = cpprb_buffer(key, cap)
    filled = cpprb_fill(rb, cap + cap // 10, seed)
    got = rb.sample(BATCH)
    rates = rates_of({"sample": lambda: rb.sample(BATCH)}, window, n)
    frame_bytes = sum(got[k].nbytes for k in ("obs", "next_obs") if k in got)
    return {"calls_per_s": statistics.median(rates["sample"]), "rates": rates,
            "bytes_per_call": sum(a.nbytes for a in got.values()), "frame_bytes_per_call": frame_bytes,
            "shapes": {k: list(a.shape) for k, a in got.items()}, "fill": filled}


# ---- figure 2: sample_sequences(32, 80) ----


def seq_frames(frame_stack: int) -> int:
    return BATCH * (SEQ_LENGTH + 1) * frame_stack


def sequences_job(job: dict) -> dict:
    key, cap, window, n = job["contender"], job["capacity"], job["window"], job["turns"]
    seed = 2000 + job.get("rep", 0)
    why = shm_room(cap * (FRAME_BYTES + 200))
    if why:
        raise RuntimeError(f"not enough room for {cap:,} frames: {why}")
    if key == "limit":
        t0 = time.perf_counter()
        store = Frames(job["prefix"], cap, seed)
        try:
            created = time.perf_counter() - t0
            harness.prefault_shared()
            res: dict[str, Any] = {"create_fill_s": created, "frames": cap}
            for fs in (4, 1):
                rates = rates_of({k: v for k, v in store.gather(seq_frames(fs), seed).items() if k != "info:memcpy"}, window, n)
                res[f"fs{fs}"] = {"calls_per_s": statistics.median(rates["take"]), "rates": rates,
                                  "bytes_per_call": seq_frames(fs) * FRAME_BYTES}
            return res
        finally:
            store.close()
    fs = 4 if key == "shmreplay_fs4" else 1
    t0 = time.perf_counter()
    buf = create_buffer(job["prefix"], f"q{fs}", cap, frame_stack=fs)
    try:
        created = time.perf_counter() - t0
        filled = fill(buf, cap + cap // 20, seed)
        harness.prefault_shared()
        out = {k: np.empty(s, d) for k, (s, d) in buf.sequence_layout(BATCH, SEQ_LENGTH).items()}
        rates = rates_of({"out": lambda: buf.sample_sequences(BATCH, SEQ_LENGTH, out=out)}, window, n)
        mask = out["mask"]
        return {f"fs{fs}": {"calls_per_s": statistics.median(rates["out"]), "rates": rates,
                            "bytes_per_call": sum(a.nbytes for a in out.values()),
                            "frame_bytes_per_call": out["obs"].nbytes,
                            "shapes": {k: list(a.shape) for k, a in out.items()},
                            "mask_share": float(mask.mean())},
                "create_s": created, "fill": filled, "nbytes": buf.nbytes, "stats": sysinfo._jsonable(dict(buf.stats()))}
    finally:
        close_buffer(buf)


# ---- figure 3: step() of 8 envs ----


def step_job(job: dict) -> dict:
    cap, window, n = job["capacity"], job["window"], job["turns"]
    seed = 3000 + job.get("rep", 0)
    rng = np.random.default_rng(seed)
    pool = random_pool(seed)
    term = rng.random((POOL * 16, NUM_ENVS)) < TERMINATION_P
    trunc = np.zeros(NUM_ENVS, np.bool_)
    buf = create_buffer(job["prefix"], "w", cap)
    try:
        w = buf.writer(NUM_ENVS)
        w.reset(obs=pool["obs"][0])
        harness.prefault_shared()
        obs, act, rew = pool["obs"], pool["action"], pool["reward"]
        i = [0]
        step = w.step

        def one() -> None:
            k = i[0]
            j = k % POOL
            step(obs=obs[j], action=act[j], reward=rew[j], terminated=term[k % len(term)], truncated=trunc)
            i[0] = k + 1

        rates = turns(one, window, n)
        return {"calls_per_s": statistics.median(rates), "rates": rates, "env_steps_per_s": NUM_ENVS * statistics.median(rates),
                "calls": i[0], "frames_written": NUM_ENVS * (i[0] + 1), "wraps": NUM_ENVS * (i[0] + 1) / cap,
                "stats": sysinfo._jsonable(dict(buf.stats()))}
    finally:
        close_buffer(buf)


# ---- figure 4: concurrent writers and a learner that checks every item ----
#
# A frame is one 64-bit word repeated: bit 63 set, writer (7 bits), env (8), episode (24),
# position in the episode (24). An episode's length and how it ends, every action and every
# reward are functions of (writer, env, episode[, t]), so the learner recomputes every item.

U = np.uint64
MARK = U(1 << 63)
PREFILL_WID = 9  # the job process prefills with this writer id; the writer processes are 0, 1


def episode_info(w: np.ndarray, e: np.ndarray, ep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(length in steps, terminated: True / truncated: False) of each episode."""
    h = (w.astype(U) * U(1_000_003) + e.astype(U) * U(10_007) + ep.astype(U) * U(7_919) + U(12_345)) * U(2_654_435_761)
    h = (h >> U(16)) & U(0xFFFFFFFF)
    length = (U(EP_LEN[0]) + h % U(EP_LEN[1] - EP_LEN[0])).astype(np.int64)
    return length, ((h >> U(8)) & U(3)) != U(0)  # 3 in 4 terminated, 1 in 4 truncated


def action_of(w: np.ndarray, e: np.ndarray, ep: np.ndarray, t: np.ndarray) -> np.ndarray:
    h = (t.astype(U) * U(40_503) + ep.astype(U) * U(97) + e.astype(U) * U(13) + w.astype(U) * U(7)) * U(2_654_435_761)
    return ((h >> U(20)) & U(0x7FFFFFFF)).astype(np.int32)


def reward_of(w: np.ndarray, e: np.ndarray, ep: np.ndarray, t: np.ndarray) -> np.ndarray:
    return ((t.astype(np.int64) * 3 + ep.astype(np.int64) + e.astype(np.int64) * 5 + w.astype(np.int64) * 11) % 13).astype(np.float32)


def stamp(w: np.ndarray, e: np.ndarray, ep: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return MARK | (w.astype(U) << U(56)) | (e.astype(U) << U(48)) | (ep.astype(U) << U(24)) | pos.astype(U)


class StampedEnvs:
    """``NUM_ENVS`` envs of writer ``wid`` whose frames, actions, rewards and episode ends are
    functions of (writer, env, episode, t); gymnasium autoreset (the step after an episode's
    end carries the next episode's o_0)."""

    def __init__(self, wid: int) -> None:
        n = NUM_ENVS
        self.w = np.full(n, wid, np.int64)
        self.e = np.arange(n, dtype=np.int64)
        self.ep = np.zeros(n, np.int64)
        self.t = np.zeros(n, np.int64)
        self.length, self.term = episode_info(self.w, self.e, self.ep)
        self.ended = np.zeros(n, np.bool_)
        self.words = np.empty((n, WORDS), U)
        self.obs = self.words.view(np.uint8).reshape(n, *FRAME)

    def reset(self) -> np.ndarray:
        self.words[:] = stamp(self.w, self.e, self.ep, self.t)[:, None]
        return self.obs

    def step(self) -> dict[str, Any]:
        r = self.ended
        if r.any():
            self.ep[r] += 1
            self.t[r] = 0
            self.length[r], self.term[r] = episode_info(self.w[r], self.e[r], self.ep[r])
        action = action_of(self.w, self.e, self.ep, self.t)
        reward = reward_of(self.w, self.e, self.ep, self.t)
        self.t += ~r
        ending = ~r & (self.t == self.length)
        self.words[:] = stamp(self.w, self.e, self.ep, self.t)[:, None]
        self.ended = ending
        return {"obs": self.obs, "action": action, "reward": reward, "terminated": ending & self.term,
                "truncated": ending & ~self.term}


class Checker:
    """Recomputes every sampled item from the stamp of its last obs frame."""

    def __init__(self) -> None:
        self.items = self.wrong = self.torn = self.padded = self.short = self.ended = 0
        self.first_wrong = ""
        self.j = np.arange(FRAME_STACK)
        self.powers = GAMMA ** np.arange(N_STEP + 1)

    def check(self, b: dict[str, np.ndarray]) -> None:
        n = len(b["action"])
        o = b["obs"].reshape(n, FRAME_STACK, FRAME_BYTES).view(U)
        x = b["next_obs"].reshape(n, FRAME_STACK, FRAME_BYTES).view(U)
        so, sx = o[:, :, 0], x[:, :, 0]
        torn = (o.min(axis=2) != so).any(axis=1) | (o.max(axis=2) != so).any(axis=1)
        torn |= (x.min(axis=2) != sx).any(axis=1) | (x.max(axis=2) != sx).any(axis=1)
        last = so[:, -1]
        w = ((last >> U(56)) & U(0x7F)).astype(np.int64)
        e = ((last >> U(48)) & U(0xFF)).astype(np.int64)
        ep = ((last >> U(24)) & U(0xFFFFFF)).astype(np.int64)
        t = (last & U(0xFFFFFF)).astype(np.int64)
        episode = (last >> U(24))[:, None]
        bad = torn | ((last & MARK) == U(0))
        bad |= ((so >> U(24)) != episode).any(axis=1) | ((sx >> U(24)) != episode).any(axis=1)
        length, term = episode_info(w, e, ep)
        bad |= t >= length  # o_t of a step: t < length
        k = np.clip(np.minimum(N_STEP, length - t), 1, N_STEP)
        pos_o = np.maximum(0, t[:, None] - (FRAME_STACK - 1) + self.j)
        pos_x = np.maximum(0, (t + k)[:, None] - (FRAME_STACK - 1) + self.j)
        bad |= ((so & U(0xFFFFFF)).astype(np.int64) != pos_o).any(axis=1)
        bad |= ((sx & U(0xFFFFFF)).astype(np.int64) != pos_x).any(axis=1)
        bad |= b["action"] != action_of(w, e, ep, t)
        ret = np.zeros(n)
        for i in range(N_STEP):
            ret += np.where(i < k, self.powers[i] * reward_of(w, e, ep, t + i), 0.0)
        bad |= ~np.isclose(b["reward"], ret, rtol=1e-5, atol=1e-4)
        bad |= ~np.isclose(b["discount"], self.powers[k], rtol=1e-6, atol=0)
        end = t + k == length
        bad |= b["terminated"] != (end & term)
        bad |= b["truncated"] != (end & ~term)
        self.items += n
        self.torn += int(torn.sum())
        self.padded += int((t < FRAME_STACK - 1).sum())
        self.short += int((k < N_STEP).sum())
        self.ended += int(end.sum())
        nbad = int(bad.sum())
        if nbad:
            self.wrong += nbad
            if not self.first_wrong:
                i = int(bad.argmax())
                self.first_wrong = (
                    f"obs stamps {[hex(int(v)) for v in so[i]]}, next_obs stamps {[hex(int(v)) for v in sx[i]]}, torn {bool(torn[i])}, "
                    f"action {int(b['action'][i])}, reward {float(b['reward'][i])!r} (expected {ret[i]!r}), "
                    f"discount {float(b['discount'][i])!r}, terminated {bool(b['terminated'][i])}, truncated {bool(b['truncated'][i])}; "
                    f"episode length {int(length[i])}, terminated {bool(term[i])}")

    def summary(self) -> dict:
        return {"checked": self.items, "wrong": self.wrong, "torn": self.torn, "padded": self.padded,
                "short_windows": self.short, "episode_ends": self.ended, "first_wrong": self.first_wrong}


def writer_main(name: str, wid: int, start: Any, seconds: float, q: Any) -> None:
    def body() -> dict:
        import shmreplay

        buf = shmreplay.EpisodeBuffer.attach(name)
        envs = StampedEnvs(wid)
        w = buf.writer(NUM_ENVS)
        harness.prefault_shared()
        q.put(("ready", wid))
        start.wait(harness.HARD_LIMIT_S)
        w.reset(obs=envs.reset())
        calls = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        step, nxt, clock = w.step, envs.step, time.perf_counter
        while clock() < deadline:
            step(**nxt())
            calls += 1
        elapsed = time.perf_counter() - t0
        episodes = int(envs.ep.sum())
        buf.close()
        return {"role": "writer", "wid": wid, "calls": calls, "env_steps": NUM_ENVS * calls, "seconds": elapsed,
                "episodes_started": episodes + NUM_ENVS}

    harness._report(q, body)


def learner_main(name: str, start: Any, seconds: float, q: Any) -> None:
    def body() -> dict:
        import shmreplay

        buf = shmreplay.EpisodeBuffer.attach(name)
        out = {k: np.empty(s, d) for k, (s, d) in buf.sample_layout(BATCH).items()}
        checker = Checker()
        harness.prefault_shared()
        q.put(("ready", 100))
        start.wait(harness.HARD_LIMIT_S)
        clock = time.perf_counter
        items = 0
        check_s = 0.0
        t0 = clock()
        deadline = t0 + seconds
        while clock() < deadline:
            buf.sample(BATCH, out=out)
            items += BATCH
            tc = clock()
            checker.check(out)
            check_s += clock() - tc
        elapsed = clock() - t0
        stats = sysinfo._jsonable(dict(buf.stats()))
        buf.close()
        return {"role": "learner", "items": items, "seconds": elapsed, "check_s": check_s, "stats": stats, **checker.summary()}

    harness._report(q, body)


def concurrent_job(job: dict) -> dict:
    cap, seconds = job["capacity"], job["seconds"]
    ctx = mp.get_context("forkserver")  # the job's own, with shmreplay imported once
    ctx.set_forkserver_preload(["harness", "episodes", "shmreplay"])
    buf = create_buffer(job["prefix"], "c", cap)
    procs: list = []
    try:
        # Prefill (untimed) with stamped episodes of a writer of its own, so that the ring is
        # full and wraps while the writers run.
        envs = StampedEnvs(PREFILL_WID)
        w = buf.writer(NUM_ENVS)
        w.reset(obs=envs.reset())
        t0 = time.perf_counter()
        for _ in range(cap // NUM_ENVS):
            w.step(**envs.step())
        prefill_s = time.perf_counter() - t0
        q, start = ctx.Queue(), ctx.Event()
        for wid in range(job["writers"]):
            procs.append(ctx.Process(target=writer_main, args=(buf.name, wid, start, seconds, q), daemon=True))
        procs.append(ctx.Process(target=learner_main, args=(buf.name, start, seconds, q), daemon=True))
        for p in procs:
            p.start()
        harness._collect(q, procs, len(procs), "ready", timeout=300)
        start.set()
        results = harness._collect(q, procs, len(procs), "done", timeout=seconds + 120)
        stats = sysinfo._jsonable(dict(buf.stats()))
    finally:
        harness._end(procs)
        close_buffer(buf)
    writers = [r for r in results if r["role"] == "writer"]
    learner = next(r for r in results if r["role"] == "learner")
    env_steps = sum(r["env_steps"] / r["seconds"] for r in writers)
    items = learner["items"] / learner["seconds"]
    item_bytes = 2 * FRAME_STACK * FRAME_BYTES + 14
    return {
        "env_steps_per_s": env_steps,
        "items_per_s": items,
        "aggregate_per_s": env_steps + items,
        "gb_per_s": (env_steps * (FRAME_BYTES + 10) + items * item_bytes) / 1e9,
        "check_share": learner["check_s"] / learner["seconds"],
        "checked": learner["checked"], "wrong": learner["wrong"], "torn": learner["torn"],
        "padded": learner["padded"], "short_windows": learner["short_windows"], "episode_ends": learner["episode_ends"],
        "first_wrong": learner["first_wrong"], "prefill_s": prefill_s, "stats": stats, "processes": results,
    }


# ---- figure 5: memory ----


def memory_job(job: dict) -> dict:
    key = job["contender"]
    if key == "shmreplay":
        import shmreplay

        small = {}
        for cap in (10_000, 20_000):  # nbytes is linear in the capacity: fixed part + per slot
            buf = create_buffer(job["prefix"], "m", cap)
            small[cap] = buf.nbytes
            close_buffer(buf)
        per_slot = (small[20_000] - small[10_000]) / 10_000
        fixed = small[10_000] - 10_000 * per_slot
        res: dict[str, Any] = {"episode_small": small, "episode_extrapolated": fixed + per_slot * MEMORY_STEPS}
        cap = job["capacity"]  # 0: extrapolate only (quick)
        why = shm_room(int(cap * per_slot + fixed)) if cap else "not asked for"
        if why:
            res["episode_note"] = f"EpisodeBuffer of {MEMORY_STEPS:,} steps not created ({why}): extrapolated from 10k and 20k"
        else:
            t0 = time.perf_counter()
            buf = create_buffer(job["prefix"], "m", cap)
            try:
                res["episode"] = {"capacity": cap, "nbytes": buf.nbytes, "bytes_per_step": buf.stats()["bytes_per_step"],
                                  "create_s": time.perf_counter() - t0}
            finally:
                close_buffer(buf)
        # Prioritized: from two small buffers.
        pr = {}
        for c in (10_000, 20_000):
            b = shmreplay.EpisodeBuffer.create(f"{job['prefix']}mp-{uuid.uuid4().hex[:6]}", capacity=c, fields=FIELDS,
                                               frame_stack=FRAME_STACK, n_step=N_STEP, gamma=GAMMA,
                                               sampler=shmreplay.Prioritized(alpha=0.6))
            pr[c] = b.nbytes
            close_buffer(b)
        ps = (pr[20_000] - pr[10_000]) / 10_000
        res["prioritized_extrapolated"] = pr[10_000] - 10_000 * ps + ps * MEMORY_STEPS
        # The transition layout: obs and next_obs stacks in every slot.
        tfields = {"obs": ((FRAME_STACK, *FRAME), np.uint8), "next_obs": ((FRAME_STACK, *FRAME), np.uint8),
                   "action": ((), np.int32), "reward": ((), np.float32), "terminated": ((), np.bool_), "truncated": ((), np.bool_)}
        tb = {}
        record = 0
        for c in (1000, 2000):
            rb = shmreplay.ReplayBuffer.create(f"{job['prefix']}mt-{uuid.uuid4().hex[:6]}", capacity=c, fields=tfields)
            tb[c], record = rb.nbytes, rb.record_bytes
            close_buffer(rb)
        ts = (tb[2000] - tb[1000]) / 1000
        res["transition"] = {"small": tb, "record_bytes": record, "bytes_per_slot": ts,
                             "extrapolated": tb[1000] - 1000 * ts + ts * MEMORY_STEPS}
        return res
    # cpprb: resident memory its arrays take (dict2buffer writes every element), at two sizes.
    import gc

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    out = {}
    cpprb_buffer("cpprb", 1000)  # the first buffer also grows the heap: not counted
    gc.collect()
    for cfg in ("cpprb", "cpprb_next_of", "cpprb_1step"):
        got = {}
        for size in (10_000, 30_000):
            gc.collect()
            r0 = rss()
            rb = cpprb_buffer(cfg, size)
            got[size] = rss() - r0
            del rb
            gc.collect()
        slope = (got[30_000] - got[10_000]) / 20_000
        out[cfg] = {"rss": got, "bytes_per_slot": slope, "extrapolated": got[10_000] - 10_000 * slope + slope * MEMORY_STEPS}
    return out


JOBS = {"sample": sample_job, "sequences": sequences_job, "step": step_job, "concurrent": concurrent_job, "memory": memory_job}


# ---------------------------------------------------------------------------------------
# The orchestrator
# ---------------------------------------------------------------------------------------


@dataclass
class Config:
    reps: int
    sample_cap: int
    window: float  # one timed window of figures 1 and 3
    turns: int  # timed windows per variant within a job
    seq_cap: int
    seq_window: float
    seq_turns: int
    step_cap: int
    conc_cap: int
    seconds: float  # figure 4
    memory_cap: int  # steps of the EpisodeBuffer created for real in figure 5 (0: extrapolated only)
    writers: int = 2


MODES = {
    "full": Config(reps=3, sample_cap=100_000, window=0.4, turns=5, seq_cap=1_000_000, seq_window=1.0, seq_turns=3,
                   step_cap=100_000, conc_cap=100_000, seconds=10.0, memory_cap=MEMORY_STEPS),
    "quick": Config(reps=1, sample_cap=10_000, window=0.15, turns=3, seq_cap=20_000, seq_window=0.3, seq_turns=2,
                    step_cap=20_000, conc_cap=20_000, seconds=2.0, memory_cap=0),
}


def job_groups(cfg: Config, keys: set[str], figs: set[str]) -> tuple[list, list]:
    """(groups run ``reps`` times, groups run once: the memory figure, which does not vary)."""
    groups: list[tuple[str, list[dict]]] = []
    if "sample" in figs:
        jobs = [dict(kind="sample", figure="sample", contender=k, capacity=cfg.sample_cap, window=cfg.window, turns=cfg.turns)
                for k in SAMPLE_KEYS if k in keys]
        if jobs:
            groups.append((f"sample(32) {cfg.sample_cap:,}", jobs))
    if "sequences" in figs:
        jobs = [dict(kind="sequences", figure="sequences", contender=k, capacity=cfg.seq_cap, window=cfg.seq_window,
                     turns=cfg.seq_turns) for k in SEQ_KEYS if k in keys]
        if jobs:
            groups.append((f"sequences {cfg.seq_cap:,}", jobs))
    if "step" in figs and "shmreplay" in keys:
        groups.append((f"step 8 envs {cfg.step_cap:,}", [dict(kind="step", figure="step", contender="shmreplay",
                                                              capacity=cfg.step_cap, window=cfg.window, turns=cfg.turns)]))
    if "concurrent" in figs and "shmreplay" in keys:
        groups.append((f"concurrent {cfg.conc_cap:,}", [dict(kind="concurrent", figure="concurrent", contender="shmreplay",
                                                             capacity=cfg.conc_cap, seconds=cfg.seconds, writers=cfg.writers)]))
    once: list[tuple[str, list[dict]]] = []
    if "memory" in figs:
        jobs = [dict(kind="memory", figure="memory", contender=k, capacity=cfg.memory_cap) for k in MEM_KEYS if k in keys]
        if jobs:
            once.append(("memory", jobs))
    return groups, once


def job_timeout(job: dict) -> float:
    kind = job["kind"]
    if kind == "sample":
        return 180 + job["capacity"] * 4e-4 + 2 * job["turns"] * job["window"] * 3
    if kind == "sequences":
        return 240 + job["capacity"] * 1e-4
    if kind == "concurrent":
        return 200 + job["seconds"]
    if kind == "memory":
        return 240 + job["capacity"] * 1e-4
    return 120 + job["turns"] * job["window"]


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
    s: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))  # figure 1, by contender
    q: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))  # figure 2, by fs4/fs1 row
    st: dict[str, list] = defaultdict(list)
    co: dict[str, list] = defaultdict(list)
    mem: dict[str, Any] = {}
    errors = []
    for entry in doc["raw"]:
        job, res = entry["job"], entry["result"]
        if not res["ok"]:
            errors.append({"rep": entry["rep"], "figure": job["figure"], "contender": job["contender"], "error": res["error"]})
            continue
        k = job["contender"]
        if job["kind"] == "sample":
            s[k]["calls_per_s"].append(res["calls_per_s"])
            s[k]["bytes_per_call"].append(res["bytes_per_call"])
            s[k]["frame_bytes_per_call"].append(res["frame_bytes_per_call"])
            if k == "limit":
                s["memcpy"]["calls_per_s"].append(statistics.median(res["rates"]["info:memcpy"]))
                s["memcpy"]["bytes_per_call"].append(res["bytes_per_call"])
                s["memcpy"]["frame_bytes_per_call"].append(res["bytes_per_call"])
            if "shapes" in res:
                s[k]["shapes"] = [res["shapes"]]
        elif job["kind"] == "sequences":
            for fs in ("fs4", "fs1"):
                if fs in res:
                    row = f"{k}_{fs}" if k == "limit" else k
                    q[row]["calls_per_s"].append(res[fs]["calls_per_s"])
                    q[row]["bytes_per_call"].append(res[fs]["bytes_per_call"])
                    q[row]["fs"] = [fs]
            for f in ("create_s", "create_fill_s"):
                if f in res:
                    q[k][f].append(res[f])
        elif job["kind"] == "step":
            st["env_steps_per_s"].append(res["env_steps_per_s"])
            st["calls_per_s"].append(res["calls_per_s"])
            st["wraps"].append(res["wraps"])
        elif job["kind"] == "concurrent":
            for f in ("env_steps_per_s", "items_per_s", "aggregate_per_s", "gb_per_s", "check_share"):
                co[f].append(res[f])
            for f in ("checked", "wrong", "torn", "padded", "short_windows", "episode_ends"):
                co[f].append(res[f])
            if res["first_wrong"]:
                co["first_wrong"].append(res["first_wrong"])
        elif job["kind"] == "memory":
            mem[k] = res
    sample = {}
    for k, d in s.items():
        calls = _median(d["calls_per_s"])
        sample[k] = {"contender": k, "reps": len(d["calls_per_s"]), "calls_per_s": calls,
                     "items_per_s": calls and calls * BATCH, "bytes_per_call": d["bytes_per_call"][0],
                     "frame_bytes_per_call": d["frame_bytes_per_call"][0],
                     "gb_per_s": calls and calls * d["bytes_per_call"][0] / 1e9, "shapes": d["shapes"][0] if d["shapes"] else None,
                     "all_calls_per_s": d["calls_per_s"]}
    for k, r in sample.items():
        r["vs_limit"] = _ratio(r["calls_per_s"], sample["limit"]["calls_per_s"]) if "limit" in sample and k != "limit" else None
        r["vs_cpprb"] = _ratio(r["items_per_s"], sample["cpprb"]["items_per_s"]) if "cpprb" in sample and k != "cpprb" else None
        r["vs_memcpy"] = _ratio(r["calls_per_s"], sample["memcpy"]["calls_per_s"]) if "memcpy" in sample and k != "memcpy" else None
    seq = {}
    for k, d in q.items():
        if not d["calls_per_s"]:
            continue
        calls = _median(d["calls_per_s"])
        seq[k] = {"row": k, "fs": d["fs"][0], "reps": len(d["calls_per_s"]), "calls_per_s": calls,
                  "bytes_per_call": d["bytes_per_call"][0], "gb_per_s": calls * d["bytes_per_call"][0] / 1e9,
                  "create_s": _median(q["limit"]["create_fill_s"] if k.startswith("limit") and "limit" in q else d["create_s"]),
                  "all_calls_per_s": d["calls_per_s"]}
    for k, r in seq.items():
        lim = seq.get(f"limit_{r['fs']}")
        r["vs_limit"] = _ratio(r["calls_per_s"], lim["calls_per_s"]) if lim and not k.startswith("limit") else None
    step = {"env_steps_per_s": _median(st["env_steps_per_s"]), "calls_per_s": _median(st["calls_per_s"]),
            "reps": len(st["env_steps_per_s"]), "wraps": _median(st["wraps"]), "all_env_steps_per_s": st["env_steps_per_s"]} if st else None
    conc: dict[str, Any] | None = None
    if co:
        conc = {f: _median(co[f]) for f in ("env_steps_per_s", "items_per_s", "aggregate_per_s", "gb_per_s", "check_share")}
        conc.update({f: sum(co[f]) for f in ("checked", "wrong", "torn", "padded", "short_windows", "episode_ends")})
        conc["reps"] = len(co["env_steps_per_s"])
        conc["first_wrong"] = co["first_wrong"][0] if co["first_wrong"] else ""
        conc["all_items_per_s"] = co["items_per_s"]
        conc["all_env_steps_per_s"] = co["env_steps_per_s"]
    doc["medians"] = {"sample": sample, "sequences": seq, "step": step, "concurrent": conc, "memory": memory_rows(mem)}
    doc["errors"] = errors
    doc["targets"] = targets(doc)


def memory_rows(mem: dict) -> list[dict]:
    rows = []
    m = mem.get("shmreplay")
    if m:
        if "episode" in m:
            e = m["episode"]
            rows.append({"key": "episode", "layout": "shmreplay EpisodeBuffer, uniform", "bytes_per_step": e["bytes_per_step"],
                         "bytes_1m": e["nbytes"], "how": f"nbytes of a real segment of {e['capacity']:,} steps", "measured": True})
        else:
            rows.append({"key": "episode", "layout": "shmreplay EpisodeBuffer, uniform", "bytes_per_step": m["episode_extrapolated"] / MEMORY_STEPS,
                         "bytes_1m": m["episode_extrapolated"], "how": "nbytes at 10k and 20k steps: fixed part + per step x 1M",
                         "measured": False})
        rows.append({"key": "prioritized", "layout": "shmreplay EpisodeBuffer, Prioritized", "bytes_per_step": m["prioritized_extrapolated"] / MEMORY_STEPS,
                     "bytes_1m": m["prioritized_extrapolated"], "how": "nbytes at 10k and 20k steps, extrapolated", "measured": False})
        t = m["transition"]
        rows.append({"key": "transition", "layout": "transition layout (shmreplay ReplayBuffer, obs + next_obs 4x84x84)",
                     "bytes_per_step": t["bytes_per_slot"], "bytes_1m": t["extrapolated"],
                     "how": f"nbytes at 1k and 2k slots (record {t['record_bytes']:,} B), extrapolated", "measured": False})
    c = mem.get("cpprb")
    if c:
        for cfg, label in (("cpprb", "cpprb ReplayBuffer, Nstep + stack_compress obs, next_obs (n-step items)"),
                           ("cpprb_next_of", "cpprb ReplayBuffer, next_of + stack_compress + Nstep (returns no next_obs)"),
                           ("cpprb_1step", "cpprb ReplayBuffer, next_of + stack_compress, no Nstep (1-step items)")):
            r = c[cfg]
            rows.append({"key": cfg, "layout": label, "bytes_per_step": r["bytes_per_slot"], "bytes_1m": r["extrapolated"],
                         "how": "resident memory of its arrays at 10k and 30k slots, extrapolated", "measured": False})
    return rows


def targets(doc: dict) -> list[dict]:
    m, figs, out = doc["medians"], set(doc["config"]["figures"]), []

    def add(name: str, value: Any, op: str, bound: float, unit: str = "x", shown: str = "{:.3f}") -> None:
        ok = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append({"target": name, "value": None if value is None else shown.format(value),
                    "required_text": f"{op} {bound:,g}{unit}", "pass": ok})

    cfg = doc["config"]
    if "sample" in figs:
        r = m["sample"].get("shmreplay")
        add(f"1. sample(32), {cfg['sample_cap']:,} frames: shmreplay / gather limit (same frames)", r and r["vs_limit"], ">=", SAMPLE_VS_LIMIT)
        add("1. sample(32): shmreplay / cpprb ReplayBuffer (Nstep, stack_compress), items/s", r and r["vs_cpprb"], ">=", SAMPLE_VS_CPPRB)
    if "sequences" in figs:
        for fs in ("fs4", "fs1"):
            r = m["sequences"].get(f"shmreplay_{fs}")
            add(f"2. sample_sequences(32, 80), {cfg['seq_cap']:,} frames, frame_stack {fs[2:]}: shmreplay / gather limit",
                r and r["vs_limit"], ">=", SEQ_VS_LIMIT)
    if "step" in figs:
        add(f"3. step() of {NUM_ENVS} envs: env steps/s", m["step"] and m["step"]["env_steps_per_s"], ">=", STEP_MIN, "", "{:,.0f}")
    if "concurrent" in figs:
        c = m["concurrent"]
        out.append({"target": "4. concurrent, 2 writers x 8 envs + 1 learner: wrong items" + (f" (of {c['checked']:,} checked)" if c else ""),
                    "value": c and c["wrong"], "required_text": "0", "pass": None if not c else (c["wrong"] == 0 and c["checked"] > 0)})
    if "memory" in figs:
        rows = {r["key"]: r for r in m["memory"]}
        r = rows.get("episode")
        what = "measured" if r and r["measured"] else "extrapolated"
        add(f"5. EpisodeBuffer segment for {MEMORY_STEPS:,} Atari steps ({what}), bytes", r and r["bytes_1m"], "<=", MEMORY_MAX, "", "{:,.0f}")
    return out


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(doc: dict) -> str:
    m, cfg = doc["medians"], doc["config"]
    out = [report.header(doc)]
    items = f"n_step {N_STEP}, frame_stack {FRAME_STACK}, gamma {GAMMA}, 84x84 uint8 frames, int32 action, float32 reward"
    if m["sample"]:
        s = m["sample"]
        reps = max(r["reps"] for r in s.values())
        out.append(f"\nfigure 1: sample({BATCH}), {items}; {cfg['sample_cap']:,} frames written by {NUM_ENVS} envs "
                   f"(episodes of {EP_LEN[0]}-{EP_LEN[1] - 1} steps), one process; medians of {cfg['turns']} windows x {reps} repetition(s)")
        what = {"shmreplay": f"EpisodeBuffer.sample({BATCH}, out=)",
                "limit": f"np.take {BATCH * 2 * FRAME_STACK} random frames (out=, mode='clip')",
                "memcpy": f"np.copyto of {BATCH * 2 * FRAME_STACK} consecutive frames (not a gather)",
                "cpprb": f"sample({BATCH}): obs, next_obs (84, 84, 4)",
                "cpprb_next_of": f"sample({BATCH}): obs only, no next_obs"}
        body = []
        for k in SAMPLE_KEYS + ["memcpy"]:
            r = s.get(k)
            if r:
                body.append([LABELS[k], what[k], _num(r["items_per_s"]), _num(1e6 / r["calls_per_s"], "{:.1f}"), f"{r['bytes_per_call']:,}",
                             f"{r['gb_per_s']:.2f}", report._fmt_ratio(r["vs_limit"]) if r["vs_limit"] else ("(1.00)" if k == "limit" else "-"),
                             report._fmt_ratio(r["vs_cpprb"]) if r["vs_cpprb"] else ("(1.00)" if k == "cpprb" else "-"),
                             report._fmt_ratio(r["vs_memcpy"]) if r["vs_memcpy"] else "(1.00)"])
        out.append(report._grid(["contender", "call", "items/s", "us/call", "output B/call", "GB/s", "vs limit", "vs cpprb", "vs memcpy"], body))
        out.append("(memcpy: a contiguous copy of the same frame bytes, for reference: what no gather can beat)")
    if m["sequences"]:
        q = m["sequences"]
        reps = max(r["reps"] for r in q.values())
        out.append(f"\nfigure 2: sample_sequences({BATCH}, {SEQ_LENGTH}), {cfg['seq_cap']:,} frames written by {NUM_ENVS} envs; "
                   f"the limit gathers the same number of random frames; medians of {cfg['seq_turns']} windows x {reps} repetition(s)")
        body = []
        for k, label in (("shmreplay_fs4", LABELS["shmreplay_fs4"]), ("limit_fs4", f"gather limit, {seq_frames(4):,} frames"),
                         ("shmreplay_fs1", LABELS["shmreplay_fs1"]), ("limit_fs1", f"gather limit, {seq_frames(1):,} frames")):
            r = q.get(k)
            if r:
                body.append([label, f"{r['calls_per_s'] * BATCH:,.1f}", f"{1e3 / r['calls_per_s']:.2f}", f"{r['bytes_per_call'] / 1e6:.1f}",
                             f"{r['gb_per_s']:.2f}", report._fmt_ratio(r["vs_limit"]) if r["vs_limit"] else "-",
                             _num(r["create_s"], "{:.1f}")])
        out.append(report._grid(["contender", "sequences/s", "ms/call", "output MB/call", "GB/s", "vs limit", "create s"], body))
    if m["step"]:
        r = m["step"]
        out.append(f"\nfigure 3: step() of {NUM_ENVS} envs (pre-generated frames, terminations 1/{round(1 / TERMINATION_P)}), "
                   f"{cfg['step_cap']:,} frames (the ring wrapped {r['wraps']:.1f} times); medians of {cfg['turns']} windows x {r['reps']} repetition(s)")
        out.append(report._grid(["", "env steps/s", "us per call", "frames GB/s"],
                                [["shmreplay EpisodeWriter.step", _num(r["env_steps_per_s"]), f"{1e6 / r['calls_per_s']:.1f}",
                                  f"{r['env_steps_per_s'] * FRAME_BYTES / 1e9:.2f}"]]))
    if m["concurrent"]:
        c = m["concurrent"]
        out.append(f"\nfigure 4: concurrent, {cfg['conc_cap']:,} frames (prefilled): {cfg['writers']} writer processes x {NUM_ENVS} envs + "
                   f"1 learner (sample({BATCH}, out=), every item checked) for {cfg['seconds']:g} s; medians of {c['reps']} repetition(s)")
        out.append(report._grid(
            ["env steps/s", "items/s", "aggregate/s", "GB/s", "checking", "wrong / checked", "torn", "padded stacks", "short windows"],
            [[_num(c["env_steps_per_s"]), _num(c["items_per_s"]), _num(c["aggregate_per_s"]), f"{c['gb_per_s']:.2f}",
              f"{c['check_share']:.0%}", f"{c['wrong']:,} / {c['checked']:,}", f"{c['torn']:,}", f"{c['padded']:,}", f"{c['short_windows']:,}"]]))
    if m["memory"]:
        out.append(f"\nfigure 5: memory for {MEMORY_STEPS:,} Atari steps (GB = 1e9 bytes)")
        out.append(report._grid(["layout", "bytes per step", "for 1M steps", "how"],
                                [[r["layout"], f"{r['bytes_per_step']:,.0f}", f"{r['bytes_1m'] / 1e9:.2f} GB", r["how"]] for r in m["memory"]]))
    if doc["targets"]:
        out.append("\ntargets (episode streams, issue 12), shmreplay:")
        out.append(report.targets_grid(doc["targets"]))
    for k, why in doc["skipped"].items():
        out.append(f"\nskipped {LABELS.get(k, k)}: {why}")
    for e in doc["errors"]:
        out.append(f"\nERROR repetition {e['rep'] + 1} {e['figure']} {e['contender']}: {e['error'].strip().splitlines()[-1]}")
    c = m["concurrent"]
    if c and c["wrong"]:
        out.append(f"\nwrong items: {c['wrong']:,}; first: {c['first_wrong']}")
    for n in doc["notes"]:
        out.append(f"\nnote: {n}")
    out.append(report.machine_footer(doc["machine"], "cpprb"))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, 1 repetition (< 2 min)")
    ap.add_argument("--only", help=f"comma-separated figures: {','.join(FIGURES)} or 1-{len(FIGURES)} (default: all)")
    ap.add_argument("--reps", type=int, help="repetitions (default: 3; quick 1); the memory figure runs once")
    ap.add_argument("--seconds", type=float, help="duration of the concurrent run (default: 10; quick 2)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory (default benches/results)")
    args = ap.parse_args()

    mode = "quick" if args.quick else "full"
    cfg = MODES[mode]
    if args.reps:
        cfg.reps = args.reps
    if args.seconds:
        cfg.seconds = args.seconds
    figs = report.parse_figures(args.only, FIGURES, ap)

    skipped: dict[str, str] = {}
    keys: set[str] = set()
    for k in dict.fromkeys(SAMPLE_KEYS + SEQ_KEYS + MEM_KEYS):
        why = missing(k)
        if why:
            skipped[k] = why
        else:
            keys.add(k)
    if "cpprb" in skipped:
        skipped.pop("cpprb_next_of", None)
    for k in ("shmreplay_fs4", "shmreplay_fs1"):
        if "shmreplay" in skipped:
            skipped.pop(k, None)
    for k, why in skipped.items():
        print(f"skipping {LABELS[k]}: {why}", flush=True)
    notes: list[str] = [
        "cpprb's stack_compress takes the stack on the last axis: its obs are (84, 84, 4), the same bytes as (4, 84, 84)",
        "cpprb's Nstep turns next_of off (\"Nstep is not support next_of yet\"): with next_of='obs' its sample returns no "
        "next_obs; the counted cpprb declares next_obs and stack_compresses it too",
    ] if "sample" in figs or "memory" in figs else []

    prefix = f"shmep-{os.getpid()}-{uuid.uuid4().hex[:4]}-"
    started = time.time()
    machine = report.machine_info()
    doc_mode = "episodes" + ("-quick" if args.quick else "")
    print(report.header({"mode": doc_mode, "machine": machine}), flush=True)
    groups, once = job_groups(cfg, keys, figs)
    n_jobs = sum(len(j) for _, j in groups)
    print(f"{mode}: figures {','.join(f for f in FIGURES if f in figs)}; {n_jobs} jobs per repetition, {cfg.reps} repetition(s)"
          f"{' + the memory jobs once' if once else ''}; files in {SHM_DIR} start with {prefix}", flush=True)
    raw = run.run_rounds(cfg.reps, groups, lambda job, rep: run_job(dict(job, rep=rep), prefix), prefix, notes)
    if once and not any(n.startswith("interrupted") for n in notes):
        raw += run.run_rounds(1, once, lambda job, rep: run_job(dict(job, rep=rep), prefix), prefix, notes)

    machine["load_avg_end"] = os.getloadavg()
    doc = {
        "suite": "shmreplay episode streams benches",
        "mode": doc_mode,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": time.time() - started,
        "machine": machine,
        "config": asdict(cfg) | {"figures": [f for f in FIGURES if f in figs], "fields": {k: [list(s), np.dtype(d).name] for k, (s, d) in FIELDS.items()},
                                 "frame_stack": FRAME_STACK, "n_step": N_STEP, "gamma": GAMMA, "num_envs": NUM_ENVS,
                                 "batch": BATCH, "seq_length": SEQ_LENGTH, "episode_lengths": list(EP_LEN),
                                 "termination_p": TERMINATION_P},
        "contenders": {k: LABELS[k] for k in sorted(keys)},
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
    # must be pickled as episodes.<name>, so the work is done by the module imported by name.
    import episodes

    sys.exit(episodes.main())
