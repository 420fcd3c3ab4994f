"""Exceptions raised by shmreplay beyond the built-in ones (FileExistsError, ValueError, ...).

Every one of them derives from :class:`ShmReplayError`, so ``except shmreplay.ShmReplayError``
catches all of them, and also from the built-in exception it used to be (or that describes it
best), so ``except MemoryError`` / ``except ValueError`` / ``except TimeoutError`` /
``except RuntimeError`` keep working. The Rust extension raises them by looking up these exact
names in this module; they are defined nowhere else.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ShmReplayError",
    "InsufficientSpaceError",
    "EmptyBufferError",
    "CorruptSegmentError",
    "ContendedError",
    "TooManyHandlesError",
    "ShutdownError",
]


class ShmReplayError(Exception):
    """Base class of every exception specific to shmreplay.

    It is never raised itself: each subclass also derives from a built-in exception
    (``MemoryError``, ``ValueError``, ``TimeoutError``, ``RuntimeError``). Invalid arguments,
    missing or existing buffers and permission problems are reported with the plain built-in
    exceptions (``ValueError``, ``TypeError``, ``FileNotFoundError``, ``FileExistsError``,
    ``PermissionError``), not with a subclass of this one.
    """


class InsufficientSpaceError(ShmReplayError, MemoryError):
    """The target filesystem cannot hold the whole segment.

    Raised by :meth:`ReplayBuffer.create` before anything is written; no file is left behind.
    ``needed`` and ``free`` are byte counts and ``path`` is the segment file that was refused.
    """

    def __init__(self, message: str, needed: int, free: int, path: str) -> None:
        super().__init__(message)
        self.needed = needed
        self.free = free
        self.path = path

    def __reduce__(self) -> tuple[type, tuple[str, int, int, str], dict[str, Any]]:
        # The state carries whatever else was set on the instance (e.g. ``__notes__``).
        return (type(self), (str(self), self.needed, self.free, self.path), dict(self.__dict__))


class EmptyBufferError(ShmReplayError, ValueError):
    """:meth:`ReplayBuffer.sample` was called before any row was committed."""


class CorruptSegmentError(ShmReplayError, ValueError):
    """A segment file failed validation on attach: foreign, truncated, damaged or too new."""


class ContendedError(ShmReplayError, TimeoutError):
    """An operation gave up after waiting longer than its bound for busy slots.

    Raised when a slot stayed busy longer than the bound, held by a writer that is alive or
    that cannot be proved dead (``buf[i]``, or a writer waiting for the slot it claimed), and
    by :meth:`ReplayBuffer.sample` when it found no consistent row within the bound (every
    slot drawn was being written: the ring is too small for the number of writers). The
    message says which bound was exceeded.
    """


class TooManyHandlesError(ShmReplayError, RuntimeError):
    """Every handle entry of the buffer is in use by live handles.

    Raised when a handle would be opened (:meth:`ReplayBuffer.attach`, unpickling a handle,
    or a process's first use of an inherited one) while the buffer's fixed table of handle
    entries is full. Entries of processes that have exited are reused, so closing handles, or
    letting processes that hold them exit, makes room.
    """


class ShutdownError(ShmReplayError, RuntimeError):
    """The buffer was shut down (:meth:`ReplayBuffer.shutdown`, from any process).

    Raised by every call that was waiting for flow control (a rate limiter or a queue) when the
    shutdown came, and by every later call that cannot proceed at once, whatever its timeout.
    Nothing was inserted or taken. Calls that need not wait still succeed, so a consumer can
    drain a queue after its producers were shut down.
    """
