"""Frame sources for the actor-learner demo.

Two sources share one small interface (:class:`FrameSource`):

* :class:`AtariFrames` plays a real Atari 2600 game through ``ale-py`` + ``gymnasium``
  (install with ``pip install 'shmreplay[atari]'``) and turns each 210x160 grayscale screen into
  the classic DQN observation: an 84x84 ``uint8`` frame, four of them stacked.
* :class:`SyntheticFrames` draws a cheap moving pattern with NumPy only. It needs no extra
  packages, never imports ``gymnasium``, and stamps a frame counter and the actor id into the
  top-left pixels of every frame so a learner can check that every sampled record is whole.

Both return observations of shape :data:`OBS_SHAPE` as fresh arrays that the caller may keep.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "FRAME_SIZE",
    "STACK",
    "OBS_SHAPE",
    "AtariUnavailableError",
    "FrameSource",
    "AtariFrames",
    "SyntheticFrames",
    "Downsampler",
    "atari_env_id",
    "check_atari",
    "read_stamp",
]

FRAME_SIZE = 84
"""Height and width of one preprocessed frame."""
STACK = 4
"""Number of consecutive frames in one observation."""
OBS_SHAPE: tuple[int, int, int] = (STACK, FRAME_SIZE, FRAME_SIZE)
"""Shape of one observation (``uint8``)."""

Frame = npt.NDArray[np.uint8]
StepResult = tuple[Frame, float, bool]

INSTALL_HINT = (
    "the Atari demo needs gymnasium and ale-py: pip install 'shmreplay[atari]' "
    "(or run the demo with --synthetic to use generated frames)"
)


class AtariUnavailableError(RuntimeError):
    """``gymnasium`` / ``ale-py`` are missing, or the requested game cannot be created."""


class FrameSource(Protocol):
    """What an actor needs from an environment: stacked frames, a reward and an end flag."""

    num_actions: int

    def reset(self) -> Frame:
        """Start a new episode and return its first stacked observation ``(4, 84, 84)``."""
        ...

    def step(self, action: int) -> StepResult:
        """Apply ``action``; return ``(next_obs, reward, done)``.

        ``done`` is true when the episode ended (terminated or truncated); call :meth:`reset`
        before the next :meth:`step`.
        """
        ...

    def close(self) -> None:
        """Release the environment."""
        ...


def _push(stack: Frame, frame: Frame) -> Frame:
    """Return a new stack: the three newest frames of ``stack`` followed by ``frame``."""
    out = np.empty_like(stack)
    out[:-1] = stack[1:]
    out[-1] = frame
    return out


class Downsampler:
    """Resize a ``(H, W)`` ``uint8`` image to ``(84, 84)`` with NumPy only.

    Each output pixel averages a 2x2 grid of source pixels placed at the quarter points of the
    source area it covers: close to an area (box) filter, and much better than nearest-neighbour
    for the thin ball and paddles of Atari games. The filter is separable, so it costs two
    row/column gathers (~30 us for a 210x160 screen) instead of one 2-D fancy index (~350 us).
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


class AtariFrames:
    """A real Atari game (``ALE/<game>-v5``) producing stacked 84x84 grayscale observations.

    The environment uses ``obs_type="grayscale"``, ``frameskip=4`` and the default sticky-action
    probability (0.25) of the v5 environments. Random seeds are applied on the first reset.
    """

    def __init__(self, game: str = "Pong", seed: int = 0, *, frameskip: int = 4) -> None:
        gymnasium = _import_gymnasium()
        self.env_id = atari_env_id(game)
        try:
            self._env = gymnasium.make(self.env_id, obs_type="grayscale", frameskip=frameskip)
        except Exception as exc:  # gymnasium raises several error types for unknown ids / ROMs
            raise AtariUnavailableError(f"cannot create Atari game {self.env_id!r}: {exc}") from exc
        self.num_actions: int = int(self._env.action_space.n)
        self._seed: int | None = seed
        self._resize: Downsampler | None = None
        self._stack: Frame = np.zeros(OBS_SHAPE, np.uint8)

    def _frame(self, screen: npt.NDArray[np.uint8]) -> Frame:
        if self._resize is None:
            self._resize = Downsampler(*screen.shape)
        return self._resize(screen)

    def reset(self) -> Frame:
        screen, _ = self._env.reset(seed=self._seed)
        self._seed = None  # seed once; later episodes continue the same random stream
        frame = self._frame(screen)
        self._stack = np.repeat(frame[None], STACK, axis=0)
        return self._stack.copy()

    def step(self, action: int) -> StepResult:
        screen, reward, terminated, truncated, _ = self._env.step(action)
        self._stack = _push(self._stack, self._frame(screen))
        return self._stack.copy(), float(reward), bool(terminated or truncated)

    def close(self) -> None:
        self._env.close()


