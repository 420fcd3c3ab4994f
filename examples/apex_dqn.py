"""Ape-X DQN on shmreplay: actor processes write, one learner trains a double DQN with JAX.

    pip install 'shmreplay[examples]'            # jax[cpu], optax, matplotlib, gymnasium, ale-py
    python examples/apex_dqn.py                  # CartPole-v1 until a mean return of 475
    python examples/apex_dqn.py --env ALE/Pong-v5 --minutes 10
    python examples/apex_dqn.py --buffer numpy   # the same learner fed by a single-process buffer

What runs (Horgan et al. 2018, "Distributed Prioritized Experience Replay"):

* ``--actors`` processes, each with a gymnasium vector env of ``--envs-per-actor`` envs. Env i
  of all N acts epsilon-greedily with Ape-X's ladder ``eps_i = 0.4 ** (1 + 7 i / (N - 1))``.
  Actors write every step into one :class:`shmreplay.EpisodeBuffer` (``n_step`` 3; Atari
  frames stored once and stacked when sampled) with a priority they compute themselves: the
  one-step TD error of their own copy of the network.
* The learner (this process) trains a double DQN from ``buf.batches(...)`` (sampled by
  priority in a background thread), sends the new priorities back with
  ``update_priorities``, and publishes its parameters to the actors through a one-slot
  :class:`shmreplay.ReplayBuffer`. A ``SampleToInsertRatio`` limiter keeps the learner and the
  actors at ``--samples-per-insert``, however fast either side is.
* Finished episodes reach the learner through a third buffer in queue mode. The score is the
  mean return of the last 20 episodes of the "greedy" envs (epsilon <= ``--eval-eps``): the
  high-epsilon end of the ladder explores and never scores 500 on CartPole.

``--buffer numpy`` runs the same learner, network, envs, ladder and hyper-parameters in one
process with a NumPy prioritized n-step buffer (what a single-process script would use), for
comparison. At the end a PNG plot of the score against wall time is written (``--plot``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

# One compute thread per process: the actors and the learner share 2 cores. Set before jax
# is imported, here and (inherited through the environment) in every spawned actor.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shmreplay  # noqa: E402

RANDOM_CARTPOLE_RETURN = 22.1  # a uniformly random CartPole-v1 policy, mean of 2,000 episodes


@dataclasses.dataclass
class Config:
    env: str = "CartPole-v1"
    buffer: str = "shmreplay"
    actors: int = 2
    envs_per_actor: int = 4
    minutes: float = 10.0
    target_return: float | None = 475.0
    eval_eps: float = 0.01
    capacity: int = 100_000
    batch_size: int = 128
    lr: float = 5e-4
    gamma: float = 0.99
    n_step: int = 3
    alpha: float = 0.6
    beta: float = 0.4
    samples_per_insert: float = 8.0
    min_size: int = 2_000
    target_every: int = 500
    publish_every: int = 50
    hidden: int = 256
    seed: int = 0
    plot: str | None = "apex_dqn.png"
    json_out: str | None = None
    beat_random: float | None = None
    name: str = ""

    @property
    def atari(self) -> bool:
        return self.env.startswith("ALE/")

    @property
    def frame_stack(self) -> int:
        return 4 if self.atari else 1

    @property
    def num_envs(self) -> int:
        return self.actors * self.envs_per_actor


def error_buffer(cfg: Config) -> float:
    """How far (in samples) the learner may run ahead of or behind ``samples_per_insert``: a few
    batches, so that prefetching and bursts of actor steps do not stall either side."""
    return 4.0 * cfg.batch_size * max(1.0, cfg.samples_per_insert)


def epsilon_ladder(num_envs: int, base: float = 0.4, spread: float = 7.0) -> np.ndarray:
    """Ape-X's per-env epsilons: ``base ** (1 + spread * i / (N - 1))``, the most exploring first."""
    if num_envs == 1:
        return np.array([base])
    return base ** (1.0 + spread * np.arange(num_envs) / (num_envs - 1))


# ------------------------------------------------------------------------------------------------
# Environments
# ------------------------------------------------------------------------------------------------


class EnvSpec(NamedTuple):
    obs_shape: tuple[int, ...]  # one frame (Atari) or one observation
    obs_dtype: Any
    num_actions: int


