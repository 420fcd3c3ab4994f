"""How a buffer draws its samples: :class:`Uniform` or :class:`Prioritized`, fixed at creation."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Union


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


Sampler = Union[Uniform, Prioritized]
"""What ``ReplayBuffer.create(sampler=...)`` takes."""


def sampler_args(sampler: Any) -> tuple[float, float, bool] | None:
    """The core's form of a sampler: ``None`` (uniform) or ``(alpha, eps, stratified)``."""
    if sampler is None or isinstance(sampler, Uniform):
        return None
    if isinstance(sampler, Prioritized):
        return (sampler.alpha, sampler.eps, sampler.stratified)
    raise TypeError(
        f"sampler must be shmreplay.Uniform() or shmreplay.Prioritized(...), got {sampler!r}"
    )


def sampler_of(args: tuple[float, float, bool] | None) -> Sampler:
    """The sampler the core describes."""
    if args is None:
        return Uniform()
    alpha, eps, stratified = args
    return Prioritized(alpha=alpha, eps=eps, stratified=stratified)
