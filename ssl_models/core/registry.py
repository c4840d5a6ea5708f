"""One registry per kind (domains, SSL methods, backbones), filled by the modules themselves."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from ssl_models.core.errors import PipelineError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object map; an unknown name fails with the list of valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            valid = ", ".join(sorted(self._entries)) or "(none)"
            raise PipelineError(f"unknown {self.kind} {name!r}; valid names: {valid}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
