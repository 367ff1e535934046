"""Typed configs: frozen dataclasses that YAML and `key=value` overrides only fill.

Each stage module owns its config dataclass; `PipelineConfig` (in `digr.pipeline.run`) nests
them. `load(cls, yaml_path, overrides)` builds any of them, and raises `ConfigError` naming
the offending key (`sft.epochs: expected int, got 'ten'`) for unknown keys and wrong types.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


class _Raw(str):
    """A command-line value: parsed as YAML for typed fields, kept verbatim for str fields
    (so `ingest.name=0123` stays "0123" instead of becoming the octal int 83)."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    if isinstance(value, _Raw):
        if tp is str:
            return str(value)
        value = yaml.safe_load(value) if value != "" else ""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is tuple:
        if isinstance(value, str):
            value = [_Raw(v) for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]  # a single value for a tuple field: `evaluate.ks=10`
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict; unknown keys and wrong types raise."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> Any:
    """A config (dataclass, or already plain data) as JSON-able plain data."""
    payload = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return json.loads(json.dumps(payload, default=str))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["sft.epochs=3", "ingest.source=inter-json"]` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _Raw(raw)
    return out


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = merge_dicts(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load(cls: type[T], path: str | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of `cls`, then the YAML file at `path` (if any), then `key=value` overrides."""
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    data = merge_dicts(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def config_hash(obj: Any) -> str:
    """Stable short hash of a config (dataclass or plain JSON-able value)."""
    payload = to_dict(obj)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