def make_envs(cfg: Config, count: int) -> tuple[Any, EnvSpec]:
    """A gymnasium vector env (NEXT_STEP autoreset) of ``count`` envs and its spec."""
    if cfg.atari:
        from shmreplay.atari import FRAME_SHAPE, make_atari_vector_env

        envs, actions = make_atari_vector_env(cfg.env, count)
        return envs, EnvSpec(FRAME_SHAPE, np.uint8, actions)
    import gymnasium

    envs = gymnasium.make_vec(cfg.env, num_envs=count, vectorization_mode="sync")
    space = envs.single_observation_space
    return envs, EnvSpec(tuple(space.shape), np.float32, int(envs.single_action_space.n))


class Stacker:
    """The last ``k`` frames of every env, for acting (the buffer stacks its own when sampling);
    an episode's first frame is repeated before it, as ``stack_padding="first"`` does."""

    def __init__(self, k: int, first: np.ndarray) -> None:
        self.frames = np.repeat(first[:, None], k, axis=1)

    def push(self, frame: np.ndarray, starts: np.ndarray) -> np.ndarray:
        self.frames[:, :-1] = self.frames[:, 1:]
        self.frames[:, -1] = frame
        if starts.any():
            self.frames[starts] = frame[starts][:, None]
        return self.frames


# ------------------------------------------------------------------------------------------------
# The network and the double-DQN update (JAX + optax)
# ------------------------------------------------------------------------------------------------


def init_params(cfg: Config, spec: EnvSpec, seed: int) -> Any:
    import jax

    def dense(key: Any, n_in: int, n_out: int) -> dict[str, Any]:
        return {"w": jax.random.normal(key, (n_in, n_out)) * math.sqrt(2.0 / n_in), "b": jax.numpy.zeros(n_out)}

    def conv(key: Any, c_in: int, c_out: int, size: int) -> dict[str, Any]:
        fan_in = c_in * size * size
        return {"w": jax.random.normal(key, (c_out, c_in, size, size)) * math.sqrt(2.0 / fan_in), "b": jax.numpy.zeros(c_out)}

    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    if cfg.atari:  # the Nature DQN torso
        return {
            "conv": [conv(keys[0], cfg.frame_stack, 32, 8), conv(keys[1], 32, 64, 4), conv(keys[2], 64, 64, 3)],
            "dense": [dense(keys[3], 64 * 7 * 7, 512), dense(keys[4], 512, spec.num_actions)],
        }
    n_in = cfg.frame_stack * int(np.prod(spec.obs_shape))
    return {
        "conv": [],
        "dense": [dense(keys[0], n_in, cfg.hidden), dense(keys[1], cfg.hidden, cfg.hidden), dense(keys[2], cfg.hidden, spec.num_actions)],
    }


