"""The fault interface, the report every fault returns, and the machinery they share.

A fault is a frozen dataclass holding its parameters (:class:`Fault`).  ``run()`` first draws a
*plan* from the seeded ``rng``: one :class:`Action` per connection (e.g. "RST after the request").
The plan alone makes the report's ``schedule``, so the same parameters and seed always give the
same schedule however the run goes.  :func:`drive` then performs the actions on worker threads,
each on a fresh :class:`Conn`, which tallies what it did and saw into a :class:`FaultReport` and
records bytes the client never asked for as observations (the cross-talk rule judges them).
That bookkeeping lives in :class:`ConnState`, which ``connection_storm``'s asyncio connections
share (its engine runs in worker processes: ``_storm_engine.py``).

Every blocking socket call runs under a timeout bounded by the run's deadline (and by the
endpoint's ``io_timeout_s``), so a run returns within milliseconds of its deadline.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import errno
import functools
import math
import random
import socket
import threading
import time
import typing
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self

from afterclose.harness import httpclient
from afterclose.harness.control import ServerControl
from afterclose.harness.errors import ScenarioError
from afterclose.harness.oracle import evidence
from afterclose.harness.oracle.evidence import Observation

MAX_OBSERVATIONS = 100
GONE_POLL_S = 0.05
_SHOWN_BYTES = 120


@dataclass(frozen=True)
class Endpoint:
    """Where the target listens.  ``echo_path``: its 2xx bodies contain the request path."""

    host: str
    port: int
    echo_path: bool = False
    io_timeout_s: float = 3.0
    # Asked (at most every GONE_POLL_S) before each new connection: True once the target has
    # exited, so a fault stops hammering a dead port instead of running out its duration.
    gone: Callable[[], bool] | None = field(default=None, compare=False)


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
    cause it), ``cut_by_deadline``, ``not_started``, ``errors:<kind>``, plus per-fault keys.
    ``schedule`` is the plan, one line per connection, independent of timing.
    """

    fault: str
    counts: Counter[str] = field(default_factory=Counter)
    observations: list[Observation] = field(default_factory=list)
    schedule: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

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
                raise ScenarioError(
                    f"fault {cls.name!r}: unknown parameter {key!r} (allowed: {', '.join(known)})",
                    where=where,
                    hint=_did_you_mean(str(key), list(known), f"parameters of {cls.name}"),
                )
            values[key] = p.check(value, where)
        return cls(**values)

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


# --------------------------------------------------------------------------- connections


class DeadlineReached(Exception):
    """The run's deadline passed while a connection was in the middle of something."""


@dataclass(frozen=True)
class Target:
    """An endpoint resolved once per run, and the names of the run's requests."""

    fault: str
    endpoint: Endpoint
    family: socket.AddressFamily
    sockaddr: tuple[Any, ...]
    paths: httpclient.PathGen

    @classmethod
    def resolve(cls, fault: str, endpoint: Endpoint, run_id: str | None = None) -> Target:
        try:
            infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ScenarioError(
                f"cannot resolve {endpoint.host!r}: {exc}", where=f"fault {fault}"
            ) from None
        family, _, _, _, sockaddr = infos[0]
        return cls(fault, endpoint, family, tuple(sockaddr), httpclient.PathGen(run_id))


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__).lower()


