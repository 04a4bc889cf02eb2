"""argparse flags from option dataclasses, in the style of litgpt's jsonargparse CLI but with the flags our users
type: one `--field-name` per field, its docstring as the help line, a nested dataclass as an argument group (its
class docstring's first line is "Title: description").
`add_options` declares them; `build` turns the parsed namespace back into the dataclass.

Field types map to argparse: `Literal[...]` -> choices, `X | None` -> X, `tuple[int, ...]` -> comma-separated
integers, `list[str]` -> a repeatable option, `bool` -> `--name` (default False) or `--name/--no-name` (default
True). A field's metadata may set `flag` (another spelling), `positional`, `nargs` and `metavar`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from functools import cache
from typing import Any, Literal, TypeVar

import docstring_parser

T = TypeVar("T")


def positional(default: Any = dataclasses.MISSING, nargs: str | None = None, metavar: str | None = None) -> Any:
    """A dataclass field that is a positional argument."""
    return dataclasses.field(default=default, metadata={"positional": True, "nargs": nargs, "metavar": metavar})


def option(default: Any = dataclasses.MISSING, flag: str | None = None, metavar: str | None = None) -> Any:
    """A dataclass field with another flag spelling or a metavar."""
    return dataclasses.field(default=default, metadata={"flag": flag, "metavar": metavar})


@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring} of a dataclass (the string literal under each field)."""
    doc = docstring_parser.parse_from_object(cls)
    return {param.arg_name: " ".join((param.description or "").split()) for param in doc.params}


def _integers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _argument(kind: Any, default: Any) -> dict[str, Any]:
    """argparse keywords for a field of type `kind`."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        (kind,) = [a for a in args if a is not type(None)]
        args = typing.get_args(kind)
    if typing.get_origin(kind) is Literal:
        return {"choices": args, "type": type(args[0])}
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction if default else "store_true"}
    if typing.get_origin(kind) is tuple and args[1:] == (...,) and args[0] is int:
        return {"type": _integers, "metavar": "I,J,..."}
    if typing.get_origin(kind) is list:
        return {"action": "append", "type": args[0]}
    return {"type": kind}


def _help(text: str, default: Any) -> str:
    shown = not any(default is nothing for nothing in (None, False, True, dataclasses.MISSING)) and default != [] \
        and "default" not in text
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    return f"{text} (default: {default})" if shown else text


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """Declare one argument per field of the dataclass `cls`; a field whose type is a dataclass becomes a group."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            title, _, description = (kind.__doc__ or f.name).strip().splitlines()[0].partition(": ")
            add_options(parser.add_argument_group(title, description or None), kind)
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        meta = {k: v for k, v in f.metadata.items() if v is not None}
        keywords = {**_argument(kind, default), "help": _help(docs.get(f.name, ""), default)}
        if meta.get("positional") and keywords.get("action") == "append":  # nargs collects a positional's list
            del keywords["action"]
        if "metavar" in meta:
            keywords["metavar"] = meta["metavar"]
        if meta.get("positional"):
            keywords.update({"nargs": meta["nargs"]} if "nargs" in meta else {})
            if default is not dataclasses.MISSING:
                keywords.setdefault("nargs", "?")
            parser.add_argument(f.name, default=None if default is dataclasses.MISSING else default, **keywords)
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        required = default is dataclasses.MISSING
        parser.add_argument(flag, dest=f.name, required=required, **({} if required else {"default": default}),
                            **keywords)


def build(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass `cls` filled from parsed arguments (nested groups included)."""
    hints = typing.get_type_hints(cls)
    values = {f.name: build(hints[f.name], args) if dataclasses.is_dataclass(hints[f.name]) else getattr(args, f.name)
              for f in dataclasses.fields(cls)}
    return cls(**values)
