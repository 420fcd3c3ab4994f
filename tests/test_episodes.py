"""Acceptance tests for ``shmreplay.EpisodeBuffer`` (issue 12), written blind from the issue and
the API pins (SPEC), not from the implementation.

The core of the file is an ORACLE. The test side knows every env's trajectory as it was written,
identifies every sampled item by its content, recomputes from the trajectory what the item must
be (observation stacks, n-step return, next stacks, discount, flags, the other fields) and
compares. Frames carry their identity: for the synthetic drivers an observation ``obs`` (3,) int32
holds ``[code, code ^ OBS_X, t]`` where ``code`` encodes (writer id, env, episode number, position
t); every other field of step t derives from the code of (writer, env, episode, t). So an item
decodes back to its episode and step whatever ticket or slot it came from, a torn frame fails its
own check, and a stack that mixes two episodes differs from the expected one. For the gymnasium
loop the recorder keeps the observations it saw and identifies items by matching them exactly.

In multi-process tests the trajectories are generated deterministically from a seed per writer,
so the checking process regenerates them (``Driver(..., build=False)``). What any writer wrote at
any moment is a prefix of its full schedule, and an item that is valid for a prefix has the same
content in the full schedule, so the oracle built from the full schedule checks items sampled at
any time (an incomplete window of the prefix is never valid: its next observation or its end is
missing).

Assumptions beyond the text (each also noted where used):

* A1: tickets (``info["key"]``) count frames from 0 in write order, as ReplayBuffer's do, and a
  step's key lives in slot ``key % capacity`` (``info["index"]``). Only used in the key tests.
* A2: ``len(buf)`` of a buffer with one writer is ``min(frames written, capacity)``; "frames held".
* A3: the frames of one ``step``/``reset`` call are written together (contiguous, call order);
  used to tell which frames a single writer's ring still holds (a boundary call is "unknown").
* A4: ``reset(envs=[...])`` for an env whose previous step ended its episode starts the new
  episode with the reset observation, and the next ``step`` is an ordinary step of that episode
  (gymnasium clears its autoreset flag on reset). One dedicated test; the random drivers never
  reset an env with a pending autoreset.
* A5: ``"discount"`` is compared with a relative tolerance of 1e-6 unless gamma is 0, 0.5 or 1
  (exact): whether gamma**k is rounded once from float64 or computed in float32 is not pinned.
  Rewards: float64 sum then cast, relative tolerance 1e-6 of sum |gamma^j r_j| for float32 fields
  (1e-12 for float64 fields); exact when gamma is 0, 0.5 or 1 (all values are then representable).
* A6: a sequence starts at a step (``s < L``): its first position is never padding.
* A7: "steps whose window is complete" is read so that a step in a still-running or abandoned
  episode needs all ``n_step`` steps and ``o_{t+n}`` written, and a step of an ended episode is
  always complete. A step is "certainly samplable" when every frame from ``max(0, t-fs+1)`` to
  ``o_{t+k}`` is still held, and also ``o_0`` when the stack reaches before the episode start
  (even with zero padding: an implementation may need the start frame to find the start).
* A8: MinSize counts frames held (every frame written is an insert) and a limited buffer that
  may not sample yet raises TimeoutError with ``timeout=0``; ``stats()["inserts"]`` counts frames
  and ``stats()["samples"]`` counts sampled items (a sequence is one item).
* A9: missing ``terminated``/``truncated`` in ``step`` may raise ValueError or TypeError (a
  missing keyword argument is a TypeError in Python); ``envs=`` given to an unbatched writer
  may raise either too. Every other listed error is ValueError, wrong types TypeError.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
import os
import pickle
import signal
import time
import traceback
from typing import Any, Callable, Iterable

import numpy as np
import pytest

import shmreplay
from shmreplay import EpisodeBuffer, ReplayBuffer

from helpers import kill_and_reap, normalize_fields, splitmix64

pytestmark = pytest.mark.timeout(120)

ENDED = ("term", "trunc", "both")
START_TIMEOUT = 60.0  # spawn children import numpy, pytest and shmreplay

# =======================================================================================
# Frame codes: (writer, env, episode, position) <-> one int32
# =======================================================================================

OBS_X = 0x2B2B2B2B
T_MAX = 64  # positions 0..63 (episodes here have at most 50 steps: positions 0..50)
EP_MAX = 1 << 16
E_MAX = 16
W_MAX = 16
GARBAGE_WID = 15  # never used by a driver: values of ignored autoreset steps and of refused calls
GARBAGE_REWARD = 12345.0


def frame_code(w: int, e: int, ep: int, t: int) -> int:
    assert 0 <= w < W_MAX and 0 <= e < E_MAX and 0 <= ep < EP_MAX and 0 <= t < T_MAX, (w, e, ep, t)
    return 1 + t + T_MAX * (ep + EP_MAX * (e + E_MAX * w))


def decode_code(code: int) -> tuple[int, int, int, int]:
    c = int(code) - 1
    t = c % T_MAX
    c //= T_MAX
    ep = c % EP_MAX
    c //= EP_MAX
    return c // E_MAX, c % E_MAX, ep, t


def coded_value(name: str, codes: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """The value of field ``name`` for the given frame/step codes: shape ``codes.shape + shape``."""
    c = np.asarray(codes, dtype=np.int64)
    lead = c.shape
    flat = c.reshape(-1)
    dtype = np.dtype(dtype)
    if name == "obs":
        assert tuple(shape) == (3,), "the coded 'obs' field is (3,) int32"
        v = np.stack([flat, flat ^ OBS_X, (flat - 1) % T_MAX], axis=-1)
    elif name.startswith("pix"):
        size = int(np.prod(shape, dtype=np.int64))
        words = (size + 7) // 8
        h = splitmix64(flat.astype(np.uint64)[:, None] * np.uint64(4099) + np.arange(words, dtype=np.uint64)[None, :])
        v = np.ascontiguousarray(h).view(np.uint8)[:, :size]
    elif name == "action":
        v = flat
    elif name == "aux":
        v = np.stack([flat * 0.5, -((flat - 1) % T_MAX).astype(np.float64)], axis=-1)
    elif name == "flag":
        v = (flat % 3) == 0
    else:  # reward-like scalar float fields: multiples of 1/16 in [-62.5, 62.5]
        h = splitmix64(flat.astype(np.uint64) ^ np.uint64(0x5EED))
        v = ((h % np.uint64(2001)).astype(np.float64) - 1000.0) / 16.0
    return np.asarray(v).astype(dtype).reshape(lead + tuple(shape)).copy()  # (ascontiguousarray would make 0-d 1-d)


def coded_fields(*, pix: tuple[int, ...] | None = None, reward: str = "reward", reward_dtype: Any = np.float32) -> dict:
    f: dict[str, tuple[tuple[int, ...], Any]] = {"obs": ((3,), np.int32)}
    if pix is not None:
        f["pix"] = (tuple(pix), np.uint8)
    f["action"] = ((), np.int32)
    f["aux"] = ((2,), np.float64)
    f["flag"] = ((), np.bool_)
    f[reward] = ((), reward_dtype)
    return f


# =======================================================================================
# Buffer configuration
# =======================================================================================


@dataclasses.dataclass
class Cfg:
    fields: dict
    observation: tuple = ("obs",)
    reward: Any = "reward"
    frame_stack: int = 1
    stack_padding: str = "first"
    n_step: int = 1
    gamma: float = 0.99

    def __post_init__(self) -> None:
        self.fields = normalize_fields(self.fields)
        if isinstance(self.observation, str):
            self.observation = (self.observation,)
        self.observation = tuple(self.observation)

    @property
    def step_fields(self) -> list[str]:
        return [f for f in self.fields if f not in self.observation]

    @property
    def exact(self) -> bool:
        return self.gamma in (0.0, 0.5, 1.0)

    def create(self, name: str | None, capacity: int, **kwargs: Any) -> Any:
        obs = self.observation[0] if len(self.observation) == 1 else list(self.observation)
        return EpisodeBuffer.create(
            name,
            capacity=capacity,
            fields={k: (s, d) for k, (s, d) in self.fields.items()},
            observation=obs,
            reward=self.reward,
            frame_stack=self.frame_stack,
            stack_padding=self.stack_padding,
            n_step=self.n_step,
            gamma=self.gamma,
            **kwargs,
        )

    def ident(self) -> str:
        return f"n{self.n_step}-fs{self.frame_stack}-{self.stack_padding}-g{self.gamma}"


# =======================================================================================
# Episodes and the deterministic driver (synthetic vector env with autoreset)
# =======================================================================================


class CodedEp:
    """One episode of a synthetic env: its content derives from codes; ``L`` steps written so far
    (frames ``o_0 .. o_L``), ``kind`` one of open / abandoned / term / trunc / both."""

    __slots__ = ("key", "L", "kind", "plan_L", "plan_kind", "calls", "fields")

    def __init__(self, key: tuple[int, int, int], plan_L: int | None, plan_kind: str, fields: dict) -> None:
        self.key = key
        self.L = 0
        self.kind = "open"
        self.plan_L = plan_L
        self.plan_kind = plan_kind
        self.calls: list[int] = []  # call index that wrote frame pos
        self.fields = fields

    def code(self, pos: int) -> int:
        return frame_code(*self.key, pos)

    def frame(self, name: str, pos: int) -> np.ndarray:
        shape, dtype = self.fields[name]
        return coded_value(name, self.code(pos), shape, dtype)

    def value(self, name: str, t: int) -> np.ndarray:
        shape, dtype = self.fields[name]
        return coded_value(name, self.code(t), shape, dtype)

    def describe(self) -> str:
        w, e, ep = self.key
        return f"writer {w} env {e} episode {ep} (L={self.L}, {self.kind})"


def random_plan(rng: np.random.Generator, max_len: int, both_p: float) -> tuple[int, str]:
    L = int(rng.integers(1, max_len + 1))
    u = float(rng.random())
    kind = "both" if u < both_p else ("term" if u < both_p + (1 - both_p) / 2 else "trunc")
    return L, kind


class Driver:
    """A deterministic synthetic vector env of ``num_envs`` envs (None: one unbatched env),
    producing the kwargs of ``reset``/``step`` calls and recording what they write.

    Episode lengths are 1..max_len, ends terminated / truncated / both. An env whose previous
    step ended its episode autoresets in the next step (gymnasium NEXT_STEP): that call's obs is
    the new o_0 and its action/reward/flags are garbage that must be ignored. With
    ``reset_prob`` some envs (never one with a pending autoreset) are reset mid-episode, in a
    random order of ``envs``. ``plan(env, episode) -> (L or None, kind)`` fixes the episodes.
    ``build=False`` records only (for the oracle of another process): the same random draws.
    """

    def __init__(
        self,
        wid: int,
        num_envs: int | None,
        seed: int,
        cfg: Cfg,
        *,
        reset_prob: float = 0.0,
        plan: Callable[[int, int], tuple[int | None, str]] | None = None,
        max_len: int = 50,
        both_p: float = 0.1,
        build: bool = True,
    ) -> None:
        self.wid = wid
        self.num_envs = num_envs
        self.batched = num_envs is not None
        self.N = 1 if num_envs is None else int(num_envs)
        self.cfg = cfg
        self.rng = np.random.default_rng([seed, wid, 0xE915])
        self.reset_prob = reset_prob
        self.plan = plan
        self.max_len = max_len
        self.both_p = both_p
        self.build = build
        self.cur: list[CodedEp | None] = [None] * self.N
        self.pending = [False] * self.N
        self.next_ep = [0] * self.N
        self.episodes: dict[tuple[int, int, int], CodedEp] = {}
        self.calls: list[tuple[int, int]] = []  # (first frame number, frames) per call
        self.frames = 0

    # ---- recording -------------------------------------------------------------------
    def _start(self, e: int) -> CodedEp:
        old = self.cur[e]
        if old is not None and old.kind == "open":
            old.kind = "abandoned"
        k = self.next_ep[e]
        self.next_ep[e] += 1
        if self.plan is not None:
            L, kind = self.plan(e, k)
        else:
            L, kind = random_plan(self.rng, self.max_len, self.both_p)
        rec = CodedEp((self.wid, e, k), L, kind, self.cfg.fields)
        rec.calls.append(len(self.calls))
        self.episodes[rec.key] = rec
        self.cur[e] = rec
        self.pending[e] = False
        return rec

    def _finish_call(self, n: int) -> None:
        self.calls.append((self.frames, n))
        self.frames += n

    def _unbatch(self, kw: dict) -> dict:
        if self.batched:
            return kw
        return {k: (v[0] if isinstance(v, np.ndarray) else v) for k, v in kw.items()}

    def reset(self, envs: Iterable[int] | None = None) -> dict | None:
        idx = list(range(self.N)) if envs is None else [int(e) for e in envs]
        codes = [self._start(e).code(0) for e in idx]
        self._finish_call(len(idx))
        if not self.build:
            return None
        codes_a = np.asarray(codes, dtype=np.int64)
        kw = {o: coded_value(o, codes_a, *self.cfg.fields[o]) for o in self.cfg.observation}
        if envs is not None:
            kw["envs"] = idx
            return kw
        return self._unbatch(kw)

    def step(self) -> dict | None:
        N = self.N
        ci = len(self.calls)
        obs_codes = np.zeros(N, dtype=np.int64)
        step_codes = np.zeros(N, dtype=np.int64)
        garbage = np.zeros(N, dtype=bool)
        term = np.zeros(N, dtype=bool)
        trunc = np.zeros(N, dtype=bool)
        for e in range(N):
            rec = self.cur[e]
            assert rec is not None, "driver: step before reset"
            if self.pending[e]:
                rec = self._start(e)
                obs_codes[e] = rec.code(0)
                garbage[e] = True
                term[e] = bool(self.rng.random() < 0.5)
                trunc[e] = bool(self.rng.random() < 0.5)
            else:
                t = rec.L
                step_codes[e] = rec.code(t)
                obs_codes[e] = rec.code(t + 1)
                rec.L += 1
                rec.calls.append(ci)
                if rec.plan_L is not None and rec.L >= rec.plan_L:
                    rec.kind = rec.plan_kind
                    self.pending[e] = True
                    term[e] = rec.kind in ("term", "both")
                    trunc[e] = rec.kind in ("trunc", "both")
        self._finish_call(N)
        if not self.build:
            return None
        kw: dict[str, Any] = {}
        for o in self.cfg.observation:
            kw[o] = coded_value(o, obs_codes, *self.cfg.fields[o])
        gcode = frame_code(GARBAGE_WID, 0, 0, 1)
        for f in self.cfg.step_fields:
            shape, dtype = self.cfg.fields[f]
            v = coded_value(f, np.where(garbage, gcode, step_codes), shape, dtype)
            if f == self.cfg.reward and garbage.any():
                v[garbage] = GARBAGE_REWARD
            kw[f] = v
        kw["terminated"] = term
        kw["truncated"] = trunc
        return self._unbatch(kw)

    def next_op(self) -> tuple[str, dict | None]:
        if self.reset_prob and self.rng.random() < self.reset_prob:
            cand = [e for e in range(self.N) if not self.pending[e]]
            if cand:
                if not self.batched:
                    return "reset", self.reset()
                k = int(self.rng.integers(1, len(cand) + 1))
                envs = [int(e) for e in self.rng.permutation(cand)[:k]]
                if k == self.N and self.rng.random() < 0.5:
                    return "reset", self.reset()
                return "reset", self.reset(envs)
        return "step", self.step()

    def run(self, n_calls: int) -> "Driver":
        """Records a whole schedule without building values (the oracle of another process)."""
        self.reset()
        for _ in range(n_calls):
            self.next_op()
        return self

    # ---- oracle interface --------------------------------------------------------------
    def all_episodes(self) -> list[CodedEp]:
        return list(self.episodes.values())


def apply(writer: Any, op: str, kw: dict) -> None:
    getattr(writer, op)(**kw)


class CodedOracle:
    """Identifies coded items: the primary observation frame decodes to (w, e, ep, t)."""

    def __init__(self, drivers: dict[int, Driver] | None = None, factory: Callable[[int], Driver] | None = None) -> None:
        self.drivers = dict(drivers or {})
        self.factory = factory

    def driver(self, wid: int) -> Driver | None:
        d = self.drivers.get(wid)
        if d is None and self.factory is not None and wid < W_MAX and wid != GARBAGE_WID:
            d = self.drivers[wid] = self.factory(wid)
        return d

    def lookup(self, frame: np.ndarray) -> tuple[Any, int] | None:
        f = np.asarray(frame).reshape(-1)
        if f.shape != (3,):
            return None
        code = int(f[0])
        if code <= 0 or int(f[1]) != (code ^ OBS_X) or int(f[2]) != (code - 1) % T_MAX:
            return None
        w, e, ep, t = decode_code(code)
        d = self.driver(w)
        if d is None:
            return None
        rec = d.episodes.get((w, e, ep))
        return None if rec is None else (rec, t)


# =======================================================================================
# The recorder of an arbitrary (gymnasium) loop: explicit values, lookup by observation bytes
# =======================================================================================


class RecEp:
    __slots__ = ("key", "L", "kind", "frames", "steps", "calls")

    def __init__(self, key: tuple[int, int, int], cfg: Cfg) -> None:
        self.key = key
        self.L = 0
        self.kind = "open"
        self.frames: dict[str, list[np.ndarray]] = {o: [] for o in cfg.observation}
        self.steps: dict[str, list[np.ndarray]] = {f: [] for f in cfg.step_fields}
        self.calls: list[int] = []

    def frame(self, name: str, pos: int) -> np.ndarray:
        return self.frames[name][pos]

    def value(self, name: str, t: int) -> np.ndarray:
        return self.steps[name][t]

    def describe(self) -> str:
        return f"env {self.key[1]} episode {self.key[2]} (L={self.L}, {self.kind})"


_AMBIGUOUS = object()


class Recorder:
    """Records what a vector-env loop wrote, applying gymnasium's NEXT_STEP autoreset rule itself."""

    def __init__(self, cfg: Cfg, num_envs: int) -> None:
        self.cfg = cfg
        self.N = num_envs
        self.cur: list[RecEp | None] = [None] * num_envs
        self.pending = [False] * num_envs
        self.count = [0] * num_envs
        self.episodes: list[RecEp] = []
        self.index: dict[bytes, Any] = {}
        self.calls: list[tuple[int, int]] = []
        self.frames = 0

    def _add_frame(self, rec: RecEp, values: dict[str, np.ndarray], row: int) -> None:
        for o in self.cfg.observation:
            shape, dtype = self.cfg.fields[o]
            rec.frames[o].append(np.asarray(np.asarray(values[o])[row]).astype(dtype).copy())
        rec.calls.append(len(self.calls))
        key = rec.frames[self.cfg.observation[0]][-1].tobytes()
        self.index[key] = _AMBIGUOUS if key in self.index else (rec, len(rec.frames[self.cfg.observation[0]]) - 1)

    def _start(self, e: int, values: dict, row: int) -> RecEp:
        old = self.cur[e]
        if old is not None and old.kind == "open":
            old.kind = "abandoned"
        rec = RecEp((0, e, self.count[e]), self.cfg)
        self.count[e] += 1
        self.episodes.append(rec)
        self.cur[e] = rec
        self.pending[e] = False
        self._add_frame(rec, values, row)
        return rec

    def reset(self, values: dict, envs: list[int] | None = None) -> None:
        idx = list(range(self.N)) if envs is None else list(envs)
        for row, e in enumerate(idx):
            self._start(e, values, row)
        self.calls.append((self.frames, len(idx)))
        self.frames += len(idx)

    def step(self, values: dict, terminated: Any, truncated: Any) -> None:
        term = np.asarray(terminated, dtype=bool)
        trunc = np.asarray(truncated, dtype=bool)
        for e in range(self.N):
            if self.pending[e]:
                self._start(e, values, e)
                continue
            rec = self.cur[e]
            assert rec is not None
            for f in self.cfg.step_fields:
                shape, dtype = self.cfg.fields[f]
                rec.steps[f].append(np.asarray(np.asarray(values[f])[e]).astype(dtype))
            rec.L += 1
            self._add_frame(rec, values, e)
            if term[e] or trunc[e]:
                rec.kind = "both" if (term[e] and trunc[e]) else ("term" if term[e] else "trunc")
                self.pending[e] = True
        self.calls.append((self.frames, self.N))
        self.frames += self.N

    def all_episodes(self) -> list[RecEp]:
        return self.episodes

    def lookup(self, frame: np.ndarray) -> tuple[Any, int] | None:
        shape, dtype = self.cfg.fields[self.cfg.observation[0]]
        hit = self.index.get(np.asarray(frame).astype(dtype).tobytes())
        assert hit is not _AMBIGUOUS, "two recorded frames are equal: the item cannot be identified"
        return hit