def q_values(params: Any, obs: Any) -> Any:
    """Q(s, .) of a batch of (stacked) observations; uint8 frames are scaled to [0, 1]."""
    import jax
    import jax.numpy as jnp

    x = obs.astype(jnp.float32)
    if params["conv"]:
        x = x / 255.0
        for layer, stride in zip(params["conv"], (4, 2, 1)):
            x = jax.lax.conv_general_dilated(x, layer["w"], (stride, stride), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
            x = jax.nn.relu(x + layer["b"][None, :, None, None])
    x = x.reshape(x.shape[0], -1)
    *hidden, last = params["dense"]
    for layer in hidden:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ last["w"] + last["b"]


class Learner:
    """Double DQN with n-step targets, importance weights and a periodically copied target net."""

    def __init__(self, cfg: Config, spec: EnvSpec) -> None:
        import jax
        import jax.numpy as jnp
        import optax
        from jax.flatten_util import ravel_pytree

        self.cfg = cfg
        self.params = init_params(cfg, spec, cfg.seed)
        self.target = self.params
        self.optimizer = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(cfg.lr))
        self.opt_state = self.optimizer.init(self.params)
        self.updates = 0
        self._ravel = lambda p: np.asarray(ravel_pytree(p)[0], dtype=np.float32)
        optimizer = self.optimizer

        def loss(params: Any, target: Any, batch: dict[str, Any], weight: Any) -> tuple[Any, Any]:
            q = q_values(params, batch["obs"])
            q_taken = jnp.take_along_axis(q, batch["action"][:, None].astype(jnp.int32), axis=1)[:, 0]
            best = jnp.argmax(q_values(params, batch["next_obs"]), axis=1)  # double DQN: online picks,
            q_next = jnp.take_along_axis(q_values(target, batch["next_obs"]), best[:, None], axis=1)[:, 0]  # target rates
            bootstrap = batch["discount"] * (1.0 - batch["terminated"].astype(jnp.float32))
            td = batch["reward"] + bootstrap * jax.lax.stop_gradient(q_next) - q_taken
            return jnp.mean(weight * optax.huber_loss(td)), td

        @jax.jit
        def step(params: Any, target: Any, opt_state: Any, batch: dict[str, Any], weight: Any) -> tuple[Any, Any, Any, Any]:
            (value, td), grads = jax.value_and_grad(loss, has_aux=True)(params, target, batch, weight)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, td, value

        self._step = step

    def update(self, batch: dict[str, np.ndarray], weight: np.ndarray) -> np.ndarray:
        """One gradient step; returns |TD error| per item (the new priorities)."""
        inputs = {k: batch[k] for k in ("obs", "next_obs", "action", "reward", "discount", "terminated")}
        self.params, self.opt_state, td, _ = self._step(self.params, self.target, self.opt_state, inputs, weight)
        self.updates += 1
        if self.updates % self.cfg.target_every == 0:
            self.target = self.params
        return np.abs(np.asarray(td))

    def flat_params(self) -> np.ndarray:
        return self._ravel(self.params)


class Policy:
    """An actor's copy of the network: epsilon-greedy actions and one-step TD priorities."""

    def __init__(self, cfg: Config, spec: EnvSpec, epsilons: np.ndarray, seed: int) -> None:
        import jax
        from jax.flatten_util import ravel_pytree

        template = init_params(cfg, spec, 0)
        _, self._unravel = ravel_pytree(template)
        self.params = template
        self._q = jax.jit(q_values)
        self.epsilons = epsilons
        self.gamma = cfg.gamma
        self.rng = np.random.default_rng(seed)
        self.num_actions = spec.num_actions

    def load(self, flat: np.ndarray) -> None:
        self.params = self._unravel(flat)

    def q(self, obs: np.ndarray) -> np.ndarray:
        return np.asarray(self._q(self.params, obs))

    def act(self, q: np.ndarray) -> np.ndarray:
        explore = self.rng.random(len(q)) < self.epsilons
        return np.where(explore, self.rng.integers(self.num_actions, size=len(q)), q.argmax(axis=1))

    def priority(self, q: np.ndarray, action: np.ndarray, reward: np.ndarray, terminated: np.ndarray, q_next: np.ndarray) -> np.ndarray:
        target = reward + self.gamma * (1.0 - terminated) * q_next.max(axis=1)
        return np.abs(target - q[np.arange(len(q)), action])


# ------------------------------------------------------------------------------------------------
# Actors (their own processes)
# ------------------------------------------------------------------------------------------------


class Episodes:
    """Running returns of a vector env with NEXT_STEP autoreset."""

    def __init__(self, n: int) -> None:
        self.ret = np.zeros(n)
        self.length = np.zeros(n, dtype=np.int64)
        self.restarting = np.zeros(n, dtype=bool)  # the env's next step starts a new episode

    def step(self, reward: np.ndarray, terminated: np.ndarray, truncated: np.ndarray) -> list[tuple[int, float, int]]:
        """Adds a step; returns (env, return, length) of the episodes it ended."""
        live = ~self.restarting
        self.ret[live] += reward[live]
        self.length[live] += 1
        ended = live & (terminated | truncated)
        done = [(int(e), float(self.ret[e]), int(self.length[e])) for e in np.flatnonzero(ended)]
        self.ret[self.restarting] = 0.0
        self.length[self.restarting] = 0
        self.restarting = ended
        return done


