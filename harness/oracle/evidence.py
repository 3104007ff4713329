"""What faults and clients saw, as facts: the seam between those who watch and the rules.

A client or a fault never decides a verdict.  It records an :class:`Observation` (what it saw,
with the numbers it measured) in its report; the rule modules under ``harness/oracle/rules/``
read the observations and decide.  Each kind below is read by exactly one rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Bytes arrived on a connection that had no request outstanding (before any request, or after
# the last answer).  Read by the cross-talk rule.
UNSOLICITED_BYTES = "unsolicited-bytes"
# An answer (or unparseable bytes) that carries another request's tag instead of this one's.
# ``values``: none; ``detail`` names the expected and the found tags.  Read by cross-talk.
FOREIGN_ANSWER = "foreign-answer"
# The target's CPU measured while its clients were idle.  ``values``: ``idle`` (fraction of a
# core before the fault), ``busy`` (fraction of a core in the window), ``allowed`` (the most
# above ``idle`` that is not a spin), ``window_s``.  Read by the busy-loop rule.
CPU_WHILE_IDLE = "cpu-while-idle"
# State the manifest says survives a restart (``restart_keeps``) was answered differently
# after the restart.  Read by the liveness rule.
STATE_LOST_ON_RESTART = "state-lost-on-restart"

# A storm started fewer of its planned connections than the threshold allows while the target
# took what it got (the harness could not keep up).  ``values``: ``planned``, ``started``,
# ``not_started``, ``allowed`` (the share that may go unstarted).  Read by incomplete-evidence.
UNDER_DELIVERED = "under-delivered"

# A complete request on a connection the client did not disturb (no RST, half-close or shutdown
# planned on it) got EOF or RST instead of an answer.  ``values``: ``requests`` (how many whole
# requests went unanswered), ``reset`` (1: RST, 0: EOF), ``idle_s`` (how long the connection
# had been quiet when the request went out).  Read by the dropped-request rule.
DROPPED_REQUEST = "dropped-request"

KINDS = (
    UNSOLICITED_BYTES,
    FOREIGN_ANSWER,
    CPU_WHILE_IDLE,
    STATE_LOST_ON_RESTART,
    DROPPED_REQUEST,
    UNDER_DELIVERED,
)


@dataclass(frozen=True)
class Observation:
    """One fact a client or fault saw.

    ``kind``: one of :data:`KINDS`.  ``who``: the observer, e.g. ``"conn 12 (reset_peer)"`` or
    ``"fd_limit"``.  ``detail``: one line saying what was seen, already readable by a user.
    ``data``: an excerpt of the bytes concerned (at most a few hundred), if any.
    ``values``: the measurements a rule compares (see each kind).
    """

    kind: str
    who: str
    detail: str
    data: bytes = b""
    # A plain dict: reports travel between processes (the storm's workers) by pickle, which
    # refuses a mappingproxy.
    values: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown observation kind {self.kind!r}; one of {KINDS}")
