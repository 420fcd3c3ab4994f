"""Typed public API of shmreplay (hand-written stub; checked with ``mypy.stubtest``)."""

import os
from types import TracebackType
from typing import Any, Literal, Mapping, Sequence, Tuple, TypedDict, Union, overload

import numpy as np
import numpy.typing as npt

__version__: str

Shape = Union[int, Tuple[int, ...]]
DTypeLike = Union[str, type, np.dtype[Any]]
FieldSpec = Tuple[Shape, DTypeLike]
PathLike = Union[str, "os.PathLike[str]"]

class InsufficientSpaceError(MemoryError):
    """The target filesystem cannot hold the whole segment (raised by ``create``).

    ``needed`` and ``free`` are byte counts; the message names the fix.
    """

    needed: int
    free: int
    path: str
    def __init__(self, message: str, needed: int, free: int, path: str) -> None: ...

class CorruptSegmentError(ValueError):
    """A segment file failed validation on attach: foreign, truncated, damaged or too new."""

class EmptyBufferError(ValueError):
    """``sample`` was called on a buffer that holds no committed row yet."""

class SampleInfo(TypedDict):
    index: npt.NDArray[np.int64]
    key: npt.NDArray[np.uint64]

class Stats(TypedDict):
    capacity: int
    size: int
    inserts: int
    samples: int
    retries: int
    recovered: int
    superseded: int
    attached: int

class BufferInfo(TypedDict):
    name: str
    path: str
    capacity: int
    size: int
    bytes: int
    record_bytes: int
    attached: int
    stale: bool

class ReplayBuffer:
    """A ring of ``capacity`` fixed-size records in one shared-memory segment."""

    def __init__(self, raw: Any, path: str | None, owner: bool) -> None: ...

    @classmethod
    def create(
        cls,
        name: str | None = None,
        *,
        capacity: int,
        fields: Mapping[str, FieldSpec],
        path: PathLike | None = None,
    ) -> "ReplayBuffer": ...
    @classmethod
    def attach(cls, name: str, *, path: PathLike | None = None) -> "ReplayBuffer": ...
    @property
    def name(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def capacity(self) -> int: ...
    @property
    def fields(self) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]: ...
    @property
    def record_bytes(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def is_owner(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    def add(self, **values: npt.ArrayLike) -> None: ...
    def extend(self, batch: Mapping[str, npt.ArrayLike]) -> None: ...
    @overload
    def sample(self, batch_size: int, *, return_info: Literal[False] = ...) -> dict[str, np.ndarray]: ...
    @overload
    def sample(
        self, batch_size: int, *, return_info: Literal[True]
    ) -> tuple[dict[str, np.ndarray], SampleInfo]: ...
    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...
    def __len__(self) -> int: ...
    def stats(self) -> Stats: ...
    def processes(self) -> list[int]: ...
    def close(self) -> None: ...
    def unlink(self) -> None: ...
    def __enter__(self) -> "ReplayBuffer": ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]: ...

def list_buffers(path: PathLike | None = None) -> list[BufferInfo]: ...
def remove(name: str, *, path: PathLike | None = None) -> None: ...

DEFAULT_DIR: str