def read_params(slot: shmreplay.ReplayBuffer) -> tuple[np.ndarray, int] | None:
    """The newest published parameters and their version; None before the first, or when the
    learner kept rewriting the slot while we read (the actor keeps its parameters a while)."""
    try:
        batch = slot.sample(1)
    except (shmreplay.EmptyBufferError, shmreplay.ContendedError):
        return None
    return batch["params"][0], int(batch["version"][0])


def shut_down_when_orphaned(learner: int, buf: shmreplay.EpisodeBuffer) -> None:
    while os.getppid() == learner:
        time.sleep(0.5)
    buf.shutdown()


def actor_main(cfg: Config, actor_id: int, names: dict[str, str]) -> None:
    """An actor process: acts with the newest parameters and writes every step; ends when the
    learner shuts the buffer down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the learner, which shuts down
    buf = shmreplay.EpisodeBuffer.attach(names["replay"])
    # A learner killed outright (SIGKILL) shuts nothing down: then the actors do it themselves,
    # which ends their waits on the limiter; the segments become stale for `shmreplay gc`.
    learner = os.getppid()
    threading.Thread(target=shut_down_when_orphaned, args=(learner, buf), daemon=True).start()
    params_slot = shmreplay.ReplayBuffer.attach(names["params"])
    finished = shmreplay.ReplayBuffer.attach(names["episodes"])
    envs, spec = make_envs(cfg, cfg.envs_per_actor)
    ladder = epsilon_ladder(cfg.num_envs)
    # Env i of the ladder belongs to actor i % actors: each actor holds both ends of the ladder,
    # so losing one still leaves explorers and greedy envs.
    mine = np.arange(actor_id, cfg.num_envs, cfg.actors)
    policy = Policy(cfg, spec, ladder[mine], seed=cfg.seed * 1000 + actor_id)
    version = -1
    writer = buf.writer(num_envs=cfg.envs_per_actor)
    episodes = Episodes(cfg.envs_per_actor)
    try:
        obs, _ = envs.reset(seed=cfg.seed * 1000 + 100 * actor_id)
        writer.reset(obs=obs)
        stack = Stacker(cfg.frame_stack, obs)
        q = None
        steps = 0
        while True:
            steps += 1
            if version < 0 or steps % 16 == 0:  # a parameter read is a copy: not every step
                newest = read_params(params_slot)
                if newest is not None and newest[1] != version:
                    policy.load(newest[0])
                    version = newest[1]
                    q = None
            if q is None:
                q = policy.q(stack.frames)
            action = policy.act(q)
            obs, reward, terminated, truncated, _ = envs.step(action)
            starts = episodes.restarting.copy()
            q_next = policy.q(stack.push(obs, starts))
            priority = policy.priority(q, action, reward.astype(np.float64), terminated.astype(np.float64), q_next)
            writer.step(obs=obs, action=action, reward=reward, terminated=terminated, truncated=truncated, priority=priority)
            for env, ret, length in episodes.step(reward, terminated, truncated):
                finished.add(env=mine[env], eps=ladder[mine[env]], ret=ret, length=length, time=time.time())
            q = q_next
    except shmreplay.ShutdownError:
        pass
    finally:
        envs.close()
        for handle in (buf, params_slot, finished):
            handle.close()


# ------------------------------------------------------------------------------------------------
# The learner's bookkeeping
# ------------------------------------------------------------------------------------------------


class ActorsLost(Exception):
    """Every actor process died."""


class Terminated(Exception):
    """SIGTERM: stop as for Ctrl-C (shut the buffers down, remove them)."""


def terminate(signum: int, frame: Any) -> None:
    raise Terminated


class Score:
    """Returns of finished episodes; the score is the mean of the last 20 greedy-end ones."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.start = time.time()
        self.greedy: collections.deque[float] = collections.deque(maxlen=20)
        self.curve: list[tuple[float, float]] = []  # (seconds, score) after each greedy episode
        self.episodes = 0
        self.reached_at: float | None = None

    def add(self, eps: float, ret: float, when: float) -> None:
        self.episodes += 1
        if eps <= self.cfg.eval_eps:
            self.greedy.append(ret)
            self.curve.append((when - self.start, self.value))
            if (
                self.reached_at is None
                and self.cfg.target_return is not None
                and len(self.greedy) == self.greedy.maxlen
                and self.value >= self.cfg.target_return
            ):
                self.reached_at = when - self.start

    @property
    def value(self) -> float:
        return float(np.mean(self.greedy)) if self.greedy else float("nan")


