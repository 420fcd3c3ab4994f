"""Vector environments of 84x84 frames for the actor-learner demo.

Two sources share the interface of a gymnasium vector env (:class:`VectorEnv`): ``reset()``
returns ``(obs, info)`` and ``step(actions)`` returns ``(obs, reward, terminated, truncated,
info)``, one row per env, with gymnasium's default NEXT_STEP autoreset (the step after an
episode's end returns the first observation of a new episode, with reward 0 and no flags).

* :func:`make_atari_vector_env` plays real Atari 2600 games through ``ale-py`` +
  ``gymnasium.make_vec`` (install with ``pip install 'shmreplay[atari]'``), each screen turned
  into one 84x84 grayscale ``uint8`` frame by :class:`Downsampler`. Frames are not stacked here:
  an :class:`~shmreplay.EpisodeBuffer` stores each frame once and stacks them when it samples.
* :class:`SyntheticVectorEnv` runs :class:`SyntheticFrames`, a cheap moving pattern drawn with
  NumPy only; it needs no extra packages and never imports ``gymnasium``.

Observations are ``(num_envs, 84, 84)`` ``uint8`` arrays the caller may keep and modify.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "FRAME_SIZE",
    "FRAME_SHAPE",
    "AtariUnavailableError",
    "VectorEnv",
    "SyntheticFrames",
    "SyntheticVectorEnv",
    "Downsampler",
    "atari_env_id",
    "make_atari_vector_env",
    "check_atari",
]

FRAME_SIZE = 84
"""Height and width of one preprocessed frame."""
FRAME_SHAPE: tuple[int, int] = (FRAME_SIZE, FRAME_SIZE)
"""Shape of one observation: a single ``uint8`` frame."""

Frame = npt.NDArray[np.uint8]
Frames = npt.NDArray[np.uint8]
StepResult = tuple[Frames, npt.NDArray[Any], npt.NDArray[np.bool_], npt.NDArray[np.bool_], dict[str, Any]]

INSTALL_HINT = (
    "the Atari demo needs gymnasium and ale-py: pip install 'shmreplay[atari]' "
    "(or run the demo with --synthetic to use generated frames)"
)


class AtariUnavailableError(RuntimeError):
    """``gymnasium`` / ``ale-py`` are missing, or the requested game cannot be created."""


class VectorEnv(Protocol):
    """The part of ``gymnasium.vector.VectorEnv`` the demo's actors use."""

    num_envs: int

    def reset(self, *, seed: int | None = None) -> tuple[Frames, dict[str, Any]]:
        """Start an episode in every env; return the first frames ``(num_envs, 84, 84)``."""
        ...

    def step(self, actions: npt.NDArray[np.int64]) -> StepResult:
        """One step of every env: ``(obs, reward, terminated, truncated, info)``.

        NEXT_STEP autoreset: for an env whose previous step ended its episode, ``obs`` is the
        first frame of a new episode, its reward 0 and its flags False.
        """
        ...

    def close(self) -> None:
        """Release the environments."""
        ...


class Downsampler:
    """Resize a ``(H, W)`` ``uint8`` image to ``(84, 84)`` with NumPy only.

    Each output pixel averages a 2x2 grid of source pixels placed at the quarter points of the
    source area it covers: close to an area (box) filter, and much better than nearest-neighbour
    for the thin ball and paddles of Atari games. The filter is separable, so it costs two
    row/column gathers (~30 us for a 210x160 screen) instead of one 2-D fancy index (~350 us).
    gymnasium's ``AtariPreprocessing`` would need OpenCV, which the demo does not install.
    """

    def __init__(self, height: int, width: int, size: int = FRAME_SIZE) -> None:
        taps = np.array([0.25, 0.75])
        rows = ((np.arange(size)[:, None] + taps) * (height / size)).astype(np.intp)
        cols = ((np.arange(size)[:, None] + taps) * (width / size)).astype(np.intp)
        self._rows = np.minimum(rows, height - 1).ravel()  # 2 taps per output row
        self._cols = np.minimum(cols, width - 1).ravel()  # 2 taps per output column
        self.shape = (height, width)

    def __call__(self, image: npt.NDArray[np.uint8]) -> Frame:
        if image.shape != self.shape:
            raise ValueError(f"expected an image of shape {self.shape}, got {image.shape}")
        tall = image.take(self._rows, axis=0).astype(np.uint16)  # (2*size, W)
        pairs = tall[0::2] + tall[1::2]  # (size, W)
        wide = pairs.take(self._cols, axis=1)  # (size, 2*size)
        frame: Frame = ((wide[:, 0::2] + wide[:, 1::2] + 2) >> 2).astype(np.uint8)
        return frame