# =======================================================================================
# The oracle: expected items, checks, keys, eviction, coverage
# =======================================================================================


def make_evict(src: Any, capacity: int) -> Callable[[Any, int], str]:
    """For a single writer (A3): whether frame ``pos`` of ``rec`` is certainly evicted, certainly
    held, or unknown (written by the call that straddles the ring's oldest frame)."""

    def state(rec: Any, pos: int) -> str:
        start, n = src.calls[rec.calls[pos]]
        threshold = src.frames - capacity
        if start + n <= threshold:
            return "evicted"
        if start >= threshold:
            return "present"
        return "unknown"

    return state


def window_k(cfg: Cfg, rec: Any, t: int) -> int | None:
    """k for step t, or None if its window is not complete (A7)."""
    if t >= rec.L:
        return None
    if rec.kind in ENDED:
        return min(cfg.n_step, rec.L - t)
    return cfg.n_step if t + cfg.n_step <= rec.L else None


def needed_positions(cfg: Cfg, first: int, last: int, *, certain: bool = False) -> list[int]:
    lo = first - cfg.frame_stack + 1
    pos = list(range(max(0, lo), last + 1))
    if lo < 0 and (certain or cfg.stack_padding == "first") and 0 not in pos:
        pos.append(0)
    return pos


def expected_stack(cfg: Cfg, rec: Any, name: str, end: int) -> np.ndarray:
    shape, dtype = cfg.fields[name]
    if cfg.frame_stack == 1:
        return np.asarray(rec.frame(name, end))
    out = []
    for pos in range(end - cfg.frame_stack + 1, end + 1):
        if pos >= 0:
            out.append(rec.frame(name, pos))
        elif cfg.stack_padding == "first":
            out.append(rec.frame(name, 0))
        else:
            out.append(np.zeros(shape, dtype))
    return np.stack(out)


def n_step_return(cfg: Cfg, rec: Any, t: int, k: int) -> tuple[float, float]:
    """(sum_{j<k} gamma^j r_{t+j} in float64, sum of the absolute terms)."""
    r = np.array([float(rec.value(cfg.reward, t + j)) for j in range(k)], dtype=np.float64)
    g = np.array([cfg.gamma**j for j in range(k)], dtype=np.float64)
    return float(np.sum(g * r)), float(np.sum(np.abs(g * r)))


def _show(a: Any) -> str:
    a = np.asarray(a)
    if a.size > 24:
        return f"array{a.shape} {a.dtype} (first {a.reshape(-1)[:12].tolist()}...)"
    return repr(a.tolist())


def _frame_ids(cfg: Cfg, oracle: Any, stack: np.ndarray) -> str:
    """Readable identities of the frames of a stack of the primary observation."""
    a = np.asarray(stack)
    shape = cfg.fields[cfg.observation[0]][0]
    frames = a.reshape((-1,) + tuple(shape))
    out = []
    for f in frames:
        if not np.any(f):
            out.append("zeros")
            continue
        hit = oracle.lookup(f)
        out.append("?" if hit is None else f"{hit[0].key}@{hit[1]}")
    return "[" + ", ".join(out) + "]"


def assert_same(got: Any, exp: Any, where: str) -> None:
    got = np.asarray(got)
    exp = np.asarray(exp)
    assert got.dtype == exp.dtype, f"{where}: dtype {got.dtype}, expected {exp.dtype}"
    assert got.shape == exp.shape, f"{where}: shape {got.shape}, expected {exp.shape}"
    assert np.array_equal(got, exp), f"{where}: got {_show(got)}, expected {_show(exp)}"


class KeyBook:
    """Keys identify steps: the same step always has the same key while it can be sampled, and a
    key is never reused for another step (keys are never reused)."""

    def __init__(self) -> None:
        self.by_item: dict[Any, int] = {}
        self.by_key: dict[int, Any] = {}

    def see(self, item: Any, key: int, where: str) -> None:
        k0 = self.by_item.setdefault(item, key)
        assert k0 == key, f"{where}: key {key}, but the same step was sampled with key {k0} before"
        i0 = self.by_key.setdefault(key, item)
        assert i0 == item, f"{where}: key {key} was the key of step {i0} before (keys are never reused)"


def _check_info(info: dict, n: int, capacity: int | None, where: str) -> None:
    assert isinstance(info, dict) or hasattr(info, "keys"), f"{where}: info is a {type(info).__name__}"
    for name, dtype in (("key", np.uint64), ("index", np.int64)):
        assert name in info, f"{where}: info lacks {name!r}: {sorted(info)}"
        a = info[name]
        assert isinstance(a, np.ndarray), f"{where}: info[{name!r}] is a {type(a).__name__}"
        assert a.dtype == np.dtype(dtype), f"{where}: info[{name!r}] dtype {a.dtype}, expected {np.dtype(dtype)}"
        assert a.shape == (n,), f"{where}: info[{name!r}] shape {a.shape}, expected {(n,)}"
    if capacity is not None and n:
        idx = info["index"]
        assert idx.min() >= 0 and idx.max() < capacity, f"{where}: index outside [0, {capacity}): {idx}"


