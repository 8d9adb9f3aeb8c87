"""Typed, self-validating configs (the torchtitan pattern, without a framework).

Every component owns a ``@dataclass`` that subclasses :class:`Config` and checks its own invariants in
``validate()``. Building from plain dicts (YAML, CLI overrides) type-checks every field and reports errors
with the full dotted path, the bad value and what is allowed, so a typo fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

from dimsum.errors import UserError

C = TypeVar("C", bound="Config")


class ConfigError(UserError, ValueError):
    """A config value is wrong. ``path`` is the dotted field, e.g. ``train.global_batch``."""

    def __init__(self, path: str, value: Any, allowed: str) -> None:
        self.path, self.value, self.allowed = path, value, allowed
        super().__init__(f"{path}: got {value!r}; {allowed}")

    def under(self, prefix: str) -> ConfigError:
        """The same error, seen from an enclosing config."""
        return ConfigError(f"{prefix}.{self.path}" if prefix else self.path, self.value, self.allowed)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float, lists to tuples)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), path)
    if isinstance(tp, type) and issubclass(tp, Config):
        if not isinstance(value, Mapping):
            raise ConfigError(path, value, f"expected a mapping of {tp.__name__} fields")
        return tp.from_dict(value, path)
    if origin in (tuple, list):
        return _coerce_list(value, tp, path)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, value, "expected a mapping")
        return dict(value)
    return _coerce_scalar(value, tp, path)


def _coerce_union(value: Any, arms: tuple[Any, ...], path: str) -> Any:
    if value is None and type(None) in arms:
        return None
    errors = []
    for arm in (a for a in arms if a is not type(None)):
        try:
            return _coerce(value, arm, path)
        except ConfigError as err:
            errors.append(err.allowed)
    raise ConfigError(path, value, " or ".join(errors))


def _coerce_list(value: Any, tp: Any, path: str) -> list[Any] | tuple[Any, ...]:
    (item_type, *_) = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(path, value, f"expected a list of {_describe(item_type)}")
    items = [_coerce(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if typing.get_origin(tp) is tuple else items


def _coerce_scalar(value: Any, tp: Any, path: str) -> Any:
    """bool is an int subclass in Python, but ``lr: true`` is a typo, not 1.0 (nor ZeRO stage 1)."""
    if typing.get_origin(tp) is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise ConfigError(path, value, f"expected {_describe(tp)}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(path, value, f"expected {tp.__name__}")
    if tp is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, tp):
        raise ConfigError(path, value, f"expected {tp.__name__}")
    return value


@dataclasses.dataclass
class Config:
    """Base for component configs: build with :meth:`from_dict`, check with :meth:`validate`."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` (via :meth:`check`) when a field value is not allowed."""

    def check(self, ok: bool, field: str, allowed: str) -> None:
        """Fail with the field's name, its value and what would have been allowed."""
        if not ok:
            raise ConfigError(field, getattr(self, field), allowed)

    @classmethod
    def defaults_for(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """Field values to start from before ``data`` is applied (e.g. a registry entry)."""
        return {}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], path: str = "") -> C:
        """Build and validate; every error names the full dotted path of the bad field."""
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = [k for k in data if k not in names]
        if unknown:
            key = unknown[0]
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            allowed = f"unknown key{hint}; allowed keys: {', '.join(names)}"
            raise ConfigError(_join(path, key), data[key], allowed)
        try:
            merged = {**cls.defaults_for(data), **data}
        except ConfigError as err:
            raise err.under(path) from None
        values = {k: _coerce(v, hints[k], _join(path, k)) for k, v in merged.items()}
        obj = cls(**values)
        try:
            obj.validate()
        except ConfigError as err:
            raise err.under(path) from None
        return obj

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe dict (tuples become lists)."""

        def plain(v: Any) -> Any:
            if isinstance(v, Config):
                return v.to_dict()
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            return v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)
