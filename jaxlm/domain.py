"""The values a setting accepts, declared with the setting: `Range`, `NonEmpty`, `Duration`,
`Parsed`.

A config field carries its domain in its dataclass metadata (`config.setting`), and one walk
over the fields (`check_fields`) refuses every out-of-domain value with one sentence that names
the key, the value and what is allowed. Literal and bool fields need no declaration: their type
is their domain, and parsing already refuses the rest. No JAX here.

Each domain can also name values outside it (`outside`), so a test can prove, for every field
of every config, that a wrong value is refused: a key added later cannot skip the check.
"""

import dataclasses
import math
import typing
from collections.abc import Callable
from typing import Any, Literal

from jaxlm.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Range:
    """A finite number in [low, high] (either end may be open or absent)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False  # only for the messages and the examples outside

    def contains(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        low, high = self.low, self.high
        if high is None and low is not None:
            if low == 0 and self.low_open:
                return "positive"
            return f"greater than {_num(low)}" if self.low_open else f"at least {_num(low)}"
        if low is None and high is not None:
            return f"less than {_num(high)}" if self.high_open else f"at most {_num(high)}"
        if low is None:
            return "a finite number"
        opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {opening}{_num(low)}, {_num(high)}{closing}"

    def outside(self) -> list:
        values: list = []
        if self.low is not None:
            values.append(self.low if self.low_open else self.low - 1)
        if self.high is not None:
            values.append(self.high if self.high_open else self.high + 1)
        if not self.integer:
            values.append(math.nan)
        return values


@dataclasses.dataclass(frozen=True)
class NonEmpty:
    """A string with something in it (a path, a name)."""

    def contains(self, value) -> bool:
        return isinstance(value, str) and value.strip() != ""

    def describe(self) -> str:
        return "a non-empty string"

    def outside(self) -> list:
        return [""]


@dataclasses.dataclass(frozen=True)
class Duration:
    """Seconds, MM:SS or HH:MM:SS."""

    def contains(self, value) -> bool:
        return parse_duration(value) is not None

    def describe(self) -> str:
        return "seconds or HH:MM:SS"

    def outside(self) -> list:
        return ["soon", "-5", "1:2:3:4"]


@dataclasses.dataclass(frozen=True)
class Parsed:
    """Text that `parse` accepts; it raises UsageError for the rest (a blend, a split string)."""

    parse: Callable[[Any], Any]
    description: str
    bad_examples: tuple = ()

    def contains(self, value) -> bool:
        try:
            self.parse(value)
        except UsageError:
            return False
        return True

    def describe(self) -> str:
        return self.description

    def outside(self) -> list:
        return list(self.bad_examples)


Domain = Range | NonEmpty | Duration | Parsed


def at_least(low: int) -> Range:
    return Range(low=low, integer=True)


def positive() -> Range:
    return Range(low=0, low_open=True)


def non_negative() -> Range:
    return Range(low=0)


def fraction(*, high_open: bool = False) -> Range:
    return Range(low=0, high=1, high_open=high_open)


def parse_duration(text) -> float | None:
    """'HH:MM:SS', 'MM:SS' or plain seconds -> seconds; None if it is none of these."""
    try:
        parts = [float(p) for p in str(text).split(":")]
    except ValueError:
        return None
    if not 1 <= len(parts) <= 3 or not all(math.isfinite(p) and p >= 0 for p in parts):
        return None
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + p
    return seconds


def domain_of(field: dataclasses.Field) -> Domain | None:
    return field.metadata.get("domain")


def type_is_domain(annotation) -> bool:
    """Literal and bool fields: parsing already refuses every value outside the type."""
    annotation = _strip_none(annotation)
    return annotation is bool or typing.get_origin(annotation) is Literal


def check_fields(obj, prefix: str = "", flags: bool = False) -> None:
    """Every field of the dataclass `obj` (and of the dataclasses inside it) in its domain; the
    first one that is not raises a UsageError naming key (as `--top-p` with `flags`), value and
    domain."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        key = f"--{field.name.replace('_', '-')}" if flags else f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{key}.", flags)
            continue
        domain = domain_of(field)
        if value is None or domain is None or domain.contains(value):
            continue
        optional = _allows_none(field.type)
        allowed = f"none or {domain.describe()}" if optional else domain.describe()
        raise UsageError(f"{key} must be {allowed}, not {_show(value)}")


def _strip_none(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if _allows_none(annotation) and len(args) == 1 else annotation


def _allows_none(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _show(value: Any) -> str:
    if isinstance(value, tuple):  # a list setting, as it is written: 'a,b'
        return f"'{','.join(map(str, value))}'"
    return f"'{value}'" if isinstance(value, str) else str(value)