def check_sample(
    cfg: Cfg,
    oracle: Any,
    batch: dict,
    info: dict | None,
    n: int,
    *,
    keybook: KeyBook | None = None,
    evict: Callable[[Any, int], str] | None = None,
    capacity: int | None = None,
    what: str = "sample",
) -> list[tuple[Any, int]]:
    """Checks every item of ``buf.sample(n)`` against the trajectories; returns the items."""
    fs = cfg.frame_stack
    want = set(cfg.observation) | {f"next_{o}" for o in cfg.observation} | set(cfg.step_fields)
    want |= {"discount", "terminated", "truncated"}
    assert set(batch) == want, f"{what}: fields {sorted(batch)}, expected {sorted(want)}"
    for o in cfg.observation:
        shape, dtype = cfg.fields[o]
        exp_shape = (n, *shape) if fs == 1 else (n, fs, *shape)
        for name in (o, f"next_{o}"):
            a = np.asarray(batch[name])
            assert a.shape == exp_shape, f"{what}: {name!r} shape {a.shape}, expected {exp_shape}"
            assert a.dtype == dtype, f"{what}: {name!r} dtype {a.dtype}, expected {dtype}"
    for f in cfg.step_fields:
        shape, dtype = cfg.fields[f]
        a = np.asarray(batch[f])
        assert a.shape == (n, *shape), f"{what}: {f!r} shape {a.shape}, expected {(n, *shape)}"
        assert a.dtype == dtype, f"{what}: {f!r} dtype {a.dtype}, expected {dtype}"
    assert batch["discount"].shape == (n,) and batch["discount"].dtype == np.float32, (
        f"{what}: discount {batch['discount'].shape} {batch['discount'].dtype}, expected ({n},) float32"
    )
    for flag in ("terminated", "truncated"):
        assert batch[flag].shape == (n,) and batch[flag].dtype == np.bool_, (
            f"{what}: {flag} {batch[flag].shape} {batch[flag].dtype}, expected ({n},) bool"
        )
    if info is not None:
        _check_info(info, n, capacity, what)

    primary = cfg.observation[0]
    items = []
    for i in range(n):
        stack = np.asarray(batch[primary][i])
        last = stack if fs == 1 else stack[-1]
        found = oracle.lookup(last)
        key = None if info is None else int(info["key"][i])
        if found is None:
            raise AssertionError(
                f"{what} item {i} (key {key}): o_t {_show(last)} is no observation any writer wrote "
                f"(torn, padding, or a refused call's values)"
            )
        rec, t = found
        where = f"{what} item {i} [{rec.describe()}, t={t}, key={key}]"
        assert t < rec.L, f"{where}: o_t is the episode's last frame written, no step t exists"
        k = window_k(cfg, rec, t)
        assert k is not None, (
            f"{where}: the window is not complete (needs {cfg.n_step} steps or the end, {rec.L - t} written)"
        )
        for o in cfg.observation:
            got = np.asarray(batch[o][i])
            exp = expected_stack(cfg, rec, o, t)
            if not np.array_equal(got, exp):
                raise AssertionError(
                    f"{where}: {o!r} stack {_frame_ids(cfg, oracle, batch[primary][i])} "
                    f"(expected {_frame_ids(cfg, oracle, expected_stack(cfg, rec, primary, t))}); "
                    f"got {_show(got)}, expected {_show(exp)}"
                )
            got = np.asarray(batch[f"next_{o}"][i])
            exp = expected_stack(cfg, rec, o, t + k)
            if not np.array_equal(got, exp):
                raise AssertionError(
                    f"{where}: 'next_{o}' (k={k}) stack {_frame_ids(cfg, oracle, batch[f'next_{primary}'][i])} "
                    f"(expected {_frame_ids(cfg, oracle, expected_stack(cfg, rec, primary, t + k))}); "
                    f"got {_show(got)}, expected {_show(exp)}"
                )
        for f in cfg.step_fields:
            got = batch[f][i]
            if f == cfg.reward:
                exp64, scale = n_step_return(cfg, rec, t, k)
                dtype = cfg.fields[f][1]
                exp = dtype.type(exp64)
                if cfg.exact:
                    ok = got == exp
                else:
                    tol = (1e-6 if dtype == np.float32 else 1e-12) * max(scale, 1e-30)
                    ok = abs(float(got) - exp64) <= tol
                assert ok, (
                    f"{where}: {f!r} {float(got)!r}, expected n-step return {float(exp)!r} over k={k} "
                    f"(rewards {[float(rec.value(f, t + j)) for j in range(k)]}, gamma {cfg.gamma})"
                )
            else:
                assert_same(got, rec.value(f, t), f"{where}: field {f!r}")
        exp_d = np.float32(cfg.gamma**k)
        got_d = batch["discount"][i]
        if cfg.exact:
            assert got_d == exp_d, f"{where}: discount {got_d!r}, expected gamma**{k} = {exp_d!r}"
        else:
            assert math.isclose(float(got_d), float(exp_d), rel_tol=1e-6), (
                f"{where}: discount {got_d!r}, expected gamma**{k} = {exp_d!r}"
            )
        end = t + k == rec.L
        exp_term = end and rec.kind in ("term", "both")
        exp_trunc = end and rec.kind in ("trunc", "both")
        assert bool(batch["terminated"][i]) == exp_term, f"{where}: terminated {batch['terminated'][i]}, expected {exp_term}"
        assert bool(batch["truncated"][i]) == exp_trunc, f"{where}: truncated {batch['truncated'][i]}, expected {exp_trunc}"
        if evict is not None:
            for pos in needed_positions(cfg, t, t + k):
                assert evict(rec, pos) != "evicted", f"{where}: needs frame {pos}, which has been overwritten"
        if keybook is not None and key is not None:
            keybook.see((rec.key, t), key, where)
        items.append((rec.key, t))
    return items


def check_sequences(
    cfg: Cfg,
    oracle: Any,
    seq: dict,
    info: dict | None,
    n: int,
    length: int,
    period: int,
    *,
    keybook: KeyBook | None = None,
    evict: Callable[[Any, int], str] | None = None,
    capacity: int | None = None,
    what: str = "sample_sequences",
) -> list[tuple[Any, int]]:
    fs = cfg.frame_stack
    want = set(cfg.observation) | set(cfg.step_fields) | {"terminated", "truncated", "is_first", "mask"}
    assert set(seq) == want, f"{what}: fields {sorted(seq)}, expected {sorted(want)}"
    for o in cfg.observation:
        shape, dtype = cfg.fields[o]
        exp_shape = (n, length + 1, *shape) if fs == 1 else (n, length + 1, fs, *shape)
        a = np.asarray(seq[o])
        assert a.shape == exp_shape and a.dtype == dtype, f"{what}: {o!r} {a.shape} {a.dtype}, expected {exp_shape} {dtype}"
    for f in cfg.step_fields:
        shape, dtype = cfg.fields[f]
        a = np.asarray(seq[f])
        assert a.shape == (n, length, *shape) and a.dtype == dtype, (
            f"{what}: {f!r} {a.shape} {a.dtype}, expected {(n, length, *shape)} {dtype}"
        )
    for flag in ("terminated", "truncated", "is_first", "mask"):
        a = np.asarray(seq[flag])
        assert a.shape == (n, length) and a.dtype == np.bool_, f"{what}: {flag!r} {a.shape} {a.dtype}, expected {(n, length)} bool"
    if info is not None:
        _check_info(info, n, capacity, what)

    primary = cfg.observation[0]
    items = []
    for i in range(n):
        first = np.asarray(seq[primary][i, 0])
        last = first if fs == 1 else first[-1]
        key = None if info is None else int(info["key"][i])
        found = oracle.lookup(last)
        if found is None:
            raise AssertionError(f"{what} item {i} (key {key}): o_s {_show(last)} is no observation any writer wrote")
        rec, s = found
        where = f"{what} item {i} [{rec.describe()}, s={s}, length={length}, period={period}, key={key}]"
        assert s % period == 0, f"{where}: start {s} is not a multiple of the period"
        assert s < rec.L, f"{where}: the start is the episode's last frame written (A6)"
        ended = rec.kind in ENDED
        assert ended or s + length <= rec.L, f"{where}: only {rec.L - s} steps written and the episode has not ended"
        for o in cfg.observation:
            shape, dtype = cfg.fields[o]
            zero = np.zeros(shape if fs == 1 else (fs, *shape), dtype)
            for j in range(length + 1):
                pos = s + j
                exp = expected_stack(cfg, rec, o, pos) if pos <= rec.L else zero
                got = np.asarray(seq[o][i, j])
                if not np.array_equal(got, exp):
                    raise AssertionError(
                        f"{where}: {o!r} position {j} (o_{pos}) {_frame_ids(cfg, oracle, seq[primary][i, j])}; "
                        f"got {_show(got)}, expected {_show(exp)}"
                    )
        for j in range(length):
            pos = s + j
            real = pos < rec.L
            for f in cfg.step_fields:
                shape, dtype = cfg.fields[f]
                exp = np.asarray(rec.value(f, pos)) if real else np.zeros(shape, dtype)
                assert_same(seq[f][i, j], exp, f"{where}: {f!r} position {j}")
            last_step = real and pos == rec.L - 1
            exp_flags = {
                "mask": real,
                "is_first": real and pos == 0,
                "terminated": last_step and rec.kind in ("term", "both"),
                "truncated": last_step and rec.kind in ("trunc", "both"),
            }
            for flag, exp in exp_flags.items():
                assert bool(seq[flag][i, j]) == exp, f"{where}: {flag!r} position {j} is {bool(seq[flag][i, j])}, expected {exp}"
        if evict is not None:
            for pos in needed_positions(cfg, s, min(s + length, rec.L)):
                assert evict(rec, pos) != "evicted", f"{where}: needs frame {pos}, which has been overwritten"
        if keybook is not None and key is not None:
            keybook.see((rec.key, s), key, where)
        items.append((rec.key, s))
    return items


def step_sets(cfg: Cfg, episodes: Iterable[Any], evict: Callable | None = None) -> tuple[set, set]:
    """(certainly samplable steps, possibly samplable steps) as (episode key, t)."""
    must, allowed = set(), set()
    for rec in episodes:
        for t in range(rec.L):
            k = window_k(cfg, rec, t)
            if k is None:
                continue
            if evict is None:
                must.add((rec.key, t))
                allowed.add((rec.key, t))
                continue
            if any(evict(rec, p) == "evicted" for p in needed_positions(cfg, t, t + k)):
                continue
            allowed.add((rec.key, t))
            if all(evict(rec, p) == "present" for p in needed_positions(cfg, t, t + k, certain=True)):
                must.add((rec.key, t))
    return must, allowed


def start_sets(cfg: Cfg, episodes: Iterable[Any], length: int, period: int, evict: Callable | None = None) -> tuple[set, set]:
    must, allowed = set(), set()
    for rec in episodes:
        for s in range(0, rec.L, period):
            if rec.kind not in ENDED and s + length > rec.L:
                continue
            last = min(s + length, rec.L)
            if evict is None:
                must.add((rec.key, s))
                allowed.add((rec.key, s))
                continue
            if any(evict(rec, p) == "evicted" for p in needed_positions(cfg, s, last)):
                continue
            allowed.add((rec.key, s))
            if all(evict(rec, p) == "present" for p in needed_positions(cfg, s, last, certain=True)):
                must.add((rec.key, s))
    return must, allowed


def draw_ids(buf: Any, cfg: Cfg, oracle: Any, draws: int, *, seq: tuple[int, int] | None = None, batch: int = 2048) -> collections.Counter:
    """Identifies ``draws`` sampled items (steps, or sequence starts with ``seq=(length, period)``)."""
    counts: collections.Counter = collections.Counter()
    primary = cfg.observation[0]
    done = 0
    while done < draws:
        b = min(batch, draws - done)
        if seq is None:
            out = buf.sample(b)
            frames = np.asarray(out[primary])
            frames = frames if cfg.frame_stack == 1 else frames[:, -1]
        else:
            out = buf.sample_sequences(b, length=seq[0], period=seq[1])
            frames = np.asarray(out[primary])[:, 0]
            frames = frames if cfg.frame_stack == 1 else frames[:, -1]
        for f in frames:
            hit = oracle.lookup(f)
            assert hit is not None, f"sampled an unidentifiable observation {_show(f)}"
            counts[(hit[0].key, hit[1])] += 1
        done += b
    return counts


def chi2_critical(df: int, p: float = 1e-6) -> float:
    """Wilson-Hilferty: the chi-square value exceeded with probability ~p (p = 1e-6: z = 4.753)."""
    z = statistics.NormalDist().inv_cdf(1.0 - p)
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def assert_coverage(counts: collections.Counter, must: set, allowed: set, what: str, *, uniform: bool = False) -> None:
    drawn = set(counts)
    extra = drawn - allowed
    assert not extra, f"{what}: drew {len(extra)} items that are not samplable, e.g. {sorted(extra)[:5]}"
    missing = must - drawn
    assert not missing, (
        f"{what}: {len(missing)} of {len(must)} samplable items never drawn in {sum(counts.values())} draws, "
        f"e.g. {sorted(missing)[:5]}"
    )
    if uniform and len(allowed) > 1:
        assert must == allowed
        total = sum(counts.values())
        exp = total / len(allowed)
        stat = sum((counts.get(it, 0) - exp) ** 2 / exp for it in allowed)
        crit = chi2_critical(len(allowed) - 1)
        assert stat < crit, f"{what}: draws are not uniform over the {len(allowed)} samplable items (chi2 {stat:.1f} > {crit:.1f})"