def atari_env_id(game: str) -> str:
    """``"Pong"`` -> ``"ALE/Pong-v5"``; a full id such as ``"ALE/Breakout-v5"`` is kept as is."""
    if "/" in game or game.endswith(("-v5", "-v4", "-v0")):
        return game
    return f"ALE/{game}-v5"


def _import_gymnasium() -> Any:
    """Import ``gymnasium`` with the ALE environments registered and ALE's banner silenced."""
    try:
        import ale_py
        import gymnasium
    except ImportError as exc:
        raise AtariUnavailableError(f"{INSTALL_HINT} ({exc})") from exc
    try:
        ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    except AttributeError:  # older ale-py: keep its start-up banner
        pass
    gymnasium.register_envs(ale_py)
    return gymnasium


def make_atari_vector_env(game: str, num_envs: int, *, frameskip: int = 4) -> tuple[VectorEnv, int]:
    """``gymnasium.make_vec`` of ``num_envs`` copies of ``ALE/<game>-v5`` (``"sync"`` mode) whose
    observations are 84x84 grayscale frames; returns ``(envs, number of actions)``.

    The games use ``obs_type="grayscale"``, ``frameskip=4`` and the v5 default sticky-action
    probability (0.25); autoreset is gymnasium's default (NEXT_STEP). Frames are not stacked.
    """
    gymnasium = _import_gymnasium()
    from gymnasium.spaces import Box
    from gymnasium.wrappers import TransformObservation

    env_id = atari_env_id(game)
    frame_space = Box(0, 255, FRAME_SHAPE, np.uint8)
    resize: list[Downsampler] = []  # one per process; built from the first screen's shape

    def downsample(screen: npt.NDArray[np.uint8]) -> Frame:
        if not resize:
            resize.append(Downsampler(*screen.shape))
        return resize[0](screen)

    def preprocess(env: Any) -> Any:
        return TransformObservation(env, downsample, frame_space)

    try:
        envs = gymnasium.make_vec(
            env_id,
            num_envs=num_envs,
            vectorization_mode="sync",
            wrappers=[preprocess],
            obs_type="grayscale",
            frameskip=frameskip,
        )
    except Exception as exc:  # gymnasium raises several error types for unknown ids / ROMs
        raise AtariUnavailableError(f"cannot create Atari game {env_id!r}: {exc}") from exc
    return envs, int(envs.single_action_space.n)


