"""Exceptions raised by shmreplay beyond the built-in ones (FileExistsError, ValueError, ...)."""

from __future__ import annotations


class InsufficientSpaceError(MemoryError):
    """The target filesystem cannot hold the whole segment.

    Raised by :meth:`ReplayBuffer.create` before anything is written; no file is left behind.
    ``needed`` and ``free`` are byte counts and ``path`` is the segment file that was refused.
    """

    def __init__(self, message: str, needed: int, free: int, path: str) -> None:
        super().__init__(message)
        self.needed = needed
        self.free = free
        self.path = path

    def __reduce__(self) -> tuple[type, tuple[str, int, int, str]]:
        return (type(self), (str(self), self.needed, self.free, self.path))


class EmptyBufferError(ValueError):
    """:meth:`ReplayBuffer.sample` was called before any row was committed."""


class CorruptSegmentError(ValueError):
    """A segment file failed validation on attach: foreign, truncated, damaged or too new."""
