"""Types of shmreplay's public API: what ``sample``, ``stats`` and ``list_buffers`` return."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Literal, Optional, Tuple, TypedDict, Union

if sys.version_info >= (3, 11):
    from typing import NotRequired
else:  # pragma: no cover
    from typing_extensions import NotRequired

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # gymnasium is optional: never imported at run time
    from gymnasium.spaces import Space

Shape = Union[int, Tuple[int, ...]]
"""A field's shape: ``()`` for scalars, an int for 1-d, a tuple of ints."""
DTypeLike = Union[str, type, "np.dtype[Any]"]
"""A field's dtype: ``np.uint8``, ``"float32"``, ``np.dtype("i4")``..."""
FieldSpec = Union[Tuple[Shape, Any], "Space[Any]"]
"""``(shape, dtype)`` of one field; the dtype is anything ``np.dtype()`` takes (typed ``Any`` so
that a dict literal mixing ``np.uint8`` and ``"float32"`` type-checks). Or a gymnasium space:
``Box``, ``MultiBinary``, ``MultiDiscrete`` (their shape and dtype) or ``Discrete`` (a scalar of
its dtype, int64)."""
PathLike = Union[str, "os.PathLike[str]"]


class SampleInfo(TypedDict):
    """Where each sampled row came from: its slot and its insert ticket (the key); for a
    prioritized buffer also its probability, importance weight and raw priority."""

    index: npt.NDArray[np.int64]
    key: npt.NDArray[np.uint64]
    probability: NotRequired[npt.NDArray[np.float64]]
    weight: NotRequired[npt.NDArray[np.float32]]
    priority: NotRequired[npt.NDArray[np.float64]]


class LimiterInfo(TypedDict):
    """A buffer's flow control, as :meth:`ReplayBuffer.stats` reports it (Reverb's terms)."""

    kind: str
    """``"MinSize"``, ``"SampleToInsertRatio"`` or ``"Queue"``."""
    samples_per_insert: float
    min_size: int
    min_diff: float
    max_diff: float


class Stats(TypedDict):
    """Counters of a buffer, summed over every process that used it."""

    capacity: int
    size: int
    inserts: int
    samples: int
    retries: int
    recovered: int
    superseded: int
    lost: int
    stale_updates: int
    attached: int
    deletes: int
    insert_wait_s: float
    sample_wait_s: float
    limiter: Optional[LimiterInfo]
    priority_total: NotRequired[float]
    max_priority: NotRequired[float]
    bytes_per_step: NotRequired[float]


class BufferInfo(TypedDict):
    """One buffer found by :func:`shmreplay.list_buffers`.

    ``stale``: no live process holds a handle and its creator has exited;
    :func:`shmreplay.gc` removes it.
    """

    name: str
    path: str
    capacity: int
    size: int
    bytes: int
    record_bytes: int
    attached: int
    creator_pid: int
    stale: bool
    sampler: Union[None, Tuple[float, float, bool], str]
    """``None`` (uniform), ``(alpha, eps, stratified)`` or ``"queue"``."""
    kind: Literal["ring", "episodes"]
    """``"ring"`` (a :class:`ReplayBuffer`) or ``"episodes"`` (an :class:`EpisodeBuffer`)."""
