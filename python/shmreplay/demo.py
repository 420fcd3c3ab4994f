"""The live actor-learner demo: ``shmreplay demo``.

Actor processes play Atari (or draw synthetic frames) and push transitions into one shared
replay buffer; learner processes sample random batches from it at the same time, check every
batch and take a tiny NumPy "training step". The main process only watches: it prints the
buffer's counters once a second and a summary at the end.

::

    main ──creates──▶ ReplayBuffer (one shared-memory segment)
     │                   ▲ extend()            │ sample()
     ├─ actor 0 ─────────┤                     ├──▶ learner 0
     └─ actor 1 ─────────┘                     └──▶ ...

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
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from . import EmptyBufferError, Prioritized, ReplayBuffer, SampleToInsertRatio, ShutdownError, Uniform, atari
from ._format import format_bytes

if TYPE_CHECKING:
    from . import Stats

__all__ = ["DemoConfig", "DemoSummary", "add_arguments", "config_from_args", "demo_fields", "run"]

MAX_ACTORS = 255  # the synthetic frames stamp the actor id into one byte
JOIN_TIMEOUT = 5.0  # seconds the children get to stop on their own before they are terminated


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo needs; built from the command line by :func:`config_from_args`."""

    actors: int = 2
    learners: int = 1
    capacity: int = 100_000
    batch_size: int = 32
    chunk: int = 16
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
        if self.learners < 0:
            raise ValueError("--learners must be >= 0")
        if self.batch_size < 1 or self.chunk < 1:
            raise ValueError("--batch-size and --chunk must be >= 1")
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
    """What the demo reports at the end (also written by ``--json PATH``)."""

    source: str
    buffer: str
    duration_s: float
    actors: int
    learners: int
    batch_size: int
    capacity: int
    record_bytes: int
    segment_bytes: int
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
    """The schema of one Atari transition (about 56.5 KB per record)."""
    return {
        "obs": (atari.OBS_SHAPE, np.uint8),
        "next_obs": (atari.OBS_SHAPE, np.uint8),
        "action": ((), np.int32),
        "reward": ((), np.float32),
        "done": ((), np.bool_),
        "actor": ((), np.int32),
        "step": ((), np.int32),
    }


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


def _make_frames(cfg: DemoConfig, actor_id: int) -> atari.FrameSource:
    seed = cfg.seed * 1_000 + actor_id
    if cfg.synthetic:
        return atari.SyntheticFrames(seed, stamp=actor_id)
    return atari.AtariFrames(cfg.game, seed)


def actor_main(name: str, cfg: DemoConfig, actor_id: int, stop: Any, reports: Any) -> None:
    """Play one game with a random policy and push transitions in chunks of ``cfg.chunk``."""
    _child_setup()
    should_stop = _StopFlag(stop)
    report: dict[str, Any] = {"role": "actor", "id": actor_id, "steps": 0, "episodes": 0}
    frames = None
    try:
        buf = ReplayBuffer.attach(name, path=cfg.path)
        try:
            frames = _make_frames(cfg, actor_id)
            rng = np.random.default_rng(cfg.seed * 1_000 + 500 + actor_id)
            chunk = {k: np.zeros((cfg.chunk, *shape), dtype) for k, (shape, dtype) in demo_fields().items()}
            chunk["actor"][:] = actor_id
            obs = frames.reset()
            steps = episodes = filled = 0
            episode_return = returns = 0.0
            started = time.perf_counter()
            while True:
                action = int(rng.integers(frames.num_actions))
                next_obs, reward, done = frames.step(action)
                chunk["obs"][filled] = obs
                chunk["next_obs"][filled] = next_obs
                chunk["action"][filled] = action
                chunk["reward"][filled] = reward
                chunk["done"][filled] = done
                chunk["step"][filled] = steps
                filled += 1
                steps += 1
                episode_return += reward
                if done:
                    episodes += 1
                    returns += episode_return
                    episode_return = 0.0
                    obs = frames.reset()
                else:
                    obs = next_obs
                if filled == cfg.chunk:
                    try:
                        buf.extend(chunk)  # with --samples-per-insert, waits for the learners
                    except ShutdownError:
                        break
                    filled = 0
                    if should_stop():
                        break
            elapsed = time.perf_counter() - started
            report.update(
                steps=steps,
                episodes=episodes,
                mean_return=returns / episodes if episodes else None,
                steps_per_s=steps / elapsed if elapsed > 0 else 0.0,
            )
        finally:
            if frames is not None:
                frames.close()
            buf.close()
    except KeyboardInterrupt:  # defensive: SIGINT is ignored, but a stray one must stay quiet
        pass
    reports.put(report)


