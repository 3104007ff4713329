"""The fault interface, the report every fault returns, and the parameter machinery.

A fault is a frozen dataclass holding its parameters (:class:`Fault`, declared with
:func:`param`).  ``run()`` first draws a *plan* from the seeded ``rng``: one action per
connection (e.g. "RST after the request").  The plan alone makes the report's ``schedule``, so
the same parameters and seed always give the same schedule however the run goes.  The client
(:mod:`afterclose.harness.client`) then performs the actions, each on a fresh connection,
which tallies what it did and saw into a :class:`FaultReport`: counts, and observations (facts
such as bytes nobody asked for) that the rules judge.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import functools
import math
import random
import typing
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from afterclose.harness.client.plan import Planned, schedule_of
from afterclose.harness.control import ServerControl
from afterclose.harness.errors import ScenarioError
from afterclose.harness.oracle.evidence import Observation
from afterclose.harness.protocols.base import Protocol

MAX_OBSERVATIONS = 100
GONE_POLL_S = 0.05


def keepalive_hint(what: str) -> str:
    """Why a fault that needs a connection kept open found none, and the manifest key that
    helps."""
    return (
        f"no connection stayed open long enough for the {what}: the server closed each one "
        "first; if it keeps a connection open only when a request asks for it, or needs some "
        'header, set it in the manifest (request_headers = { Connection = "keep-alive" })'
    )


@dataclass(frozen=True)
class Endpoint:
    """Where the target listens.  ``echo_path``: its 2xx bodies contain the request path."""

    host: str
    port: int
    echo_path: bool = False
    io_timeout_s: float = 3.0
    # The manifest's ``request_headers`` (sent with every valid request) and ``large_path``
    # (asked for by the mid-response faults, whose answer must back up in the server).
    request_headers: tuple[tuple[str, str], ...] = ()
    large_path: str | None = None
    # Asked (at most every GONE_POLL_S) before each new connection: True once the target has
    # exited, so a fault stops hammering a dead port instead of running out its duration.
    gone: Callable[[], bool] | None = field(default=None, compare=False)
    # What the clients speak (None: HTTP/1.1), and whether over TLS.
    protocol: Protocol | None = None
    tls: bool = False


# Keys shown first, in this order, by FaultReport.summary(); others follow sorted.
_SUMMARY_ORDER = (
    "connections",
    "requests",
    "responses",
    "rst_sent",
    "fin_sent",
    "reset_by_peer",
    "closed_by_peer",
    "closed_without_answer",
)


@dataclass
class FaultReport:
    """What a fault did and saw.

    ``counts`` keys: ``connections`` (established), ``requests`` (whole valid requests sent),
    ``responses``, ``status:<code>``, ``rst_sent``, ``fin_sent`` (explicit ``shutdown(SHUT_WR)``),
    ``reset_by_peer`` (ECONNRESET/EPIPE), ``closed_by_peer`` (EOF), ``closed_without_answer``
    (whole requests never answered because the peer closed or reset, when the fault did not
    cause it), ``cut_by_deadline``, ``not_started``, ``errors:<kind>``, plus per-fault keys
    (``observations_dropped``: observations beyond MAX_OBSERVATIONS).
    ``observations``: facts for the rules (:mod:`afterclose.harness.oracle.evidence`).
    ``schedule`` is the plan, one line per connection, independent of timing.
    """

    fault: str
    counts: Counter[str] = field(default_factory=Counter)
    observations: list[Observation] = field(default_factory=list)
    schedule: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    # Why the fault could not be applied at all (set by Fault.check_applied), else "".
    unapplied: str = ""

    def count(self, key: str, n: int = 1) -> None:
        if n:
            self.counts[key] += n

    def observe(self, obs: Observation) -> None:
        """Keep what was seen, up to MAX_OBSERVATIONS; beyond that only count it."""
        if len(self.observations) < MAX_OBSERVATIONS:
            self.observations.append(obs)
        else:
            self.counts["observations_dropped"] += 1

    def merge(self, other: FaultReport) -> None:
        """Add ``other`` into this report (counts add up, lists concatenate)."""
        if other.fault and other.fault not in self.fault.split("+"):
            self.fault = f"{self.fault}+{other.fault}" if self.fault else other.fault
        self.counts.update(other.counts)
        for obs in other.observations:
            self.observe(obs)
        self.schedule.extend(other.schedule)
        self.elapsed_s += other.elapsed_s
        self.unapplied = self.unapplied or other.unapplied

    def summary(self) -> str:
        keys = [k for k in _SUMMARY_ORDER if self.counts.get(k)]
        keys += sorted(k for k in self.counts if k not in _SUMMARY_ORDER and self.counts[k])
        counts = ", ".join(f"{k}={self.counts[k]}" for k in keys) or "nothing done"
        seen = Counter(o.kind for o in self.observations)
        observed = ", ".join(f"{kind}={n}" for kind, n in sorted(seen.items())) or "no observation"
        return f"{self.fault}: {counts}; {observed}; {self.elapsed_s:.2f}s"


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Spec:
    """Allowed values of one parameter: a numeric range, or choices (also a mapping's keys)."""

    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    doc: str = ""

    def range_text(self) -> str:
        def show(x: float | None) -> str:
            return "" if x is None else (str(int(x)) if float(x).is_integer() else f"{x:g}")

        return f"{show(self.lo)}..{show(self.hi)}"


def param(
    default: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    choices: Sequence[str] = (),
    doc: str = "",
) -> Any:
    """A fault parameter: a dataclass field with its allowed values in the metadata."""
    spec = Spec(lo, hi, tuple(choices), doc)
    if isinstance(default, Mapping):
        frozen = dict(default)
        return field(default_factory=lambda: dict(frozen), metadata={"spec": spec})
    return field(default=default, metadata={"spec": spec})


def suggest(word: str, options: Sequence[str]) -> str | None:
    """The closest of ``options`` to a misspelt ``word``, if any is close."""
    matches = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _did_you_mean(word: str, options: Sequence[str], what: str) -> str:
    match = suggest(word, options)
    allowed = ", ".join(options)
    if match is not None:
        return f"did you mean {match!r}? ({what}: {allowed})"
    return f"use one of: {allowed}"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _Param:
    """One parameter of one fault class, as validation needs it."""

    def __init__(self, fault: str, name: str, kind: type, spec: Spec, default: object) -> None:
        self.fault = fault
        self.name = name
        self.kind = kind
        self.spec = spec
        self.default = default

    def _error(self, message: str, where: str, hint: str | None = None) -> ScenarioError:
        return ScenarioError(f"fault {self.fault!r}: {message}", where=where, hint=hint)

    def _check_range(self, label: str, value: float, where: str) -> None:
        lo, hi = self.spec.lo, self.spec.hi
        if math.isnan(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self._error(
                f"parameter {label!r} = {value!r} is out of range "
                f"(allowed: {self.spec.range_text()})",
                where,
            )

    def check(self, value: object, where: str) -> object:
        """``value`` normalised (ints become floats for float parameters), or ScenarioError."""
        name, spec = self.name, self.spec
        if self.kind is bool:
            if not isinstance(value, bool):
                raise self._error(f"parameter {name!r} must be true or false, got {value!r}", where)
            return value
        if self.kind in (int, float):
            whole = self.kind is int
            if not _is_number(value) or (whole and not isinstance(value, int)):
                raise self._error(
                    f"parameter {name!r} must be {'an integer' if whole else 'a number'} in "
                    f"{spec.range_text()}, got {value!r} ({type(value).__name__})",
                    where,
                )
            number = typing.cast(float, value) if whole else float(typing.cast(float, value))
            self._check_range(name, number, where)
            return number
        if self.kind is str:
            if not isinstance(value, str) or value not in spec.choices:
                raise self._error(
                    f"parameter {name!r} = {value!r} is not one of: {', '.join(spec.choices)}",
                    where,
                    _did_you_mean(str(value), spec.choices, f"allowed values of {name}"),
                )
            return value
        return self._check_mapping(value, where)

    def _check_mapping(self, value: object, where: str) -> dict[str, float]:
        name, spec = self.name, self.spec
        if not isinstance(value, Mapping):
            raise self._error(
                f"parameter {name!r} must be a table of name -> weight, got {value!r}", where
            )
        out: dict[str, float] = {}
        for key, weight in value.items():
            if not isinstance(key, str) or key not in spec.choices:
                raise self._error(
                    f"parameter {name!r} has unknown key {key!r} "
                    f"(allowed: {', '.join(spec.choices)})",
                    where,
                    _did_you_mean(str(key), spec.choices, f"allowed keys of {name}"),
                )
            if not _is_number(weight):
                raise self._error(
                    f"parameter '{name}.{key}' must be a number in {spec.range_text()}, "
                    f"got {weight!r}",
                    where,
                )
            self._check_range(f"{name}.{key}", float(weight), where)
            out[key] = float(weight)
        if not any(w > 0 for w in out.values()):
            raise self._error(f"parameter {name!r} needs at least one weight > 0", where)
        return out

    def describe(self) -> str:
        if self.kind is str:
            allowed = " | ".join(self.spec.choices)
        elif self.kind is bool:
            allowed = "true | false"
        elif self.kind in (int, float):
            allowed = f"{self.kind.__name__} {self.spec.range_text()}"
        else:
            allowed = f"{{{', '.join(self.spec.choices)}}} -> weight {self.spec.range_text()}"
        doc = f" - {self.spec.doc}" if self.spec.doc else ""
        return f"{self.name}: {allowed}, default {self.default!r}{doc}"


@functools.cache
def _params_of(cls: type[Fault]) -> dict[str, _Param]:
    hints = typing.get_type_hints(cls)
    out: dict[str, _Param] = {}
    for f in dataclasses.fields(typing.cast(Any, cls)):
        spec = f.metadata.get("spec", Spec())
        kind = hints[f.name]
        if typing.get_origin(kind) is not None:
            kind = dict  # Mapping[str, float]: the only generic parameter type
        if f.default is not dataclasses.MISSING:
            default: object = f.default
        else:
            default = typing.cast(Callable[[], object], f.default_factory)()
        out[f.name] = _Param(cls.name, f.name, kind, spec, default)
    return out


class Fault(abc.ABC):
    """One kind of fault.  Subclasses are frozen dataclasses whose fields are the parameters
    (declared with :func:`param`), registered under ``name`` = their module's name.
    """

    name: ClassVar[str]
    needs_server: ClassVar[bool] = False  # True: acts on the server itself, through run_on()
    # The counts that say the fault was applied: all of them 0 means it never was.
    applied_when: ClassVar[tuple[str, ...]] = ()
    # What was missing when it was not, and which manifest key fixes it.
    unapplied_hint: ClassVar[str] = ""
    # True: the fault itself may end connections it did not plan to (forged segments, limits,
    # signals, restarts): a request it left unanswered proves nothing about the server.
    disturbs_connections: ClassVar[bool] = False

    def __post_init__(self) -> None:
        where = f"fault {self.name}"
        for key, p in _params_of(type(self)).items():
            p.check(getattr(self, key), where)

    @classmethod
    def describe_params(cls) -> list[str]:
        """One line per parameter: name, allowed values, default, meaning."""
        return [p.describe() for p in _params_of(cls).values()]

    @classmethod
    def from_params(cls, params: Mapping[str, object], where: str) -> Self:
        """Validate ``params`` (missing ones take their defaults) and build the fault."""
        known = _params_of(cls)
        values: dict[str, object] = {}
        for key, value in params.items():
            p = known.get(key)
            if p is None:
                # ``where`` may name the fault already (the session's does).
                named = "" if where.endswith(f"fault {cls.name!r}") else f"fault {cls.name!r}: "
                raise ScenarioError(
                    f"{named}unknown parameter {key!r} (allowed: {', '.join(known)})",
                    where=where,
                    hint=_did_you_mean(str(key), list(known), f"parameters of {cls.name}"),
                )
            values[key] = p.check(value, where)
        return cls(**values)

    @classmethod
    def stretched(cls, params: Mapping[str, object], seconds: float) -> dict[str, object]:
        """``params`` with the fault's storm lasting at least ``seconds`` at its own rate
        (``--storm-duration``); a fault without a storm keeps them as they are."""
        return dict(params)

    @abc.abstractmethod
    def plan(self, rng: random.Random) -> Sequence[Planned]:
        """What each connection will do, drawn from ``rng`` alone (no I/O, no clock)."""

    def schedule(self, rng: random.Random) -> list[str]:
        """The schedule a run with this ``rng`` state reports (consumes ``rng`` like run())."""
        return schedule_of(self.plan(rng))

    def run(self, endpoint: Endpoint, rng: random.Random, deadline: float) -> FaultReport:
        """Do the fault against ``endpoint`` until done or ``deadline`` (``time.monotonic()``).

        ``rng`` is a seeded ``random.Random``; every random choice comes from it, before any I/O.
        """
        raise TypeError(f"fault {self.name!r} acts on a server, not an endpoint: use run_on()")

    def run_on(self, server: ServerControl, rng: random.Random, deadline: float) -> FaultReport:
        """:meth:`run` against ``server``'s endpoint; a fault that ``needs_server`` overrides
        this instead, and acts on ``server`` itself (limits, signals, restarts)."""
        return self.run(server.endpoint(), rng, deadline)

    def check_applied(self, report: FaultReport) -> str:
        """Record in ``report`` (and return) why the fault was never applied, or "".

        A fault that did nothing it exists for proves nothing about the server: the run is
        judged as usual, and then skipped with this reason instead of passing or failing."""
        keys = self.applied_when
        if (
            not keys
            or any(report.counts.get(k) for k in keys)
            or report.counts.get("stopped_target_gone")
        ):
            return ""
        report.unapplied = f"not applied ({' + '.join(keys)} = 0; {report.summary()})" + (
            f": {self.unapplied_hint}" if self.unapplied_hint else ""
        )
        return report.unapplied