# =======================================================================================
# Single-process oracle runs
# =======================================================================================


def run_and_check(
    buf: Any,
    cfg: Cfg,
    driver: Driver,
    writer: Any,
    n_calls: int,
    *,
    check_every: int = 10,
    evict: Callable | None = None,
    seq_args: tuple[int, int] = (6, 3),
    keybook: KeyBook | None = None,
) -> None:
    """Writes ``n_calls`` ops from ``driver``; every ``check_every`` calls samples steps and
    sequences and checks them all (or checks EmptyBufferError when nothing is complete)."""
    oracle = CodedOracle({driver.wid: driver})
    keybook = keybook or KeyBook()
    length, period = seq_args
    for c in range(n_calls):
        op, kw = driver.next_op()
        apply(writer, op, kw)
        if c % check_every == 0 or c == n_calls - 1:
            assert len(buf) == min(driver.frames, buf.capacity), f"len {len(buf)} after {driver.frames} frames (A2)"
            _, allowed = step_sets(cfg, driver.all_episodes(), evict)
            if not allowed and evict is None:
                with pytest.raises(shmreplay.EmptyBufferError):
                    buf.sample(4)
            elif allowed:
                batch, info = buf.sample(24, return_info=True)
                check_sample(cfg, oracle, batch, info, 24, keybook=keybook, evict=evict, capacity=buf.capacity, what=f"call {c}")
            _, s_allowed = start_sets(cfg, driver.all_episodes(), length, period, evict)
            if not s_allowed and evict is None:
                with pytest.raises(shmreplay.EmptyBufferError):
                    buf.sample_sequences(2, length=length, period=period)
            elif s_allowed:
                seq, info = buf.sample_sequences(6, length=length, period=period, return_info=True)
                check_sequences(
                    cfg, oracle, seq, info, 6, length, period, keybook=keybook, evict=evict, capacity=buf.capacity, what=f"call {c}"
                )


ORACLE_CASES = [
    pytest.param(n, fs, pad, id=f"n{n}-fs{fs}-{pad}") for n in (1, 3, 5) for fs in (1, 4) for pad in ("first", "zeros")
]


@pytest.mark.parametrize("n_step,frame_stack,padding", ORACLE_CASES)
def test_sample_oracle(shm_name, n_step, frame_stack, padding):
    """4 envs with autoreset, random lengths 1..50, all three kinds of end, some partial resets; no
    wrap: every sampled item checked, every samplable step and sequence start drawn, uniformly."""
    cfg = Cfg(coded_fields(), frame_stack=frame_stack, stack_padding=padding, n_step=n_step, gamma=0.99)
    seed = 100 + 10 * n_step + frame_stack + (padding == "zeros")
    with cfg.create(shm_name, capacity=4000) as buf:
        w = buf.writer(num_envs=4)
        assert w.num_envs == 4
        d = Driver(0, 4, seed, cfg, reset_prob=0.03)
        w.reset(**d.reset())
        keybook = KeyBook()
        run_and_check(buf, cfg, d, w, 160, keybook=keybook, seq_args=(5, 2))
        assert d.frames < 4000
        eps = d.all_episodes()
        kinds = collections.Counter(r.kind for r in eps)
        assert kinds["term"] and kinds["trunc"] and kinds["abandoned"], kinds
        oracle = CodedOracle({0: d})
        batch, info = buf.sample(400, return_info=True)
        check_sample(cfg, oracle, batch, info, 400, keybook=keybook, capacity=buf.capacity)
        must, allowed = step_sets(cfg, eps)
        counts = draw_ids(buf, cfg, oracle, 40 * len(allowed))
        assert_coverage(counts, must, allowed, "sample", uniform=True)
        for length, period in ((1, 1), (7, 3), (60, 60)):
            seq, info = buf.sample_sequences(64, length=length, period=period, return_info=True)
            check_sequences(cfg, oracle, seq, info, 64, length, period, keybook=keybook, capacity=buf.capacity)
            s_must, s_allowed = start_sets(cfg, eps, length, period)
            counts = draw_ids(buf, cfg, oracle, 30 * len(s_allowed), seq=(length, period))
            assert_coverage(counts, s_must, s_allowed, f"sample_sequences(length={length}, period={period})")


WRAP_CASES = [
    pytest.param(1, 1, "first", 60, id="n1-fs1-cap60"),
    pytest.param(3, 4, "first", 150, id="n3-fs4-first-cap150"),
    pytest.param(5, 4, "zeros", 150, id="n5-fs4-zeros-cap150"),
    pytest.param(3, 1, "zeros", 97, id="n3-fs1-zeros-cap97"),
]


@pytest.mark.parametrize("n_step,frame_stack,padding,capacity", WRAP_CASES)
def test_sample_oracle_wrapping_ring(shm_name, n_step, frame_stack, padding, capacity):
    """Two observation fields, 3 envs, a ring that wraps ~15 times: no item ever touches an
    overwritten frame, the newest frames stay samplable (oldest-first eviction), len is capacity."""
    cfg = Cfg(
        coded_fields(pix=(5, 5)), observation=("obs", "pix"), frame_stack=frame_stack, stack_padding=padding, n_step=n_step, gamma=0.97
    )
    with cfg.create(shm_name, capacity=capacity) as buf:
        assert buf.observations == ("obs", "pix")
        w = buf.writer(num_envs=3)
        d = Driver(0, 3, 7 + capacity, cfg, reset_prob=0.02)
        w.reset(**d.reset())
        evict = make_evict(d, capacity)
        keybook = KeyBook()
        run_and_check(buf, cfg, d, w, 5 * capacity, check_every=9, evict=evict, keybook=keybook, seq_args=(4, 2))
        assert d.frames > 10 * capacity
        assert len(buf) == capacity, f"len {len(buf)} (A2)"
        oracle = CodedOracle({0: d})
        batch, info = buf.sample(300, return_info=True)
        check_sample(cfg, oracle, batch, info, 300, keybook=keybook, evict=evict, capacity=capacity)
        must, allowed = step_sets(cfg, d.all_episodes(), evict)
        assert must, "the newest frames hold complete steps"
        counts = draw_ids(buf, cfg, oracle, 50 * len(allowed))
        assert_coverage(counts, must, allowed, "sample after wrapping")
        s_must, s_allowed = start_sets(cfg, d.all_episodes(), 4, 2, evict)
        counts = draw_ids(buf, cfg, oracle, 50 * max(1, len(s_allowed)), seq=(4, 2))
        assert_coverage(counts, s_must, s_allowed, "sample_sequences after wrapping")


@pytest.mark.parametrize("padding", ["first", "zeros"])
def test_unbatched_writer(shm_name, padding):
    """num_envs=None: values without the env axis; autoreset and mid-episode resets as batched."""
    cfg = Cfg(coded_fields(pix=(2, 3)), observation=["obs", "pix"], frame_stack=4, stack_padding=padding, n_step=3, gamma=0.9)
    with cfg.create(shm_name, capacity=3000) as buf:
        w = buf.writer(num_envs=None)
        assert w.num_envs is None
        d = Driver(0, None, 5, cfg, reset_prob=0.03)
        kw = d.reset()
        assert kw["obs"].shape == (3,) and kw["pix"].shape == (2, 3)
        w.reset(**kw)
        run_and_check(buf, cfg, d, w, 400, check_every=20, seq_args=(10, 5))
        oracle = CodedOracle({0: d})
        must, allowed = step_sets(cfg, d.all_episodes())
        counts = draw_ids(buf, cfg, oracle, 40 * len(allowed))
        assert_coverage(counts, must, allowed, "sample", uniform=True)
        batch = buf.sample(100)  # return_info defaults to False: the batch alone
        assert isinstance(batch, dict), f"sample() without return_info returned a {type(batch).__name__}"
        check_sample(cfg, oracle, batch, None, 100)


REWARD_CASES = [
    pytest.param(dict(gamma=0.0), id="gamma0"),
    pytest.param(dict(gamma=0.5), id="gamma0.5-exact"),
    pytest.param(dict(gamma=1.0), id="gamma1"),
    pytest.param(dict(gamma=0.99, reward_dtype=np.float64), id="float64-reward"),
    pytest.param(dict(gamma=0.5, reward=None), id="no-reward-field"),
]


@pytest.mark.parametrize("case", REWARD_CASES)
def test_reward_variants(shm_name, case):
    """gamma at 0, 0.5 (exact sums), 1; a float64 reward; reward=None: the field "r" is then an
    ordinary field (r_t, not summed) and discount is still gamma**k."""
    case = dict(case)
    gamma = case.pop("gamma")
    rname = "reward" if case.get("reward", "reward") is not None else "r"
    fields = coded_fields(reward=rname, reward_dtype=case.pop("reward_dtype", np.float32))
    cfg = Cfg(fields, reward=case.pop("reward", "reward"), frame_stack=2, stack_padding="first", n_step=5, gamma=gamma)
    with cfg.create(shm_name, capacity=2000) as buf:
        assert buf.gamma == gamma and buf.reward == cfg.reward and buf.n_step == 5
        w = buf.writer(num_envs=3)
        d = Driver(0, 3, 11, cfg, reset_prob=0.02)
        w.reset(**d.reset())
        run_and_check(buf, cfg, d, w, 150, check_every=15)
        oracle = CodedOracle({0: d})
        batch, info = buf.sample(500, return_info=True)
        check_sample(cfg, oracle, batch, info, 500)


# =======================================================================================
# Hand-computed semantics: autoreset, both flags, final observation kept, partial resets
# =======================================================================================

HAND_FIELDS = {"obs": ((1,), np.int32), "action": ((), np.int32), "reward": ((), np.float32)}


def _col(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int32)[:, None]


def _hand_buffer(name: str, **kwargs: Any) -> Any:
    kw = dict(capacity=64, fields=HAND_FIELDS, observation="obs", reward="reward", frame_stack=1, n_step=2, gamma=0.5)
    kw.update(kwargs)
    return EpisodeBuffer.create(name, **kw)


def _write_hand_episodes(w: Any) -> None:
    F, T = False, True
    w.reset(obs=_col(10, 20))
    w.step(obs=_col(11, 21), action=np.array([1, 2]), reward=np.array([1.0, 2.0]), terminated=np.array([F, F]), truncated=np.array([F, F]))
    # env 0 terminates, env 1 is truncated: 12 and 22 are final observations and must be used
    w.step(obs=_col(12, 22), action=np.array([3, 4]), reward=np.array([4.0, 8.0]), terminated=np.array([T, F]), truncated=np.array([F, T]))
    # autoreset: 30 and 40 are the new episodes' o_0; action 99, reward 1000 and the flags are ignored
    w.step(obs=_col(30, 40), action=np.array([99, 99]), reward=np.array([1000.0, 1000.0]), terminated=np.array([T, T]), truncated=np.array([T, T]))
    # env 0 ends with both flags (counts as terminated, both stored), env 1 truncated again
    w.step(obs=_col(31, 41), action=np.array([5, 6]), reward=np.array([16.0, 32.0]), terminated=np.array([T, F]), truncated=np.array([T, T]))


# o_t -> (action, n-step reward, next obs, discount, terminated, truncated)   (n_step 2, gamma 0.5)
HAND_ITEMS = {
    10: (1, 1.0 + 0.5 * 4.0, 12, 0.25, True, False),
    11: (3, 4.0, 12, 0.5, True, False),
    20: (2, 2.0 + 0.5 * 8.0, 22, 0.25, False, True),
    21: (4, 8.0, 22, 0.5, False, True),
    30: (5, 16.0, 31, 0.5, True, True),
    40: (6, 32.0, 41, 0.5, False, True),
}

# o_s -> (obs, action, reward, terminated, truncated, is_first, mask) for length 3, period 1
HAND_SEQS = {
    10: ([10, 11, 12, 0], [1, 3, 0], [1, 4, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 0]),
    11: ([11, 12, 0, 0], [3, 0, 0], [4, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0]),
    20: ([20, 21, 22, 0], [2, 4, 0], [2, 8, 0], [0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 0]),
    21: ([21, 22, 0, 0], [4, 0, 0], [8, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0]),
    30: ([30, 31, 0, 0], [5, 0, 0], [16, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]),
    40: ([40, 41, 0, 0], [6, 0, 0], [32, 0, 0], [0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]),
}