class _LinearValue:
    """A tiny TD(0) linear value estimate over a 7x7 subsample of the newest frame."""

    def __init__(self, gamma: float = 0.99, lr: float = 0.01) -> None:
        self.w = np.zeros(49 + 1, np.float64)
        self.gamma = gamma
        self.lr = lr
        self.td_error = 0.0

    @staticmethod
    def _features(obs: np.ndarray) -> np.ndarray:
        x = obs[:, -1, 6::12, 6::12].reshape(len(obs), -1).astype(np.float64) / 255.0
        return np.concatenate([x, np.ones((len(obs), 1))], axis=1)

    def update(self, batch: Mapping[str, np.ndarray], weight: np.ndarray | None = None) -> np.ndarray:
        """One TD(0) step on ``batch`` (weighted by importance ``weight`` if given); returns
        each row's absolute TD error, the new priorities of prioritized replay."""
        x, x_next = self._features(batch["obs"]), self._features(batch["next_obs"])
        not_done = 1.0 - batch["done"].astype(np.float64)
        target = batch["reward"] + self.gamma * not_done * (x_next @ self.w)
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
    num_actions: int,
    synthetic: bool,
) -> str | None:
    """Return a description of the first thing wrong with a sampled batch, or ``None``.

    Checks the schema (keys, shapes, dtypes), the value ranges, and that each row is one whole
    transition: ``next_obs`` must continue ``obs`` (three shared frames), and with synthetic
    frames the stamped frame counters and actor ids must agree with the scalar fields.
    """
    for key, (shape, dtype) in demo_fields().items():
        arr = batch.get(key)
        if arr is None:
            return f"field {key!r} missing from the batch"
        if arr.shape != (batch_size, *shape) or arr.dtype != np.dtype(dtype):
            return (
                f"field {key!r}: got {arr.dtype}{arr.shape}, expected {np.dtype(dtype)}{(batch_size, *shape)}"
            )
    index = info["index"]
    if index.shape != (batch_size,) or index.min() < 0 or index.max() >= capacity:
        return f"sample index out of range [0, {capacity}): {index.min()}..{index.max()}"
    actor, action = batch["actor"], batch["action"]
    if actor.min() < 0 or actor.max() >= num_actors:
        return f"actor id out of range [0, {num_actors}): {actor.min()}..{actor.max()}"
    if action.min() < 0 or action.max() >= num_actions:
        return f"action out of range [0, {num_actions}): {action.min()}..{action.max()}"
    if not np.all(np.isfinite(batch["reward"])) or batch["step"].min() < 0:
        return "non-finite reward or negative step"
    obs, next_obs = batch["obs"], batch["next_obs"]
    torn = ~np.all(next_obs[:, :-1] == obs[:, 1:], axis=(1, 2, 3))
    if torn.any():
        return f"torn record: next_obs does not continue obs at slot {int(index[np.argmax(torn)])}"
    if synthetic:
        count, who = atari.read_stamp(obs[:, -1])
        next_count, next_who = atari.read_stamp(next_obs[:, -1])
        bad = ((next_count - count) % (1 << 32) != 1) | (who != actor) | (next_who != actor)
        if bad.any():
            slot = int(index[np.argmax(bad)])
            return f"torn record: frame stamps disagree with the actor field at slot {slot}"
    return None


