"""One registry per kind (domains, SSL methods, backbones), filled by the modules themselves.

An entry may be registered lazily, by "package.module:attribute", so that checking a name in
params.yaml never imports torch. A method entry also names its options dataclass (torch-free),
which `load_config` binds `pretrain.options` to before any stage runs; a method in a file of its own
may name its options by "package.module:Class" too (imported only when that method is chosen).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from typing import Callable, Generic, TypeVar

from ssl_models.core.errors import PipelineError

T = TypeVar("T")


@dataclasses.dataclass
class NoOptions:
    """A method or backbone without options of its own."""


class Registry(Generic[T]):
    """Name -> object map; an unknown name fails with the list of valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._lazy: dict[str, str] = {}  # name -> "package.module:attribute", imported on first use
        self._options: dict[str, type | str] = {}

    def register_lazy(self, name: str, target: str, options: type | str = NoOptions) -> None:
        """Name an entry without importing it: validation stays cheap (no torch import)."""
        self._lazy[name] = target
        self._options[name] = options

    def register(self, name: str, options: type | None = None) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            if options is not None or name not in self._options:
                self._options[name] = options or NoOptions
            return entry

        return add

    def check(self, name: str, where: str | None = None) -> None:
        """Fail with the list of valid names when `name` is not registered."""
        if name not in self:
            valid = ", ".join(self.names()) or "(none)"
            place = f"params.yaml {where}: " if where else ""
            raise PipelineError(f"{place}unknown {self.kind} {name!r}; valid names: {valid}")

    def options(self, name: str) -> type:
        """The options dataclass of entry `name` (known without importing the entry, unless it was
        registered by "package.module:Class")."""
        self.check(name)
        options = self._options[name]
        if isinstance(options, str):
            module, _, attribute = options.partition(":")
            options = self._options[name] = getattr(importlib.import_module(module), attribute)
        return options

    def get(self, name: str) -> T:
        self.check(name)
        if name not in self._entries:
            module, _, attribute = self._lazy[name].partition(":")
            importlib.import_module(module)  # its decorator may register the entry
            if name not in self._entries:
                self._entries[name] = getattr(sys.modules[module], attribute)
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(set(self._entries) | set(self._lazy))

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._lazy
