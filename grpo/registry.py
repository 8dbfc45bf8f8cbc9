"""A tiny name -> object registry, one instance per kind of pluggable thing.

Every registry in the project (loss aggregation, advantage scaling, multi-reward
combination, reward functions, rollout backends) is an instance of `Registry`, so all
of them fail the same way: an unknown name lists the valid ones, and registering a
name twice is an error rather than a silent override (verl's ``core_algos`` pattern).

    AGGREGATIONS = Registry("loss aggregation")

    @AGGREGATIONS.register("bnpo")
    def _bnpo(...): ...

    AGGREGATIONS.get("bnpo")      # -> the function
    AGGREGATIONS.get("nope")      # UnknownNameError: unknown loss aggregation 'nope'; valid: bnpo
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised by `Registry.get` for a name that was never registered.

    Derives from `KeyError` so ``except KeyError`` keeps working; `str()` gives the plain
    message (KeyError would otherwise wrap it in quotes).
    """

    def __str__(self) -> str:  # KeyError.__str__ repr()s its argument
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(ValueError):
    """Raised when a name is registered twice in the same registry."""


class Registry(Generic[T]):
    """Maps names to objects of one kind.

    Args:
      kind: human-readable kind used in error messages, e.g. ``"reward"``.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering the decorated object under `name`; returns it unchanged."""

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        """Registers `obj` under `name`; raises `DuplicateNameError` if taken."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._items:
            raise DuplicateNameError(
                f"{self.kind} {name!r} is already registered (by {_describe(self._items[name])}); pick another name"
            )
        self._items[name] = obj

    def get(self, name: str) -> T:
        """Returns the object registered as `name`; raises `UnknownNameError` listing valid names."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(self.names()) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"


def _describe(obj: object) -> str:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if module and qualname:
        return f"{module}.{qualname}"
    return repr(obj)