def test_autoreset_both_flags_and_final_observation_by_hand(shm_name):
    with _hand_buffer(shm_name) as buf:
        w = buf.writer(num_envs=2)
        _write_hand_episodes(w)
        assert len(buf) == 10, "2 reset frames + 4 step calls of 2 envs"
        batch, info = buf.sample(600, return_info=True)
        assert set(batch) == {"obs", "next_obs", "action", "reward", "discount", "terminated", "truncated"}
        seen: dict[int, int] = {}
        for i in range(600):
            o = int(batch["obs"][i, 0])
            assert o in HAND_ITEMS, f"sampled o_t = {o}: not a step (99/1000 are ignored values, 12/22/31/41 final)"
            action, reward, nxt, disc, term, trunc = HAND_ITEMS[o]
            got = (
                int(batch["action"][i]),
                float(batch["reward"][i]),
                int(batch["next_obs"][i, 0]),
                float(batch["discount"][i]),
                bool(batch["terminated"][i]),
                bool(batch["truncated"][i]),
            )
            assert got == (action, reward, nxt, disc, term, trunc), f"item o_t={o}: got {got}, expected {HAND_ITEMS[o]}"
            key = int(info["key"][i])
            assert seen.setdefault(o, key) == key, f"step o_t={o} sampled with two keys"
        assert set(seen) == set(HAND_ITEMS), f"steps never drawn: {set(HAND_ITEMS) - set(seen)}"
        assert len(set(seen.values())) == len(seen), "two steps share a key"

        seq, sinfo = buf.sample_sequences(600, length=3, period=1, return_info=True)
        assert set(seq) == {"obs", "action", "reward", "terminated", "truncated", "is_first", "mask"}
        assert seq["obs"].shape == (600, 4, 1) and seq["action"].shape == (600, 3) and seq["mask"].shape == (600, 3)
        starts = set()
        for i in range(600):
            s = int(seq["obs"][i, 0, 0])
            assert s in HAND_SEQS, f"sequence starting at o_s = {s}"
            exp = HAND_SEQS[s]
            got = (
                seq["obs"][i, :, 0].tolist(),
                seq["action"][i].tolist(),
                seq["reward"][i].tolist(),
                seq["terminated"][i].astype(int).tolist(),
                seq["truncated"][i].astype(int).tolist(),
                seq["is_first"][i].astype(int).tolist(),
                seq["mask"][i].astype(int).tolist(),
            )
            assert got == tuple(exp), f"sequence from o_s={s}: got {got}, expected {exp}"
            assert int(sinfo["key"][i]) == seen[s], f"sequence from o_s={s}: key {sinfo['key'][i]}, its first step's is {seen[s]}"
            starts.add(s)
        assert starts == set(HAND_SEQS)
        seq = buf.sample_sequences(200, length=2, period=2)
        assert set(seq["obs"][:, 0, 0].tolist()) <= {10, 20, 30, 40}, "period 2: starts at steps 0, 2, ... only"


def test_frame_stack_padding_by_hand(shm_name):
    """frame_stack 3, n_step 1: "first" repeats o_0, "zeros" pads with zeros; next_obs stacks too."""
    for padding, pad in (("first", None), ("zeros", 0)):
        with _hand_buffer(f"{shm_name}{padding}", frame_stack=3, n_step=1, stack_padding=padding) as buf:
            assert buf.frame_stack == 3 and buf.stack_padding == padding
            w = buf.writer(num_envs=None)
            w.reset(obs=np.array([10], np.int32))
            for t in range(3):
                w.step(obs=np.array([11 + t], np.int32), action=t, reward=1.0, terminated=t == 2, truncated=False)
            p = lambda first: first if pad is None else pad  # noqa: E731
            expect = {
                10: ([p(10), p(10), 10], [p(10), 10, 11]),
                11: ([p(10), 10, 11], [10, 11, 12]),
                12: ([10, 11, 12], [11, 12, 13]),
            }
            batch = buf.sample(200)
            assert batch["obs"].shape == (200, 3, 1)
            seen = set()
            for i in range(200):
                o = batch["obs"][i, :, 0].tolist()
                n = batch["next_obs"][i, :, 0].tolist()
                assert o[-1] in expect, o
                assert (o, n) == expect[o[-1]], f"{padding}: got {o} -> {n}, expected {expect[o[-1]]}"
                seen.add(o[-1])
            assert seen == set(expect)


def test_partial_reset_abandons_the_pending_episode(shm_name):
    """reset(envs=[2, 0]) mid-episode: rows follow the order of envs; the abandoned episodes keep
    their complete steps, their last n_step-1 steps are never sampled; env 1 is untouched."""
    cfg = Cfg(coded_fields(), frame_stack=2, stack_padding="zeros", n_step=3, gamma=0.9)
    plan = lambda e, k: (None, "term") if k == 0 else (4, "trunc")  # noqa: E731 - first episodes never end
    with cfg.create(shm_name, capacity=500) as buf:
        w = buf.writer(num_envs=3)
        d = Driver(0, 3, 1, cfg, plan=plan)
        w.reset(**d.reset())
        for _ in range(6):
            w.step(**d.step())
        kw = d.reset([2, 0])
        assert kw["envs"] == [2, 0] and kw["obs"].shape == (2, 3)
        w.reset(**kw)
        for _ in range(6):
            w.step(**d.step())
        oracle = CodedOracle({0: d})
        ab = [d.episodes[(0, e, 0)] for e in (0, 2)]
        assert all(r.kind == "abandoned" and r.L == 6 for r in ab)
        assert d.episodes[(0, 1, 0)].L == 12
        must, allowed = step_sets(cfg, d.all_episodes())
        assert (ab[0].key, 3) in must and (ab[0].key, 4) not in allowed and (ab[0].key, 5) not in allowed
        counts = draw_ids(buf, cfg, oracle, 60 * len(allowed))
        assert_coverage(counts, must, allowed, "after a partial reset", uniform=True)
        batch, info = buf.sample(300, return_info=True)
        check_sample(cfg, oracle, batch, info, 300)
        s_must, s_allowed = start_sets(cfg, d.all_episodes(), 3, 1)
        counts = draw_ids(buf, cfg, oracle, 60 * len(s_allowed), seq=(3, 1))
        assert_coverage(counts, s_must, s_allowed, "sequences after a partial reset")


def test_reset_after_an_ended_episode_is_not_autoreset_again(shm_name):
    """A4: env 0's episode ends; the user resets env 0 before stepping again; that reset starts
    the new episode and the next step is its step 0 (its action and reward count)."""
    with _hand_buffer(shm_name, n_step=1) as buf:
        w = buf.writer(num_envs=2)
        F, T = False, True
        w.reset(obs=_col(10, 20))
        w.step(obs=_col(11, 21), action=np.array([1, 2]), reward=np.array([1.0, 2.0]), terminated=np.array([T, F]), truncated=np.array([F, F]))
        w.reset(obs=_col(50), envs=[0])
        w.step(obs=_col(51, 22), action=np.array([7, 3]), reward=np.array([7.0, 3.0]), terminated=np.array([F, F]), truncated=np.array([F, F]))
        batch = buf.sample(300)
        got = {int(o): (int(a), float(r), int(n)) for o, a, r, n in zip(batch["obs"][:, 0], batch["action"], batch["reward"], batch["next_obs"][:, 0])}
        assert got == {10: (1, 1.0, 11), 20: (2, 2.0, 21), 21: (3, 3.0, 22), 50: (7, 7.0, 51)}, got


# =======================================================================================
# Complete windows only, empty buffers, keys, priorities, limiter
# =======================================================================================


def test_only_complete_windows_are_sampled_step_by_step(shm_name):
    """After every call the set of drawable steps (and sequence starts) is exactly the complete
    ones: an in-progress episode's last n_step-1 steps appear only when the window completes or the
    episode ends; before anything is complete: EmptyBufferError."""
    cfg = Cfg(coded_fields(), frame_stack=2, stack_padding="first", n_step=3, gamma=0.9)
    plan = lambda e, k: (7, "term") if k == 0 else ((None, "term") if k == 1 else (2, "trunc"))  # noqa: E731
    with cfg.create(shm_name, capacity=1000) as buf:
        w = buf.writer(num_envs=None)
        d = Driver(0, None, 3, cfg, plan=plan)
        oracle = CodedOracle({0: d})
        with pytest.raises(shmreplay.EmptyBufferError):
            buf.sample(1)
        w.reset(**d.reset())
        with pytest.raises(shmreplay.EmptyBufferError):
            buf.sample(1)
        with pytest.raises(shmreplay.EmptyBufferError):
            buf.sample_sequences(1, length=1)
        keybook = KeyBook()
        for c in range(20):
            w.step(**d.step())
            must, allowed = step_sets(cfg, d.all_episodes())
            if not allowed:
                with pytest.raises(shmreplay.EmptyBufferError):
                    buf.sample(8)
            else:
                counts = draw_ids(buf, cfg, oracle, 400)
                assert set(counts) == allowed, f"after step call {c}: drew {sorted(counts)}, complete: {sorted(allowed)}"
                batch, info = buf.sample(32, return_info=True)
                check_sample(cfg, oracle, batch, info, 32, keybook=keybook, what=f"after step call {c}")
            s_must, s_allowed = start_sets(cfg, d.all_episodes(), 2, 1)
            if not s_allowed:
                with pytest.raises(shmreplay.EmptyBufferError):
                    buf.sample_sequences(4, length=2, period=1)
            else:
                counts = draw_ids(buf, cfg, oracle, 400, seq=(2, 1))
                assert set(counts) == s_allowed, f"after step call {c}: sequence starts {sorted(counts)}, expected {sorted(s_allowed)}"
                seq, info = buf.sample_sequences(16, length=2, period=1, return_info=True)
                check_sequences(cfg, oracle, seq, info, 16, 2, 1, keybook=keybook)
        first = d.episodes[(0, 0, 0)]
        assert first.kind == "term" and first.L == 7
        assert d.episodes[(0, 0, 1)].L == 12 and d.episodes[(0, 0, 1)].kind == "open"


def test_keys_are_tickets_and_change_when_slots_are_overwritten(shm_name):
    """A1: with one unbatched writer, frame i gets ticket i; a step's key is the ticket of o_{t+1},
    its index key % capacity. Once the ring wraps, the steps held have new keys (never reused)."""
    cfg = Cfg(coded_fields(), n_step=1, frame_stack=1)
    cap = 40
    with cfg.create(shm_name, capacity=cap) as buf:
        w = buf.writer(num_envs=None)
        d = Driver(0, None, 9, cfg, plan=lambda e, k: (5, "term"))
        oracle = CodedOracle({0: d})
        w.reset(**d.reset())
        for _ in range(29):
            w.step(**d.step())
        assert d.frames == 30 and len(buf) == 30

        def check_keys() -> dict[int, int]:
            batch, info = buf.sample(500, return_info=True)
            out = {}
            for i in range(500):
                rec, t = oracle.lookup(batch["obs"][i])
                ticket = d.calls[rec.calls[t + 1]][0]
                assert int(info["key"][i]) == ticket, f"{rec.describe()} t={t}: key {info['key'][i]}, ticket of o_t+1 is {ticket}"
                assert int(info["index"][i]) == ticket % cap, f"index {info['index'][i]} for ticket {ticket}"
                out[int(info["key"][i])] = int(info["index"][i])
            return out

        old = check_keys()
        for _ in range(100):
            w.step(**d.step())
        assert len(buf) == cap
        new = check_keys()
        assert min(new) >= d.frames - cap, "a key of an evicted frame was sampled"
        assert not set(old) & set(new), "keys were reused"
        assert set(old.values()) & set(new.values()), "the same slots hold new steps"


def test_update_priorities_on_stale_keys_is_counted(shm_name):
    cfg = Cfg(coded_fields(), n_step=2, frame_stack=1)
    with cfg.create(shm_name, capacity=50, sampler=shmreplay.Prioritized(alpha=1.0, eps=0.0)) as buf:
        w = buf.writer(num_envs=2)
        d = Driver(0, 2, 4, cfg)
        w.reset(**d.reset())
        for _ in range(15):
            w.step(**d.step())
        _, info = buf.sample(64, return_info=True)
        old = np.unique(info["key"])
        assert buf.update_priorities(old, np.full(old.shape, 3.0)) == old.size
        assert np.all(buf.priorities(old) == 3.0)
        before = buf.stats()["stale_updates"]
        for _ in range(60):
            w.step(**d.step())
        assert buf.update_priorities(old, np.full(old.shape, 2.0)) == 0, "stale keys were applied"
        assert buf.stats()["stale_updates"] == before + old.size
        assert np.all(np.isnan(buf.priorities(old)))
        _, info = buf.sample(64, return_info=True)
        fresh = np.unique(info["key"])
        assert not set(fresh.tolist()) & set(old.tolist())
        assert buf.update_priorities(fresh, np.full(fresh.shape, 5.0)) == fresh.size
        assert buf.stats()["stale_updates"] == before + old.size