def learner_main(
    name: str, cfg: DemoConfig, learner_id: int, num_actions: int, stop: Any, reports: Any
) -> None:
    """Sample batches as fast as possible, validate each one and take a linear TD step; with
    ``--prioritized``, weight the step by the importance weights and set each sampled row's
    priority to its new absolute TD error."""
    _child_setup()
    should_stop = _StopFlag(stop)
    report: dict[str, Any] = {"role": "learner", "id": learner_id, "batches": 0, "bad": 0, "error": None}
    try:
        buf = ReplayBuffer.attach(name, path=cfg.path)
        try:
            while len(buf) < cfg.batch_size and not should_stop():
                time.sleep(0.01)
            model = _LinearValue()
            batches = bad = updates = 0
            rewards = 0.0
            while not should_stop():
                try:
                    batch, info = buf.sample(cfg.batch_size, return_info=True)
                except EmptyBufferError:
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
                    num_actions=num_actions,
                    synthetic=cfg.synthetic,
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

    def __init__(self, out: TextIO, record_bytes: int, capacity: int) -> None:
        self.out = out
        self.tty = out.isatty()
        self.record_bytes = record_bytes
        self.capacity = capacity
        self.last: tuple[float, int, int] = (time.monotonic(), 0, 0)
        self.width = 0

    def tick(self, elapsed: float, stats: Stats) -> None:
        now = time.monotonic()
        t0, inserts0, samples0 = self.last
        dt = max(now - t0, 1e-9)
        ins = (stats["inserts"] - inserts0) / dt
        smp = (stats["samples"] - samples0) / dt
        mbs = (ins + smp) * self.record_bytes / 1e6
        fill = stats["size"] / self.capacity
        line = (
            f"[{elapsed:6.1f} s] inserts {ins:9,.0f}/s | samples {smp:10,.0f} rows/s | "
            f"{mbs:8,.1f} MB/s | fill {stats['size']:,}/{self.capacity:,} ({fill:.1%})"
        )
        if stats["inserts"] == 0:
            line = f"[{elapsed:6.1f} s] waiting for the actors' first transitions..."
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
    buf: ReplayBuffer,
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


