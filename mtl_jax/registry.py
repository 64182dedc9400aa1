"""Small named registries: task types, heads, losses, weightings, PEFT kinds, samplers, metrics.

A registry rejects duplicate names and, on a lookup miss, names every valid entry, so a typo in a
config is one clear line instead of a KeyError deep inside a step.
"""
from __future__ import annotations

from typing import Dict, Generic, Iterator, TypeVar

from mtl_jax.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object map for one kind of component (e.g. ``"weighting"``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str, obj: T | None = None):
        """Registers ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""
        if obj is None:
            def decorator(o: T) -> T:
                self.register(name, o)
                return o
            return decorator
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        return obj

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(
                f"unknown {self.kind} {name!r}; valid {self.kind} names: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
