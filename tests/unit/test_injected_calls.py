"""Calls and results the harness injected (RecordFlag.INJECTED) are marked in the text and SVG
timelines, and the shim's own shutdown is never judged as the server's call."""

from __future__ import annotations

import dataclasses

from tracebuild import EP, IN, A, TraceBuilder, conn, counts, server

from afterclose.harness.trace.findings import TraceVerdict
from afterclose.harness.trace.format import RecordFlag
from afterclose.harness.trace.svg import render_svg
from afterclose.harness.trace.timeline import INJECTED_CALL, INJECTED_RESULT

ECONNRESET = 104
RULE = "wrong-incarnation"


def _injected(t: TraceBuilder) -> None:
    """Mark the last record as injected by the harness."""
    last = t.records[-1]
    t.records[-1] = dataclasses.replace(last, flags=last.flags | RecordFlag.INJECTED)


def _reused(t: TraceBuilder) -> None:
    """T2 got an event for 7#1; T3 closed 7 and 7#2 was accepted: whatever T2 does to fd 7
    now acts on a connection it never received."""
    server(t)
    conn(t, 7, A)
    t.wait(tid=2, epfd=EP, events=[(IN, A)])
    t.close(tid=3, fd=7)
    t.accept(tid=1, ret=7)


def test_the_shims_shutdown_is_never_the_servers_act() -> None:
    def shutdown_on_reused(injected: bool) -> TraceVerdict:
        t = TraceBuilder()
        _reused(t)
        t.shutdown(tid=2, fd=7)
        if injected:
            _injected(t)
        return t.check()

    assert counts(shutdown_on_reused(injected=False)) == {RULE: 1}
    assert counts(shutdown_on_reused(injected=True)) == {}


def test_the_server_write_around_an_injected_shutdown_is_still_judged_and_marked() -> None:
    # write=econnreset: the shim shuts the socket down inside T2's write, then fails it.
    t = TraceBuilder()
    _reused(t)
    w = t.begin(t.write, tid=2, fd=7, err=ECONNRESET)
    t.shutdown(tid=2, fd=7)
    _injected(t)
    t.end(w)
    _injected(t)
    t.close(tid=1, fd=7)  # 7#2's owner closes it after the reset it saw
    v = t.check()
    assert counts(v) == {RULE: 1}
    (finding,) = v.occurrences[RULE]
    # The finding is the server's write, not the harness's shutdown.
    assert "wrote to" in finding.summary or "write" in finding.summary
    focus = v.records[finding.index]
    assert focus.op.name == "WRITE"
    text = v.render()
    assert f"shutdown(7, SHUT_RDWR) {INJECTED_CALL}" in text
    assert f"= -1 ECONNRESET {INJECTED_RESULT}" in text
    svg = render_svg(finding)
    assert ">injected</text>" in svg
    assert INJECTED_CALL in svg.replace("&#x27;", "'").replace("&#39;", "'")


def test_records_not_injected_carry_no_mark() -> None:
    t = TraceBuilder()
    _reused(t)
    t.shutdown(tid=2, fd=7)
    v = t.check()
    assert "injected" not in v.render()
    assert "injected" not in render_svg(v.occurrences[RULE][0])
