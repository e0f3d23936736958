"""Value checks for config sections: each section (and each sparsifier's settings) validates itself with these and
raises ``Invalid`` naming the key relative to itself; the config loader adds the section's path and the source."""
from __future__ import annotations

import math


class Invalid(ValueError):
    """``key`` (relative to the checked section, dotted below it) is wrong: ``expected`` says what would be right.
    ``involved``: the other keys of a rule between keys (the message blames --set when any of them came from there).
    ``plain``: ``expected`` is the whole message after the key (no "expected ..., got <value>" around it)."""

    def __init__(self, key: str, expected: str, involved: tuple[str, ...] = (), *, plain: bool = False):
        super().__init__(f"{key}: {expected}" if plain else f"{key}: expected {expected}")
        self.key, self.expected, self.involved, self.plain = key, expected, tuple(involved), plain


def require(ok: bool, key: str, expected: str, involved: tuple[str, ...] = ()) -> None:
    if not ok:
        raise Invalid(key, expected, involved)


def positive(section, *names: str) -> None:
    for name in names:
        require(getattr(section, name) > 0, name, "> 0")


def non_negative(section, *names: str) -> None:
    for name in names:
        require(getattr(section, name) >= 0, name, ">= 0")


def one_of(section, name: str, choices) -> None:
    require(getattr(section, name) in choices, name, f"one of {', '.join(choices)}")


def finite(value) -> bool:
    values = value if isinstance(value, (tuple, list)) else (value,)
    return not any(isinstance(v, float) and not math.isfinite(v) for v in values)


def fractions(section, name: str) -> None:
    """Increasing fractions in (0, 1], e.g. learning-rate milestones."""
    ms = getattr(section, name)
    require(all(0 < m <= 1 for m in ms) and list(ms) == sorted(ms), name, "increasing fractions in (0, 1]")
