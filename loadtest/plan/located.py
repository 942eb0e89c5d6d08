"""Validate YAML with pydantic and say where a value is wrong: ``file:line: key.path: rule, got value``.

YAML node marks give every key and list item its line (:func:`read_yaml`); a pydantic error's location
is a path of keys and indices, so :func:`validate` names the line and path of the deepest part of that
path written in the file. Validators raise :func:`rule` errors in the same words, and one mechanism
suggests the closest valid key or value for a typo (:class:`Section` keys, :func:`Choice` values).
:func:`Sweep` is one value or a list of values (one point each).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import WithJsonSchema
from pydantic_core import PydanticCustomError

from core.errors import ConfigValidationError


def did_you_mean(value: Any, choices: Iterable[Any]) -> str:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def rule(text: str, at: Any = ()) -> PydanticCustomError:
    """A broken rule, raised by a validator; ``at`` (a key or a tuple of keys) extends the error's place."""
    where = at if isinstance(at, tuple) else (at,)
    return PydanticCustomError("rule", "{rule}", {"rule": text, "at": where})


def check_choice(value: Any, choices: tuple, what: str, at: Any = ()) -> Any:
    if value not in choices:
        listed = ", ".join(map(str, choices))
        raise rule(f"unknown {what} {value!r}{did_you_mean(value, choices)}; valid: {listed}", at)
    return value


_RULES = {  # pydantic's error types in the plan's words; the error's context and value fill them in
    "greater_than": "must be > {gt}, got {value!r}",
    "greater_than_equal": "must be >= {ge}, got {value!r}",
    "less_than": "must be < {lt}, got {value!r}",
    "less_than_equal": "must be <= {le}, got {value!r}",
    "int_type": "expected an integer, got {value!r}",
    "float_type": "expected a number, got {value!r}",
    "bool_type": "expected true or false, got {value!r}",
    "string_type": "expected a string, got {value!r}",
    "string_too_short": "expected a non-empty string, got {value!r}",
    "list_type": "expected a list (e.g. [4, 8]), got {value!r}",
    "dict_type": "expected a mapping (key: value lines), got {kind} {value!r}",
    "too_short": "must not be empty: give at least {min_length}",
    "too_long": "takes at most {max_length}, got {count}: {listed}",
}


def location(error: dict) -> tuple:
    return tuple(error["loc"]) + tuple((error.get("ctx") or {}).get("at", ()))


def rule_text(error: dict) -> str:
    """What an error says: the rule broken and the value given (and the valid ones, for a typo)."""
    ctx, kind = error.get("ctx") or {}, error["type"]
    if kind == "rule":
        return ctx["rule"]
    if kind == "missing":
        return f"missing required key '{error['loc'][-1]}'"
    kind = "dict_type" if kind == "model_type" else kind
    if kind not in _RULES:
        return f"{error['msg']}, got {error.get('input')!r}"
    value = error.get("input")
    bounds = {key: int(v) if isinstance(v, float) and v.is_integer() else v for key, v in ctx.items()}
    many = isinstance(value, (dict, list))
    count, listed = (len(value), ", ".join(map(str, value))) if many else (None, "")
    return _RULES[kind].format(value=value, kind=type(value).__name__, count=count, listed=listed, **bounds)


def locate(lines: dict[tuple, int], loc: tuple) -> tuple[int, str]:
    """The line of the deepest part of ``loc`` written in the file, and that part as a dotted path."""
    while loc and loc not in lines:
        loc = loc[:-1]
    path = "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in loc).lstrip(".")
    return lines.get(loc, lines.get((), 1)), path or "plan"


def _yaml_lines(node: yaml.Node, path: tuple = (), lines: dict | None = None) -> dict[tuple, int]:
    """Path of keys and list indices -> the 1-based line where that key or item is written."""
    lines = {(): node.start_mark.line + 1} if lines is None else lines
    if isinstance(node, yaml.MappingNode):
        children = [(getattr(key, "value", None), key, value) for key, value in node.value]
    elif isinstance(node, yaml.SequenceNode):
        children = [(index, item, item) for index, item in enumerate(node.value)]
    else:
        return lines
    for key, mark_node, value in children:
        lines[(*path, key)] = mark_node.start_mark.line + 1
        _yaml_lines(value, (*path, key), lines)
    return lines


def read_yaml(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """The YAML document, and the line of every key and item in it (see :func:`locate`)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark else 0
        problem = getattr(error, "problem", error)
        raise ConfigValidationError(f"{source}:{line}: not valid YAML: {problem}") from None
    finally:
        loader.dispose()
    return data, _yaml_lines(node) if node else {}


def validate(model: type[BaseModel], data: Any, source: str, lines: dict[tuple, int]) -> Any:
    """``model`` validated from ``data``; of several errors the one written first in the file is raised.

    Raises:
        ConfigValidationError: ``source:line: key.path: rule, got value`` and how many errors follow it.
    """
    try:
        return model.model_validate(data)
    except ValidationError as error:
        found = sorted(((locate(lines, location(e)), rule_text(e)) for e in error.errors()),
                       key=lambda item: item[0][0])
        ((line, path), text) = found[0]
        more = f" ({len(found) - 1} more error(s) after this one)" if len(found) > 1 else ""
        raise ConfigValidationError(f"{source}:{line}: {path}: {text}{more}") from None


T = TypeVar("T")


def Choice(what: str, choices: Iterable[str]) -> Any:  # a type factory, named like the types it makes
    """A string of a vocabulary; an unknown one is refused naming the closest valid one."""
    valid = tuple(choices)
    check = AfterValidator(lambda value: check_choice(value, valid, what))
    return Annotated[str, check, WithJsonSchema({"type": "string", "enum": list(valid)})]


class OneOrMany:
    """A sweep's JSON Schema: one value, or a list of values."""

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict:
        many = handler(core_schema)
        return {"anyOf": [many["items"], many]}


# a sweep: one value, or a non-empty list of values (one point each)
Sweep = Annotated[list[T], BeforeValidator(lambda v: v if isinstance(v, list) else [v]), Field(min_length=1),
                  OneOrMany()]
Count = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Text = Annotated[str, Field(min_length=1)]


class Section(BaseModel):
    """A mapping of the plan: strict types; unknown keys refused naming the closest one; null = empty."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if data is None:
            return {}
        valid = list(cls.model_fields)
        for key in data if isinstance(data, dict) else ():
            if key not in valid:
                raise rule(f"unknown key{did_you_mean(key, valid)}; valid keys: {', '.join(valid)}", key)
        return data