def progress_line(cfg: Config, score: Score, learner: Learner, env_steps: int, elapsed: float) -> str:
    return (
        f"\r{elapsed:6.0f} s  env steps {env_steps:>9,}  updates {learner.updates:>7,} "
        f"({learner.updates / max(elapsed, 1e-9):5.0f}/s)  episodes {score.episodes:>6,}  "
        f"score {score.value:6.1f} (last {len(score.greedy)} with eps <= {cfg.eval_eps:g})"
    )


def summary(cfg: Config, score: Score, learner: Learner, env_steps: int, elapsed: float) -> dict[str, Any]:
    return {
        "env": cfg.env,
        "buffer": cfg.buffer,
        "seed": cfg.seed,
        "seconds": round(elapsed, 1),
        "env_steps": env_steps,
        "updates": learner.updates,
        "updates_per_s": round(learner.updates / max(elapsed, 1e-9), 1),
        "env_steps_per_s": round(env_steps / max(elapsed, 1e-9), 1),
        "episodes": score.episodes,
        "score": score.value,
        "target_return": cfg.target_return,
        "reached_target_s": score.reached_at,
        "curve": score.curve,
    }


# ------------------------------------------------------------------------------------------------
# shmreplay: actor processes, one learner
# ------------------------------------------------------------------------------------------------


def watch_actors(actors: list[Any], buf: shmreplay.EpisodeBuffer, ended: threading.Event, lost: list[str], deadline: float) -> None:
    """Reports actors that die and shuts the buffer down (which ends the learner's ``batches()``)
    when none is left or the time budget is over, even while the learner waits for data."""
    while not ended.wait(0.2):
        for p in actors:
            if p.exitcode is not None and p.name not in lost:
                lost.append(p.name)
                left = len(actors) - len(lost)
                goes_on = f"learning goes on with {left} actor(s)" if left else "no actor left: stopping"
                print(f"\n{p.name} (pid {p.pid}) died (exit code {p.exitcode}); {goes_on}", flush=True)
        if len(lost) == len(actors) or time.monotonic() > deadline + 5.0:
            buf.shutdown()
            return


def run_shmreplay(cfg: Config) -> dict[str, Any]:
    probe, spec = make_envs(cfg, 1)
    probe.close()
    base = cfg.name or f"apex-{os.getpid()}"
    names = {"replay": base, "params": f"{base}-params", "episodes": f"{base}-episodes"}
    learner = Learner(cfg, spec)
    flat = learner.flat_params()
    frame_dtype = np.uint8 if cfg.atari else np.float32
    buf = shmreplay.EpisodeBuffer.create(
        names["replay"],
        capacity=cfg.capacity,
        fields={"obs": (spec.obs_shape, frame_dtype), "action": ((), np.int32), "reward": ((), np.float32)},
        observation="obs",
        reward="reward",
        frame_stack=cfg.frame_stack,
        n_step=cfg.n_step,
        gamma=cfg.gamma,
        sampler=shmreplay.Prioritized(alpha=cfg.alpha),
        limiter=shmreplay.SampleToInsertRatio(
            samples_per_insert=cfg.samples_per_insert,
            min_size=cfg.min_size,
            error_buffer=error_buffer(cfg),
        ),
    )
    params_slot = shmreplay.ReplayBuffer.create(
        names["params"], capacity=1, fields={"params": (flat.shape, np.float32), "version": ((), np.int64)}
    )
    finished = shmreplay.ReplayBuffer.create(
        names["episodes"],
        capacity=4096,
        fields={"env": ((), np.int32), "eps": ((), np.float64), "ret": ((), np.float64), "length": ((), np.int64), "time": ((), np.float64)},
        sampler=shmreplay.Queue(),
    )
    params_slot.add(params=flat, version=0)
    ctx = multiprocessing.get_context("spawn")  # jax is not fork-safe
    actors = [ctx.Process(target=actor_main, args=(cfg, i, names), name=f"actor-{i}", daemon=True) for i in range(cfg.actors)]
    for p in actors:
        p.start()
    score = Score(cfg)
    print(f"actor pids: {' '.join(str(p.pid) for p in actors)}", flush=True)
    start = time.monotonic()
    ended = threading.Event()
    lost: list[str] = []  # actors that died
    watchdog = threading.Thread(target=watch_actors, args=(actors, buf, ended, lost, start + cfg.minutes * 60), daemon=True)
    watchdog.start()
    last_print = 0.0
    try:
        batches = buf.batches(cfg.batch_size, prefetch=2, beta=cfg.beta)  # ends when buf shuts down
        for batch, info in batches:
            buf.update_priorities(info["key"], learner.update(batch, info["weight"]) + 1e-6)
            if learner.updates % cfg.publish_every == 0:
                params_slot.add(params=learner.flat_params(), version=learner.updates)
            now = time.monotonic()
            if now - last_print >= 1.0:
                last_print = now
                waiting = len(finished)
                if waiting:
                    got = finished.sample(waiting, timeout=0)
                    for eps, ret, when in zip(got["eps"], got["ret"], got["time"]):
                        score.add(float(eps), float(ret), float(when))
                env_steps = buf.stats()["inserts"] - cfg.num_envs
                print(progress_line(cfg, score, learner, env_steps, now - start), end="", flush=True)
                if score.reached_at is not None or now - start >= cfg.minutes * 60:
                    break
        batches.close()
    finally:
        ended.set()
        print()
        elapsed = time.monotonic() - start
        env_steps = buf.stats()["inserts"] - cfg.num_envs  # one frame per env step, plus each env's o_0
        for handle in (buf, finished):
            handle.shutdown()  # every actor waiting in a call gets ShutdownError and exits
        for p in actors:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        for handle in (buf, params_slot, finished):
            handle.unlink()
            handle.close()
    if len(lost) == len(actors):
        raise ActorsLost("every actor died; see their output above")
    return summary(cfg, score, learner, env_steps, elapsed)


