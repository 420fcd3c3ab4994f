"""The live actor-learner demo: ``shmreplay demo``.

Actor processes play Atari through gymnasium vector envs (or draw synthetic frames) and write
their episodes into one shared :class:`~shmreplay.EpisodeBuffer`, each 84x84 frame once; learner
processes sample n-step items with 4-frame stacks from it at the same time, check every item
and take a tiny NumPy "training step". The main process only watches: it prints the buffer's
counters once a second and a summary at the end, with the segment's size beside what the
transition layout (``obs`` and ``next_obs`` stacks in every record) would need.

::

    main ──creates──▶ EpisodeBuffer (one shared-memory segment)
     │                   ▲ writer.step()       │ sample()
     ├─ actor 0 ─────────┤ (N envs each)       ├──▶ learner 0
     └─ actor 1 ─────────┘                     └──▶ ...

Every frame carries a stamp (its actor, env, episode, position, and the action, reward and
flags of the step that produced it) in the first 16 pixels of its first and last rows, so a
learner can check that each item's stacks come from one episode of one env, in order, whole.

Every child attaches to the buffer by name, ignores SIGINT (the main process owns Ctrl-C and
tells the children to stop through an Event), and also stops by itself if the main process
dies. The main process joins the children (terminating stragglers after a timeout) and always
removes the segment.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import numpy.typing as npt

from . import (
    EmptyBufferError,
    EpisodeBuffer,
    EpisodeWriter,
    Prioritized,
    ReplayBuffer,
    SampleToInsertRatio,
    ShutdownError,
    Uniform,
    atari,
)
from ._format import format_bytes

if TYPE_CHECKING:
    from . import Stats

__all__ = [
    "DemoConfig",
    "DemoSummary",
    "STAMP",
    "add_arguments",
    "check_batch",
    "config_from_args",
    "demo_fields",
    "play",
    "read_stamps",
    "run",
    "transition_fields",
    "write_stamps",
]

MAX_ACTORS = 255  # a frame's stamp holds the actor id in one byte
MAX_ENVS = 256  # ... and the env index
JOIN_TIMEOUT = 5.0  # seconds the children get to stop on their own before they are terminated

FRAME_STACK = 4
N_STEP = 3
GAMMA = 0.99
# The checker reads a window's rewards, action and flags from the stamps of the next stack's
# frames: that stack (o_{t+k-3} .. o_{t+k}) holds every frame of the window only if k < 4.
assert N_STEP < FRAME_STACK

STAMP = np.dtype(
    [
        ("episode", "<u4"),  # per env, counted from 0
        ("position", "<u4"),  # t of o_t within its episode
        ("reward", "<f4"),  # r_{t-1}, the reward of the step that produced o_t (0 for o_0)
        ("actor", "u1"),
        ("env", "u1"),
        ("action", "u1"),  # a_{t-1}
        ("flags", "u1"),  # TERMINATED | TRUNCATED of step t-1
    ]
)
"""The stamp the actors write into every frame (16 bytes), see :func:`write_stamps`."""
TERMINATED = 1
TRUNCATED = 2


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo needs; built from the command line by :func:`config_from_args`."""

    actors: int = 2
    envs_per_actor: int = 4
    learners: int = 1
    capacity: int = 100_000
    batch_size: int = 32
    seconds: float = 60.0
    game: str = "Pong"
    synthetic: bool = False
    start_method: str = "spawn"
    seed: int = 0
    path: str | None = None
    json_path: str | None = None
    prioritized: bool = False
    samples_per_insert: float | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` for settings the demo cannot run with."""
        if not 1 <= self.actors <= MAX_ACTORS:
            raise ValueError(f"--actors must be between 1 and {MAX_ACTORS}")
        if not 1 <= self.envs_per_actor <= MAX_ENVS:
            raise ValueError(f"--envs-per-actor must be between 1 and {MAX_ENVS}")
        if self.learners < 0:
            raise ValueError("--learners must be >= 0")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if self.capacity < self.batch_size:
            raise ValueError("--capacity must be at least --batch-size")
        if self.seconds < 0 or not math.isfinite(self.seconds):
            raise ValueError("--seconds must be >= 0 (0 runs until Ctrl-C)")
        spi = self.samples_per_insert
        if spi is not None and not (math.isfinite(spi) and spi > 0):
            raise ValueError("--samples-per-insert must be a number > 0")
        if self.start_method not in mp.get_all_start_methods():
            raise ValueError(f"start method {self.start_method!r} is not available here")


@dataclass
class DemoSummary:
    """What the demo reports at the end (also written by ``--json PATH``).

    ``inserts`` counts frames written, ``sampled_rows`` items sampled (each an n-step return
    with two 4-frame stacks).
    """

    source: str
    buffer: str
    duration_s: float
    actors: int
    envs_per_actor: int
    learners: int
    batch_size: int
    frame_stack: int
    n_step: int
    gamma: float
    capacity: int
    frame_bytes: int
    item_bytes: int
    bytes_per_step: float
    segment_bytes: int
    transition_record_bytes: int
    transition_segment_bytes: int
    inserts: int
    sampled_rows: int
    inserts_per_s: float
    samples_per_s: float
    gb_moved: float
    gb_per_s: float
    retries: int
    recovered: int
    final_size: int
    final_fill: float
    episodes: int
    env_steps_per_s_per_actor: float
    mean_episode_return: float | None
    batches: int
    bad_batches: int
    td_error: float | None
    first_error: str | None
    interrupted: bool
    child_failures: list[str] = field(default_factory=list)
    priority_updates: int = 0
    stale_updates: int = 0
    priority_total: float | None = None
    samples_per_insert: float | None = None
    insert_wait_s: float = 0.0
    sample_wait_s: float = 0.0


def demo_fields() -> dict[str, tuple[tuple[int, ...], Any]]:
    """The fields of one step in the demo's :class:`EpisodeBuffer`: one 84x84 frame (the
    observation field), the action and reward, and stamps the learners check items with."""
    return {
        "obs": (atari.FRAME_SHAPE, np.uint8),
        "action": ((), np.int32),
        "reward": ((), np.float32),
        "actor": ((), np.int32),
        "env": ((), np.int32),
        "step": ((), np.int32),  # t: the step's position in its episode
    }


def transition_fields() -> dict[str, tuple[tuple[int, ...], Any]]:
    """The transition layout the demo used before episode buffers (about 56.5 KB per record):
    ``obs`` and ``next_obs`` as whole 4x84x84 stacks in every record."""
    stacked = (FRAME_STACK, *atari.FRAME_SHAPE)
    return {
        "obs": (stacked, np.uint8),
        "next_obs": (stacked, np.uint8),
        "action": ((), np.int32),
        "reward": ((), np.float32),
        "done": ((), np.bool_),
        "actor": ((), np.int32),
        "step": ((), np.int32),
    }


def sample_fields() -> dict[str, tuple[tuple[int, ...], Any]]:
    """What :meth:`EpisodeBuffer.sample` returns per item for :func:`demo_fields`."""
    stacked = (FRAME_STACK, *atari.FRAME_SHAPE)
    fields = dict(demo_fields())
    fields["obs"] = fields["next_obs"] = (stacked, np.uint8)
    fields.update(discount=((), np.float32), terminated=((), np.bool_), truncated=((), np.bool_))
    return fields


def _nbytes(fields: Mapping[str, tuple[tuple[int, ...], Any]]) -> int:
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in fields.values())


def write_stamps(frames: npt.NDArray[np.uint8], stamps: np.ndarray) -> None:
    """Write ``stamps[i]`` (:data:`STAMP`) into the first 16 pixels of the first and of the last
    row of ``frames[i]`` (``(N, 84, 84)``), in place: a frame torn between two writes shows two
    different stamps."""
    raw = stamps.view(np.uint8).reshape(len(stamps), STAMP.itemsize)
    frames[:, 0, : STAMP.itemsize] = raw
    frames[:, -1, : STAMP.itemsize] = raw


def read_stamps(frames: npt.NDArray[np.uint8]) -> tuple[np.ndarray, npt.NDArray[np.bool_]]:
    """Decode the stamps of ``frames`` (``(..., 84, 84)``): returns the stamps of their first
    rows (:data:`STAMP`, shape ``frames.shape[:-2]``) and whether each last row's stamp matches."""
    top = np.ascontiguousarray(frames[..., 0, : STAMP.itemsize])
    bottom = frames[..., -1, : STAMP.itemsize]
    whole: npt.NDArray[np.bool_] = np.all(top == bottom, axis=-1)
    return top.view(STAMP)[..., 0], whole


# --------------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------------


class _StopFlag:
    """True once the main process asks to stop or has died (so no child outlives it)."""

    def __init__(self, stop: Any) -> None:
        self._stop = stop
        self._parent = mp.parent_process()

    def __call__(self) -> bool:
        if self._stop.is_set():
            return True
        return self._parent is not None and not self._parent.is_alive()


def _child_setup() -> None:
    """Leave Ctrl-C to the main process: it stops the children through the stop Event.

    SIGTERM gets its default action back (a ``fork`` child inherits the main's handler).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _make_envs(cfg: DemoConfig) -> tuple[atari.VectorEnv, int]:
    if cfg.synthetic:
        envs = atari.SyntheticVectorEnv(cfg.envs_per_actor)
        return envs, envs.num_actions
    return atari.make_atari_vector_env(cfg.game, cfg.envs_per_actor)


def play(
    envs: atari.VectorEnv,
    writer: EpisodeWriter,
    *,
    actor_id: int,
    num_actions: int,
    seed: int,
    keep_going: Callable[[], bool],
) -> dict[str, Any]:
    """Play ``envs`` with a random policy and write every step with ``writer`` while
    ``keep_going()``: the plain gymnasium loop (one ``reset``, then ``step`` after ``step``,
    NEXT_STEP autoreset left to the writer), plus the frames' stamps. Stops quietly on
    :class:`ShutdownError`. Returns the counts an actor reports."""
    n = envs.num_envs
    rng = np.random.default_rng(seed + 500)
    stamps = np.zeros(n, STAMP)
    stamps["actor"] = actor_id
    stamps["env"] = np.arange(n)
    actor = np.full(n, actor_id, np.int32)
    env = np.arange(n, dtype=np.int32)
    ended = np.zeros(n, np.bool_)  # the env's last step ended its episode
    episode_return = np.zeros(n)
    steps = episodes = 0
    returns = 0.0
    started = time.perf_counter()
    obs, _ = envs.reset(seed=seed)
    write_stamps(obs, stamps)
    try:
        writer.reset(obs=obs)
        while keep_going():
            actions = rng.integers(num_actions, size=n)
            obs, reward, terminated, truncated, _ = envs.step(actions)
            reward = reward.astype(np.float32)
            t = stamps["position"].astype(np.int32)
            # An env whose episode ended last step returned its next episode's o_0 now.
            stamps["episode"] += ended
            stamps["position"] = np.where(ended, 0, stamps["position"] + 1)
            stamps["reward"] = np.where(ended, 0.0, reward)
            stamps["action"] = np.where(ended, 0, actions)
            stamps["flags"] = np.where(ended, 0, terminated * TERMINATED + truncated * TRUNCATED)
            write_stamps(obs, stamps)
            writer.step(  # with --samples-per-insert, waits for the learners
                obs=obs,
                action=actions.astype(np.int32),
                reward=reward,
                terminated=terminated,
                truncated=truncated,
                actor=actor,
                env=env,
                step=t,
            )
            steps += n - int(ended.sum())
            episode_return += np.where(ended, 0.0, reward)
            ended = terminated | truncated
            episodes += int(ended.sum())
            returns += float(episode_return[ended].sum())
            episode_return[ended] = 0.0
    except ShutdownError:
        pass
    elapsed = time.perf_counter() - started
    return {
        "steps": steps,
        "episodes": episodes,
        "mean_return": returns / episodes if episodes else None,
        "steps_per_s": steps / elapsed if elapsed > 0 else 0.0,
    }


def actor_main(name: str, cfg: DemoConfig, actor_id: int, stop: Any, reports: Any) -> None:
    """Play a vector env of ``cfg.envs_per_actor`` games into the buffer (:func:`play`) until
    the main process says stop."""
    _child_setup()
    should_stop = _StopFlag(stop)
    report: dict[str, Any] = {"role": "actor", "id": actor_id, "steps": 0, "episodes": 0}
    envs = None
    try:
        buf = EpisodeBuffer.attach(name, path=cfg.path)
        try:
            envs, num_actions = _make_envs(cfg)
            report.update(
                play(
                    envs,
                    buf.writer(num_envs=envs.num_envs),
                    actor_id=actor_id,
                    num_actions=num_actions,
                    seed=cfg.seed * 1_000 + actor_id * MAX_ENVS,
                    keep_going=lambda: not should_stop(),
                )
            )
        finally:
            if envs is not None:
                envs.close()
            buf.close()
    except KeyboardInterrupt:  # defensive: SIGINT is ignored, but a stray one must stay quiet
        pass
    reports.put(report)


class _LinearValue:
    """A tiny TD linear value estimate over a 7x7 subsample of the newest frame, trained on
    n-step targets ``reward + discount * (1 - terminated) * V(next_obs)``."""

    def __init__(self, lr: float = 0.01) -> None:
        self.w = np.zeros(49 + 1, np.float64)
        self.lr = lr
        self.td_error = 0.0

    @staticmethod
    def _features(obs: np.ndarray) -> np.ndarray:
        # The subsample starts at row 6: rows 0 and 83 hold the stamps.
        x = obs[:, -1, 6::12, 6::12].reshape(len(obs), -1).astype(np.float64) / 255.0
        return np.concatenate([x, np.ones((len(obs), 1))], axis=1)

    def update(self, batch: Mapping[str, np.ndarray], weight: np.ndarray | None = None) -> np.ndarray:
        """One TD step on ``batch`` (weighted by importance ``weight`` if given); returns each
        item's absolute TD error, the new priorities of prioritized replay."""
        x, x_next = self._features(batch["obs"]), self._features(batch["next_obs"])
        bootstrap = batch["discount"] * (1.0 - batch["terminated"].astype(np.float64))
        target = batch["reward"] + bootstrap * (x_next @ self.w)
        delta = target - x @ self.w
        scaled = delta if weight is None else delta * weight
        self.w += self.lr * (scaled @ x) / len(x)
        self.td_error = float(np.mean(np.abs(delta)))
        return np.abs(delta)


def check_batch(
    batch: Mapping[str, np.ndarray],
    info: Mapping[str, Any],
    *,
    batch_size: int,
    capacity: int,
    num_actors: int,
    num_envs: int,
    num_actions: int,
    gamma: float = GAMMA,
) -> str | None:
    """Return a description of the first thing wrong with a sampled batch, or ``None``.

    Checks the schema (keys, shapes, dtypes) and value ranges, then each item against the
    stamps of its frames: both stacks whole and from one episode of one env, at positions
    ``t-3 .. t`` and ``t+k-3 .. t+k`` (the first frame repeated before the episode's start),
    byte for byte equal where they overlap, with ``1 <= k <= n_step`` and ``k < n_step`` only
    when the episode ended; the step fields (actor, env, step ``t``, action ``a_t``) those of the
    stamps; ``discount == gamma**k``; the reward the discounted sum of the ``k`` stamped
    rewards; ``terminated``/``truncated`` the stamped flags of step ``t+k-1``, and no earlier
    frame marking an episode's end.
    """
    expected = sample_fields()
    if set(batch) != set(expected):
        return f"batch keys {sorted(batch)}, expected {sorted(expected)}"
    for key, (shape, dtype) in expected.items():
        arr = batch[key]
        if arr.shape != (batch_size, *shape) or arr.dtype != np.dtype(dtype):
            return f"field {key!r}: got {arr.dtype}{arr.shape}, expected {np.dtype(dtype)}{(batch_size, *shape)}"
    index = info["index"]
    if index.shape != (batch_size,) or index.min() < 0 or index.max() >= capacity:
        return f"sample index out of range [0, {capacity}): {index.min()}..{index.max()}"
    for key, bound in (("actor", num_actors), ("env", num_envs), ("action", num_actions)):
        values = batch[key]
        if values.min() < 0 or values.max() >= bound:
            return f"{key} out of range [0, {bound}): {values.min()}..{values.max()}"
    if not np.all(np.isfinite(batch["reward"])) or batch["step"].min() < 0:
        return "non-finite reward or negative step"

    def bad(mask: npt.NDArray[np.bool_], what: str) -> str | None:
        if not mask.any():
            return None
        i = int(np.argmax(mask))
        return f"{what} (item {i}, slot {int(index[i])})"

    obs, next_obs = batch["obs"], batch["next_obs"]
    now, now_whole = read_stamps(obs)  # (B, 4): o_{t-3} .. o_t
    nxt, next_whole = read_stamps(next_obs)  # (B, 4): o_{t+k-3} .. o_{t+k}
    last = now[:, -1]
    t = last["position"].astype(np.int64)
    k = nxt[:, -1]["position"].astype(np.int64) - t
    stack = np.arange(FRAME_STACK) - (FRAME_STACK - 1)
    same_stream = np.ones(batch_size, np.bool_)
    for stamps in (now, nxt):
        for key in ("actor", "env", "episode"):
            same_stream &= np.all(stamps[key] == last[key][:, None], axis=1)
    window = np.clip(k, 1, N_STEP)  # k itself is checked below; this keeps the indexing valid
    first = FRAME_STACK - window  # index of o_{t+1} in the next stack
    rows = np.arange(batch_size)
    overlap = np.ones(batch_size, np.bool_)
    for n in range(1, N_STEP + 1):  # k steps apart, the stacks share FRAME_STACK - k frames
        m = window == n
        overlap[m] = np.all(next_obs[m, : FRAME_STACK - n] == obs[m, n:], axis=(1, 2, 3))
    flags = nxt[:, -1]["flags"].astype(np.int64)
    earlier_flags = np.any(now["flags"] != 0, axis=1) | np.any(nxt[:, :-1]["flags"] != 0, axis=1)
    expected_reward = np.zeros(batch_size)
    discount = 1.0
    for j in range(N_STEP):  # as the buffer sums: in float64, the discount multiplied step by step
        r = nxt["reward"][rows, np.minimum(first + j, FRAME_STACK - 1)].astype(np.float64)
        expected_reward += np.where(j < window, discount * r, 0.0)
        discount *= gamma
    checks = [
        (~(now_whole.all(axis=1) & next_whole.all(axis=1)), "torn frame: its first and last rows differ"),
        (~same_stream, "torn item: its frames come from different episodes or envs"),
        ((k < 1) | (k > N_STEP), f"next_obs is not 1..{N_STEP} steps after obs"),
        (np.any(now["position"] != np.maximum(t[:, None] + stack, 0), axis=1), "obs stack out of order"),
        (np.any(nxt["position"] != np.maximum((t + k)[:, None] + stack, 0), axis=1), "next_obs stack out of order"),
        (~overlap, "next_obs does not continue obs"),
        (
            (batch["actor"] != last["actor"]) | (batch["env"] != last["env"]) | (batch["step"] != t),
            "actor, env or step field disagrees with the frames",
        ),
        (batch["action"] != nxt["action"][rows, first], "action is not a_t"),
        (earlier_flags, "the window or stack crosses an episode's end"),
        ((k < N_STEP) & (flags == 0), f"a window shorter than {N_STEP} steps in an episode that goes on"),
        (
            (batch["terminated"] != ((flags & TERMINATED) != 0)) | (batch["truncated"] != ((flags & TRUNCATED) != 0)),
            "terminated/truncated are not the flags of the window's last step",
        ),
        (
            ~np.isclose(batch["discount"], (gamma ** window.astype(np.float64)).astype(np.float32), rtol=1e-6, atol=0),
            "discount is not gamma**k",
        ),
        (~np.isclose(batch["reward"], expected_reward, rtol=1e-6, atol=1e-6), "reward is not the n-step return"),
    ]
    for mask, what in checks:
        problem = bad(mask, what)
        if problem is not None:
            return problem
    return None


def learner_main(
    name: str, cfg: DemoConfig, learner_id: int, num_actions: int, stop: Any, reports: Any
) -> None:
    """Sample batches as fast as possible, validate each one and take a linear TD step; with
    ``--prioritized``, weight the step by the importance weights and set each sampled item's
    priority to its new absolute TD error."""
    _child_setup()
    should_stop = _StopFlag(stop)
    report: dict[str, Any] = {"role": "learner", "id": learner_id, "batches": 0, "bad": 0, "error": None}
    try:
        buf = EpisodeBuffer.attach(name, path=cfg.path)
        try:
            model = _LinearValue()
            batches = bad = updates = 0
            rewards = 0.0
            while not should_stop():
                try:
                    batch, info = buf.sample(cfg.batch_size, return_info=True)
                except EmptyBufferError:  # no step's window is complete yet
                    time.sleep(0.01)
                    continue
                except ShutdownError:  # the run is over (--samples-per-insert: we were waiting)
                    break
                batches += 1
                error = check_batch(
                    batch,
                    info,
                    batch_size=cfg.batch_size,
                    capacity=cfg.capacity,
                    num_actors=cfg.actors,
                    num_envs=cfg.envs_per_actor,
                    num_actions=num_actions,
                    gamma=buf.gamma,
                )
                if error is not None:
                    bad += 1
                    report["error"] = report["error"] or error
                    continue
                if cfg.prioritized:
                    errors = model.update(batch, info["weight"])
                    updates += buf.update_priorities(info["key"], errors)
                else:
                    model.update(batch)
                rewards += float(batch["reward"].mean())
            report.update(
                batches=batches,
                bad=bad,
                priority_updates=updates,
                mean_reward=rewards / batches if batches else None,
                td_error=model.td_error,
            )
        finally:
            buf.close()
    except KeyboardInterrupt:
        pass
    reports.put(report)


# --------------------------------------------------------------------------------------------
# Main process
# --------------------------------------------------------------------------------------------


class _Progress:
    """Prints one status line per tick: rewritten in place on a terminal, appended otherwise."""

    def __init__(self, out: TextIO, frame_bytes: int, item_bytes: int, capacity: int) -> None:
        self.out = out
        self.tty = out.isatty()
        self.frame_bytes = frame_bytes
        self.item_bytes = item_bytes
        self.capacity = capacity
        self.last: tuple[float, int, int] = (time.monotonic(), 0, 0)
        self.width = 0

    def tick(self, elapsed: float, stats: Stats) -> None:
        now = time.monotonic()
        t0, inserts0, samples0 = self.last
        dt = max(now - t0, 1e-9)
        ins = (stats["inserts"] - inserts0) / dt
        smp = (stats["samples"] - samples0) / dt
        mbs = (ins * self.frame_bytes + smp * self.item_bytes) / 1e6
        fill = stats["size"] / self.capacity
        line = (
            f"[{elapsed:6.1f} s] inserts {ins:7,.0f} frames/s | samples {smp:7,.0f} items/s | "
            f"{mbs:7,.1f} MB/s | fill {stats['size']:,}/{self.capacity:,} ({fill:.1%})"
        )
        if stats["inserts"] == 0:
            line = f"[{elapsed:6.1f} s] waiting for the actors' first frames..."
        self.last = (now, stats["inserts"], stats["samples"])
        if self.tty:
            self.out.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.tty and self.width:
            self.out.write("\n")
            self.out.flush()


class _Interrupted(Exception):
    """SIGTERM arrived in the main process; handled like Ctrl-C."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise _Interrupted()


def _start_children(
    ctx: BaseContext, name: str, cfg: DemoConfig, num_actions: int, stop: Any, reports: Any
) -> list[tuple[str, BaseProcess]]:
    """Start the actors and learners with SIGINT ignored, so that ``spawn`` children inherit
    that disposition through ``exec`` and a Ctrl-C during their start-up cannot hit them."""
    children: list[tuple[str, BaseProcess]] = []
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for i in range(cfg.actors):
            p = ctx.Process(  # type: ignore[attr-defined]
                target=actor_main,
                args=(name, cfg, i, stop, reports),
                name=f"shmreplay-actor-{i}",
                daemon=True,
            )
            p.start()
            children.append((f"actor {i}", p))
        for i in range(cfg.learners):
            p = ctx.Process(  # type: ignore[attr-defined]
                target=learner_main,
                args=(name, cfg, i, num_actions, stop, reports),
                name=f"shmreplay-learner-{i}",
                daemon=True,
            )
            p.start()
            children.append((f"learner {i}", p))
    finally:
        signal.signal(signal.SIGINT, previous)
    return children


def _drain(reports: Any, into: list[dict[str, Any]]) -> None:
    while True:
        try:
            into.append(reports.get_nowait())
        except queue.Empty:
            return


def _stop_children(
    children: list[tuple[str, BaseProcess]],
    stop: Any,
    reports: Any,
    into: list[dict[str, Any]],
    buf: EpisodeBuffer,
) -> None:
    """Ask the children to stop (and shut a rate-limited buffer down, so that children
    waiting for the limiter stop waiting), wait up to :data:`JOIN_TIMEOUT`, then terminate,
    then kill.

    A second Ctrl-C while waiting skips straight to terminating. Reports are drained while
    waiting so no child blocks on a full queue.
    """
    stop.set()
    if buf.limiter is not None:
        buf.shutdown()
    deadline = time.monotonic() + JOIN_TIMEOUT
    try:
        while any(p.is_alive() for _, p in children) and time.monotonic() < deadline:
            _drain(reports, into)
            for _, p in children:
                p.join(timeout=0.05)
    except (KeyboardInterrupt, _Interrupted):
        pass
    # From here on nothing may interrupt the clean-up; every wait below is bounded.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig_method in ("terminate", "kill"):
            alive = [p for _, p in children if p.is_alive()]
            if not alive:
                break
            for p in alive:
                getattr(p, sig_method)()
            for p in alive:
                p.join(timeout=2.0)
        for _, p in children:
            p.join(timeout=0.1)
        _drain(reports, into)  # an exited child has flushed its report into the pipe
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_source(cfg: DemoConfig) -> tuple[str, int]:
    """Return (description, number of actions); fails early with a clear message."""
    if cfg.synthetic:
        return "synthetic frames", atari.SyntheticFrames.num_actions
    return atari.check_atari(cfg.game)


def _source_line(s: DemoSummary) -> str:
    kind = "NumPy vector env" if s.source == "synthetic frames" else "gymnasium vector env, sync"
    return f"{s.source} ({kind}, {s.envs_per_actor} envs per actor, random policy)"


def _size_pair(segment: int, transition: int) -> tuple[str, str]:
    """Both sizes in the larger one's unit, so they compare at a glance."""
    unit = format_bytes(max(segment, transition)).split()[-1]
    scale = {"TB": 1e12, "GB": 1e9, "MB": 1e6, "kB": 1e3, "B": 1.0}[unit]
    digits = 2 if scale >= 1e9 else 1
    return f"{segment / scale:.{digits}f} {unit}", f"{transition / scale:.{digits}f} {unit}"


def transition_record_bytes(path: str | None) -> int:
    """Bytes of one record of :func:`transition_fields` in a :class:`ReplayBuffer`, read from
    a 1-slot buffer made and removed here (a full-size one would take seconds to create)."""
    with ReplayBuffer.create(None, capacity=1, fields=transition_fields(), path=path) as probe:
        return probe.record_bytes


def _summary_lines(s: DemoSummary) -> Iterator[tuple[str, str]]:
    yield "duration", f"{s.duration_s:.1f} s" + (" (interrupted)" if s.interrupted else "")
    yield "source", _source_line(s)
    returns = f", mean return {s.mean_episode_return:+.1f}" if s.mean_episode_return is not None else ""
    yield (
        "actors",
        f"{s.actors} × {s.envs_per_actor} envs ({s.env_steps_per_s_per_actor:,.0f} env steps/s per actor, "
        f"{s.episodes:,} episodes{returns})",
    )
    td = f", TD error {s.td_error:.4f}" if s.td_error is not None else ""
    yield (
        "learners",
        f"{s.learners} (batch {s.batch_size}: {s.n_step}-step returns, {s.frame_stack}-frame stacks; "
        f"{s.batches:,} batches{td})",
    )
    if s.priority_total is not None:
        yield (
            "priorities",
            f"{s.priority_updates:,} updated ({s.stale_updates:,} stale), total {s.priority_total:,.4g}",
        )
    if s.samples_per_insert is not None:
        observed = s.sampled_rows / s.inserts if s.inserts else 0.0
        yield (
            "rate limit",
            f"{s.samples_per_insert:g} items sampled per frame written (observed {observed:.2f}); waited "
            f"{s.insert_wait_s:.1f} s in inserts, {s.sample_wait_s:.1f} s in samples",
        )
    yield "inserts", f"{s.inserts:,} frames"
    yield "sampled", f"{s.sampled_rows:,} items"
    yield "inserts/s", f"{s.inserts_per_s:,.0f} frames"
    yield "samples/s", f"{s.samples_per_s:,.0f} items"
    yield (
        "GB moved",
        f"{s.gb_moved:.2f} GB ({s.frame_bytes:,} B per frame written, {s.item_bytes:,} B per item sampled)",
    )
    yield "GB/s", f"{s.gb_per_s:.2f}"
    yield "retries", f"{s.retries:,}" + (f" ({s.recovered:,} slots recovered)" if s.recovered else "")
    yield "final fill", f"{s.final_size:,}/{s.capacity:,} frames ({s.final_fill:.1%})"
    segment, transition = _size_pair(s.segment_bytes, s.transition_segment_bytes)
    yield "segment size", f"{segment} ({s.buffer}); the transition layout would need {transition}"
    yield (
        "per slot",
        f"{s.bytes_per_step:,.0f} B; the transition layout: {s.transition_record_bytes:,} B "
        f"(ReplayBuffer.record_bytes, obs and next_obs {s.frame_stack}×84×84) × {s.capacity:,}",
    )
    checked = "ok" if not s.bad_batches else f"{s.bad_batches:,} BAD batches: {s.first_error}"
    yield "batch checks", f"{checked} ({s.batches:,} batches checked)"
    for failure in s.child_failures:
        yield "FAILED", failure


def print_summary(summary: DemoSummary, out: TextIO) -> None:
    """Print the closing table."""
    rows = list(_summary_lines(summary))
    width = max(len(k) for k, _ in rows)
    out.write("\nshmreplay demo summary\n" + "-" * 22 + "\n")
    for key, value in rows:
        out.write(f"{key:<{width}}  {value}\n")
    out.flush()


def rate_limiter(cfg: DemoConfig) -> SampleToInsertRatio | None:
    """``--samples-per-insert``: learners sample that many items per frame the actors write,
    once ``min_size`` frames are in (a tenth of the buffer, at most 1,000, at least one batch),
    within an error window wide enough for an actor's step (a frame per env) and a learner's
    batch."""
    spi = cfg.samples_per_insert
    if spi is None:
        return None
    min_size = min(cfg.capacity, max(cfg.batch_size, min(1_000, cfg.capacity // 10)))
    error_buffer = max(2.0 * cfg.batch_size, 2.0 * cfg.envs_per_actor * spi, 100.0)
    return SampleToInsertRatio(samples_per_insert=spi, min_size=min_size, error_buffer=error_buffer)


def run(cfg: DemoConfig, out: TextIO = sys.stdout) -> int:
    """Run the demo; return the process exit code (0 = ok, 1 = a check or a child failed)."""
    cfg.validate()
    source, num_actions = _check_source(cfg)
    ctx = mp.get_context(cfg.start_method)
    name = f"demo-{os.getpid()}"
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupted)
    # Hold Ctrl-C / SIGTERM back until the `with` owns the new segment: an interrupt between
    # create() returning and the block starting would otherwise leak it.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        record_bytes = transition_record_bytes(cfg.path)
        sampler = Prioritized() if cfg.prioritized else Uniform()
        buf = EpisodeBuffer.create(
            name,
            capacity=cfg.capacity,
            fields=demo_fields(),
            observation="obs",
            reward="reward",
            frame_stack=FRAME_STACK,
            stack_padding="first",
            n_step=N_STEP,
            gamma=GAMMA,
            path=cfg.path,
            sampler=sampler,
            limiter=rate_limiter(cfg),
        )
        with buf:  # the creator unlinks the segment when the block ends, however it ends
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            return _run_with_buffer(cfg, ctx, buf, source, num_actions, record_bytes, out)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGTERM, previous_term)


def _run_with_buffer(
    cfg: DemoConfig,
    ctx: BaseContext,
    buf: EpisodeBuffer,
    source: str,
    num_actions: int,
    record_bytes: int,
    out: TextIO,
) -> int:
    segment, transition = _size_pair(buf.nbytes, record_bytes * buf.capacity)
    out.write(
        f"shmreplay demo: {cfg.actors} actor(s) × {cfg.envs_per_actor} envs [{source}, random policy] "
        f"-> EpisodeBuffer of {cfg.capacity:,} frames [frame_stack {buf.frame_stack}, n_step "
        f"{buf.n_step}, gamma {buf.gamma:g}] -> {cfg.learners} learner(s) [batch {cfg.batch_size}], "
        f"start method {cfg.start_method}\n"
        f"buffer {buf.name!r}: {segment} at {buf.path}, {buf.bytes_per_step:,.0f} B per frame "
        f"(the transition layout would need {transition})\n"
        f"inspect it from another terminal: shmreplay info {buf.name}"
        + (f" --path {cfg.path}" if cfg.path else "")
        + "\n"
        + (
            "running until Ctrl-C\n"
            if cfg.seconds == 0
            else f"running for {cfg.seconds:g} s (Ctrl-C stops early)\n"
        )
    )
    out.flush()
    stop = ctx.Event()
    reports = ctx.Queue()
    children: list[tuple[str, BaseProcess]] = []
    collected: list[dict[str, Any]] = []
    failures: list[str] = []
    interrupted = False
    progress = _Progress(out, _nbytes(demo_fields()), _nbytes(sample_fields()), buf.capacity)
    started = time.monotonic()
    try:
        children = _start_children(ctx, buf.name, cfg, num_actions, stop, reports)
        started = time.monotonic()
        end = started + cfg.seconds if cfg.seconds else math.inf
        next_tick = started + 1.0
        while True:
            now = time.monotonic()
            if now >= end:
                break
            time.sleep(max(0.0, min(next_tick, end) - now))
            now = time.monotonic()
            if now >= next_tick:
                progress.tick(now - started, buf.stats())
                while next_tick <= now:
                    next_tick += 1.0
            _drain(reports, collected)
            dead = [(label, p) for label, p in children if not p.is_alive()]
            if dead:
                failures += [
                    f"{label} (pid {p.pid}) exited early with code {p.exitcode}" for label, p in dead
                ]
                break
    except (KeyboardInterrupt, _Interrupted):
        interrupted = True
    finally:
        duration = time.monotonic() - started
        progress.done()
        if interrupted:
            out.write("stopping...\n")
            out.flush()
        _stop_children(children, stop, reports, collected, buf)
    for label, p in children:
        if p.exitcode not in (0, None) and not any(f.startswith(label + " ") for f in failures):
            failures.append(f"{label} (pid {p.pid}) exited with code {p.exitcode}")
    summary = _summarize(cfg, buf, source, record_bytes, duration, collected, failures, interrupted)
    print_summary(summary, out)
    if cfg.json_path:
        with open(cfg.json_path, "w", encoding="utf-8") as fh:
            json.dump(asdict(summary), fh, indent=2)
            fh.write("\n")
    if summary.bad_batches or failures:
        print("shmreplay demo: FAILED (see the summary above)", file=sys.stderr)
        return 1
    return 0


def _summarize(
    cfg: DemoConfig,
    buf: EpisodeBuffer,
    source: str,
    transition_record: int,
    duration: float,
    reports: list[dict[str, Any]],
    failures: list[str],
    interrupted: bool,
) -> DemoSummary:
    stats = buf.stats()
    actors = [r for r in reports if r["role"] == "actor"]
    learners = [r for r in reports if r["role"] == "learner"]
    duration = max(duration, 1e-9)
    frame_bytes, item_bytes = _nbytes(demo_fields()), _nbytes(sample_fields())
    moved = stats["inserts"] * frame_bytes + stats["samples"] * item_bytes
    rates = [r.get("steps_per_s") or 0.0 for r in actors]
    errors = [r["error"] for r in learners if r.get("error")]
    finished = [r for r in actors if r.get("mean_return") is not None]
    td_errors = [r["td_error"] for r in learners if r.get("td_error") is not None]
    return DemoSummary(
        source=source,
        buffer=buf.name,
        duration_s=duration,
        actors=cfg.actors,
        envs_per_actor=cfg.envs_per_actor,
        learners=cfg.learners,
        batch_size=cfg.batch_size,
        frame_stack=buf.frame_stack,
        n_step=buf.n_step,
        gamma=buf.gamma,
        capacity=buf.capacity,
        frame_bytes=frame_bytes,
        item_bytes=item_bytes,
        bytes_per_step=buf.bytes_per_step,
        segment_bytes=buf.nbytes,
        transition_record_bytes=transition_record,
        transition_segment_bytes=transition_record * buf.capacity,
        inserts=stats["inserts"],
        sampled_rows=stats["samples"],
        inserts_per_s=stats["inserts"] / duration,
        samples_per_s=stats["samples"] / duration,
        gb_moved=moved / 1e9,
        gb_per_s=moved / 1e9 / duration,
        retries=stats["retries"],
        recovered=stats["recovered"],
        final_size=len(buf),
        final_fill=len(buf) / buf.capacity,
        episodes=sum(r.get("episodes", 0) for r in actors),
        env_steps_per_s_per_actor=sum(rates) / len(rates) if rates else 0.0,
        mean_episode_return=(
            sum(r["mean_return"] * r["episodes"] for r in finished) / sum(r["episodes"] for r in finished)
            if finished
            else None
        ),
        batches=sum(r.get("batches", 0) for r in learners),
        bad_batches=sum(r.get("bad", 0) for r in learners),
        td_error=sum(td_errors) / len(td_errors) if td_errors else None,
        first_error=errors[0] if errors else None,
        priority_updates=sum(r.get("priority_updates", 0) for r in learners),
        stale_updates=stats["stale_updates"],
        priority_total=stats.get("priority_total"),
        samples_per_insert=cfg.samples_per_insert,
        insert_wait_s=stats["insert_wait_s"],
        sample_wait_s=stats["sample_wait_s"],
        interrupted=interrupted,
        child_failures=failures,
    )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``demo`` options to ``parser`` (used by :mod:`shmreplay.cli`)."""
    d = DemoConfig()
    parser.add_argument("--actors", type=int, default=d.actors, help="actor processes (default: %(default)s)")
    parser.add_argument(
        "--envs-per-actor",
        type=int,
        default=d.envs_per_actor,
        metavar="N",
        help="envs in each actor's vector env; each step writes N frames (default: %(default)s)",
    )
    # The old name: an actor's write was a chunk of --chunk transitions, now it is a step of N envs.
    parser.add_argument("--chunk", type=int, dest="envs_per_actor", help=argparse.SUPPRESS)
    parser.add_argument(
        "--learners", type=int, default=d.learners, help="learner processes (default: %(default)s)"
    )
    parser.add_argument(
        "--capacity", type=int, default=d.capacity, help="buffer slots, one per frame (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="items per sample (default: %(default)s)"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=d.seconds,
        help="run time; 0 runs until Ctrl-C (default: %(default)s)",
    )
    parser.add_argument(
        "--game", default=d.game, help="Atari game, e.g. Pong, Breakout (default: %(default)s)"
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="generated frames instead of Atari (no gymnasium needed)"
    )
    parser.add_argument(
        "--start-method",
        choices=("spawn", "fork", "forkserver"),
        default=d.start_method,
        help="multiprocessing start method (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--json", dest="json_path", metavar="PATH", help="also write the summary as JSON to PATH"
    )
    parser.add_argument(
        "--prioritized",
        action="store_true",
        help="prioritized replay: learners sample by priority and set each item's priority to its TD error",
    )
    parser.add_argument(
        "--samples-per-insert",
        type=float,
        default=None,
        metavar="SPI",
        help="rate-limit the run (shmreplay.SampleToInsertRatio): learners sample SPI items per frame "
        "written, actors and learners wait for each other",
    )


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """Build a :class:`DemoConfig` from parsed ``demo`` arguments (``--path`` included)."""
    return DemoConfig(
        actors=args.actors,
        envs_per_actor=args.envs_per_actor,
        learners=args.learners,
        capacity=args.capacity,
        batch_size=args.batch_size,
        seconds=args.seconds,
        game=args.game,
        synthetic=args.synthetic,
        start_method=args.start_method,
        seed=args.seed,
        path=getattr(args, "path", None),
        json_path=args.json_path,
        prioritized=args.prioritized,
        samples_per_insert=args.samples_per_insert,
    )
