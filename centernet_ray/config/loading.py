"""Building a :class:`Config`: YAML files (paths or shipped names, ``base:`` chains), dotted
``key=value`` overrides, and the validator that coerces plain data into the schema.

Unknown keys and bad values raise :class:`ConfigError` naming what would have been valid.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from centernet_ray.config import files as config_files
from centernet_ray.config.schema import Config, ConfigError
from centernet_ray.errors import UserInputError


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The parsed content of a YAML file or a shipped name; a missing or malformed file is a
    :class:`ConfigError`."""
    return read_yaml_text(path, what)[1]


def read_yaml_text(path: str | Path, what: str = "config file") -> tuple[str, Any]:
    """(the text, its parsed content) of a YAML file or a shipped name, read once; a missing or
    malformed file is a :class:`ConfigError`."""
    try:
        return config_files.read_yaml_text(path, what)
    except UserInputError as exc:
        raise ConfigError(str(exc)) from exc


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a config (a YAML path or a shipped name such as ``demo``; the defaults when ``path`` is
    None), resolve its ``base:`` chain and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = config_files.read_config(path)
        except UserInputError as exc:
            raise ConfigError(str(exc)) from exc
    return with_overrides(data, overrides)


def with_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The :class:`Config` of nested plain ``data`` (e.g. a checkpoint's config) with ``key=value``
    overrides applied."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, value = parse_override(item)
        if _is_text(_field_type(key)) and not isinstance(value, (str, list, dict)) and value is not None:
            value = item.partition("=")[2].strip()  # a text setting as typed: run_name=2024-12-03, split=2017
        _set_dotted(data, key, value)
    return config_from_dict(data)


def _is_text(hint: Any) -> bool:
    """``str`` or ``str | None``."""
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType)
                           and set(typing.get_args(hint)) == {str, type(None)})


def _field_type(key: str) -> Any:
    """The declared type of ``section.key`` in the schema (None for an unknown key: refused later)."""
    section, _, name = key.partition(".")
    part = typing.get_type_hints(Config).get(section)
    return typing.get_type_hints(part).get(name) if dataclasses.is_dataclass(part) else None


def parse_override(item: str) -> tuple[str, Any]:
    """``"loss.alpha=2.5"`` -> ``("loss.alpha", 2.5)``; values are parsed as YAML scalars/lists."""
    key, sep, raw = item.partition("=")
    if not sep or not key or "." not in key:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. loss.alpha=2.5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        where = config_files.yaml_error_in_words(exc)
        raise ConfigError(f"override {item!r}: cannot parse value {raw!r}{where}") from None
    return key.strip(), value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    target = data.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"section {section!r} must be a mapping")
    target[name] = value


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain data."""
    return _build(Config, data, prefix="")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(str(key) for key in set(data) - set(fields))  # a YAML key may be a number or null
    if unknown:
        hint = ""
        if not prefix and "." in unknown[0]:  # a search-space file given as a config
            hint = (" (a config nests its keys, `loss: {alpha: 2.5}`; dotted keys are a search space's: "
                    "`centernet-ray tune --search-space FILE`)")
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}' in {where}; valid keys: {', '.join(fields)}{hint}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, prefix=f"{prefix}{name}.")
        else:
            coerced = _coerce(f"{prefix}{name}", hint, value)
            _check_range(f"{prefix}{name}", coerced, fields[name].metadata)
            kwargs[name] = coerced
    return cls(**kwargs)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, arg, value)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] + (" (or null)" if type(None) in args else ""))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, e.g. {key}=[{_example(args)}]; got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, args[0], v) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} values, e.g. {key}=[{_example(args)}]; got {value!r}")
        return tuple(_coerce(key, a, v) for a, v in zip(args, value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, e.g. {key}={{a: b}}; got {value!r}")
        return {_coerce(key, args[0], k): _coerce(key, args[1], v) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false; got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number; got {value!r}")
        if not math.isfinite(value):  # "nan" and "inf" parse as floats and pass every bound check
            raise ConfigError(f"{key} must be a finite number; got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string; got {value!r} (in a YAML file, quote it)")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")  # a programming error in this module


def _example(args: tuple) -> str:
    sample = {int: "1", float: "0.5", str: "a"}
    items = args[:1] * 2 if len(args) == 2 and args[1] is Ellipsis else args
    return ",".join(sample.get(a, "?") for a in items)


def _check_range(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    if value is None or not meta:
        return
    checks = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
              ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
    bounds = [f"{sym} {meta[name]}" for name, sym, _ in checks if meta.get(name) is not None]
    for name, _, ok in checks:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{key} must be {' and '.join(bounds)}; got {value!r}")
