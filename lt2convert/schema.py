"""Config files as validated data: the field types their schemas share, and pydantic's errors as one line per
field ("stages[1].lr: must be > 0, got -1"), so a bad file is reported whole, naming every field."""

from __future__ import annotations

import typing
from typing import Annotated, Any

import pydantic
import pydantic.dataclasses
from pydantic import ConfigDict, Field, ValidationError

PositiveInt = Annotated[int, Field(strict=True, gt=0)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
PositiveNumber = Annotated[float, Field(strict=True, gt=0)]
NonNegativeNumber = Annotated[float, Field(strict=True, ge=0)]
Fraction = Annotated[float, Field(strict=True, ge=0, le=1)]
Flag = Annotated[bool, Field(strict=True)]
Number = Annotated[float, Field(strict=True)]
Text = Annotated[str, Field(strict=True, min_length=1)]
OptionalText = Annotated[str, Field(strict=True)] | None

# pydantic error type -> what to say (before ", got VALUE"); constraint values come from the error's context
_MESSAGES = {
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "string_too_short": "expected a non-empty string",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "too_short": "expected at least {min_length} item(s)",
    "dict_type": "expected a mapping",
    "dataclass_type": "expected a mapping",
    "model_type": "expected a mapping",
    "literal_error": "expected one of {expected}",
    "greater_than": "must be > {gt:g}",
    "greater_than_equal": "must be >= {ge:g}",
    "less_than": "must be < {lt:g}",
    "less_than_equal": "must be <= {le:g}",
}


def field_path(loc: tuple[Any, ...], where: str = "") -> str:
    """('stages', 1, 'lora', 'r') -> 'stages[1].lora.r' (under `where`, itself a path)."""
    path = where
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def problems_of(err: ValidationError, where: str = "") -> list[str]:
    """One line per error: the field's path, what is wrong, and the value found."""
    lines = []
    for error in err.errors(include_url=False):
        kind, context = error["type"], error.get("ctx") or {}
        path = field_path(error["loc"], where)
        if kind == "missing":
            lines.append(f"{path}: missing")
        elif kind in ("extra_forbidden", "unexpected_keyword_argument"):
            lines.append(f"{path}: unknown key")
        elif kind == "value_error":  # our own validators' messages already say what was found
            lines.append(f"{path}: {context.get('error', error['msg'])}")
        elif kind in _MESSAGES:
            lines.append(f"{path}: {_MESSAGES[kind].format(**context)}, got {error['input']!r}")
        else:
            lines.append(f"{path}: {error['msg']}, got {error['input']!r}")
    return lines


def record(cls: type) -> type:
    """A frozen dataclass whose fields are checked against their types on construction (unknown keys are errors):
    one definition is the config file's schema, its JSON Schema and the type the code uses."""
    return pydantic.dataclasses.dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)


def overrides_of(cls: type) -> type[pydantic.BaseModel]:
    """The schema of `cls` with every field optional, for a file that overrides only some of its values (unset
    fields are left out of `model_dump(exclude_unset=True)`)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    # absent means "as the source derives it", not null: the schema shows no default
    unset = Field(None, json_schema_extra=lambda schema: schema.pop("default"))
    fields: dict[str, Any] = {name: (hint, unset) for name, hint in hints.items()}
    return pydantic.create_model(f"{cls.__name__}Overrides", __config__=ConfigDict(extra="forbid"), **fields)