# ------------------------------------------------------------------------------------------------
# NumPy: one process acts and learns, a single-process prioritized n-step buffer
# ------------------------------------------------------------------------------------------------


class NumpyReplay:
    """Prioritized n-step transitions in NumPy arrays (the single-process baseline).

    n-step returns are built per env when a step's window completes (or its episode ends) and
    stored with both observations; sampling is stratified by cumulative sums, weights as in
    shmreplay (``(v_i / v_min) ** -beta``).
    """

    def __init__(self, cfg: Config, spec: EnvSpec, num_envs: int) -> None:
        self.cfg = cfg
        shape = (cfg.capacity, cfg.frame_stack, *spec.obs_shape)
        dtype = np.uint8 if cfg.atari else np.float32
        self.obs = np.zeros(shape, dtype)
        self.next_obs = np.zeros(shape, dtype)
        self.action = np.zeros(cfg.capacity, np.int32)
        self.reward = np.zeros(cfg.capacity, np.float32)
        self.discount = np.zeros(cfg.capacity, np.float32)
        self.terminated = np.zeros(cfg.capacity, np.bool_)
        self.value = np.zeros(cfg.capacity, np.float64)  # (p + eps) ** alpha
        self.max_priority = 1.0
        self.size = self.cursor = self.inserts = 0
        self.pending: list[collections.deque[tuple[Any, ...]]] = [collections.deque() for _ in range(num_envs)]
        self.rng = np.random.default_rng(cfg.seed)

    def _store(self, obs: np.ndarray, action: int, reward: float, discount: float, terminated: bool, next_obs: np.ndarray, priority: float) -> None:
        i = self.cursor
        self.obs[i], self.action[i], self.reward[i] = obs, action, reward
        self.discount[i], self.terminated[i], self.next_obs[i] = discount, terminated, next_obs
        self.max_priority = max(self.max_priority, priority)
        self.value[i] = (priority + 1e-6) ** self.cfg.alpha
        self.cursor = (i + 1) % self.cfg.capacity
        self.size = min(self.size + 1, self.cfg.capacity)
        self.inserts += 1

    def add(self, env: int, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray, terminated: bool, truncated: bool, priority: float) -> None:
        """Step t of env ``env``: stores every transition whose n-step window this completes."""
        window = self.pending[env]
        window.append((obs, action, reward, priority))
        ended = terminated or truncated
        while window and (len(window) == self.cfg.n_step or ended):
            first_obs, first_action, _, first_priority = window[0]
            ret = sum(self.cfg.gamma**j * r for j, (_, _, r, _) in enumerate(window))
            self._store(first_obs, first_action, ret, self.cfg.gamma ** len(window), terminated, next_obs, first_priority)
            window.popleft()
            if not ended:
                break

    def sample(self, batch_size: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        cumulative = np.cumsum(self.value[: self.size])
        total = cumulative[-1]
        targets = (np.arange(batch_size) + self.rng.random(batch_size)) * (total / batch_size)
        idx = np.minimum(np.searchsorted(cumulative, targets, side="right"), self.size - 1)
        v = self.value[idx]
        v_min = self.value[: self.size][self.value[: self.size] > 0].min()
        weight = ((v / v_min) ** -self.cfg.beta).astype(np.float32)
        batch = {
            "obs": self.obs[idx], "next_obs": self.next_obs[idx], "action": self.action[idx],
            "reward": self.reward[idx], "discount": self.discount[idx], "terminated": self.terminated[idx],
        }  # fmt: skip
        return batch, weight, idx

    def update_priorities(self, idx: np.ndarray, priority: np.ndarray) -> None:
        self.value[idx] = (priority + 1e-6) ** self.cfg.alpha
        self.max_priority = max(self.max_priority, float(priority.max()))


def run_numpy(cfg: Config) -> dict[str, Any]:
    envs, spec = make_envs(cfg, cfg.num_envs)
    learner = Learner(cfg, spec)
    policy = Policy(cfg, spec, epsilon_ladder(cfg.num_envs), seed=cfg.seed * 1000)
    policy.load(learner.flat_params())
    replay = NumpyReplay(cfg, spec, cfg.num_envs)
    episodes = Episodes(cfg.num_envs)
    score = Score(cfg)
    ladder = epsilon_ladder(cfg.num_envs)
    start = time.monotonic()
    last_print, sampled, env_steps = 0.0, 0, 0
    obs, _ = envs.reset(seed=cfg.seed * 1000)
    stack = Stacker(cfg.frame_stack, obs)
    q = policy.q(stack.frames)
    try:
        while True:
            action = policy.act(q)
            before = stack.frames.copy()
            obs, reward, terminated, truncated, _ = envs.step(action)
            env_steps += cfg.num_envs
            starts = episodes.restarting.copy()
            after = stack.push(obs, starts)
            q_next = policy.q(after)
            priority = policy.priority(q, action, reward.astype(np.float64), terminated.astype(np.float64), q_next)
            for e in np.flatnonzero(~starts):
                replay.add(int(e), before[e], int(action[e]), float(reward[e]), after[e].copy(), bool(terminated[e]), bool(truncated[e]), float(priority[e]))
            for env, ret, _ in episodes.step(reward, terminated, truncated):
                score.add(float(ladder[env]), ret, time.time())
            q = q_next
            # SampleToInsertRatio's rule, an env step counted as an insert (a frame, in shmreplay).
            allowed = (env_steps - cfg.min_size) * cfg.samples_per_insert + error_buffer(cfg)
            while replay.size >= cfg.min_size and sampled + cfg.batch_size <= allowed:
                batch, weight, idx = replay.sample(cfg.batch_size)
                replay.update_priorities(idx, learner.update(batch, weight))
                sampled += cfg.batch_size
                if learner.updates % cfg.publish_every == 0:
                    policy.load(learner.flat_params())
                    q = policy.q(stack.frames)
            now = time.monotonic()
            if now - last_print >= 1.0:
                last_print = now
                print(progress_line(cfg, score, learner, env_steps, now - start), end="", flush=True)
                if score.reached_at is not None or now - start >= cfg.minutes * 60:
                    break
    finally:
        print()
        envs.close()
    return summary(cfg, score, learner, env_steps, time.monotonic() - start)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if result["curve"]:
        t, s = zip(*result["curve"])
        ax.plot(t, s, label=f"{result['buffer']} (seed {result['seed']})")
    if result["target_return"] is not None:
        ax.axhline(result["target_return"], color="grey", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("mean return, last 20 greedy-end episodes")
    ax.set_title(f"Ape-X DQN on {result['env']}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> Config:
    defaults = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--env", default=defaults.env, help="gymnasium id: CartPole-v1, or an Atari game such as ALE/Pong-v5")
    p.add_argument("--buffer", choices=["shmreplay", "numpy"], default=defaults.buffer, help="numpy: the single-process baseline")
    helps = {
        "actors": "actor processes", "envs_per_actor": "envs of each actor's vector env",
        "minutes": "time budget", "target_return": "stop once the score reaches it",
        "eval_eps": "episodes of envs with at most this epsilon make the score",
        "capacity": "replay capacity (frames)", "samples_per_insert": "SampleToInsertRatio's rate",
        "min_size": "frames before learning starts", "target_every": "updates between target-network copies",
        "publish_every": "updates between parameter publications", "hidden": "MLP width (CartPole)",
        "plot": "PNG of the score against wall time ('' for none)", "json_out": "write the result as JSON here",
        "name": "names of the buffers: NAME, NAME-params, NAME-episodes (default: apex-<pid>)",
        "beat_random": "exit 1 unless the final score is at least this many times a random policy's (CartPole)",
    }  # fmt: skip
    for field in dataclasses.fields(Config):
        if field.name in ("env", "buffer"):
            continue
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        kind = {"int": int, "float": float, "str": str}.get(str(field.type).split(" ")[0], float)
        p.add_argument(flag, type=kind, default=default, help=helps.get(field.name, field.name.replace("_", " ")))
    p.add_argument("--no-target", action="store_true", help="run the whole --minutes, do not stop at --target-return")
    args = p.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
    if args.no_target:
        values["target_return"] = None
    cfg = Config(**values)
    for name in ("actors", "envs_per_actor", "capacity", "batch_size", "n_step", "min_size", "target_every", "publish_every", "hidden"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.beat_random is not None and cfg.env != "CartPole-v1":
        p.error("--beat-random is for CartPole-v1 (the random policy's return is known there)")
    if cfg.min_size > cfg.capacity:
        p.error("--min-size must not exceed --capacity")
    if not 0 <= cfg.gamma <= 1 or not 0 <= cfg.beta <= 1:
        p.error("--gamma and --beta must be in [0, 1]")
    if cfg.minutes <= 0 or cfg.lr <= 0 or cfg.samples_per_insert <= 0:
        p.error("--minutes, --lr and --samples-per-insert must be > 0")
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    who = f"{cfg.actors} actor processes x {cfg.envs_per_actor} envs" if cfg.buffer == "shmreplay" else f"one process, {cfg.num_envs} envs"
    print(f"Ape-X DQN on {cfg.env}: {cfg.buffer} buffer, {who}, seed {cfg.seed}")
    signal.signal(signal.SIGTERM, terminate)
    try:
        result = run_shmreplay(cfg) if cfg.buffer == "shmreplay" else run_numpy(cfg)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("\nterminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except ActorsLost as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    reached = result["reached_target_s"]
    print(
        f"{result['env_steps']:,} env steps ({result['env_steps_per_s']:,.0f}/s), {result['updates']:,} updates "
        f"({result['updates_per_s']:,.0f}/s) in {result['seconds']:.0f} s; score {result['score']:.1f}"
        + ("" if cfg.target_return is None else (f"; reached {cfg.target_return:g} after {reached:.0f} s" if reached is not None else f"; {cfg.target_return:g} not reached"))
    )
    if cfg.plot:
        plot(result, cfg.plot)
        print(f"plot: {cfg.plot}")
    if cfg.json_out:
        with open(cfg.json_out, "w") as f:
            json.dump(result, f, indent=1)
    if cfg.beat_random is not None:
        needed = cfg.beat_random * RANDOM_CARTPOLE_RETURN
        if not result["score"] >= needed:
            print(f"FAILED: score {result['score']:.1f} < {cfg.beat_random:g} x a random policy's {RANDOM_CARTPOLE_RETURN}", file=sys.stderr)
            return 1
        print(f"learned: score {result['score']:.1f} >= {cfg.beat_random:g} x a random policy's {RANDOM_CARTPOLE_RETURN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
