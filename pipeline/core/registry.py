"""Name -> entry tables for the pipeline's extension points (attacks, sparsifiers, device kinds), in the spirit of
timm's model registry and torchao's config-type -> handler map.

An entry names its implementation either as an object or as ``"package.module:attr"``. The string form lets the
tables stay small and torch-free -- the config reads them to validate names before any work starts -- while the
implementation is imported only by the stage that runs it. A stage that loads entries this way lists the table in
``Stage.tables``, so that its code fingerprint covers every implementation the table names (pipeline/run).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Entry:
    name: str
    target: str | Callable | type | None   # "package.module:attr", the object itself, or None (nothing to run)
    settings: type | None = None           # frozen dataclass of the entry's own config keys, if it has any
    meta: dict = field(default_factory=dict)

    def load(self) -> Any:
        """The implementation (imported now if named by a string)."""
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            return getattr(importlib.import_module(module), attr)
        return self.target

    @property
    def module(self) -> str | None:
        """The module that implements the entry (what a code fingerprint must cover)."""
        if self.target is None:
            return None
        if isinstance(self.target, str):
            return self.target.partition(":")[0]
        return self.target.__module__


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, target, *, settings: type | None = None, **meta) -> Entry:
        """Add ``name``; a name is registered once (a second registration is a bug, not an override)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        entry = Entry(name, target, settings, dict(meta))
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def __getitem__(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r} (known: {', '.join(self._entries)})") from None

    def __contains__(self, name) -> bool:
        return name in self._entries

    def names(self) -> tuple[str, ...]:
        """In registration order (the order messages, reports and tables list them in)."""
        return tuple(self._entries)

    def entries(self) -> tuple[Entry, ...]:
        return tuple(self._entries.values())

    def modules(self) -> tuple[str, ...]:
        """Every implementing module, once each."""
        return tuple(dict.fromkeys(m for e in self._entries.values() if (m := e.module)))
