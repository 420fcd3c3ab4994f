"""shmreplay: a shared-memory experience replay buffer for multi-process reinforcement learning.

Actors :meth:`~ReplayBuffer.add` transitions and learners :meth:`~ReplayBuffer.sample` batches
from one ring of records in shared memory, from any number of processes at once, with no lock
and no kernel object per slot. See :class:`ReplayBuffer`.
"""

from __future__ import annotations

import os

from . import _core
from ._buffer import ReplayBuffer
from ._errors import CorruptSegmentError, EmptyBufferError, InsufficientSpaceError
from ._types import BufferInfo, DTypeLike, FieldSpec, PathLike, SampleInfo, Shape, Stats

__all__ = [
    "ReplayBuffer",
    "InsufficientSpaceError",
    "EmptyBufferError",
    "CorruptSegmentError",
    "list_buffers",
    "remove",
    "DEFAULT_DIR",
    "SampleInfo",
    "Stats",
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

    Each is a dict: name, path, capacity, size, bytes, record_bytes, attached (live handles)
    and stale (no live process holds it).
    """
    return _core.list_buffers(None if path is None else os.fspath(path))  # type: ignore[return-value]


def remove(name: str, *, path: PathLike | None = None) -> None:
    """Removes buffer ``name``; processes that have it open keep using it until they close.

    Raises ``FileNotFoundError`` if there is no such buffer.
    """
    _core.remove(name, None if path is None else os.fspath(path))
