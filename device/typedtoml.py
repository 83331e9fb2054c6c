"""TOML tables into frozen dataclasses, each value checked against its field's declaration, and back.

A field declares its type in its annotation and, in its metadata, what it allows
(:func:`choices`, :func:`value_range`). A value that does not fit is refused with a
:class:`~device.errors.ConfigError` naming the file, the dotted key, the value and what is allowed:
on a machine with no screen a typo must stop start-up with a message, not be ignored.
``device/config.py`` declares the appliance's sections with this; nothing here knows them.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from device.errors import ConfigError

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def choices(*values: Any) -> dict:
    """Field metadata: the value must be one of ``values``."""
    return {"choices": tuple(values)}


def value_range(lo: float | None = None, hi: float | None = None) -> dict:
    """Field metadata: the number (or every number of a fixed-length list) must lie in [lo, hi]."""
    return {"min": lo, "max": hi}


def read_table(where: str, name: str, cls: type, table: Any) -> Any:
    """The TOML table ``[name]`` of file ``where`` as a ``cls``; unknown keys and bad values are refused."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: '{name}' must be a table ([{name}]), not {_fmt(table)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {name}.{key}; [{name}] accepts "
                              f"{', '.join(sorted(fields))}")
        kwargs[key] = _convert(where, f"{name}.{key}", value, hints[key], dict(fields[key].metadata))
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a dataclass __post_init__ check (e.g. quality thresholds)
        raise ConfigError(f"{where}: {exc}") from exc


def dump(tables: Mapping[str, Any]) -> str:
    """Dataclass instances as TOML tables, every field written (``None`` as ``""``, the default's spelling)."""
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        for f in dataclasses.fields(table):
            lines.append(f"{f.name} = {_toml_value(getattr(table, f.name))}")
        lines.append("")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _allowed(hint: Any, meta: dict) -> str:
    if "choices" in meta:
        return "one of " + ", ".join(_fmt(c) for c in meta["choices"])
    lo, hi = meta.get("min"), meta.get("max")
    base = {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path string"}
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if ... not in args:
            kind = f"a list of {len(args)} integers"
        elif args[0] is str:
            kind = "a list of host names (letters, digits, '-' and '.'; no scheme, port or wildcard)"
        else:
            kind = "a list of path strings"
    elif origin in (types.UnionType, typing.Union):
        kind = "a path string (\"\" for the default)"
    else:
        kind = base.get(hint, str(hint))
    if lo is not None and hi is not None:
        return f"{kind} from {lo} to {hi}"
    if lo is not None:
        return f"{kind} >= {lo}"
    return kind


def _bad(where: str, key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{where}: {key} = {_fmt(value)} is not allowed; use {allowed}")


#: Plain types: (is this TOML value one?, the Python value). A bool is not an int, NaN is not a number.
_SCALARS: dict[type, tuple[Callable[[Any], bool], Callable[[Any], Any]]] = {
    bool: (lambda v: isinstance(v, bool), lambda v: v),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), lambda v: v),
    float: (lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v == v, float),
    str: (lambda v: isinstance(v, str), lambda v: v),
    Path: (lambda v: isinstance(v, str) and bool(v), Path),
}


def _convert(where: str, key: str, value: Any, hint: Any, meta: dict) -> Any:
    """Check and convert one TOML value to the declared type."""
    allowed = _allowed(hint, meta)
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):  # Path | None: "" means the default
        if value == "":
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if origin is tuple:
        return _convert_list(where, key, value, typing.get_args(hint), meta, allowed)
    if hint not in _SCALARS:  # pragma: no cover - a declaration error, not a user error
        raise TypeError(f"config field {key} has unsupported type {hint}")
    accepts, make = _SCALARS[hint]
    if not accepts(value):
        raise _bad(where, key, value, allowed)
    out = make(value)
    if "choices" in meta and out not in meta["choices"]:
        raise _bad(where, key, value, allowed)
    if not isinstance(out, bool) and isinstance(out, int | float):
        _check_range(where, key, value, out, meta, allowed)
    return out


def _convert_list(where: str, key: str, value: Any, args: tuple, meta: dict, allowed: str) -> tuple:
    """``tuple[Path, ...]``, ``tuple[str, ...]`` (host names) or a fixed number of integers."""
    if not isinstance(value, list):
        raise _bad(where, key, value, allowed)
    if ... in args:
        if not all(isinstance(v, str) and v for v in value):
            raise _bad(where, key, value, allowed)
        if args[0] is str:
            names = tuple(v.strip().lower().rstrip(".") for v in value)
            if not all(len(n) <= 253 and HOST_NAME.fullmatch(n) for n in names):
                raise _bad(where, key, value, allowed)
            return names
        return tuple(Path(v) for v in value)
    if len(value) != len(args) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise _bad(where, key, value, allowed)
    for v in value:
        _check_range(where, key, value, v, meta, allowed)
    return tuple(value)


def _check_range(where: str, key: str, value: Any, v: float, meta: dict, allowed: str) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _bad(where, key, value, allowed)


def _toml_value(v: Any) -> str:
    if v is None:
        return '""'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v)
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