def _summary_lines(s: DemoSummary) -> Iterator[tuple[str, str]]:
    yield "duration", f"{s.duration_s:.1f} s" + (" (interrupted)" if s.interrupted else "")
    yield "source", s.source
    returns = f", mean return {s.mean_episode_return:+.1f}" if s.mean_episode_return is not None else ""
    yield (
        "actors",
        f"{s.actors} ({s.env_steps_per_s_per_actor:,.0f} env steps/s each, {s.episodes:,} episodes{returns})",
    )
    td = f", TD error {s.td_error:.4f}" if s.td_error is not None else ""
    yield "learners", f"{s.learners} (batch {s.batch_size}, {s.batches:,} batches{td})"
    if s.priority_total is not None:
        yield (
            "priorities",
            f"{s.priority_updates:,} updated ({s.stale_updates:,} stale), total {s.priority_total:,.4g}",
        )
    if s.samples_per_insert is not None:
        observed = s.sampled_rows / s.inserts if s.inserts else 0.0
        yield (
            "rate limit",
            f"{s.samples_per_insert:g} samples per insert (observed {observed:.2f}); waited "
            f"{s.insert_wait_s:.1f} s in inserts, {s.sample_wait_s:.1f} s in samples",
        )
    yield "inserts", f"{s.inserts:,}"
    yield "sampled rows", f"{s.sampled_rows:,}"
    yield "inserts/s", f"{s.inserts_per_s:,.0f}"
    yield "samples/s", f"{s.samples_per_s:,.0f} rows"
    yield "GB moved", f"{s.gb_moved:.2f} GB ({s.record_bytes:,} B per record)"
    yield "GB/s", f"{s.gb_per_s:.2f}"
    yield "retries", f"{s.retries:,}" + (f" ({s.recovered:,} slots recovered)" if s.recovered else "")
    yield "final fill", f"{s.final_size:,}/{s.capacity:,} ({s.final_fill:.1%})"
    yield "segment size", f"{format_bytes(s.segment_bytes)} ({s.buffer})"
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
    """``--samples-per-insert``: learners sample that many rows per row the actors insert, once
    ``min_size`` rows are in (a tenth of the buffer, at most 1,000, at least one batch), within
    an error window wide enough for an actor's chunk and a learner's batch."""
    spi = cfg.samples_per_insert
    if spi is None:
        return None
    min_size = min(cfg.capacity, max(cfg.batch_size, min(1_000, cfg.capacity // 10)))
    error_buffer = max(2.0 * cfg.batch_size, 2.0 * cfg.chunk * spi, 100.0)
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
        sampler = Prioritized() if cfg.prioritized else Uniform()
        buf = ReplayBuffer.create(
            name,
            capacity=cfg.capacity,
            fields=demo_fields(),
            path=cfg.path,
            sampler=sampler,
            limiter=rate_limiter(cfg),
        )
        with buf:  # the creator unlinks the segment when the block ends, however it ends
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            return _run_with_buffer(cfg, ctx, buf, source, num_actions, out)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGTERM, previous_term)


def _run_with_buffer(
    cfg: DemoConfig, ctx: BaseContext, buf: ReplayBuffer, source: str, num_actions: int, out: TextIO
) -> int:
    policy = "random policy"
    out.write(
        f"shmreplay demo: {cfg.actors} actor(s) [{source}, {policy}] -> {cfg.capacity:,}-slot buffer "
        f"-> {cfg.learners} learner(s) [batch {cfg.batch_size}], start method {cfg.start_method}\n"
        f"buffer {buf.name!r}: {format_bytes(buf.nbytes)} at {buf.path}, "
        f"{buf.record_bytes:,} B per transition\n"
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
    progress = _Progress(out, buf.record_bytes, buf.capacity)
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
    summary = _summarize(cfg, buf, source, duration, collected, failures, interrupted)
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
    buf: ReplayBuffer,
    source: str,
    duration: float,
    reports: list[dict[str, Any]],
    failures: list[str],
    interrupted: bool,
) -> DemoSummary:
    stats = buf.stats()
    actors = [r for r in reports if r["role"] == "actor"]
    learners = [r for r in reports if r["role"] == "learner"]
    duration = max(duration, 1e-9)
    moved = (stats["inserts"] + stats["samples"]) * buf.record_bytes
    rates = [r.get("steps_per_s") or 0.0 for r in actors]
    errors = [r["error"] for r in learners if r.get("error")]
    finished = [r for r in actors if r.get("mean_return") is not None]
    td_errors = [r["td_error"] for r in learners if r.get("td_error") is not None]
    return DemoSummary(
        source=source,
        buffer=buf.name,
        duration_s=duration,
        actors=cfg.actors,
        learners=cfg.learners,
        batch_size=cfg.batch_size,
        capacity=buf.capacity,
        record_bytes=buf.record_bytes,
        segment_bytes=buf.nbytes,
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
        "--learners", type=int, default=d.learners, help="learner processes (default: %(default)s)"
    )
    parser.add_argument(
        "--capacity", type=int, default=d.capacity, help="buffer slots (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="rows per sample (default: %(default)s)"
    )
    parser.add_argument(
        "--chunk", type=int, default=d.chunk, help="transitions per extend() (default: %(default)s)"
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
        help="prioritized replay: learners sample by priority and set each row's priority to its TD error",
    )
    parser.add_argument(
        "--samples-per-insert",
        type=float,
        default=None,
        metavar="SPI",
        help="rate-limit the run (shmreplay.SampleToInsertRatio): learners sample SPI rows per row "
        "inserted, actors and learners wait for each other",
    )


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """Build a :class:`DemoConfig` from parsed ``demo`` arguments (``--path`` included)."""
    return DemoConfig(
        actors=args.actors,
        learners=args.learners,
        capacity=args.capacity,
        batch_size=args.batch_size,
        chunk=args.chunk,
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
