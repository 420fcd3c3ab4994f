"""When samples and inserts may proceed: :class:`MinSize` and :class:`SampleToInsertRatio`,
Reverb's rate limiters, fixed at creation (``ReplayBuffer.create(limiter=...)``).

With ``I`` rows inserted, ``S`` rows sampled and ``D`` rows deleted (overwritten), a call is
admitted whole when

* ``sample(n)``: ``I - D >= min_size`` and ``I * samples_per_insert - S - n >= min_diff``;
* an insert of ``k`` rows: ``I + k - D <= min_size`` or ``(I + k) * samples_per_insert - S <=
  max_diff``.

A call that is not allowed waits (``timeout=``), and calls that could never be allowed are
refused with ``ValueError`` before they wait.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union


def _count(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be an int, got a bool")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__}") from None
    if n < 1:
        raise ValueError(f"{owner}: {name} must be >= 1, got {n}")
    return n


def _real(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number, got {type(value).__name__}")
    return float(value)


@dataclass(frozen=True)
class MinSize:
    """Samples wait until the buffer holds ``min_size`` rows (1 <= min_size <= capacity);
    inserts never wait. Keeps a learner from overfitting the first transitions."""

    min_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "min_size", _count("MinSize", "min_size", self.min_size))


@dataclass(frozen=True, eq=False)
class SampleToInsertRatio:
    """Keeps ``samples_per_insert`` rows sampled per row inserted, within an error window, once
    ``min_size`` rows are in (Ape-X, R2D2 and Acme fix this ratio).

    Args:
        samples_per_insert: the target ratio (> 0).
        min_size: rows inserted before the first sample (1 <= min_size <= capacity).
        error_buffer: how far ``I * samples_per_insert - S`` may stray: a number ``eb`` gives
            the window ``[spi * min_size - eb, spi * min_size + eb]``, a pair
            ``(min_diff, max_diff)`` is used as given. The window must be at least
            ``2 * max(1, samples_per_insert)`` wide and ``min_diff <= spi * min_size``
            (Reverb's rules: otherwise inserts and samples could block each other forever).

    Two limiters are equal when their ratio, min_size and window are.
    """

    samples_per_insert: float
    min_size: int
    error_buffer: Union[float, Tuple[float, float]]

    def __post_init__(self) -> None:
        name = "SampleToInsertRatio"
        spi = _real(name, "samples_per_insert", self.samples_per_insert)
        if not (math.isfinite(spi) and spi > 0.0):
            raise ValueError(f"{name}: samples_per_insert must be a finite number > 0, got {spi}")
        min_size = _count(name, "min_size", self.min_size)
        eb = self.error_buffer
        if isinstance(eb, (tuple, list)):
            if len(eb) != 2:
                raise ValueError(f"{name}: error_buffer must be a number or a (min_diff, max_diff) pair")
            window = (_real(name, "min_diff", eb[0]), _real(name, "max_diff", eb[1]))
        else:
            e = _real(name, "error_buffer", eb)
            if not e >= 0.0:
                raise ValueError(f"{name}: error_buffer must be >= 0, got {e}")
            window = (spi * min_size - e, spi * min_size + e)
        lo, hi = window
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError(f"{name}: the error window must not be NaN")
        if not hi - lo >= 2.0 * max(1.0, spi):  # (negated: a NaN window from infinite ends fails too)
            raise ValueError(
                f"{name}: max_diff - min_diff = {hi - lo} is below 2 * max(1, samples_per_insert) "
                f"= {2.0 * max(1.0, spi)}: inserts and samples could block each other forever"
            )
        if lo > spi * min_size:
            raise ValueError(
                f"{name}: min_diff {lo} is above samples_per_insert * min_size = {spi * min_size}: "
                "the first sample could never be allowed"
            )
        object.__setattr__(self, "samples_per_insert", spi)
        object.__setattr__(self, "min_size", min_size)
        object.__setattr__(self, "error_buffer", window if isinstance(eb, (tuple, list)) else float(eb))

    def _window(self) -> Tuple[float, float]:
        eb = self.error_buffer
        if isinstance(eb, tuple):
            return eb
        center = self.samples_per_insert * self.min_size
        return (center - eb, center + eb)

    @property
    def min_diff(self) -> float:
        """The lowest ``I * samples_per_insert - S`` a sample may leave."""
        return self._window()[0]

    @property
    def max_diff(self) -> float:
        """The highest ``I * samples_per_insert - S`` an insert may leave."""
        return self._window()[1]

    def _key(self) -> Tuple[float, int, float, float]:
        return (self.samples_per_insert, self.min_size, self.min_diff, self.max_diff)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SampleToInsertRatio):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


Limiter = Union[MinSize, SampleToInsertRatio]
"""What ``ReplayBuffer.create(limiter=...)`` takes."""

LimiterArgs = Tuple[str, float, int, float, float]
"""A limiter in the core's form: ``(kind, samples_per_insert, min_size, min_diff, max_diff)``."""


def limiter_args(limiter: Any) -> Optional[LimiterArgs]:
    """The core's form of a limiter (``None``: no limiter)."""
    if limiter is None:
        return None
    if isinstance(limiter, MinSize):
        return ("MinSize", 1.0, limiter.min_size, -math.inf, math.inf)
    if isinstance(limiter, SampleToInsertRatio):
        return (
            "SampleToInsertRatio",
            limiter.samples_per_insert,
            limiter.min_size,
            limiter.min_diff,
            limiter.max_diff,
        )
    raise TypeError(
        "limiter must be None, shmreplay.MinSize(...) or shmreplay.SampleToInsertRatio(...), "
        f"got {limiter!r}"
    )


def limiter_of(args: Optional[LimiterArgs]) -> Optional[Limiter]:
    """The limiter the core describes."""
    if args is None:
        return None
    kind, spi, min_size, min_diff, max_diff = args
    if kind == "MinSize":
        return MinSize(min_size)
    return SampleToInsertRatio(spi, min_size, (min_diff, max_diff))
