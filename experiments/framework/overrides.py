"""``--set KEY=VALUE``: change one field of a preset's config from the command line.

A preset's config is a frozen dataclass (see :class:`~experiments.framework.Experiment`);
``--set steps=200`` builds a new one with :func:`dataclasses.replace`, the text parsed to
the field's declared type (``int``, ``float``, ``bool``, ``str``, ``None`` where the type
allows it, tuples, enums, paths). A dotted key reaches into a nested config
(``train.steps``: the field ``steps`` of the config in ``train``) or into a mapping of
configs (``blocks.mnist-cnn.steps``). The changed config is part of every cell's identity
(:func:`~experiments.framework.cell_identity`), so a run with overrides never counts as the
preset's own result, nor the other way round; :func:`with_overrides` also records the
``--set`` arguments on the experiment, so each record's command and ``table.md`` name them.

Values: ``true``/``false`` (also ``yes``/``no``, ``1``/``0``), ``None``, numbers as Python
writes them (``3e-4``, ``5_000``), tuples as ``300,400`` or ``(300, 400)`` (``()`` for an
empty one), strings as they are (quotes optional).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import enum
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.framework.declare import Experiment, UsageError

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null")


class _BadValue(Exception):
    """A value that does not fit a type (turned into a :class:`UsageError` naming the key)."""


def parse_assignment(text: str) -> tuple[str, str]:
    """``"key=value"`` as ``(key, value)`` (the value may contain ``=``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set {text!r}: expected KEY=VALUE, e.g. --set steps=200")
    return key.strip(), value.strip()


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: fall back on the value's type
        return {}


def _literal(text: str) -> Any:
    """``text`` as a Python literal if it is one, else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace(
        "typing.", "")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def coerce(value: Any, tp: Any) -> Any:
    """``value`` (parsed text, or the text itself) as an instance of the annotation ``tp``;
    :class:`_BadValue` if it is not one."""
    if tp is Any or tp is object:
        return value
    if tp is None or tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in _NONE):
            return None
        raise _BadValue("expected None")
    if _is_union(tp):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or
                                   (isinstance(value, str) and value.lower() in _NONE)):
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arm)
            except _BadValue:
                continue
        raise _BadValue(f"expected {_type_name(tp)}")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        for allowed in typing.get_args(tp):
            if value == allowed or str(value) == str(allowed):
                return allowed
        raise _BadValue(f"expected one of {', '.join(map(repr, typing.get_args(tp)))}")
    if origin in (tuple, list) or tp in (tuple, list):
        return _coerce_sequence(value, tp, origin or tp)
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        if value == {} or value == "{}":
            return {}
        raise _BadValue("a mapping can only be emptied ({}) here; set one entry with a "
                        "dotted key (KEY.ENTRY.FIELD=VALUE)")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        raise _BadValue("it is a nested config: set its fields with dotted keys")
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise _BadValue("expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _BadValue("expected a whole number")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value))  # inf, nan
        except ValueError:
            raise _BadValue("expected a number") from None
    if tp is str:
        return value if isinstance(value, str) else str(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or str(value) in (member.name, str(member.value)):
                return member
        raise _BadValue(f"expected one of {', '.join(str(m.value) for m in tp)}")
    if tp in (Path, os.PathLike):
        return Path(str(value))
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _BadValue(f"a {_type_name(tp)} cannot be set from the command line")


def _coerce_sequence(value: Any, tp: Any, origin: type) -> tuple | list:
    args = typing.get_args(tp)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("(", "[")) and text.endswith((")", "]")):
            text = text[1:-1]
        items = [_literal(p.strip()) for p in text.split(",") if p.strip()]
    elif isinstance(value, tuple | list):
        items = list(value)
    else:
        items = [value]
    if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[int, str]: fixed length
        if len(items) != len(args):
            raise _BadValue(f"expected {len(args)} items ({_type_name(tp)})")
        return tuple(coerce(v, a) for v, a in zip(items, args, strict=True))
    elem = args[0] if args else Any
    out = [coerce(v, elem) for v in items]
    return tuple(out) if origin is tuple else out


def _field_type(config: Any, name: str) -> Any:
    hint = _hints(type(config)).get(name)
    if hint is not None:
        return hint
    current = getattr(config, name)
    if isinstance(current, tuple):
        return tuple[type(current[0]), ...] if current else tuple
    return Any if current is None else type(current)


def _keys(config: Any) -> list[str]:
    """The keys ``--set`` accepts at this level: fields, ``name.…`` for nested ones."""
    if dataclasses.is_dataclass(config):
        names = [f.name for f in dataclasses.fields(config)]
        return [n + (".…" if _nested(getattr(config, n)) else "") for n in names]
    return [f"{k}.…" for k in config]


def _nested(value: Any) -> bool:
    return (dataclasses.is_dataclass(value) and not isinstance(value, type)) or (
        isinstance(value, Mapping) and bool(value)
        and all(dataclasses.is_dataclass(v) for v in value.values()))


def _unknown(key: str, part: str, node: Any, where: str) -> UsageError:
    keys = _keys(node)
    bare = [k.removesuffix(".…") for k in keys]
    close = difflib.get_close_matches(part, bare, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    scope = f" of {where}" if where else ""
    return UsageError(f"--set {key}: unknown key {part!r}{hint}; valid keys{scope}: "
                      + ", ".join(keys))


def _set(node: Any, path: Sequence[str], raw: str, key: str, where: str) -> Any:
    """``node`` with ``path`` set to ``raw`` (parsed to the field's type), rebuilt."""
    part, rest = path[0], path[1:]
    inner = f"{where}.{part}" if where else part
    if isinstance(node, Mapping):
        if part not in node:
            raise _unknown(key, part, node, where)
        if not rest:
            raise UsageError(f"--set {key}: {inner} is a nested config: set its fields, "
                             f"e.g. --set {inner}.{_keys(node[part])[0]}=…; valid keys of "
                             f"{inner}: {', '.join(_keys(node[part]))}")
        return {**node, part: _set(node[part], rest, raw, key, inner)}
    if not dataclasses.is_dataclass(node) or isinstance(node, type):
        raise UsageError(f"--set {key}: {where or 'the config'} is a "
                         f"{type(node).__name__}, not a config with fields")
    names = [f.name for f in dataclasses.fields(node)]
    if part not in names:
        raise _unknown(key, part, node, where)
    current = getattr(node, part)
    if rest:
        if not _nested(current):
            raise UsageError(f"--set {key}: {inner} is a value, not a nested config; "
                             f"use --set {inner}=VALUE")
        value = _set(current, rest, raw, key, inner)
    else:
        if _nested(current) and dataclasses.is_dataclass(current):
            raise UsageError(f"--set {key}: {inner} is a nested config: set its fields, "
                             f"e.g. --set {inner}.{_keys(current)[0]}=…; valid keys of "
                             f"{inner}: {', '.join(_keys(current))}")
        tp = _field_type(node, part)
        parsed = _literal(raw)
        union = typing.get_args(tp) if _is_union(tp) else ()
        if (tp is str or str in union) and not isinstance(parsed, str) and not (
                type(None) in union and raw.lower() in _NONE):
            parsed = raw  # a string field keeps the text as typed ("1" stays "1")
        try:
            value = coerce(parsed, tp)
        except _BadValue as e:
            raise UsageError(f"--set {key}={raw}: bad value for {inner} "
                             f"({_type_name(tp)}, now {current!r}): {e}") from None
    try:
        return dataclasses.replace(node, **{part: value})
    except (TypeError, ValueError) as e:
        raise UsageError(f"--set {key}={raw}: {where or 'the config'} rejects it: {e}") from e


def override(config: Any, assignments: Sequence[str]) -> Any:
    """``config`` with each ``"key=value"`` of ``assignments`` applied in order (dotted
    keys reach nested configs); a :class:`UsageError` names a bad key or value and lists
    the valid keys."""
    for text in assignments:
        key, raw = parse_assignment(text)
        config = _set(config, key.split("."), raw, key, "")
    return config


def with_overrides(exp: Experiment, preset: str, assignments: Sequence[str]) -> Experiment:
    """``exp`` with the config of ``preset`` changed by ``assignments`` (``--set``) and the
    assignments recorded in ``exp.overrides[preset]``; ``exp`` itself when there are none."""
    if not assignments:
        return exp
    if preset not in exp.presets:
        raise UsageError(f"unknown preset {preset!r} for experiment {exp.name!r}; "
                         f"valid presets: {', '.join(exp.presets)}")
    try:
        config = override(exp.presets[preset], assignments)
    except UsageError as e:
        raise UsageError(f"{exp.name} ({preset}): {e}") from None
    texts = tuple("=".join(parse_assignment(a)) for a in assignments)
    return dataclasses.replace(exp, presets={**exp.presets, preset: config},
                               overrides={**exp.overrides, preset: texts})
