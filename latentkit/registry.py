"""Typed name → implementation registries, extensible by decorator and by entry points.

A third-party package adds a scheduler without touching latentkit by declaring, in its
``pyproject.toml``::

    [project.entry-points."latentkit.schedulers"]
    my-sampler = "my_package.sampler:MySampler"

Entry points are read once, the first time a registry is asked for a name it lacks or for
its full list of names, so importing latentkit stays cheap.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from latentkit.errors import InvalidArgumentError, UnknownNameError

T = TypeVar("T")
logger = logging.getLogger("latentkit")


def normalize(name: str) -> str:
    """The lookup key for a name: case, spaces, underscores and dashes do not matter."""
    return re.sub(r"[\s_\-]+", "-", name.strip().lower())


class Registry(Mapping[str, T], Generic[T]):
    """A read-only mapping from registered names to implementations, plus aliases.

    An alias may carry preset options (A1111's "DPM++ 2M Karras" is ``dpm-solver++`` with
    Karras sigmas); `resolve` returns the canonical name and those options.
    """

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._items: dict[str, T] = {}
        self._aliases: dict[str, tuple[str, dict[str, Any]]] = {}
        self._entry_points_loaded = False
        self._lock = threading.RLock()

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        """Decorator registering an implementation under ``name``."""

        def decorate(item: T) -> T:
            self.add(name, item, replace=replace)
            return item

        return decorate

    def add(self, name: str, item: T, *, replace: bool = False) -> None:
        """Register ``item`` under ``name``; re-registering a taken name needs ``replace=True``."""
        key = normalize(name)
        if key in self._items and self._items[key] is not item and not replace:
            raise InvalidArgumentError(
                f"{self.kind} {name!r} is already registered; pass replace=True to override it"
            )
        self._items[key] = item

    def alias(self, alias: str, name: str, **options: Any) -> None:
        """Make ``alias`` resolve to the registered ``name`` with preset ``options``."""
        self._aliases[normalize(alias)] = (normalize(name), options)

    def resolve(self, name: str) -> tuple[str, dict[str, Any]]:
        """The canonical name and preset options for ``name`` (a name or an alias)."""
        key = normalize(name)
        if key not in self._items and key not in self._aliases:
            self._load_entry_points()
        if key in self._items:
            return key, {}
        if key in self._aliases:
            target, options = self._aliases[key]
            return target, dict(options)
        raise UnknownNameError(self.kind, name, self.names())

    def names(self) -> list[str]:
        """Every registered name (not aliases), sorted."""
        self._load_entry_points()
        return sorted(self._items)

    def aliases(self) -> dict[str, str]:
        """Alias → registered name."""
        return {alias: target for alias, (target, _) in self._aliases.items()}

    def __getitem__(self, name: str) -> T:
        return self._items[self.resolve(name)[0]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def _load_entry_points(self) -> None:
        with self._lock:  # once, and never half-seen by another thread
            if self._entry_points_loaded:
                return
            for ep in entry_points(group=self.group):
                if normalize(ep.name) in self._items:
                    continue
                try:
                    self.add(ep.name, ep.load())
                except Exception as e:  # a broken plugin must not break latentkit itself
                    logger.warning("skipping %s %r from %s: %s", self.kind, ep.name, ep.value, e)
            self._entry_points_loaded = True
