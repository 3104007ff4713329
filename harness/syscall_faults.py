"""Syscall faults and schedule perturbation ("chaos"), injected by the LD_PRELOAD shim.

Both are declared and validated here and carried to the target in its environment in an
encoded form the shim reads without parsing any user syntax (:func:`to_env`, :func:`chaos_env`);
the shim (``harness/shim/faults.c`` and ``chaos.c``) does the work.

Syscall faults, per scenario with ``@pytest.mark.syscall_faults(read={"eagain": 0.05}, ...)``:

==============  ===================================================================================
call            errors (what the target sees)
==============  ===================================================================================
``epoll_wait``  ``eintr``: epoll_wait/epoll_pwait/epoll_pwait2 fail with EINTR without waiting
                (only a wait that could block: timeout != 0)
``read``        ``eagain``: read/readv/recv/recvfrom/recvmsg fail with EAGAIN without reading; only
                on a non-blocking stream socket (O_NONBLOCK, checked with fcntl(F_GETFL) when the
                dice say so, or MSG_DONTWAIT) that is not registered EPOLLET without EPOLLONESHOT
``write``       ``short``: write/writev/send/sendto/sendmsg/sendfile move 1..n-1 of n bytes;
                ``econnreset``: fail with ECONNRESET; ``epipe``: fail with EPIPE (stream sockets)
``accept``      ``emfile`` / ``econnaborted``: accept/accept4 fail without accepting: the
                connection stays in the backlog, as with a real EMFILE
==============  ===================================================================================

Each is a result the kernel could have given at that moment.  ECONNRESET and EPIPE are the
exception a server must survive: the connection is really fine, so the shim makes it dead
(``shutdown(SHUT_RDWR)``) before answering, and later calls get EOF/EPIPE/HUP from the kernel,
as after a real reset.  An injected fault is recorded in the trace with its result and
:attr:`~afterclose.harness.trace.format.RecordFlag.INJECTED`; the rules judge it like a real
one, since it is what the server saw.  EBADF is never injected: on a closed fd the eligibility
checks fail and the real call runs.

Chaos (``--chaos``): with level L (1-10; ``low`` 3, ``on``/``medium`` 5, ``high`` 8) a thread is
held up with probability L*5 % for up to L*20 µs after epoll_wait returned events, before close,
before epoll_ctl and after a read returned 0.

Both draw from per-thread PRNGs seeded from ``AFTERCLOSE_FAULT_SEED`` (the test's seed) and the
thread's creation order, so a replay with ``--fault-seed`` injects the same faults as far as the
target's threads repeat their calls.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from afterclose.harness.errors import ScenarioError

__all__ = [
    "CALLS",
    "CHAOS_LEVELS",
    "ENV_CHAOS",
    "ENV_FAULTS",
    "ENV_SEED",
    "SyscallFault",
    "chaos_env",
    "chaos_level",
    "from_marker",
    "parse",
    "to_env",
]

ENV_FAULTS = "AFTERCLOSE_SYSCALL_FAULTS"
ENV_SEED = "AFTERCLOSE_FAULT_SEED"
ENV_CHAOS = "AFTERCLOSE_CHAOS"

# call -> the errors it may be given.  Their codes in the encoded spec are their positions
# (errors from 1, 0 being "none"); harness/shim/format.h is generated from them.
CALLS: dict[str, tuple[str, ...]] = {
    "epoll_wait": ("eintr",),
    "read": ("eagain",),
    "write": ("short", "econnreset", "epipe"),
    "accept": ("emfile", "econnaborted"),
}
CALL_CODES: dict[str, int] = {call: n for n, call in enumerate(CALLS)}
ERROR_CODES: dict[str, int] = {
    error: n for n, error in enumerate((e for errs in CALLS.values() for e in errs), start=1)
}
# The shim compares a 32-bit draw with a threshold: probability p is threshold floor(p * 2**32).
THRESHOLD_ONE = 1 << 32
# Names a user may reach for, and the call that covers them.
_COVERED_BY = {
    "epoll_pwait": "epoll_wait",
    "epoll_pwait2": "epoll_wait",
    "readv": "read",
    "recv": "read",
    "recvfrom": "read",
    "recvmsg": "read",
    "writev": "write",
    "send": "write",
    "sendto": "write",
    "sendmsg": "write",
    "sendfile": "write",
    "accept4": "accept",
}
# Level names of --chaos; the shim is given the level's number.
CHAOS_LEVELS: dict[str, int] = {"off": 0, "low": 3, "on": 5, "medium": 5, "high": 8}
MAX_CHAOS = 10


@dataclass(frozen=True, slots=True)
class SyscallFault:
    """Make ``call`` fail with ``error`` with probability ``probability`` (0 to 1)."""

    call: str
    error: str
    probability: float

    @property
    def threshold(self) -> int:
        """The probability as a threshold on the shim's 32-bit draws (0 to 2**32)."""
        # Rounded to 12 decimal places first, finer than the 2**-32 steps: a probability
        # written 0.05 gives the same threshold whatever its binary float.
        whole, _, frac = f"{self.probability:.12f}".partition(".")
        if int(whole) >= 1:
            return THRESHOLD_ONE
        scale: int = 10 ** len(frac)
        return (int(frac or "0") << 32) // scale

    def env_item(self) -> str:
        """``call:error:threshold`` in codes: the form the shim reads."""
        return f"{CALL_CODES[self.call]}:{ERROR_CODES[self.error]}:{self.threshold}"


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def parse(spec: Mapping[str, object], *, where: str = "syscall_faults") -> tuple[SyscallFault, ...]:
    """Validate ``{"read": {"eagain": 0.05}, ...}`` into specs, or raise :class:`ScenarioError`
    naming ``where`` and the key, the allowed values and the nearest name."""
    faults: list[SyscallFault] = []
    for call, errors in spec.items():
        if not isinstance(call, str) or call not in CALLS:
            name = str(call)
            if name in _COVERED_BY:
                hint = f"{name!r} is covered by {_COVERED_BY[name]!r}; "
            else:
                hint = _suggest(name, CALLS)
            raise ScenarioError(
                f"unknown syscall {name!r}",
                where=f"{where}: key {name!r}",
                hint=f"{hint}faults exist for: {', '.join(CALLS)}",
            )
        allowed = CALLS[call]
        if not isinstance(errors, Mapping) or not errors:
            raise ScenarioError(
                f"{call}= must map errors to probabilities, e.g. {{{allowed[0]!r}: 0.05}}; "
                f"got {errors!r}",
                where=f"{where}: key {call!r}",
                hint=f"errors for {call}: {', '.join(allowed)}",
            )
        total = 0.0
        thresholds = 0
        for error, probability in errors.items():
            key = f"{call}.{error}"
            if not isinstance(error, str) or error not in allowed:
                raise ScenarioError(
                    f"{call} cannot be given error {error!r}",
                    where=f"{where}: key {key!r}",
                    hint=f"{_suggest(str(error), allowed)}errors for {call}: {', '.join(allowed)}",
                )
            if (
                isinstance(probability, bool)
                or not isinstance(probability, int | float)
                or not math.isfinite(probability)
                or not 0 <= probability <= 1
            ):
                raise ScenarioError(
                    f"the probability of {key} must be a number from 0 to 1, got {probability!r}",
                    where=f"{where}: key {key!r}",
                    hint="e.g. 0.05 for one call in twenty",
                )
            total += float(probability)
            fault = SyscallFault(call, error, float(probability))
            thresholds += fault.threshold
            faults.append(fault)
        if total > 1 + 1e-9 or thresholds > THRESHOLD_ONE:
            raise ScenarioError(
                f"the probabilities of {call} add up to {total:g}, more than 1",
                where=f"{where}: key {call!r}",
                hint="one draw per call picks at most one of its errors",
            )
    return tuple(faults)