class SyntheticFrames:
    """A NumPy-only stand-in for an Atari game: a ball bouncing between two paddles.

    Costs a few microseconds per step. Pixels ``[0, 0:4]`` of every frame hold a little-endian
    frame counter and pixel ``[0, 4]`` the ``stamp`` (the actor id), see :func:`read_stamp`.
    Episodes end after a random 200-2000 steps; the reward is +1/-1 when the ball reaches the
    right/left edge.
    """

    num_actions = 6

    def __init__(self, seed: int = 0, *, stamp: int = 0) -> None:
        if not 0 <= stamp < 256:
            raise ValueError("stamp must fit in one byte (0..255)")
        self._rng = np.random.default_rng(seed)
        self._stamp = stamp
        self._counter = 0
        ys, xs = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE]
        self._background: Frame = (40 + (ys + 2 * xs) % 48).astype(np.uint8)
        self._stack: Frame = np.zeros(OBS_SHAPE, np.uint8)
        self._pos = np.zeros(2)
        self._vel = np.zeros(2)
        self._paddle = 40.0
        self._left = 0

    def _draw(self) -> Frame:
        frame: Frame = self._background.copy()
        y, x = int(self._pos[0]), int(self._pos[1])
        frame[y : y + 3, x : x + 3] = 236
        p = int(self._paddle)
        frame[p : p + 12, 78:80] = 200
        frame[0, 0:4] = np.frombuffer(self._counter.to_bytes(4, "little"), np.uint8)
        frame[0, 4] = self._stamp
        self._counter = (self._counter + 1) & 0xFFFFFFFF
        return frame

    def reset(self) -> Frame:
        self._pos = self._rng.uniform([8, 8], [70, 70])
        self._vel = self._rng.uniform(1.0, 2.5, size=2) * self._rng.choice([-1.0, 1.0], size=2)
        self._paddle = 36.0
        self._left = int(self._rng.integers(200, 2001))
        self._stack = np.repeat(self._draw()[None], STACK, axis=0)
        return self._stack.copy()

    def step(self, action: int) -> StepResult:
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
        self._left -= 1
        self._stack = _push(self._stack, self._draw())
        return self._stack.copy(), reward, self._left <= 0

    def close(self) -> None:
        pass


def read_stamp(frames: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """Decode the (frame counter, stamp) written by :class:`SyntheticFrames`.

    ``frames`` has shape ``(..., 84, 84)``; returns two arrays of shape ``frames.shape[:-2]``.
    """
    raw = np.ascontiguousarray(frames[..., 0, 0:4])
    counter: npt.NDArray[np.int64] = raw.astype(np.int64) @ np.array([1, 1 << 8, 1 << 16, 1 << 24], np.int64)
    stamp: npt.NDArray[np.uint8] = np.asarray(frames[..., 0, 4])
    return counter, stamp


def check_atari(game: str) -> tuple[str, int]:
    """Raise :class:`AtariUnavailableError` unless ``game`` can be played.

    Returns ``(env_id, num_actions)``. Cheap when the packages are missing (nothing is
    imported); otherwise creates and closes the environment once, so that a bad game name is
    reported before any process starts.
    """
    missing = [m for m in ("gymnasium", "ale_py") if importlib.util.find_spec(m) is None]
    if missing:
        raise AtariUnavailableError(f"{INSTALL_HINT}; missing: {', '.join(missing)}")
    frames = AtariFrames(game)
    frames.close()
    return frames.env_id, frames.num_actions
