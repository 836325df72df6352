"""Command-line flags generated from a config dataclass: one ``--flag`` per field.

Bools get ``--x/--no-x``, tuples take several values, ``Path | None`` fields take a path; a field
without a default is a required flag. Help text and choices come from ``field(metadata=...)``;
``metadata={"cli": False}`` keeps a field off the command line (set by the program instead).
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields
from typing import Any


def add_cli_args(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.metadata.get("cli") is False:
            continue
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        kwargs: dict[str, Any] = {"help": f.metadata.get("help"), "dest": f.name}
        if f.default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is tuple:
            kwargs.update(nargs="*", type=typing.get_args(hint)[0])
        else:
            kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            kwargs.update(type=kinds[0], choices=f.metadata.get("choices"))
        parser.add_argument(flag, **kwargs)


def from_cli_args(args: argparse.Namespace, cls: type, **rest: Any) -> Any:
    """``cls`` from the parsed flags; ``rest`` sets the fields that are not flags."""
    flags = {f.name: getattr(args, f.name) for f in fields(cls) if f.metadata.get("cli") is not False}
    return cls(**flags, **rest)