class ConnState:
    """What one client connection did and saw, without the I/O: the bookkeeping that the
    blocking :class:`Conn` and the storm's asyncio connection share.

    ``awaiting`` lists the requests sent and not yet answered, oldest first: a path (answer
    required, body checked when the target echoes paths) or None (a malformed request, whose
    answer may be an error response or a close).
    """

    def __init__(self, target: Target, index: int, report: FaultReport, deadline: float) -> None:
        self.target = target
        self.endpoint = target.endpoint
        self.index = index
        self.report = report
        self.deadline = deadline
        self.sock: socket.socket | None = None
        self.awaiting: deque[str | None] = deque()
        self.sent_any = False
        self.last_answered: str | None = None
        self.gone = False  # the peer closed or reset the connection
        self._next_req = 0

    def _label(self) -> str:
        return f"{self.target.fault} conn {self.index}"

    def _op_deadline(self) -> float:
        now = time.monotonic()
        if now >= self.deadline:
            raise DeadlineReached
        return min(self.deadline, now + self.endpoint.io_timeout_s)

    def _new_socket(self) -> socket.socket:
        sock = socket.socket(self.target.family, socket.SOCK_STREAM)
        # Without TCP_NODELAY, Nagle holds a small write back while an earlier one is unACKed,
        # and the peer delays its ACK (up to 40 ms on Linux): requests written one at a time
        # would reach the server late and coalesced, not in the order and timing we planned.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _connected(self, sock: socket.socket) -> None:
        self.sock = sock
        self.report.count("connections")

    def _connect_failed(self, exc: OSError) -> None:
        self.report.count(f"errors:connect_{_errno_name(exc)}")

    def _timed_out(self, what: str) -> None:
        if time.monotonic() >= self.deadline - 0.002:
            raise DeadlineReached
        self.report.count(f"errors:timeout_{what}")

    def _peer_gone(self, reset: bool) -> None:
        self.gone = True
        self.report.count("reset_by_peer" if reset else "closed_by_peer")
        self._unanswered()

    def _unanswered(self) -> None:
        self.report.count("closed_without_answer", sum(p is not None for p in self.awaiting))
        self.awaiting.clear()

    def _unsolicited(self, data: bytes, when: str) -> None:
        if not self.sent_any:
            context = "before sending any request"
        elif self.last_answered is not None and not self.awaiting:
            context = f"after the response to {self.last_answered}, with no request outstanding"
        else:
            context = when
        owners = httpclient.paths_in(data)
        whose = f" (mentions {', '.join(owners[:3])})" if owners else ""
        self.report.observe(
            Observation(
                evidence.UNSOLICITED_BYTES,
                self._label(),
                f"received {len(data)} unasked-for bytes {context}{whose}: {data[:_SHOWN_BYTES]!r}",
                data=data[:_SHOWN_BYTES],
            )
        )

    def next_path(self) -> str:
        """A fresh path naming the next request of this connection."""
        path = self.target.paths.path(self.index, self._next_req)
        self._next_req += 1
        return path

    def new_request(self, *, close: bool = False) -> tuple[str, bytes]:
        """The next GET of this connection: ``(path, bytes)``."""
        path = self.next_path()
        host = self.endpoint.host
        return path, httpclient.build_get(path, host, self.endpoint.port, close=close)

    def new_requests(self, count: int, *, close_last: bool = False) -> tuple[bytes, list[str]]:
        """``count`` GETs to pipeline in one write, and their paths."""
        reqs = [self.new_request(close=close_last and i == count - 1) for i in range(count)]
        return b"".join(r for _, r in reqs), [p for p, _ in reqs]

    def _sent(self, completes: Sequence[str | None]) -> None:
        self.sent_any = True
        for path in completes:
            self.awaiting.append(path)
            if path is not None:
                self.report.count("requests")

    def _send_failed(self, exc: OSError) -> None:
        if isinstance(exc, ConnectionResetError | BrokenPipeError):
            # EPIPE means the socket is already fully shut, which for a connection we never
            # shut ourselves means the peer's RST arrived first.  (Python ignores SIGPIPE, so
            # this is an error, not a signal.)
            self._peer_gone(True)
        else:
            self.report.count(f"errors:send_{_errno_name(exc)}")

    def _no_answer(self, exc: httpclient.NoAnswer, expected: str | None) -> None:
        if expected is not None:
            self.awaiting.appendleft(expected)
        if exc.partial:
            self.report.count("truncated_responses")
        self._peer_gone(exc.reset)

    def _answered(self, response: httpclient.Response, expected: str | None) -> None:
        self.report.count("responses")
        self.report.count(f"status:{response.status}")
        if expected is not None:
            self.last_answered = expected
            self._check_echo(expected, response)

    def _unsolicited_garbage(self, exc: httpclient.GarbageResponse, expected: str | None) -> None:
        self.report.count("errors:garbage")
        # Not HTTP is not proof of cross-talk by itself, but bytes naming another request are.
        owners = [p for p in httpclient.paths_in(exc.partial) if p != expected]
        if owners:
            self.report.observe(
                Observation(
                    evidence.FOREIGN_ANSWER,
                    self._label(),
                    f"waiting for the answer to {expected}, got non-HTTP bytes "
                    f"mentioning {', '.join(owners[:3])}: {exc.partial[:_SHOWN_BYTES]!r}",
                    data=exc.partial[:_SHOWN_BYTES],
                )
            )

    def _check_echo(self, path: str, response: httpclient.Response) -> None:
        if not self.endpoint.echo_path or not 200 <= response.status < 300:
            return
        if httpclient.echoes(response.body, path):
            return
        others = httpclient.paths_in(response.body)
        whose = f"the answer to {', '.join(others[:3])}" if others else "no request path"
        self.report.observe(
            Observation(
                evidence.FOREIGN_ANSWER,
                self._label(),
                f"the {response.status} response to {path} carries {whose}: "
                f"body {response.body[:_SHOWN_BYTES]!r}",
                data=response.body[:_SHOWN_BYTES],
            )
        )

    def _shutdown_failed(self, exc: OSError) -> None:
        if exc.errno in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE):
            # ENOTCONN here means the peer's RST already tore the connection down.
            self._peer_gone(True)
        else:
            self.report.count(f"errors:shutdown_{_errno_name(exc)}")

    def shutdown_write(self) -> bool:
        """Half-close: send a FIN but keep reading (never blocks)."""
        assert self.sock is not None, "connect() first"
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._shutdown_failed(exc)
            return False
        self.report.count("fin_sent")
        return True

    def rst(self) -> None:
        """Abort the connection with a RST (SO_LINGER {1, 0}); the fault meant it."""
        if self.sock is not None:
            httpclient.rst_close(self.sock)
            self.sock = None
            self.awaiting.clear()
            self.report.count("rst_sent")

    def close(self) -> None:
        """A plain close().  Linux sends a FIN, unless received bytes are still unread: then
        it sends a RST instead (RFC 2525 2.17), since the peer's data was never consumed.
        """
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Conn(ConnState):
    """One client connection: blocking socket calls under deadlines, tallied into a report."""

    def __init__(self, target: Target, index: int, report: FaultReport, deadline: float) -> None:
        super().__init__(target, index, report, deadline)
        self.reader: httpclient.ResponseReader | None = None

    def _arm(self) -> socket.socket:
        assert self.sock is not None, "connect() first"
        self.sock.settimeout(max(self._op_deadline() - time.monotonic(), 0.001))
        return self.sock

    # -- actions

    def connect(self) -> bool:
        sock = self._new_socket()
        try:
            sock.settimeout(max(self._op_deadline() - time.monotonic(), 0.001))
            sock.connect(self.target.sockaddr)
        except TimeoutError:
            sock.close()
            self._timed_out("connect")
            return False
        except OSError as exc:
            sock.close()
            self._connect_failed(exc)
            return False
        except BaseException:
            sock.close()
            raise
        self.reader = httpclient.ResponseReader(sock)
        self._connected(sock)
        return True

    def send(self, data: bytes, completes: Sequence[str | None] = ()) -> bool:
        """Send ``data``; ``completes`` are the requests it finishes (see ``awaiting``).

        False if the peer is gone (counted as ``reset_by_peer``) or on any other error.
        """
        try:
            self._arm().sendall(data)
        except TimeoutError:
            self._timed_out("send")
            return False
        except OSError as exc:
            self._send_failed(exc)
            return False
        self._sent(completes)
        return True

    def send_requests(self, count: int, *, close_last: bool = False) -> bool:
        """Pipeline ``count`` GETs in one write."""
        data, paths = self.new_requests(count, close_last=close_last)
        return self.send(data, paths)

    def read_response(self) -> httpclient.Response | None:
        """The answer to the oldest request in ``awaiting``, or None (failure counted)."""
        assert self.reader is not None, "connect() first"
        expected = self.awaiting.popleft() if self.awaiting else None
        try:
            response = self.reader.read_response(self._op_deadline())
        except httpclient.NoAnswer as exc:
            self._no_answer(exc, expected)
            return None
        except httpclient.HttpTimeout:
            self._timed_out("response")
            return None
        except httpclient.GarbageResponse as exc:
            self._unsolicited_garbage(exc, expected)
            return None
        self._answered(response, expected)
        return response

    def read_some(self, max_bytes: int) -> bytes:
        """One recv() of at most ``max_bytes`` of the answers, or b"" (EOF/RST/timeout counted)."""
        assert self.sock is not None and self.reader is not None, "connect() first"
        data = self.reader.parser.take_buffered()[:max_bytes]
        if data:
            return data
        try:
            data = self._arm().recv(max_bytes)
        except TimeoutError:
            self._timed_out("response")
            return b""
        except ConnectionResetError:
            self._peer_gone(True)
            return b""
        if not data:
            self.reader.parser.feed_eof()
            self._peer_gone(False)
        return data

    def check_quiet(self, wait_s: float = 0.0) -> bool:
        """Expect no bytes now (none asked for): any is cross-talk.  Watches for up to
        ``wait_s``; returns False if the peer closed or reset the connection meanwhile.
        """
        assert self.sock is not None and self.reader is not None, "connect() first"
        extra = self.reader.parser.take_buffered()
        alive = not self.reader.parser.eof
        if not extra and alive:
            wait = min(wait_s, max(self.deadline - time.monotonic(), 0.0))
            # A zero timeout makes the socket non-blocking: recv() then only reports what the
            # kernel already queued.
            self.sock.settimeout(wait)
            try:
                extra = self.sock.recv(httpclient.RECV_SIZE)
            except (BlockingIOError, TimeoutError):
                extra = b""
            except ConnectionResetError:
                self._peer_gone(True)
                return False
            else:
                if not extra:
                    self.reader.parser.feed_eof()
                    self._peer_gone(False)
                    return False
        if extra:
            self._unsolicited(extra, "while no answer was due")
        return alive

    def read_to_eof(self) -> None:
        """After the last answer, expect only EOF or RST: any byte before it is cross-talk."""
        assert self.reader is not None, "connect() first"
        try:
            data, reset = self.reader.read_until_eof(self._op_deadline())
        except httpclient.HttpTimeout as exc:
            if exc.partial:
                self._unsolicited(exc.partial, "while waiting for the close")
            self._timed_out("close")
            return
        if data:
            self._unsolicited(data, "while waiting for the close")
        self._peer_gone(reset)


