"""One registry per kind (domains, SSL methods, backbones), filled by the modules themselves."""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Generic, TypeVar

from ssl_models.core.errors import PipelineError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object map; an unknown name fails with the list of valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._lazy: dict[str, str] = {}  # name -> "package.module:attribute", imported on first use

    def register_lazy(self, name: str, target: str) -> None:
        """Name an entry without importing it: validation stays cheap (no torch import)."""
        self._lazy[name] = target

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def check(self, name: str) -> None:
        """Fail with the list of valid names when `name` is not registered."""
        if name not in self:
            valid = ", ".join(self.names()) or "(none)"
            raise PipelineError(f"unknown {self.kind} {name!r}; valid names: {valid}")

    def get(self, name: str) -> T:
        self.check(name)
        if name not in self._entries:
            module, _, attribute = self._lazy[name].partition(":")
            importlib.import_module(module)  # its decorator registers the entry
            if name not in self._entries:
                self._entries[name] = getattr(sys.modules[module], attribute)
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(set(self._entries) | set(self._lazy))

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._lazy
