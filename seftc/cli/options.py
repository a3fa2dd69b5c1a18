"""Click options derived from a typed config: each option is declared once, as a field of a
pydantic model (its type, default, constraints and `description`), and both the command's long
options and the recipe stage's keys come from it.

A field `batch_size: Count = Field(4, description="...")` becomes `--batch-size INTEGER` with that
help and `[default: 4]`; `bool` fields become flags (`--x/--no-x` when the default is True);
`Literal[...]` fields become choices; `list[str]` fields repeatable options. A field's
`json_schema_extra={"cli": {...}}` may name the flag (`"flag": "--sparse-initializers/--dense-initializers"`),
the text shown as its default (`"show_default": "per method"`), its choices, a metavar, or hide it.
"""
from __future__ import annotations

import types
import typing
from typing import Any, Callable, Literal

import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from seftc.errors import validated


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _base(annotation: Any) -> Any:
    """The annotation without `| None` and without Annotated metadata."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _base(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _base(args[0])
    return annotation


def _optional(annotation: Any) -> bool:
    """The annotation admits None (`X | None`, possibly inside Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _optional(typing.get_args(annotation)[0])
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


class OrNone(click.ParamType):
    """A number, or `none` for a field that is optional but has a default (`--row-cap none`: no cap)."""

    def __init__(self, base: type):
        self.base = base
        self.name = f"{base.__name__}|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            return None
        try:
            return self.base(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a number nor 'none'", param, ctx)


def _cli_extra(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return dict(extra.get("cli", {}))


def click_option(name: str, info: FieldInfo) -> Callable[[Callable], Callable]:
    """The click option of one config field."""
    extra = _cli_extra(info)
    base = _base(info.annotation)
    default = info.default
    kwargs: dict[str, Any] = {"help": info.description, "show_default": extra.get("show_default", True),
                              "hidden": extra.get("hidden", False)}
    if extra.get("metavar"):
        kwargs["metavar"] = extra["metavar"]
    decl = extra.get("flag", option_name(name))
    if base is bool:
        if "/" not in decl and default is True:
            decl = f"{decl}/--no-{decl.removeprefix('--')}"
        return click.option(decl, name, is_flag=True, default=bool(default), **kwargs)
    if extra.get("choices"):
        kwargs["type"] = click.Choice(list(extra["choices"]))
    elif typing.get_origin(base) is Literal:
        kwargs["type"] = click.Choice([str(a) for a in typing.get_args(base)])
    elif typing.get_origin(base) is list:
        return click.option(decl, name, multiple=True, default=tuple(default or ()), **kwargs)
    elif base in (int, float):
        kwargs["type"] = OrNone(base) if default is not None and _optional(info.annotation) else base
    if default is None and kwargs["show_default"] is True:
        kwargs["show_default"] = False
    return click.option(decl, name, default=default, **kwargs)


def options_from(model: type[BaseModel], only: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorate a click command with one option per field of `model` (in field order)."""
    fields = [(n, f) for n, f in model.model_fields.items() if n not in exclude and (only is None or n in only)]

    def decorate(fn: Callable) -> Callable:
        for name, info in reversed(fields):
            fn = click_option(name, info)(fn)
        return fn

    return decorate


def cli_labels(values: dict[str, Any]) -> dict[str, str]:
    """How the user wrote each key on the command line, for validation errors (`--steps`)."""
    return {k: option_name(k) for k in values}


def take(model: type[BaseModel], options: dict[str, Any]) -> dict[str, Any]:
    """Pop `model`'s fields from a command's keyword arguments (repeatable options as lists)."""
    values = {k: options.pop(k) for k in list(options) if k in model.model_fields}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def from_options(model: type[BaseModel], where: str, options: dict[str, Any]) -> Any:
    """`take` the fields and validate them; errors name the option (`--steps: ...`)."""
    values = take(model, options)
    return validated(model, where, labels=cli_labels(values), **values)
