"""Value types shared by several config blocks (constraints appear in the generated schema)."""

from __future__ import annotations

import string
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field

from canopy.config.base import as_tuple

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveNumber = Annotated[float, Field(gt=0)]
#: Bootstrap resamples: fewer than 10 cannot give an interval.
Resamples = Annotated[int, Field(ge=10)]
#: An open-interval probability, e.g. a confidence level.
Level = Annotated[float, Field(gt=0, lt=1)]
#: A share in (0, 1], e.g. an opacity or the share of rollouts kept.
Share = Annotated[float, Field(gt=0, le=1)]
#: auto (CUDA when present, else the CPU), cpu, cuda or cuda:<index>.
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]
NonEmptyStr = Annotated[str, Field(min_length=1)]


def distinct(values: tuple) -> tuple:
    """An after-validator of tuple settings: each value once."""
    if len(set(values)) != len(values):
        raise ValueError(f"repeats a value: {list(values)}")
    return values


#: A list of task names (at least one); null means every task.
TaskNames = Annotated[tuple[NonEmptyStr, ...], BeforeValidator(as_tuple), Field(min_length=1)]


def _format_field_names(value: str) -> list[str]:
    """The ``{field}`` names of a format string, in order; a clear error for a broken one."""
    try:
        return [n for _, n, _, _ in string.Formatter().parse(value) if n is not None]
    except ValueError as error:
        raise ValueError(
            f"not a valid format string ({error}); write literal braces as {{{{ and }}}}"
        ) from None


def one_format_field(*names: str) -> Any:
    """A validator: the string is a format string with exactly one ``{field}``, one of these."""

    def check(value: str) -> str:
        found = _format_field_names(value)
        if len(found) != 1 or found[0] not in names:
            wanted = " or ".join("{" + n + "}" for n in names)
            raise ValueError(f"must contain {wanted}, once, and no other field, has {found}")
        return value

    return AfterValidator(check)


def format_fields(*names: str) -> Any:
    """A validator: the string is a format string with exactly these ``{fields}``, once each."""

    def check(value: str) -> str:
        found = _format_field_names(value)
        if sorted(found) != sorted(names):
            wanted = ", ".join("{" + n + "}" for n in names)
            raise ValueError(f"must contain {wanted} once each and no other field, has {found}")
        return value

    return AfterValidator(check)
