"""Faults: what the clients do to a target, one module per fault, looked up by name.

A fault's name is its module's name (``reset_peer`` lives in ``reset_peer.py``), and the module
defines exactly one :class:`~afterclose.faults.base.Fault` subclass.  Modules are imported only
when asked for, so a broken fault module breaks only the scenarios that use it.

Target-side faults (``fd_limit``, ``pause``, ``kill``, ...) are Faults too, with
``needs_server`` set: they act on the started server through a
:class:`~afterclose.harness.control.ServerControl` instead of through clients.
``available()``/``get()``/``create()`` mean client-side faults, as scenario phases and the
explorer need them (a target-side name gets an error that says so); ``available("target")``,
``get_target()`` and ``create_target()`` the target-side ones; ``available("all")`` and
``get_any()`` both.  ``TargetRun.run_fault`` runs either kind through ``Fault.run_on``
(``kind()`` tells them apart).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Mapping
from typing import Literal

from afterclose.faults.base import Fault, suggest
from afterclose.harness.errors import ScenarioError

__all__ = [
    "Fault",
    "available",
    "create",
    "create_target",
    "get",
    "get_any",
    "get_target",
    "kind",
]

Kind = Literal["client", "target"]
_NOT_FAULTS = frozenset({"base"})


def _names() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.iter_modules(__path__)
        if not m.ispkg and not m.name.startswith("_") and m.name not in _NOT_FAULTS
    )


def available(kind: Kind | Literal["all"] = "client") -> list[str]:
    """Names of the client-side faults (or the ``"target"``-side ones, or ``"all"``), sorted."""
    names = _names()
    if kind == "all":
        return names
    return [name for name in names if _kind_of(get_any(name)) == kind]


def get_any(name: str, where: str | None = None) -> type[Fault]:
    """The fault class registered as ``name``, of either kind; ScenarioError (with a
    suggestion) if none is."""
    names = _names()
    if name not in names:
        match = suggest(name, names) if isinstance(name, str) else None
        listing = ", ".join(names)
        hint = f"did you mean {match!r}? (faults: {listing})" if match else f"use one of: {listing}"
        raise ScenarioError(f"unknown fault {name!r}", where=where, hint=hint)
    module = importlib.import_module(f"{__name__}.{name}")
    found: list[type[Fault]] = [
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
    acts = "run_on" if cls.needs_server else "run"
    if getattr(cls, acts) is getattr(Fault, acts):
        raise TypeError(
            f"{cls.__qualname__} must define {acts}() (needs_server={cls.needs_server})"
        )
    return cls


def _kind_of(cls: type[Fault]) -> Kind:
    return "target" if cls.needs_server else "client"


def kind(name: str, where: str | None = None) -> Kind:
    """``"client"`` (acts through connections) or ``"target"`` (acts on the running target)."""
    return _kind_of(get_any(name, where))


def get(name: str, where: str | None = None) -> type[Fault]:
    """The client-side Fault class registered as ``name``; ScenarioError (with a suggestion)
    if none is, or if ``name`` is a target-side fault (it needs the running target)."""
    cls = get_any(name, where)
    if cls.needs_server:
        raise ScenarioError(
            f"fault {name!r} acts on the running target itself (a target-side fault), "
            "not through client connections",
            where=where,
            hint=f"call it from a test: target.run_fault({name!r}, ...); "
            f"client-side faults: {', '.join(available())}",
        )
    return cls


def get_target(name: str, where: str | None = None) -> type[Fault]:
    """The target-side fault class registered as ``name`` (ScenarioError otherwise)."""
    cls = get_any(name, where)
    if not cls.needs_server:
        raise ScenarioError(
            f"fault {name!r} is a client-side fault, not a target-side one",
            where=where,
            hint=f"target-side faults: {', '.join(available('target'))}",
        )
    return cls


def create(name: str, params: Mapping[str, object], where: str) -> Fault:
    """The client-side fault ``name`` built from ``params`` (validated; errors name ``where``)."""
    return get(name, where).from_params(params, where)


def create_target(name: str, params: Mapping[str, object], where: str) -> Fault:
    """The target-side fault ``name`` built from ``params`` (validated)."""
    return get_target(name, where).from_params(params, where)
