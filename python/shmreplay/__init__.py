"""shmreplay: a shared-memory experience replay buffer for multi-process reinforcement learning.

Actors :meth:`~ReplayBuffer.add` transitions and learners :meth:`~ReplayBuffer.sample` batches
from one ring of records in shared memory, from any number of processes at once, with no lock
and no kernel object per slot. See :class:`ReplayBuffer`.
"""

from __future__ import annotations


from . import _core
from ._buffer import ReplayBuffer, _dir_arg
from ._batches import Batches
from ._episodes import EpisodeBuffer, EpisodeWriter
from ._limiters import Limiter, MinSize, SampleToInsertRatio
from ._samplers import Prioritized, Queue, Sampler, Uniform
from ._errors import (
    ContendedError,
    CorruptSegmentError,
    EmptyBufferError,
    InsufficientSpaceError,
    ShmReplayError,
    ShutdownError,
    TooManyHandlesError,
)
from ._types import BufferInfo, DTypeLike, FieldSpec, LimiterInfo, PathLike, SampleInfo, Shape, Stats

__all__ = [
    "ReplayBuffer",
    "EpisodeBuffer",
    "EpisodeWriter",
    "Batches",
    "Uniform",
    "Prioritized",
    "Queue",
    "Sampler",
    "MinSize",
    "SampleToInsertRatio",
    "Limiter",
    "ShutdownError",
    "ShmReplayError",
    "InsufficientSpaceError",
    "EmptyBufferError",
    "CorruptSegmentError",
    "ContendedError",
    "TooManyHandlesError",
    "list_buffers",
    "remove",
    "gc",
    "DEFAULT_DIR",
    "SampleInfo",
    "Stats",
    "LimiterInfo",
    "BufferInfo",
    "FieldSpec",
    "Shape",
    "DTypeLike",
    "PathLike",
]

__version__ = "0.1.0"

DEFAULT_DIR: str = _core.DEFAULT_DIR


def list_buffers(path: PathLike | None = None) -> list[BufferInfo]:
    """The buffers of this user in ``path`` (default ``/dev/shm``), sorted by name.

    Each is a dict: name, path, capacity, size, bytes, record_bytes, attached (live handles),
    creator_pid, stale (no live process holds it and its creator has exited), sampler
    (``None`` for uniform, ``(alpha, eps, stratified)`` for prioritized, ``"queue"``) and kind
    (``"ring"`` for a :class:`ReplayBuffer`, ``"episodes"`` for an :class:`EpisodeBuffer`). Files named
    like segments that cannot be read are left out (``shmreplay ls`` shows them).
    """
    return _core.scan(_dir_arg(path))[0]  # type: ignore[return-value]


def gc(path: PathLike | None = None, *, dry_run: bool = False) -> list[str]:
    """Removes this user's stale buffers in ``path`` (default ``/dev/shm``); returns their names.

    A buffer is stale when no live process holds a handle to it and the process that created
    it has exited (process identity includes its start time, so a reused pid does not count).
    A live buffer is never removed, even if a process attaches while ``gc`` runs. Also removes
    the hidden temporary files of creators that were killed while creating a buffer.

    Args:
        path: directory of the segments.
        dry_run: only return the names that would be removed.
    """
    if not isinstance(dry_run, bool):
        raise TypeError(f"dry_run must be a bool, got {type(dry_run).__name__}")
    return _core.remove_stale(_dir_arg(path), dry_run)


def remove(name: str, *, path: PathLike | None = None) -> None:
    """Removes buffer ``name``; processes that have it open keep using it until they close.

    Raises ``FileNotFoundError`` if there is no such buffer.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    _core.remove(name, _dir_arg(path))