class SyntheticFrames:
    """A NumPy-only stand-in for an Atari game: a ball bouncing in front of a paddle.

    Costs a few microseconds per step. An episode terminates after a random 10-1,199 steps, or
    is truncated at :attr:`time_limit` steps (about a third of them), so both kinds of episode
    end occur often. The reward is +1/-1 when the ball reaches the right/left edge.
    """

    num_actions = 6
    time_limit = 800

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)
        ys, xs = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE]
        self._background: Frame = (40 + (ys + 2 * xs) % 48).astype(np.uint8)
        self._pos = np.zeros(2)
        self._vel = np.zeros(2)
        self._paddle = 40.0
        self._life = 0
        self._steps = 0

    def _draw(self) -> Frame:
        frame: Frame = self._background.copy()
        y, x = int(self._pos[0]), int(self._pos[1])
        frame[y : y + 3, x : x + 3] = 236
        p = int(self._paddle)
        frame[p : p + 12, 78:80] = 200
        return frame

    def reset(self) -> Frame:
        """Start an episode; return its first frame ``(84, 84)``."""
        self._pos = self._rng.uniform([8, 8], [70, 70])
        self._vel = self._rng.uniform(1.0, 2.5, size=2) * self._rng.choice([-1.0, 1.0], size=2)
        self._paddle = 36.0
        self._life = int(self._rng.integers(10, 1200))
        self._steps = 0
        return self._draw()

    def step(self, action: int) -> tuple[Frame, float, bool, bool]:
        """Apply ``action``; return ``(frame, reward, terminated, truncated)``."""
        if not 0 <= action < self.num_actions:
            raise ValueError(f"action must be in [0, {self.num_actions})")
        self._paddle = float(np.clip(self._paddle + (-2.0, 0.0, 2.0)[action % 3], 1, 72))
        self._pos += self._vel
        reward = 0.0
        for axis in (0, 1):
            if not 1.0 <= self._pos[axis] <= 80.0:
                if axis == 1:
                    reward = 1.0 if self._vel[1] > 0 else -1.0
                self._vel[axis] = -self._vel[axis]
                self._pos[axis] = float(np.clip(self._pos[axis], 1.0, 80.0))
        self._steps += 1
        terminated = self._steps >= self._life
        truncated = not terminated and self._steps >= self.time_limit
        return self._draw(), reward, terminated, truncated


class SyntheticVectorEnv:
    """``num_envs`` :class:`SyntheticFrames` behind a gymnasium-style vector interface, with
    NEXT_STEP autoreset, so that the demo's actor loop is the same as for Atari."""

    def __init__(self, num_envs: int, seed: int = 0) -> None:
        if num_envs < 1:
            raise ValueError("num_envs must be >= 1")
        self.num_envs = num_envs
        self.num_actions = SyntheticFrames.num_actions
        self._envs = [SyntheticFrames(seed + i) for i in range(num_envs)]
        self._ended = np.zeros(num_envs, np.bool_)

    def reset(self, *, seed: int | None = None) -> tuple[Frames, dict[str, Any]]:
        if seed is not None:
            self._envs = [SyntheticFrames(seed + i) for i in range(self.num_envs)]
        self._ended[:] = False
        return np.stack([env.reset() for env in self._envs]), {}

    def step(self, actions: npt.NDArray[np.int64]) -> StepResult:
        obs = np.empty((self.num_envs, *FRAME_SHAPE), np.uint8)
        reward = np.zeros(self.num_envs, np.float64)
        terminated = np.zeros(self.num_envs, np.bool_)
        truncated = np.zeros(self.num_envs, np.bool_)
        for i, env in enumerate(self._envs):
            if self._ended[i]:
                obs[i] = env.reset()
            else:
                obs[i], reward[i], terminated[i], truncated[i] = env.step(int(actions[i]))
        self._ended = terminated | truncated
        return obs, reward, terminated, truncated, {}

    def close(self) -> None:
        pass


def check_atari(game: str) -> tuple[str, int]:
    """Raise :class:`AtariUnavailableError` unless ``game`` can be played.

    Returns ``(env_id, num_actions)``. Cheap when the packages are missing (nothing is
    imported); otherwise creates and closes the environment once, so that a bad game name is
    reported before any process starts.
    """
    missing = [m for m in ("gymnasium", "ale_py") if importlib.util.find_spec(m) is None]
    if missing:
        raise AtariUnavailableError(f"{INSTALL_HINT}; missing: {', '.join(missing)}")
    envs, num_actions = make_atari_vector_env(game, 1)
    envs.close()
    return atari_env_id(game), num_actions
