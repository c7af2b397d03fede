"""Numeric ranges declared once, beside the setting they bound, and checked before work starts.

A settings dataclass declares each numeric field with `bounded(default, gt=..., le=...)`;
`check_bounds` then refuses a value that is not a finite number in its range with one sentence
naming the key, and `click_type` turns the same declaration into a CLI option type, so a
flag and its setting can never disagree. NaN deserves the care: it compares false with
everything, so `nan <= 0` is False and a plain `if value <= 0` lets it through.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BOUND = "bound"  # the dataclass field metadata key


@dataclass(frozen=True)
class Bound:
    """An interval with optional ends; each end is inclusive (ge/le) or exclusive (gt/lt)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def describe(self) -> str:
        ends = [
            f"{sign} {_num(value)}"
            for sign, value in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
            if value is not None
        ]
        return " and ".join(ends)

    def problem(self, value: Any, integer: bool = False) -> str | None:
        """Why `value` is out of range ("must be ..., got ..."), or None when it is fine."""
        kind = "an integer" if integer else "a finite number"
        want = f"must be {kind}" + (f" {self.describe()}" if self.describe() else "")
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{want}, got {value!r}"
        if integer and not isinstance(value, int):
            return f"{want}, got {value!r}"
        if not math.isfinite(value):
            return f"{want}, got {value}"
        below = (self.gt is not None and value <= self.gt) or (
            self.ge is not None and value < self.ge
        )
        above = (self.lt is not None and value >= self.lt) or (
            self.le is not None and value > self.le
        )
        return f"{want}, got {_num(value)}" if below or above else None


def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def bounded(
    default: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> Any:
    """A dataclass field with `default` whose numeric value must lie in the given range."""
    return dataclasses.field(default=default, metadata={BOUND: Bound(gt, ge, lt, le)})


def field_bound(cls: type, name: str) -> Bound | None:
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    return field.metadata.get(BOUND)


def _is_int_field(field: dataclasses.Field) -> bool:
    hint = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    return hint.replace(" ", "").split("|")[0] == "int"  # "int" or "int | None"


def check_bounds(obj: Any, describe: Callable[[str], str] = lambda name: f"key {name!r}") -> None:
    """Raise ValueError naming the first bounded field whose value is out of range.

    None passes (a field that may be unset says so in its type); `describe(name)` words the
    key for the message, e.g. "--lr" for a CLI or "c.yaml: key 'lr'" for a file.
    """
    for field in dataclasses.fields(obj):
        bound = field.metadata.get(BOUND)
        value = getattr(obj, field.name)
        if bound is None or value is None:
            continue
        problem = bound.problem(value, integer=_is_int_field(field))
        if problem:
            raise ValueError(f"{describe(field.name)} {problem}")


def click_type(cls: type, name: str):
    """The click parameter type of a bounded field: a finite number (or integer) in range."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    return option_type(field.metadata.get(BOUND) or Bound(), integer=_is_int_field(field))


def option_type(bound: Bound, integer: bool = False):
    """A click parameter type for a number in `bound`; unlike click's FloatRange it refuses
    NaN and infinities (`option_type(Bound(ge=0))` for a CLI option with no settings field)."""
    import click

    class _Bounded(click.ParamType):
        name = "integer" if integer else "float"

        def convert(self, value, param, ctx):
            if isinstance(value, str):
                try:
                    value = int(value) if integer else float(value)
                except ValueError:
                    kind = "an integer" if integer else "a number"
                    self.fail(f"{value!r} is not {kind}", param, ctx)
            problem = bound.problem(value, integer=integer)
            if problem:
                self.fail(problem, param, ctx)
            return value

    return _Bounded()
