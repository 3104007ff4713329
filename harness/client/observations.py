"""What a client connection saw, as the observations the rules read.

Each function turns one kind of evidence (bytes nobody asked for, an answer carrying another
request's tag, a request answered by a close) into an
:class:`~afterclose.harness.oracle.evidence.Observation` whose detail names the connection,
when it happened and an excerpt of the bytes.  Both engines use them: the asyncio one
(:mod:`.conn`) and the compiled one (:mod:`.native`), which hands over its raw events.
"""

from __future__ import annotations

from afterclose.harness.oracle.evidence import (
    DROPPED_REQUEST,
    FOREIGN_ANSWER,
    UNSOLICITED_BYTES,
    Observation,
)
from afterclose.harness.protocols import base as proto

SHOWN_BYTES = 120


def who(fault: str, index: int) -> str:
    """How an observation names connection ``index`` of ``fault``."""
    return f"conn {index} ({fault})"


NOT_DUE = "while no answer was due"
WAITING_CLOSE = "while waiting for the close"


def unsolicited_context(
    sent_any: bool, last_answered: str | None, outstanding: bool, when: str
) -> str:
    """When unasked-for bytes came, as the observation says it (``when``: NOT_DUE or
    WAITING_CLOSE, unless nothing was sent yet or the last answer left nothing outstanding)."""
    if not sent_any:
        return "before sending any request"
    if last_answered is not None and not outstanding:
        return f"after the response to {last_answered}, with no request outstanding"
    return when


def _bytes_observation(kind: str, fault: str, index: int, text: str, data: bytes) -> Observation:
    """What ``text`` says of ``data`` on connection ``index``; the detail ends with an excerpt
    of the bytes, which the observation carries too."""
    excerpt = data[:SHOWN_BYTES]
    return Observation(
        kind=kind,
        who=who(fault, index),
        detail=f"{fault} conn {index}: {text} {excerpt!r}",
        data=excerpt,
    )


def _first_tags(tags: list[str]) -> str:
    return ", ".join(tags[:3])


def unsolicited_observation(
    fault: str, index: int, data: bytes, context: str, *, received: int | None = None
) -> Observation:
    """``data`` arrived on connection ``index`` though no answer was due (``context`` says
    when); the tags it mentions name whose answer it was.  ``received``: how many bytes came,
    when ``data`` holds only the first of them."""
    owners = proto.tags_in(data)
    whose = f" (mentions {_first_tags(owners)})" if owners else ""
    text = f"received {received or len(data)} unasked-for bytes {context}{whose}:"
    return _bytes_observation(UNSOLICITED_BYTES, fault, index, text, data)


def foreign_observation(
    fault: str, index: int, status: int, expected: str, body: bytes
) -> Observation:
    """The ``status`` answer to ``expected`` does not carry its tag."""
    others = proto.tags_in(body)
    whose = f"the answer to {_first_tags(others)}" if others else "no request path"
    text = f"the {status} response to {expected} carries {whose}: body"
    return _bytes_observation(FOREIGN_ANSWER, fault, index, text, body)


def garbage_observation(
    fault: str, index: int, expected: str | None, partial: bytes
) -> Observation | None:
    """Bytes that are no reply: cross-talk only if they name another request."""
    owners = [p for p in proto.tags_in(partial) if p != expected]
    if not owners:
        return None
    text = (
        f"waiting for the answer to {expected}, got bytes that are no reply, "
        f"mentioning {_first_tags(owners)}:"
    )
    return _bytes_observation(FOREIGN_ANSWER, fault, index, text, partial)


def dropped_observation(
    fault: str, index: int, first: str, unanswered: int, reset: bool, idle_s: float
) -> Observation:
    """A complete request (``first``, of ``unanswered``) got EOF or a RST, no answer."""
    how = "a RST" if reset else "EOF"
    return Observation(
        kind=DROPPED_REQUEST,
        who=who(fault, index),
        detail=f"{fault} conn {index}: the complete request {first} "
        f"got {how} instead of an answer"
        + (f" ({unanswered} requests unanswered)" if unanswered > 1 else "")
        + f", sent after {idle_s * 1000:.0f} ms of quiet",
        values={"requests": unanswered, "reset": int(reset), "idle_s": idle_s},
    )
