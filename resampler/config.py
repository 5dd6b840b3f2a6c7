"""Typed dataclass configs <-> YAML, with ``section.field=value`` overrides from the command line.

Every YAML under ``configs/`` mirrors a dataclass 1:1: unknown keys and wrongly typed values are
errors that name the field, never silently ignored. The YAML reader (`load_yaml`) is PyYAML's safe
loader with three refusals: aliases (``*name``: a few hundred bytes of nested aliases expand to
gigabytes when the mapping is walked), duplicate keys (the second ``train:`` would silently replace
the first), and an empty document (which would silently mean "all defaults"). Numbers must be
finite, and the keys and values of dict fields are converted and checked like any other field.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["from_dict", "to_dict", "load_yaml", "load_config", "save_config", "apply_overrides", "parse_cli"]

T = TypeVar("T")


class _StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases and duplicate mapping keys."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(
                f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not allowed in configs; "
                "write the value out"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeConstructor names it below
                break
            if duplicate:
                raise yaml.YAMLError(
                    f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (the second would replace the first)"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, where: str = "config") -> Any:
    """One YAML document by the strict rules above; any problem is a ValueError naming ``where``."""
    try:
        return yaml.load(text, Loader=_StrictSafeLoader)
    except yaml.YAMLError as err:
        raise ValueError(f"{where}: {' '.join(str(err).split())}") from None


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [arg for arg in args if arg is not type(None)]
        if len(candidates) == 1:  # Optional[X]: X's own error says it best
            return _convert(value, candidates[0], where)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise TypeError(f"{where}: {value!r} fits none of {tp}: {'; '.join(errors)}")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {type(value).__name__}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ValueError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {type(value).__name__}")
        key_type, value_type = args if args else (Any, Any)
        return {_convert(k, key_type, where): _convert(v, value_type, f"{where}[{k!r}]") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(f"{where}: expected an int, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads ``1e-4`` (no dot) as a string; users mean a number
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise TypeError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ValueError(f"{where}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping; unknown keys and bad types raise."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - set(fields)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"unknown config field(s) {sorted(prefix + str(k) for k in unknown)} for {cls.__name__}; "
            f"known: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        kwargs[name] = _convert(value, hints[name], path)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain nested dicts/lists (YAML- and JSON-safe)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.field=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = load_yaml(raw, f"override {item!r}") if raw != "" else ""
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Dataclass ``cls`` from a YAML file (or its defaults when ``path`` is None) plus overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        raw = Path(path).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        data = load_yaml(text, str(path))
        if data is None:
            raise ValueError(
                f"{path}: the config file is empty; give at least one section (or no file for the defaults)"
            )
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level of a config must be a mapping")
    if not data and not overrides:
        return cls()
    base = to_dict(cls()) if path is None else data
    return from_dict(cls, apply_overrides(base, list(overrides or [])))


def save_config(config: Any, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(to_dict(config), fh, sort_keys=False)


def parse_cli(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """``--config file.yaml`` plus any number of ``section.field=value`` overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=None, help="YAML file mirroring the config dataclass")
    parser.add_argument("overrides", nargs="*", help="section.field=value (value parsed as YAML)")
    args = parser.parse_args(argv)
    return load_config(cls, args.config, args.overrides)
