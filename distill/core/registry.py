"""Registries by name that fail loudly, and constructors that are their own config schema (docs/design.md §2.2)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "ConfigError", "check_kwargs"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration value: the message is one line naming what was wrong and what is valid."""


def check_kwargs(fn: Callable[..., Any], kwargs: Mapping[str, Any], where: str) -> None:
    """Raise :class:`ConfigError` if ``kwargs`` has keys ``fn`` does not accept (unless it takes ``**kwargs``)."""
    sig = inspect.signature(fn)
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} for {where}; valid keys: {', '.join(sorted(valid))}")


class Registry(Generic[T]):
    """Map names to classes or factories. ``@REG.register("name")`` adds one; :meth:`get` fails with the valid names."""

    def __init__(self, kind: str, plural: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or (kind + "es" if kind.endswith(("s", "sh", "ch", "x")) else kind + "s")
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            try:
                obj.registry_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} {name!r}; valid {self.plural}: {', '.join(self.names())}")
        return self._items[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        """Construct ``name`` with ``kwargs``, rejecting keys its constructor does not take."""
        obj = self.get(name)
        check_kwargs(obj, kwargs, f"{self.kind} {name!r}")
        return obj(**kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(self.names())
