"""The pieces every config block is built from: one error type, a frozen strict model base, and
the conversion of pydantic's errors into messages that name the key, the value and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
import typing
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "Block",
    "ConfigError",
    "Problem",
    "as_tuple",
    "format_key",
    "plain",
    "problems_from",
    "render",
]

_B = TypeVar("_B", bound="Block")


class ConfigError(ValueError):
    """The configuration (or one settings block of it) is invalid; the message lists every problem,
    each with its dotted key, the value found and what is allowed there."""

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


def format_key(path: Iterable[Any]) -> str:
    """Dotted key for a path (``['sampling', 'default', 'top_k']`` -> ``sampling.default.top_k``)."""
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in path]
    return ".".join(parts).replace(".[", "[") or "<top level>"


class Problem:
    """One invalid key: where it is, what it holds and what is allowed."""

    __slots__ = ("key", "value", "allowed")

    def __init__(self, key: Sequence[Any], value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = tuple(key), value, allowed

    @property
    def dotted(self) -> str:
        return format_key(self.key)

    def __str__(self) -> str:
        if isinstance(self.value, Mapping):
            # A check across a block's keys: the message names them; the block itself is long.
            return f"{self.dotted}: {self.allowed}"
        return f"{self.dotted} = {self.value!r}: {self.allowed}"

    def __repr__(self) -> str:
        return f"Problem({self})"


_MISSING = object()


def problems_from(error: ValidationError, prefix: Sequence[Any] = ()) -> list[Problem]:
    """One :class:`Problem` per pydantic error, keyed from the root of the configuration.

    A block chosen by a tag (a model's ``source``) is keyed as the user wrote it: the tag that
    pydantic adds to the location is left out, and named in the message instead."""
    problems = []
    root = _ROOTS.get(error.title)
    for item in error.errors(include_url=False):
        own, tag, _ = _walk(root, item["loc"])
        loc = [*prefix, *own]
        kind, message = item["type"], item["msg"]
        value = item.get("input", _MISSING)
        if kind in ("union_tag_invalid", "union_tag_not_found"):
            # The tag key itself is wrong or missing: key it, not the block around it.
            loc.append(item["ctx"]["discriminator"].strip("'"))
            if kind == "union_tag_invalid":
                value = item["ctx"]["tag"]
                allowed = f"Input should be {_one_of(item['ctx']['expected_tags'])}"
            else:
                allowed, value = "required key is missing", None
        elif kind == "extra_forbidden":
            allowed = "unknown key; allowed here: " + ", ".join(_allowed_at(error, item["loc"]))
            owner = _other_member(tag, _model_at(root, item["loc"][:-1]), own[-1])
            if owner is not None:
                allowed = f"not used by {tag[0]} {tag[1]} (a key of {tag[0]} {owner}); " + (
                    allowed.removeprefix("unknown key; ")
                )
        elif kind == "missing" and tag is not None:
            allowed, value = f"required by {tag[0]} {tag[1]}", None
        elif kind == "missing":
            allowed, value = "required key is missing", None
        else:
            # "Value error, ..." is how pydantic prefixes a validator's own message.
            allowed = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        problems.append(Problem(loc, None if value is _MISSING else value, allowed))
    return problems


def _allowed_at(error: ValidationError, loc: Sequence[Any]) -> list[str]:
    """The keys the model at ``loc[:-1]`` accepts (for an unknown key's message)."""
    model = _model_at(_ROOTS.get(error.title), loc[:-1])
    if model is None:
        return ["(see the schema)"]
    return [field.alias or name for name, field in model.model_fields.items()]


#: Block classes by name, to find which model an error's location points into.
_ROOTS: dict[str, type[BaseModel]] = {}


def _model_at(model: type[BaseModel] | None, loc: Sequence[Any]) -> type[BaseModel] | None:
    return _walk(model, loc)[2]


def _walk(
    model: type[BaseModel] | None, loc: Sequence[Any]
) -> tuple[list[Any], tuple[str, str, dict[str, type[BaseModel]]] | None, type[BaseModel] | None]:
    """Follow ``loc`` through the blocks from ``model``: the location without the tags pydantic
    puts after a tagged union's field, the last such tag as (tag key, tag, {tag: block} of its
    union), and the block ``loc`` ends in (None where it leaves the blocks)."""
    out: list[Any] = []
    tag = None
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        out.append(part)
        if model is None:
            continue
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        field = fields.get(part) if isinstance(part, str) else None
        if field is None:
            continue  # a dict key (a task's name) or a list index: same model further down
        members = _tagged_members(field)
        if members and parts and parts[0] in members:
            tag = (field.discriminator, parts[0], members)
            model = members[parts.pop(0)]
        else:
            model = _block_in(field.annotation)
    return out, tag, model


def _tagged_members(field: Any) -> dict[str, type[BaseModel]]:
    """{tag: block} of a field that holds a union told apart by a tag key (``source``)."""
    key = getattr(field, "discriminator", None)
    if not isinstance(key, str):
        return {}
    return {
        tag: member
        for member in typing.get_args(field.annotation)
        for tag in typing.get_args(member.model_fields[key].annotation)
    }


def _other_member(tag: Any, block: type[BaseModel] | None, key: str) -> str | None:
    """The tag of another member of the tagged union that ``block`` is one of, which takes
    ``key`` (for a key of another source)."""
    if tag is None or block is not tag[2][tag[1]]:
        return None
    return next((t for t, member in tag[2].items() if key in member.model_fields), None)


def _one_of(tags: str) -> str:
    # pydantic lists expected tags as "'a', 'b', 'c'"; a Literal's message says "'a', 'b' or 'c'".
    head, _, last = tags.rpartition(", ")
    return f"{head} or {last}" if head else last


def _block_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _block_in(arg)
        if found is not None:
            return found
    return None


def as_tuple(value: Any) -> Any:
    """A before-validator of tuple settings: a list (YAML's sequence) becomes a tuple, since
    frozen settings must stay hashable; anything else is left to the field's own check."""
    return tuple(value) if isinstance(value, list) else value


class Block(BaseModel):
    """A config block: frozen, unknown keys rejected, no silent type coercion (``1`` is not
    ``true``, ``"3"`` is not ``3``; an integer is accepted where a number is)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        allow_inf_nan=False,
        populate_by_name=True,
        use_attribute_docstrings=True,
        # Each job validates one block: build a model's validator when it is first used, not
        # every model's at import (a job's start-up is most of its time with the tiny models).
        defer_build=True,
    )

    #: Dotted key of the block in the configuration (``stats.robustness``); ``<name>`` stands for a
    #: user-chosen entry name. Used in the messages of :meth:`from_config` and direct construction.
    where: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _ROOTS[cls.__name__] = cls

    @classmethod
    def from_config(
        cls: type[_B],
        block: Mapping[str, Any] | None,
        where: str | None = None,
        *,
        name: str | None = None,
    ) -> _B:
        """The settings of a plain config mapping (``None``: every default).

        Raises :class:`ConfigError` naming each bad key under ``where`` (default: the block's
        place in the configuration, with ``name`` for its entry name, e.g. the recipe's), its
        value and what is allowed.
        """
        if where is None:
            where = re.sub(r"<[a-z]+>", name, cls.where, count=1) if name else cls.where
        if block is None:
            block = {}
        if not isinstance(block, Mapping):
            raise ConfigError(f"{where} must be a mapping of settings, got {type(block).__name__}")
        try:
            return cls.model_validate(dict(block))
        except ValidationError as error:
            raise _config_error(error, where) from None

    def to_config(self) -> dict[str, Any]:
        """The block as plain config values (keys as in the config file, lists as lists)."""
        return plain(self.model_dump(by_alias=True))


def plain(value: Any) -> Any:
    """Tuples to lists, recursively: what a YAML file or Snakemake's params would hold."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def _config_error(error: ValidationError, where: str) -> ConfigError:
    prefix = [part for part in where.split(".") if part] if where else []
    problems = problems_from(error, prefix)
    return ConfigError(render(problems), problems)


def render(problems: Sequence[Problem], readers: Any = None) -> str:
    """The message of a :class:`ConfigError`: one line per problem (and the rules reading it)."""
    lines = []
    for problem in problems:
        line = f"  - {problem}"
        rules = readers(problem.key) if readers else []
        if rules:
            line += f" (read by rule{'s' if len(rules) > 1 else ''} {', '.join(rules)})"
        lines.append(line)
    return f"invalid configuration ({len(problems)} problem(s)):\n" + "\n".join(lines)
