"""Checks of settings at the boundary: one message that names the setting and its range.

Every constructor and configuration that takes a user's number checks it
here, so a bad value fails at once, with the same wording everywhere::

    learning_rate must be a finite number > 0, got nan
    steps must be an int >= 1, got 0

instead of failing later somewhere else (a ``ZeroDivisionError`` for a
period of 0, a schedule's ``decay_steps`` for ``steps = 0``) or training
uphill (a negative learning rate).
"""

from __future__ import annotations

import math
import numbers

__all__ = ["SettingError", "count", "positive_number", "nonnegative_number", "fraction"]


class SettingError(ValueError):
    """A setting outside its allowed range.

    Attributes
    ----------
    name : str
        The setting, as its owner spells it (``"learning_rate"``).
    rule : str
        The allowed range in words (``"a finite number > 0"``).
    value
        The value given.
    """

    def __init__(self, name: str, rule: str, value):
        super().__init__(f"{name} must be {rule}, got {value!r}")
        self.name, self.rule, self.value = name, rule, value


def _real(name: str, rule: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingError(name, rule, value)
    return float(value)


def count(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int, if it is an integer >= ``minimum`` (bools are not)."""
    rule = f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise SettingError(name, rule, value)
    return int(value)


def positive_number(name: str, value, *, allow_inf: bool = False) -> float:
    """``value`` as a float, if it is a number > 0 (finite unless ``allow_inf``)."""
    rule = "a number > 0 (inf allowed)" if allow_inf else "a finite number > 0"
    x = _real(name, rule, value)
    if not x > 0.0 or (math.isinf(x) and not allow_inf):
        raise SettingError(name, rule, value)
    return x


def nonnegative_number(name: str, value) -> float:
    """``value`` as a float, if it is a finite number >= 0."""
    rule = "a finite number >= 0"
    x = _real(name, rule, value)
    if not (x >= 0.0 and math.isfinite(x)):
        raise SettingError(name, rule, value)
    return x


def fraction(name: str, value, *, closed: bool = False) -> float:
    """``value`` as a float, if it lies in [0, 1) (``closed``: [0, 1])."""
    rule = "in [0, 1]" if closed else "in [0, 1)"
    x = _real(name, rule, value)
    if not (0.0 <= x < 1.0 or (closed and x == 1.0)):
        raise SettingError(name, rule, value)
    return x