class Planned(Protocol):
    """One connection's share of a plan, as the schedule shows it."""

    def describe(self) -> str:
        """A compact, timing-free description for the schedule."""
        ...


class Action(Planned, Protocol):
    """What one connection does; drawn from the rng before the run, performed on a thread."""

    def perform(self, conn: Conn) -> None: ...


# --------------------------------------------------------------------------- driving


def schedule_of(actions: Sequence[Planned]) -> list[str]:
    return [f"conn {i}: {a.describe()}" for i, a in enumerate(actions)]


def drive(
    fault: str,
    endpoint: Endpoint,
    actions: Sequence[Action],
    *,
    concurrency: int,
    deadline: float,
    rate_per_s: float | None = None,
    duration_s: float | None = None,
) -> FaultReport:
    """Perform ``actions[i]`` on connection ``i``, ``concurrency`` at a time.

    With ``rate_per_s``, connection ``i`` starts no earlier than ``i / rate_per_s`` after the
    start; nothing new starts after ``duration_s`` or the deadline.  Every blocking call is
    bounded by the deadline, so this returns shortly after it.
    """
    report = FaultReport(fault, schedule=schedule_of(actions))
    target = Target.resolve(fault, endpoint)
    start = time.monotonic()
    stop = deadline if duration_s is None else min(deadline, start + duration_s)
    indices = iter(range(len(actions)))
    lock = threading.Lock()
    failures: list[BaseException] = []
    workers = [FaultReport(fault) for _ in range(max(min(concurrency, len(actions)), 0))]
    started = [0] * len(workers)
    gone = [False, 0.0]  # target gone?, when last asked

    def target_gone() -> bool:
        if endpoint.gone is None:
            return False
        with lock:
            now = time.monotonic()
            if not gone[0] and now - float(gone[1]) >= GONE_POLL_S:
                gone[0], gone[1] = endpoint.gone(), now
            return bool(gone[0])

    def work(slot: int) -> None:
        tally = workers[slot]
        try:
            while not failures:
                with lock:
                    i = next(indices, None)
                if i is None:
                    return
                if rate_per_s:
                    at = start + i / rate_per_s
                    if at >= stop:
                        return
                    time.sleep(max(at - time.monotonic(), 0.0))  # read the clock once
                if time.monotonic() >= stop or target_gone():
                    return
                started[slot] += 1
                conn = Conn(target, i, tally, deadline)
                try:
                    actions[i].perform(conn)
                except DeadlineReached:
                    tally.count("cut_by_deadline")
                finally:
                    conn.close()
        except BaseException as exc:  # a bug in an action: stop everyone, re-raise below
            failures.append(exc)

    threads = [
        threading.Thread(target=work, args=(n,), name=f"{fault}-{n}", daemon=True)
        for n in range(len(workers))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(deadline + 1.0 - time.monotonic(), 0.1))
    stuck = sum(t.is_alive() for t in threads)
    for tally in workers:
        report.merge(tally)
    report.fault = fault
    report.elapsed_s = time.monotonic() - start
    report.count("stuck_workers", stuck)
    report.count("not_started", len(actions) - sum(started))
    if gone[0]:
        report.count("stopped_target_gone")
    if failures:
        raise failures[0]
    return report
