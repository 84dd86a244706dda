"""Schedules for loss weights (KL annealing, capacity), shared by all models.

A schedule maps training progress, measured in epochs (fractional within an
epoch), to a value. The engine sets the scheduled attributes of the module
before every step, and sets them to their final value for validation so that
validation losses of different epochs measure the same objective.
"""

from __future__ import annotations

import math


class Schedule:
    """Base class: a value as a function of training progress (in epochs).

    A subclass sets :attr:`final` and implements ``__call__(progress)``,
    where ``progress`` is the number of epochs run, fractional within an
    epoch. Pass schedules to :class:`~neurovae.training.Engine` as
    ``schedules={"beta": ...}``.

    Attributes
    ----------
    final : float
        Value used for validation and after training.

    See Also
    --------
    make_schedule : Build a built-in schedule by name.

    Examples
    --------
    A step schedule, 0 for the first ``at`` epochs and ``value`` afterwards:

    >>> from neurovae.training import Schedule
    >>> class Step(Schedule):
    ...     def __init__(self, value, at):
    ...         self.final, self.at = float(value), at
    ...     def __call__(self, progress):
    ...         return self.final if progress >= self.at else 0.0
    >>> s = Step(1.0, at=5)
    >>> s(2.5), s(5.0), s.final
    (0.0, 1.0, 1.0)
    """

    #: value used for validation and after training
    final: float

    def __call__(self, progress: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class Constant(Schedule):
    """Always ``value``.

    Parameters
    ----------
    value : float
        The value at every step.

    Examples
    --------
    >>> from neurovae.training import Constant
    >>> Constant(4.0)(12.5)
    4.0
    """

    def __init__(self, value: float) -> None:
        self.final = float(value)

    def __call__(self, progress: float) -> float:
        return self.final

    def __repr__(self) -> str:
        return f"Constant({self.final})"


class Linear(Schedule):
    """Ramp from ``start`` to ``value`` over the first ``warmup_iter`` epochs.

    Parameters
    ----------
    value : float
        Value reached at the end of the ramp, and kept afterwards.
    warmup_iter : float
        Length of the ramp in epochs; must be > 0.
    start : float, default=0.0
        Value at the start of training.

    Examples
    --------
    >>> from neurovae.training import Linear
    >>> s = Linear(4.0, warmup_iter=10)
    >>> s(0.0), s(5.0), s(20.0)
    (0.0, 2.0, 4.0)
    """

    def __init__(self, value: float, warmup_iter: float, start: float = 0.0) -> None:
        if warmup_iter <= 0:
            raise ValueError(f"warmup_iter must be > 0, got {warmup_iter!r}")
        self.final = float(value)
        self.start = float(start)
        self.warmup_iter = float(warmup_iter)

    def __call__(self, progress: float) -> float:
        frac = min(1.0, max(0.0, progress / self.warmup_iter))
        return self.start + frac * (self.final - self.start)

    def __repr__(self) -> str:
        return f"Linear({self.final}, warmup_iter={self.warmup_iter})"


class Cyclical(Schedule):
    """Cyclical annealing (Fu et al. 2019): ``n_cycles`` ramps from 0.

    Training is cut into ``n_cycles`` equal cycles; within each the value
    rises linearly from 0 to ``value`` over the first ``ratio`` of the cycle
    and stays there for the rest.

    Parameters
    ----------
    value : float
        Maximal (and final) value.
    total_iter : float
        Length of training in epochs, over which the cycles spread.
    n_cycles : int
        Number of cycles.
    ratio : float, default=0.5
        Fraction of each cycle spent ramping up, in (0, 1].

    Examples
    --------
    >>> from neurovae.training import Cyclical
    >>> s = Cyclical(1.0, total_iter=20, n_cycles=2)
    >>> s(0.0), s(2.5), s(7.0), s(10.0), s(12.5)
    (0.0, 0.5, 1.0, 0.0, 0.5)
    """

    def __init__(
        self, value: float, total_iter: float, n_cycles: int, ratio: float = 0.5
    ) -> None:
        if total_iter <= 0 or n_cycles < 1 or not 0 < ratio <= 1:
            raise ValueError(
                "Cyclical needs total_iter > 0, n_cycles >= 1 and 0 < ratio <= 1"
            )
        self.final = float(value)
        self.period = float(total_iter) / int(n_cycles)
        self.ratio = float(ratio)

    def __call__(self, progress: float) -> float:
        tau = math.fmod(max(progress, 0.0), self.period) / self.period
        return self.final * min(1.0, tau / self.ratio)

    def __repr__(self) -> str:
        return f"Cyclical({self.final}, period={self.period}, ratio={self.ratio})"


def make_schedule(
    kind: str,
    value: float,
    *,
    warmup_iter: float | None = None,
    n_cycles: int = 4,
    total_iter: float | None = None,
) -> Schedule:
    """Build the schedule called ``kind``: "constant", "linear" or "cyclical".

    Parameters
    ----------
    kind : {"constant", "linear", "cyclical"}
        Shape of the schedule.
    value : float
        Final (or maximal) value.
    warmup_iter : float, optional
        Length of the ramp of a "linear" schedule, in epochs.
    n_cycles : int, default=4
        Number of cycles of a "cyclical" schedule.
    total_iter : float, optional
        Length of training in epochs, over which the cycles spread.

    Returns
    -------
    Schedule

    Examples
    --------
    >>> from neurovae.training import make_schedule
    >>> make_schedule("linear", 2.0, warmup_iter=4)(1.0)
    0.5
    """
    if kind == "constant":
        return Constant(value)
    if kind == "linear":
        if warmup_iter is None:
            raise ValueError("a 'linear' schedule needs warmup_iter")
        return Linear(value, warmup_iter=warmup_iter)
    if kind == "cyclical":
        if total_iter is None:
            raise ValueError("a 'cyclical' schedule needs total_iter")
        return Cyclical(value, total_iter=total_iter, n_cycles=n_cycles)
    raise ValueError(f"unknown schedule {kind!r}")