def test_prioritized_zero_priority_steps_are_never_drawn(shm_name):
    """Prioritized(alpha=1, eps=0): env 0's steps get priority 0 and are never drawn (steps nor
    sequences); probabilities are p / (sum over complete steps); updates move the draws."""
    cfg = Cfg(coded_fields(), n_step=2, frame_stack=2, stack_padding="zeros")
    sampler = shmreplay.Prioritized(alpha=1.0, eps=0.0)
    with cfg.create(shm_name, capacity=1000, sampler=sampler) as buf:
        assert buf.sampler == sampler
        w = buf.writer(num_envs=2)
        d = Driver(0, 2, 21, cfg, plan=lambda e, k: (6, "term" if e == 0 else "trunc"))
        oracle = CodedOracle({0: d})
        w.reset(**d.reset())
        prio: dict[tuple, float] = {}
        for c in range(20):
            recs = [d.cur[e] for e in range(2)]
            pending = list(d.pending)
            p1 = 1.0 + (c % 5)
            kw = d.step()
            w.step(**kw, priority=np.array([0.0, p1]))
            for e, p in ((0, 0.0), (1, p1)):
                if not pending[e]:
                    prio[(recs[e].key, recs[e].L - 1)] = p
        _, allowed = step_sets(cfg, d.all_episodes())
        live = {it: prio[it] for it in allowed}
        total = sum(live.values())
        keybook = KeyBook()
        batch, info = buf.sample(2000, beta=0.4, return_info=True)
        items = check_sample(cfg, oracle, batch, info, 2000, keybook=keybook)
        for name in ("probability", "weight", "priority"):
            assert name in info, f"info lacks {name!r}"
        for i, it in enumerate(items):
            assert it[0][1] == 1, f"drew {it}: env 0's steps all have priority 0"
            assert info["priority"][i] == live[it], f"{it}: priority {info['priority'][i]}, given {live[it]}"
            assert math.isclose(float(info["probability"][i]), live[it] / total, rel_tol=2e-5), (
                f"{it}: probability {info['probability'][i]}, expected {live[it]}/{total}"
            )
            assert math.isclose(float(info["weight"][i]), (live[it] / 1.0) ** -0.4, rel_tol=2e-5)
        assert {it for it, p in live.items() if p > 0} == set(items), "every positive-priority step is drawn"
        seq, sinfo = buf.sample_sequences(500, length=3, period=1, return_info=True)
        starts = check_sequences(cfg, oracle, seq, sinfo, 500, 3, 1, keybook=keybook)
        assert all(s[0][1] == 1 for s in starts), "a sequence is drawn by its first step's priority"
        # steps of env 1 with even t get priority 0 by update: only odd t are drawn afterwards
        keys = np.array([keybook.by_item[it] for it in items], dtype=np.uint64)
        ts = np.array([it[1] for it in items])
        uk, first = np.unique(keys, return_index=True)
        newp = np.where(ts[first] % 2 == 0, 0.0, 2.0)
        assert buf.update_priorities(uk, newp) == uk.size
        assert np.array_equal(buf.priorities(uk), newp)
        batch, info = buf.sample(1000, return_info=True)
        items = check_sample(cfg, oracle, batch, info, 1000, keybook=keybook)
        assert all(t % 2 == 1 for (_, t) in items), "a step updated to priority 0 was drawn"
        assert np.all(info["priority"] == 2.0)


def test_step_priority_applies_when_the_window_completes_and_defaults(shm_name):
    cfg = Cfg(coded_fields(), n_step=3, frame_stack=1)
    with cfg.create(shm_name, capacity=1000, sampler=shmreplay.Prioritized(alpha=1.0, eps=0.0)) as buf:
        w = buf.writer(num_envs=None)
        d = Driver(0, None, 2, cfg, plan=lambda e, k: (7, "term") if k == 0 else (None, "term"))
        oracle = CodedOracle({0: d})
        w.reset(**d.reset())
        for t in range(5):
            w.step(**d.step(), priority=float(t + 1))  # a scalar
        # complete: t = 0, 1, 2 (t + 3 <= 5); t = 3, 4 wait for their windows
        batch, info = buf.sample(3000, return_info=True)
        items = check_sample(cfg, oracle, batch, info, 3000)
        assert {t for _, t in items} == {0, 1, 2}
        for i, (_, t) in enumerate(items):
            assert info["priority"][i] == t + 1
            assert math.isclose(float(info["probability"][i]), (t + 1) / 6.0, rel_tol=2e-5), (t, info["probability"][i])
        w.step(**d.step(), priority=6.0)
        w.step(**d.step(), priority=7.0)  # ends the episode: every step is complete now
        batch, info = buf.sample(3000, return_info=True)
        items = check_sample(cfg, oracle, batch, info, 3000)
        assert {t for _, t in items} == set(range(7))
        for i, (_, t) in enumerate(items):
            assert math.isclose(float(info["probability"][i]), (t + 1) / 28.0, rel_tol=2e-5), (t, info["probability"][i])
        # without priority=: the largest raw priority so far (7)
        w.step(**d.step())  # autoreset: a new episode
        for _ in range(4):
            w.step(**d.step())
        batch, info = buf.sample(500, return_info=True)
        items = check_sample(cfg, oracle, batch, info, 500)
        new = [i for i, (k, _) in enumerate(items) if k[2] == 1]
        assert new, "steps of the second episode are drawn"
        assert np.all(info["priority"][new] == 7.0), info["priority"][new]
    with cfg.create(shm_name + "d", capacity=100, sampler=shmreplay.Prioritized()) as buf:
        w = buf.writer(num_envs=2)
        d = Driver(0, 2, 2, cfg, plan=lambda e, k: (None, "term"))
        w.reset(**d.reset())
        for _ in range(4):
            w.step(**d.step())
        _, info = buf.sample(64, return_info=True)
        assert np.all(info["priority"] == 1.0), "the default priority of a fresh buffer is 1.0"
        assert np.all(buf.priorities(info["key"]) == 1.0)


def test_min_size_limiter_with_timeout_zero(shm_name):
    """A8: MinSize(10) counts frames; before 10 frames sample(timeout=0) raises TimeoutError."""
    cfg = Cfg(coded_fields(), n_step=1, frame_stack=1)
    with cfg.create(shm_name, capacity=100, limiter=shmreplay.MinSize(10)) as buf:
        assert buf.limiter == shmreplay.MinSize(10)
        w = buf.writer(num_envs=None)
        d = Driver(0, None, 1, cfg, plan=lambda e, k: (None, "term"))
        oracle = CodedOracle({0: d})
        w.reset(**d.reset(), timeout=0)
        for _ in range(5):
            w.step(**d.step(), timeout=0)
        assert len(buf) == 6
        with pytest.raises(TimeoutError):
            buf.sample(1, timeout=0)
        with pytest.raises(TimeoutError):
            buf.sample_sequences(1, length=2, timeout=0)
        for _ in range(4):
            w.step(**d.step())
        assert len(buf) == 10
        batch, info = buf.sample(16, timeout=0, return_info=True)
        check_sample(cfg, oracle, batch, info, 16)
        seq, info = buf.sample_sequences(4, length=2, timeout=0, return_info=True)
        check_sequences(cfg, oracle, seq, info, 4, 2, 2)
        stats = buf.stats()
        assert stats["inserts"] == 10, f"every frame written is an insert: {stats['inserts']}"
        assert stats["samples"] == 20, f"every sampled item (16 steps + 4 sequences) is a sample: {stats['samples']}"


# =======================================================================================
# Errors: clear exceptions, nothing written
# =======================================================================================

ERR_CFG = Cfg(coded_fields(pix=(2, 3)), observation=("obs", "pix"), n_step=2, frame_stack=2, stack_padding="first", gamma=0.9)


