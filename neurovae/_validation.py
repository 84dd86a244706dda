"""Validation of estimator parameters (called in ``fit``, never in ``__init__``).

Each rule checks one parameter and, when it fails, raises an error that names
the estimator, the parameter, what is accepted and what was given.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A real (or integer) number in ``[low, high]`` (bounds optional)."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    none_ok: bool = False

    def __call__(self, value) -> bool:
        if value is None:
            return self.none_ok
        types = numbers.Integral if self.kind is int else numbers.Real
        if isinstance(value, bool) or not isinstance(value, types):
            return False
        if not np.isfinite(value):
            return False
        if self.low is not None and (
            value < self.low or (self.low_open and value == self.low)
        ):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        name = "an int" if self.kind is int else "a float"
        left = "(" if self.low_open else "["
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        text = f"{name} in {left}{low}, {high}{']' if self.high is not None else ')'}"
        return text + (" or None" if self.none_ok else "")


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values (a bool matches only a bool: 1 is not True)."""

    values: tuple

    def __call__(self, value) -> bool:
        if isinstance(value, np.bool_):
            value = bool(value)
        if not isinstance(value, (str, bool, type(None), numbers.Number)):
            return False
        return any(
            value == v and isinstance(value, bool) == isinstance(v, bool)
            for v in self.values
        )

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


@dataclass(frozen=True)
class IntSequence:
    """A non-empty sequence of positive ints (layer sizes, channels)."""

    allow_empty: bool = False
    minimum: int = 1

    def __call__(self, value) -> bool:
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            return False
        items = list(value)
        if not items and not self.allow_empty:
            return False
        return all(
            isinstance(v, numbers.Integral)
            and not isinstance(v, bool)
            and v >= self.minimum
            for v in items
        )

    def describe(self) -> str:
        kind = "a" if self.allow_empty else "a non-empty"
        sign = "positive" if self.minimum == 1 else f">= {self.minimum}"
        return f"{kind} sequence of {sign} ints"


@dataclass(frozen=True)
class AnyOf:
    """Accept a value that satisfies any of the rules."""

    rules: tuple

    def __call__(self, value) -> bool:
        return any(rule(value) for rule in self.rules)

    def describe(self) -> str:
        return " or ".join(rule.describe() for rule in self.rules)


@dataclass(frozen=True)
class Custom:
    """A predicate with its own description."""

    predicate: Callable[[object], bool]
    text: str

    def __call__(self, value) -> bool:
        return bool(self.predicate(value))

    def describe(self) -> str:
        return self.text


class InvalidParameterError(ValueError, TypeError):
    """A parameter has a wrong type or value (catch as ValueError or TypeError)."""


def check_value(owner, name: str, value, rule: Callable) -> None:
    """Raise :class:`InvalidParameterError` unless ``rule(value)`` holds.

    ``owner`` (an estimator) names the error's source.
    """
    if not rule(value):
        raise InvalidParameterError(
            f"{type(owner).__name__}: parameter {name!r} must be "
            f"{rule.describe()}; got {value!r}."
        )


def validate_params(estimator, rules: Mapping[str, Callable]) -> None:
    """Check every parameter of ``estimator`` named in ``rules``.

    Raises
    ------
    InvalidParameterError
        A subclass of both ``ValueError`` and ``TypeError``, naming the
        estimator, the parameter, the accepted values and the value given.
    """
    params = estimator.get_params(deep=False)
    for name, rule in rules.items():
        check_value(estimator, name, params[name], rule)