def from_marker(
    args: tuple[object, ...], kwargs: Mapping[str, object], *, where: str
) -> tuple[SyscallFault, ...]:
    """The faults of ``@pytest.mark.syscall_faults(read={"eagain": 0.05}, ...)``; a single
    positional mapping is accepted too (merged under the keywords)."""
    spec: dict[str, object] = {}
    for arg in args:
        if not isinstance(arg, Mapping):
            raise ScenarioError(
                f"positional argument {arg!r} is not a mapping of calls to errors",
                where=where,
                hint='write @pytest.mark.syscall_faults(read={"eagain": 0.05})',
            )
        spec.update({str(k): v for k, v in arg.items()})
    spec.update(kwargs)
    return parse(spec, where=where)


def _check_seed(seed: int) -> str:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ScenarioError(f"the fault seed must be a whole number from 0 to 2**64-1: {seed!r}")
    return str(seed)


def to_env(specs: Iterable[SyscallFault], seed: int) -> dict[str, str]:
    """The target environment that makes the shim inject ``specs`` (empty when none): the
    encoded spec, ``call:error:threshold`` items in codes (:data:`CALL_CODES`,
    :data:`ERROR_CODES`, :attr:`SyscallFault.threshold`) joined by commas, in order."""
    items = [s.env_item() for s in specs]
    if not items:
        return {}
    return {ENV_FAULTS: ",".join(items), ENV_SEED: _check_seed(seed)}


def chaos_level(value: str | int) -> int:
    """``off``/``on``/``low``/``medium``/``high`` or 0-10 as a level 0-10."""
    text = str(value).strip().lower()
    if text in CHAOS_LEVELS:
        return CHAOS_LEVELS[text]
    if text.isdigit() and 0 <= int(text) <= MAX_CHAOS:
        return int(text)
    raise ScenarioError(
        f"unknown chaos level {value!r}",
        hint=f"{_suggest(text, CHAOS_LEVELS)}use off, on, low, medium, high or 0-{MAX_CHAOS}",
    )


def chaos_env(level: str | int, seed: int) -> dict[str, str]:
    """The target environment for schedule perturbation at ``level`` (empty when off)."""
    n = chaos_level(level)
    if n == 0:
        return {}
    return {ENV_CHAOS: str(n), ENV_SEED: _check_seed(seed)}