def _bogus_values(cfg: Cfg, n: int | None, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Well-formed values that no driver writes (writer id GARBAGE_WID): if a refused call wrote
    anything, the oracle finds frames it cannot identify."""
    codes = np.array([frame_code(GARBAGE_WID, e, 0, 2) for e in range(n or 1)], dtype=np.int64)
    out = {f: coded_value(f, codes, *cfg.fields[f]) for f in names}
    return out if n is not None else {k: v[0] for k, v in out.items()}


def _bogus_step(cfg: Cfg, n: int | None) -> dict[str, Any]:
    kw: dict[str, Any] = _bogus_values(cfg, n, list(cfg.fields))
    kw["terminated"] = np.zeros(n or 1, bool) if n is not None else np.bool_(False)
    kw["truncated"] = np.zeros(n or 1, bool) if n is not None else np.bool_(False)
    return kw


def _without(kw: dict, name: str) -> dict:
    return {k: v for k, v in kw.items() if k != name}


def _with(kw: dict, **changes: Any) -> dict:
    out = dict(kw)
    out.update(changes)
    return out


N_ERR = 4
STEP_ERRORS: dict[str, tuple[Any, Callable[[dict], dict]]] = {
    "unknown-field": (ValueError, lambda kw: _with(kw, foo=np.zeros(N_ERR, np.float32))),
    "reserved-discount": (ValueError, lambda kw: _with(kw, discount=np.zeros(N_ERR, np.float32))),
    "next-obs-given": (ValueError, lambda kw: _with(kw, next_obs=kw["obs"])),
    "missing-action": (ValueError, lambda kw: _without(kw, "action")),
    "missing-reward": (ValueError, lambda kw: _without(kw, "reward")),
    "missing-aux": (ValueError, lambda kw: _without(kw, "aux")),
    "missing-obs": (ValueError, lambda kw: _without(kw, "obs")),
    "missing-pix": (ValueError, lambda kw: _without(kw, "pix")),
    "missing-terminated": ((ValueError, TypeError), lambda kw: _without(kw, "terminated")),  # A9
    "missing-truncated": ((ValueError, TypeError), lambda kw: _without(kw, "truncated")),  # A9
    "obs-leading-axis": (ValueError, lambda kw: _with(kw, obs=kw["obs"][:3])),
    "obs-frame-shape": (ValueError, lambda kw: _with(kw, obs=np.zeros((N_ERR, 4), np.int32))),
    "pix-frame-shape": (ValueError, lambda kw: _with(kw, pix=np.zeros((N_ERR, 3, 2), np.uint8))),
    "action-shape": (ValueError, lambda kw: _with(kw, action=kw["action"][:, None])),
    "aux-shape": (ValueError, lambda kw: _with(kw, aux=np.zeros((N_ERR, 3)))),
    "reward-length": (ValueError, lambda kw: _with(kw, reward=np.zeros(N_ERR + 1, np.float32))),
    "terminated-length": (ValueError, lambda kw: _with(kw, terminated=np.zeros(N_ERR - 1, bool))),
    "truncated-2d": (ValueError, lambda kw: _with(kw, truncated=np.zeros((N_ERR, 2), bool))),
    "priority-on-uniform": (TypeError, lambda kw: _with(kw, priority=np.ones(N_ERR))),
    "action-float-type": (TypeError, lambda kw: _with(kw, action=np.full(N_ERR, 1.5))),  # same_kind casting refuses it
}

RESET_ERRORS: dict[str, tuple[Any, Callable[[dict], dict]]] = {
    "non-observation-field": (ValueError, lambda kw: _with(kw, action=np.zeros(N_ERR, np.int32))),
    "terminated-given": (ValueError, lambda kw: _with(kw, terminated=np.zeros(N_ERR, bool))),
    "missing-observation-field": (ValueError, lambda kw: _without(kw, "pix")),
    "unknown-field": (ValueError, lambda kw: _with(kw, foo=np.zeros(N_ERR))),
    "leading-axis": (ValueError, lambda kw: {k: v[:3] for k, v in kw.items()}),
    "frame-shape": (ValueError, lambda kw: _with(kw, pix=np.zeros((N_ERR, 2, 2), np.uint8))),
    "env-out-of-range": (ValueError, lambda kw: {**{k: v[:1] for k, v in kw.items()}, "envs": [N_ERR]}),
    "envs-duplicated": (ValueError, lambda kw: {**{k: v[:2] for k, v in kw.items()}, "envs": [1, 1]}),
    "envs-rows-mismatch": (ValueError, lambda kw: {**{k: v[:3] for k, v in kw.items()}, "envs": [1, 2]}),
}


def _error_setup(name: str) -> tuple[Any, Driver, Any, dict]:
    buf = ERR_CFG.create(name, capacity=500)
    d = Driver(0, N_ERR, 17, ERR_CFG, plan=lambda e, k: (3 + e + k % 3, ("term", "trunc", "both")[(e + k) % 3]))
    w = buf.writer(num_envs=N_ERR)
    w.reset(**d.reset())
    for _ in range(5):
        w.step(**d.step())
    return buf, d, w, {"len": len(buf), "inserts": buf.stats()["inserts"]}


def _assert_nothing_written(buf: Any, before: dict, what: str) -> None:
    assert len(buf) == before["len"], f"{what}: len {len(buf)} != {before['len']}: the refused call wrote frames"
    assert buf.stats()["inserts"] == before["inserts"], f"{what}: inserts changed"


def _finish_and_verify(buf: Any, d: Driver, w: Any) -> None:
    """After a refused call: valid calls still work and every item is exactly as written."""
    for _ in range(12):
        w.step(**d.step())
    assert len(buf) == d.frames
    oracle = CodedOracle({0: d})
    batch, info = buf.sample(200, return_info=True)
    check_sample(ERR_CFG, oracle, batch, info, 200)
    must, allowed = step_sets(ERR_CFG, d.all_episodes())
    counts = draw_ids(buf, ERR_CFG, oracle, 40 * len(allowed))
    assert_coverage(counts, must, allowed, "after a refused call")
    seq, info = buf.sample_sequences(50, length=4, period=2, return_info=True)
    check_sequences(ERR_CFG, oracle, seq, info, 50, 4, 2)


def _raises(exc: Any, fn: Callable[[], Any], what: str) -> None:
    excs = exc if isinstance(exc, tuple) else (exc,)
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        assert isinstance(e, excs), f"{what}: raised {type(e).__name__}: {e} (expected {' or '.join(x.__name__ for x in excs)})"
        if excs == (ValueError,):
            assert not isinstance(e, TypeError), f"{what}: {type(e).__name__} is also a TypeError"
        if excs == (TypeError,):
            assert not isinstance(e, ValueError), f"{what}: {type(e).__name__} is also a ValueError"
        assert str(e), f"{what}: {type(e).__name__} without a message"
        return
    raise AssertionError(f"{what}: nothing raised")


@pytest.mark.parametrize("case", sorted(STEP_ERRORS))
def test_refused_step_writes_nothing(shm_name, case):
    exc, make = STEP_ERRORS[case]
    buf, d, w, before = _error_setup(shm_name)
    try:
        _raises(exc, lambda: w.step(**make(_bogus_step(ERR_CFG, N_ERR))), f"step with {case}")
        _assert_nothing_written(buf, before, case)
        _finish_and_verify(buf, d, w)
    finally:
        buf.close()
        buf.unlink()


@pytest.mark.parametrize("case", sorted(RESET_ERRORS))
def test_refused_reset_writes_nothing(shm_name, case):
    exc, make = RESET_ERRORS[case]
    buf, d, w, before = _error_setup(shm_name)
    try:
        kw = _bogus_values(ERR_CFG, N_ERR, ERR_CFG.observation)
        _raises(exc, lambda: w.reset(**make(kw)), f"reset with {case}")
        _assert_nothing_written(buf, before, case)
        _finish_and_verify(buf, d, w)
    finally:
        buf.close()
        buf.unlink()


def test_step_before_reset_writes_nothing_for_any_env(shm_name):
    cfg = ERR_CFG
    with cfg.create(shm_name, capacity=500) as buf:
        w = buf.writer(num_envs=N_ERR)
        _raises(ValueError, lambda: w.step(**_bogus_step(cfg, N_ERR)), "step before any reset")
        assert len(buf) == 0
        d = Driver(0, N_ERR, 5, cfg)
        w.reset(**d.reset([0, 1, 2]))  # env 3 is never reset
        before = {"len": len(buf), "inserts": buf.stats()["inserts"]}
        assert before["len"] == 3
        _raises(ValueError, lambda: w.step(**_bogus_step(cfg, N_ERR)), "step with env 3 never reset")
        _assert_nothing_written(buf, before, "step before reset of env 3")
        w.reset(**d.reset([3]))
        for _ in range(30):
            w.step(**d.step())
        oracle = CodedOracle({0: d})
        batch, info = buf.sample(300, return_info=True)
        check_sample(cfg, oracle, batch, info, 300)
        must, allowed = step_sets(cfg, d.all_episodes())
        assert_coverage(draw_ids(buf, cfg, oracle, 40 * len(allowed)), must, allowed, "after refused steps")


def test_unbatched_writer_errors(shm_name):
    cfg = ERR_CFG
    with cfg.create(shm_name, capacity=500) as buf:
        w = buf.writer(num_envs=None)
        d = Driver(0, None, 5, cfg)
        w.reset(**d.reset())
        for _ in range(4):
            w.step(**d.step())
        before = {"len": len(buf), "inserts": buf.stats()["inserts"]}
        one = _bogus_values(cfg, None, cfg.observation)
        _raises((ValueError, TypeError), lambda: w.reset(**one, envs=[0]), "envs= on an unbatched writer")  # A9
        batched = _bogus_values(cfg, 1, cfg.observation)
        _raises(ValueError, lambda: w.reset(**batched), "reset with an env axis on an unbatched writer")
        step = _bogus_step(cfg, 1)
        _raises(ValueError, lambda: w.step(**step), "step with an env axis on an unbatched writer")
        _assert_nothing_written(buf, before, "unbatched")
        for _ in range(20):
            w.step(**d.step())
        oracle = CodedOracle({0: d})
        batch, info = buf.sample(100, return_info=True)
        check_sample(cfg, oracle, batch, info, 100)


def _create_kwargs(**changes: Any) -> dict:
    kw = dict(
        capacity=100,
        fields={"obs": ((3,), np.int32), "pix": ((2, 2), np.uint8), "action": ((), np.int32), "aux": ((2,), np.float32), "reward": ((), np.float32)},
        observation=["obs", "pix"],
        reward="reward",
        frame_stack=2,
        stack_padding="first",
        n_step=3,
        gamma=0.99,
    )
    kw.update(changes)
    return kw


def _fields_with(name: str) -> dict:
    f = _create_kwargs()["fields"]
    f[name] = ((), np.float32)
    return f


CREATE_ERRORS = [
    pytest.param(ValueError, dict(n_step=0), id="n_step-0"),
    pytest.param(ValueError, dict(n_step=-2), id="n_step-negative"),
    pytest.param(ValueError, dict(frame_stack=0), id="frame_stack-0"),
    pytest.param(ValueError, dict(gamma=-0.01), id="gamma-negative"),
    pytest.param(ValueError, dict(gamma=1.0001), id="gamma-above-1"),
    pytest.param(ValueError, dict(gamma=float("nan")), id="gamma-nan"),
    pytest.param(ValueError, dict(gamma=float("inf")), id="gamma-inf"),
    pytest.param(ValueError, dict(observation="nope"), id="observation-unknown"),
    pytest.param(ValueError, dict(observation=["obs", "nope"]), id="observation-one-unknown"),
    pytest.param(ValueError, dict(reward="nope"), id="reward-unknown"),
    pytest.param(ValueError, dict(reward="action"), id="reward-int-field"),
    pytest.param(ValueError, dict(reward="aux"), id="reward-not-scalar"),
    pytest.param(ValueError, dict(stack_padding="last"), id="stack_padding-unknown"),
    pytest.param(ValueError, dict(capacity=0), id="capacity-0"),
    pytest.param(ValueError, dict(sampler=shmreplay.Queue()), id="queue-sampler"),
    pytest.param(TypeError, dict(n_step="3"), id="n_step-str"),
    pytest.param(TypeError, dict(frame_stack=2.5), id="frame_stack-float"),
    pytest.param(TypeError, dict(gamma="0.9"), id="gamma-str"),
] + [
    pytest.param(ValueError, dict(fields=_fields_with(reserved)), id=f"field-named-{reserved}")
    for reserved in ("discount", "terminated", "truncated", "is_first", "mask", "priority", "timeout", "envs", "next_obs", "next_pix")
]


@pytest.mark.parametrize("exc,changes", CREATE_ERRORS)
def test_create_errors_leave_no_segment(shm_name, shm_dir, exc, changes):
    _raises(exc, lambda: EpisodeBuffer.create(shm_name, path=shm_dir, **_create_kwargs(**changes)), f"create with {changes}")
    assert os.listdir(shm_dir) == [], f"a refused create left {os.listdir(shm_dir)}"
    with EpisodeBuffer.create(shm_name, path=shm_dir, **_create_kwargs()) as buf:  # the valid one works
        assert buf.n_step == 3


def test_sample_argument_errors(shm_name):
    cfg = Cfg(coded_fields(), n_step=2, frame_stack=2)
    with cfg.create(shm_name, capacity=200) as buf:
        w = buf.writer(num_envs=2)
        d = Driver(0, 2, 3, cfg)
        w.reset(**d.reset())
        for _ in range(20):
            w.step(**d.step())
        n = len(buf)
        cases = [
            (ValueError, lambda: buf.sample_sequences(4, length=0), "length 0"),
            (ValueError, lambda: buf.sample_sequences(4, length=-3), "length -3"),
            (ValueError, lambda: buf.sample_sequences(4, length=3, period=0), "period 0"),
            (ValueError, lambda: buf.sample_sequences(4, length=3, period=-1), "period -1"),
            (TypeError, lambda: buf.sample_sequences(4, length=2.5), "length 2.5"),
            (TypeError, lambda: buf.update_priorities(np.array([0], np.uint64), np.array([1.0])), "update_priorities on uniform"),
        ]
        for exc, fn, what in cases:
            _raises(exc, fn, what)
        assert len(buf) == n
        oracle = CodedOracle({0: d})
        seq, info = buf.sample_sequences(8, length=3, return_info=True)  # period defaults to length
        check_sequences(cfg, oracle, seq, info, 8, 3, 3)


# =======================================================================================
# Handles, properties, attach
# =======================================================================================


def test_properties_attach_and_pickle(shm_name, shm_dir):
    cfg = Cfg(coded_fields(pix=(2, 2)), observation=("obs", "pix"), frame_stack=4, stack_padding="zeros", n_step=3, gamma=0.95)
    buf = cfg.create(shm_name, capacity=321, path=shm_dir)
    try:
        assert buf.name == shm_name and buf.capacity == 321 and not buf.closed
        assert os.path.dirname(str(buf.path)) == str(shm_dir)
        assert {k: (tuple(s), np.dtype(t)) for k, (s, t) in buf.fields.items()} == cfg.fields
        assert buf.observations == ("obs", "pix") and buf.reward == "reward"
        assert (buf.frame_stack, buf.stack_padding, buf.n_step, buf.gamma) == (4, "zeros", 3, 0.95)
        assert buf.sampler == shmreplay.Uniform() and buf.limiter is None
        assert isinstance(buf.nbytes, int) and buf.nbytes > 0
        assert len(buf) == 0
        w = buf.writer(num_envs=3)
        d = Driver(0, 3, 8, cfg, reset_prob=0.05)
        w.reset(**d.reset())
        for _ in range(40):
            apply(w, *d.next_op())
        assert len(buf) == d.frames
        oracle = CodedOracle({0: d})
        for wid, other in enumerate((EpisodeBuffer.attach(shm_name, path=shm_dir), pickle.loads(pickle.dumps(buf))), start=1):
            try:
                assert type(other) is EpisodeBuffer
                assert (other.capacity, other.observations, other.frame_stack, other.stack_padding, other.n_step, other.gamma) == (
                    321, ("obs", "pix"), 4, "zeros", 3, 0.95
                )
                assert len(other) == sum(x.frames for x in oracle.drivers.values())
                batch, info = other.sample(100, return_info=True)
                check_sample(cfg, oracle, batch, info, 100)
                # a writer of another handle continues into the same ring
                w2 = other.writer(num_envs=1)
                d2 = Driver(wid, 1, 8, cfg)
                w2.reset(**d2.reset())
                for _ in range(5):
                    w2.step(**d2.step())
                oracle.drivers[wid] = d2
            finally:
                other.close()
            assert other.closed
        batch, info = buf.sample(200, return_info=True)
        check_sample(cfg, oracle, batch, info, 200)
        stats = buf.stats()
        assert isinstance(stats["bytes_per_step"], float)
        assert math.isclose(stats["bytes_per_step"], buf.nbytes / 321, rel_tol=1e-6)
    finally:
        buf.close()
        buf.unlink()
    assert buf.closed


def test_replay_and_episode_buffers_refuse_each_others_segments(shm_name):
    cfg = Cfg(coded_fields())
    with cfg.create(shm_name, capacity=10):
        with pytest.raises(ValueError):
            ReplayBuffer.attach(shm_name)
    with ReplayBuffer.create(shm_name + "r", capacity=10, fields={"x": ((2,), np.float32)}):
        with pytest.raises(ValueError):
            EpisodeBuffer.attach(shm_name + "r")


# =======================================================================================
# Memory
# =======================================================================================

ATARI_STEP_FIELDS = {"obs": ((84, 84), np.uint8), "action": ((), np.int32), "reward": ((), np.float32)}


def test_memory_bytes_per_step(name_factory):
    """Each 84x84 frame stored once: <= 7300 bytes per step (7.3 GB for 1M steps), whatever the
    stack and n; the segment is nbytes, bytes_per_step is nbytes / capacity."""
    per_step = {}
    for fs, n, cap in ((4, 3, 100_000), (1, 1, 100_000), (4, 3, 10_000)):
        buf = EpisodeBuffer.create(
            name_factory(), capacity=cap, fields=ATARI_STEP_FIELDS, observation="obs", reward="reward", frame_stack=fs, n_step=n, gamma=0.99
        )
        try:
            stats = buf.stats()
            assert "bytes_per_step" in stats
            bps = stats["bytes_per_step"]
            assert isinstance(bps, float)
            assert math.isclose(bps, buf.nbytes / cap, rel_tol=1e-9), (bps, buf.nbytes, cap)
            assert os.path.getsize(buf.path) == buf.nbytes
            assert buf.nbytes >= 84 * 84 * cap, "the frames must be in the segment"
            if cap == 100_000:
                assert bps <= 7300, f"frame_stack {fs}, n_step {n}: {bps:.1f} bytes per step > 7300"
                per_step[(fs, n)] = bps
            else:
                assert buf.nbytes <= 7300 * cap + (1 << 20), f"{buf.nbytes} bytes for {cap} steps"
        finally:
            buf.close()
            buf.unlink()
    assert math.isclose(per_step[(4, 3)], per_step[(1, 1)], rel_tol=0.01), f"stacking costs memory: {per_step}"


# =======================================================================================
# Many writer processes into one ring
# =======================================================================================

MP_ENVS = 8


def mp_cfg(padding: str, pix: tuple[int, ...] = (5, 5)) -> Cfg:
    return Cfg(coded_fields(pix=pix), observation=("obs", "pix"), frame_stack=4, stack_padding=padding, n_step=3, gamma=0.99)


def _writer_child(
    name: str, wid: int, seed: int, n_calls: int, reset_prob: float, cfg: Cfg, progress: Any, conn: Any, go: Any
) -> None:
    """Child: attach, write the deterministic schedule of writer ``wid`` (``n_calls`` calls after
    the first reset), report. ``progress[wid]`` counts calls done (a RawArray: no lock)."""
    try:
        buf = EpisodeBuffer.attach(name)
        w = buf.writer(num_envs=MP_ENVS)
        d = Driver(wid, MP_ENVS, seed, cfg, reset_prob=reset_prob)
        conn.send(("ready", os.getpid()))
        if go is not None and not go.wait(START_TIMEOUT):
            raise AssertionError("no go signal")
        w.reset(**d.reset())
        progress[wid] = 1
        deadline = time.monotonic() + 90
        for c in range(n_calls):
            apply(w, *d.next_op())
            progress[wid] = c + 2
            if time.monotonic() > deadline:
                raise AssertionError("writer too slow")
        conn.send(("done", d.frames, d.calls[-1]))
        buf.close()
    except BaseException:  # noqa: BLE001 - everything goes to the parent
        try:
            conn.send(("err", traceback.format_exc()))
        finally:
            os._exit(1)


class WriterProc:
    def __init__(self, ctx: Any, name: str, wid: int, seed: int, n_calls: int, reset_prob: float, cfg: Cfg, progress: Any, go: Any) -> None:
        self.wid = wid
        self.conn, child = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(
            target=_writer_child, args=(name, wid, seed, n_calls, reset_prob, cfg, progress, child, go), daemon=True
        )
        self.proc.start()
        child.close()
        self.ready = False
        self.result: tuple | None = None

    def _recv(self) -> None:
        try:
            msg = self.conn.recv()
        except EOFError:
            raise AssertionError(f"writer {self.wid} exited (code {self.proc.exitcode}) without a word") from None
        if msg[0] == "err":
            raise AssertionError(f"writer {self.wid} failed:\n{msg[1]}")
        if msg[0] == "ready":
            self.ready = True
        else:
            self.result = msg

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready:
            if not self.conn.poll(max(0.0, deadline - time.monotonic())):
                raise AssertionError(f"writer {self.wid} (pid {self.proc.pid}) not ready in {timeout}s (alive {self.proc.is_alive()})")
            self._recv()

    def poll_done(self) -> bool:
        """Reads what the writer sent so far (never call it for a writer that was killed)."""
        while self.result is None and self.conn.poll():
            self._recv()
        return self.result is not None


def _sample_and_check(buf: Any, cfg: Cfg, oracle: Any, keybook: KeyBook, counts: collections.Counter, what: str) -> None:
    try:
        batch, info = buf.sample(48, return_info=True)
    except shmreplay.EmptyBufferError:
        counts["empty"] += 1
        return
    check_sample(cfg, oracle, batch, info, 48, keybook=keybook, capacity=buf.capacity, what=what)
    counts["items"] += 48
    for f in batch["obs"][:, -1]:
        counts[f"writer{oracle.lookup(f)[0].key[0]}"] += 1
    try:
        seq, sinfo = buf.sample_sequences(8, length=6, period=3, return_info=True)
    except shmreplay.EmptyBufferError:
        return
    check_sequences(cfg, oracle, seq, sinfo, 8, 6, 3, keybook=keybook, capacity=buf.capacity, what=what)
    counts["sequences"] += 8


def test_writer_processes_interleave_into_one_wrapping_ring(shm_name, mp_ctx):
    """4 writer processes x 8 envs, 40000 env steps each, into a 2000-frame ring (wraps ~80
    times); the test process samples all along and checks every item against the writers'
    regenerated schedules."""
    n_writers, n_calls, cap = 4, 5000, 2000
    padding = "first" if mp_ctx.get_start_method() == "spawn" else "zeros"
    cfg = mp_cfg(padding)
    seed = 4242
    oracle = CodedOracle({wid: Driver(wid, MP_ENVS, seed, cfg, reset_prob=0.01, build=False).run(n_calls) for wid in range(n_writers)})
    total_frames = sum(d.frames for d in oracle.drivers.values())
    assert total_frames > 75 * cap
    with cfg.create(shm_name, capacity=cap) as buf:
        progress = mp_ctx.RawArray("q", W_MAX)
        go = mp_ctx.Event()
        writers = [WriterProc(mp_ctx, shm_name, wid, seed, n_calls, 0.01, cfg, progress, go) for wid in range(n_writers)]
        try:
            for wp in writers:
                wp.wait_ready(START_TIMEOUT)
            go.set()
            keybook = KeyBook()
            counts: collections.Counter = collections.Counter()
            deadline = time.monotonic() + 80
            while not all(wp.poll_done() for wp in writers):
                assert time.monotonic() < deadline, f"writers did not finish: progress {list(progress[:n_writers])}"
                _sample_and_check(buf, cfg, oracle, keybook, counts, "while writing")
            for wp in writers:
                assert wp.result[0] == "done" and wp.result[1] == oracle.drivers[wp.wid].frames
                wp.proc.join(30)
                assert wp.proc.exitcode == 0
        finally:
            kill_and_reap([wp.proc for wp in writers])
        assert counts["items"] > 0, "nothing was sampled while the writers wrote"
        assert len(buf) == cap
        # A writer descheduled between its ticket and its slot may be lapped and its frame
        # superseded (the ring wraps ~80 times); no writer dies, so no frame is lost.
        stats = buf.stats()
        assert stats["inserts"] + stats["superseded"] == total_frames and stats["lost"] == 0, (stats, total_frames)
        for _ in range(20):
            _sample_and_check(buf, cfg, oracle, keybook, counts, "after writing")
        assert sum(counts[f"writer{w}"] > 0 for w in range(n_writers)) >= 3, f"items come from the writers: {counts}"
        # the last writer's newest steps: the buffer holds at least the newest capacity frames
        seq, info = buf.sample_sequences(64, length=2, period=1, return_info=True)
        check_sequences(cfg, oracle, seq, info, 64, 2, 1, keybook=keybook, capacity=cap)


def test_writers_sigkilled_at_random_never_give_a_wrong_item(shm_name, mp_ctx):
    """Writers are SIGKILLed at random moments (mid-step for most) and replaced while the test
    process samples and checks every item: never a wrong, torn or mixed item, no hang; afterwards
    a new writer's steps are sampled."""
    cap, n_calls = 1500, 6000
    KILLS_WANTED = 8
    LAST_KILL_WID = 14  # writer ids 0..13 are killed; 14 is the fresh writer; 15 is GARBAGE_WID
    cfg = mp_cfg("first" if mp_ctx.get_start_method() == "fork" else "zeros", pix=(24, 24))
    seed = 777
    oracle = CodedOracle(factory=lambda wid: Driver(wid, MP_ENVS, seed, cfg, reset_prob=0.01, build=False).run(n_calls))
    rng = np.random.default_rng(99)
    with cfg.create(shm_name, capacity=cap) as buf:
        progress = mp_ctx.RawArray("q", W_MAX)
        writers: dict[int, WriterProc] = {}
        next_wid = 0
        killed_mid_run = 0
        keybook = KeyBook()
        counts: collections.Counter = collections.Counter()

        def start_writer() -> None:
            nonlocal next_wid
            wp = WriterProc(mp_ctx, shm_name, next_wid, seed, n_calls, 0.01, cfg, progress, None)
            writers[next_wid] = wp
            next_wid += 1

        try:
            for _ in range(4):
                start_writer()
            for wp in writers.values():
                wp.wait_ready(START_TIMEOUT)
            hard = time.monotonic() + 70
            next_kill = time.monotonic() + float(rng.uniform(0.1, 0.3))
            while killed_mid_run < KILLS_WANTED:
                assert time.monotonic() < hard, f"only {killed_mid_run} writers killed mid-run in time: {counts}"
                _sample_and_check(buf, cfg, oracle, keybook, counts, f"{killed_mid_run} writers killed")
                if time.monotonic() < next_kill:
                    continue
                alive = [wp for wp in writers.values() if wp.proc.is_alive() and not wp.poll_done()]
                running = [wp for wp in alive if 1 < progress[wp.wid] < n_calls + 1]
                if running:
                    victim = running[int(rng.integers(len(running)))]
                    os.kill(victim.proc.pid, signal.SIGKILL)
                    victim.proc.join(30)
                    assert not victim.proc.is_alive()
                    killed_mid_run += progress[victim.wid] < n_calls + 1
                    alive.remove(victim)
                if len(alive) < 4 and next_wid < LAST_KILL_WID:
                    start_writer()  # not waited for: the sampler keeps checking meanwhile
                next_kill = time.monotonic() + float(rng.uniform(0.05, 0.3))
            # kill the rest too, whatever they are doing
            for wp in writers.values():
                if wp.proc.is_alive():
                    os.kill(wp.proc.pid, signal.SIGKILL)
            for wp in writers.values():
                wp.proc.join(30)
                assert not wp.proc.is_alive()
        finally:
            kill_and_reap([wp.proc for wp in writers.values()])
        assert counts["items"] > 0
        assert len(buf) <= cap
        for _ in range(20):
            _sample_and_check(buf, cfg, oracle, keybook, counts, "after the kills")
        # a new writer in this process: the ring still works, its steps come back exactly
        wid = LAST_KILL_WID
        d = Driver(wid, MP_ENVS, seed, cfg, reset_prob=0.01)
        oracle.drivers[wid] = d
        w = buf.writer(num_envs=MP_ENVS)
        w.reset(**d.reset())
        for _ in range(2 * cap // MP_ENVS):
            apply(w, *d.next_op())
        fresh = collections.Counter()
        for _ in range(10):
            _sample_and_check(buf, cfg, oracle, keybook, fresh, "after a fresh writer")
        assert fresh[f"writer{wid}"] == fresh["items"], f"after the fresh writer wrapped the ring, other writers' items remain: {fresh}"


# =======================================================================================
# A real gymnasium vector env, unchanged
# =======================================================================================


@pytest.mark.parametrize("capacity", [5000, 300], ids=["no-wrap", "wrap"])
def test_gymnasium_vector_env_loop_writes_correct_items(shm_name, capacity):
    """A plain make_vec loop (NEXT_STEP autoreset, the default) writes its values unchanged; the
    recorder applies gymnasium's rule itself and every sampled item matches what the loop saw."""
    gym = pytest.importorskip("gymnasium")
    cfg = Cfg({"obs": ((4,), np.float32), "action": ((), np.int32), "reward": ((), np.float32)}, frame_stack=4, stack_padding="zeros", n_step=3, gamma=0.99)
    envs = gym.make_vec("CartPole-v1", num_envs=4, vectorization_mode="sync", max_episode_steps=20)
    try:
        mode = envs.metadata.get("autoreset_mode")
        assert mode in (None, gym.vector.AutoresetMode.NEXT_STEP), f"the loop must use gymnasium's default NEXT_STEP: {mode}"
        with cfg.create(shm_name, capacity=capacity) as buf:
            w = buf.writer(num_envs=4)
            rec = Recorder(cfg, 4)
            evict = make_evict(rec, capacity)
            keybook = KeyBook()
            obs, _ = envs.reset(seed=123)
            envs.action_space.seed(123)
            w.reset(obs=obs)
            rec.reset({"obs": obs})
            for i in range(300):
                action = envs.action_space.sample()
                obs, reward, terminated, truncated, _ = envs.step(action)
                w.step(obs=obs, action=action, reward=reward, terminated=terminated, truncated=truncated)
                rec.step({"obs": obs, "action": action, "reward": reward}, terminated, truncated)
                if i % 20 == 19:
                    batch, info = buf.sample(32, return_info=True)
                    check_sample(cfg, rec, batch, info, 32, keybook=keybook, evict=evict, capacity=capacity, what=f"gym step {i}")
                    seq, sinfo = buf.sample_sequences(8, length=10, period=5, return_info=True)
                    check_sequences(cfg, rec, seq, sinfo, 8, 10, 5, keybook=keybook, evict=evict, capacity=capacity, what=f"gym step {i}")
            kinds = collections.Counter(r.kind for r in rec.episodes)
            assert kinds["term"] and kinds["trunc"], kinds
            assert len(buf) == min(rec.frames, capacity)
            batch, info = buf.sample(500, return_info=True)
            check_sample(cfg, rec, batch, info, 500, keybook=keybook, evict=evict, capacity=capacity)
            must, allowed = step_sets(cfg, rec.all_episodes(), None if capacity > rec.frames else evict)
            counts = draw_ids(buf, cfg, rec, 30 * len(allowed))
            assert_coverage(counts, must, allowed, "gym items")
            seq, sinfo = buf.sample_sequences(100, length=25, period=5, return_info=True)
            check_sequences(cfg, rec, seq, sinfo, 100, 25, 5, keybook=keybook, evict=evict, capacity=capacity)
    finally:
        envs.close()
