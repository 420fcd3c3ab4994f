"""How a buffer draws its samples: :class:`Uniform`, :class:`Prioritized` or :class:`Queue`,
fixed at creation."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Tuple, Union


@dataclass(frozen=True)
class Uniform:
    """Every slot holding a record is equally likely (the default)."""


@dataclass(frozen=True)
class Prioritized:
    """Draws each record in proportion to ``v = (p + eps) ** alpha`` of its raw priority ``p``
    (prioritized experience replay, Schaul et al. 2016).

    Args:
        alpha: how much the priorities count: 0 draws uniformly, 1 fully in proportion.
        eps: added to every raw priority, so records with ``p = 0`` stay drawable when
            ``eps > 0``. With ``eps = 0`` a record of priority 0 is never drawn (while any
            record has a priority above 0).
        stratified: each of the ``B`` rows of a batch draws from its own ``1/B`` of the total
            mass (lower variance, as in the PER paper); ``False`` draws i.i.d.

    ``v`` is held in fixed point (sums are exact integers): up to about ``2**20``
    (:attr:`ReplayBuffer.priority_range` gives the exact bounds of a buffer); a priority whose
    ``v`` is above it raises ``ValueError``.
    """

    alpha: float = 0.6
    eps: float = 1e-6
    stratified: bool = True

    def __post_init__(self) -> None:
        for name in ("alpha", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"Prioritized: {name} must be a number, got {type(value).__name__}")
            value = float(value)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"Prioritized: {name} must be a finite number >= 0, got {value}")
            object.__setattr__(self, name, value)
        if not isinstance(self.stratified, bool):
            raise TypeError(f"Prioritized: stratified must be a bool, got {type(self.stratified).__name__}")


@dataclass(frozen=True)
class Queue:
    """First in, first out: ``sample(n)`` takes the next ``n`` rows in insert order, each row
    delivered to exactly one ``sample`` call (of any process), and waits until ``n`` rows are
    there. Rows are never overwritten before they are delivered: ``add``/``extend`` wait while
    the ring is full. As Reverb's ``Queue`` (for IMPALA-style on-policy learners).

    A consumer killed after taking rows loses them (at most once delivery); a producer killed
    while writing never stalls the queue: its unwritten rows are skipped once its death is
    proved, and the rows it committed are delivered.
    """


Sampler = Union[Uniform, Prioritized, Queue]
"""What ``ReplayBuffer.create(sampler=...)`` takes."""

SamplerArgs = Union[None, Tuple[float, float, bool], str]
"""A sampler in the core's form."""


def sampler_args(sampler: Any) -> SamplerArgs:
    """The core's form of a sampler: ``None`` (uniform), ``(alpha, eps, stratified)`` or
    ``"queue"``."""
    if sampler is None or isinstance(sampler, Uniform):
        return None
    if isinstance(sampler, Prioritized):
        return (sampler.alpha, sampler.eps, sampler.stratified)
    if isinstance(sampler, Queue):
        return "queue"
    raise TypeError(
        "sampler must be shmreplay.Uniform(), shmreplay.Prioritized(...) or shmreplay.Queue(), "
        f"got {sampler!r}"
    )


def sampler_of(args: SamplerArgs) -> Sampler:
    """The sampler the core describes."""
    if args is None:
        return Uniform()
    if isinstance(args, str):
        return Queue()
    alpha, eps, stratified = args
    return Prioritized(alpha=alpha, eps=eps, stratified=stratified)
