"""Faults: what the clients do to a target, one module per fault, looked up by name.

A fault's name is its module's name (``reset_peer`` lives in ``reset_peer.py``), and the module
defines exactly one :class:`~afterclose.faults.base.Fault` subclass.  Modules are imported only
when asked for, so a broken fault module breaks only the scenarios that use it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Mapping

from afterclose.faults.base import Fault, suggest
from afterclose.harness.errors import ScenarioError

__all__ = ["Fault", "available", "create", "get"]

_NOT_FAULTS = frozenset({"base"})


def available() -> list[str]:
    """Names of every fault, sorted."""
    return sorted(
        m.name
        for m in pkgutil.iter_modules(__path__)
        if not m.ispkg and not m.name.startswith("_") and m.name not in _NOT_FAULTS
    )


def get(name: str, where: str | None = None) -> type[Fault]:
    """The Fault class registered as ``name``; ScenarioError (with a suggestion) if none is."""
    names = available()
    if name not in names:
        match = suggest(name, names) if isinstance(name, str) else None
        listing = ", ".join(names)
        hint = f"did you mean {match!r}? (faults: {listing})" if match else f"use one of: {listing}"
        raise ScenarioError(f"unknown fault {name!r}", where=where, hint=hint)
    module = importlib.import_module(f"{__name__}.{name}")
    found = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, Fault)
        and obj.__module__ == module.__name__
        and not inspect.isabstract(obj)
    ]
    if len(found) != 1:
        raise TypeError(f"{module.__name__} must define exactly one Fault, found {len(found)}")
    cls = found[0]
    if cls.name != name:
        raise TypeError(f"{cls.__qualname__}.name is {cls.name!r}, expected {name!r}")
    return cls


def create(name: str, params: Mapping[str, object], where: str) -> Fault:
    """The fault ``name`` built from ``params`` (validated; errors name ``where``)."""
    return get(name, where).from_params(params, where)
