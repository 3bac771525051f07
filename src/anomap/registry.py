"""Methods by name. Methods register themselves; this module imports nothing from ``methods/``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from anomap.errors import ConfigError

_REGISTRY: dict[str, type[Any]] = {}
DEFAULT_METHOD = "gtrans_memory"  # what `anomap fit`, `demo`, `bench` and `anomap.create()` use when no method is named
T = TypeVar("T", bound=type[Any])


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a Method subclass available as ``name``. Duplicate names raise."""

    def deco(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def get_method_class(name: str) -> type[Any]:
    """The Method class registered as ``name``; a ConfigError naming the choices otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown method {name!r}.", fix=f"use one of: {', '.join(sorted(_REGISTRY)) or '(none)'}"
        )
    return _REGISTRY[name]


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)

