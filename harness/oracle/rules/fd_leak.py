"""fd-leak: a connection whose peer is gone was never closed by the server.

Two kinds of evidence, judged here together: from outside, the server's socket fds must come
back to the count taken before any fault (a connection left in CLOSE_WAIT never will); from
the trace, an accepted connection whose peer is shown gone (read 0, HUP, a reset) must be
closed before the end of the trace.  When both see leaks they are one violation: the count
from outside, with the trace's timeline of the first leaked connection.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from afterclose.harness import procfs
from afterclose.harness.oracle.rule import Rule
from afterclose.harness.oracle.verdict import Violation
from afterclose.harness.runners.base import Server
from afterclose.harness.trace.facts import TraceModel
from afterclose.harness.trace.findings import Finding
from afterclose.harness.trace.format import HeaderFlag, Op
from afterclose.harness.trace.timeline import call_str

if TYPE_CHECKING:
    from afterclose.harness.oracle.judge import Evidence

NAME = "fd-leak"


# -- from outside ----------------------------------------------------------------------------


def check_fd_leak(
    target: Server, baseline: procfs.SocketCensus, grace_s: float
) -> tuple[Violation | None, str | None]:
    """After every client is gone the target's sockets must return to the baseline.

    A server that never closes a connection whose peer sent FIN leaves it in CLOSE_WAIT
    forever: the kernel cannot finish the close without the owner's ``close()``.  Returns the
    violation, if any, and a warning for connections stranded by the network (counted apart:
    the server's kernel was never told of their close).
    """
    if target.exit_status() is not None:
        return None, None
    deadline = time.monotonic() + grace_s
    while True:
        # Counting fds is cheap; the TCP table, read only to describe a leak, can take a second
        # on a host with many TIME_WAIT sockets.  The verdict rests on a count taken after the
        # grace period began to expire, never on one started before it.
        started = time.monotonic()
        fds = procfs.socket_fd_count(target.host_pids())
        if fds <= baseline.socket_fds:
            return None, None
        if started >= deadline:
            break
        time.sleep(0.05)
    now = procfs.census(target.host_pids(), target.port)
    leaked = now.socket_fds - baseline.socket_fds
    stranded = min(now.stranded, max(leaked, 0))
    warning = None
    if stranded:
        warning = (
            f"{stranded} connection(s) still ESTABLISHED on the target's side {grace_s:g} s "
            "after every client left, whose client end is gone: the client's FIN or RST never "
            "reached the server (lost or reordered packets), so they are not counted as leaks"
        )
    if leaked - stranded <= 0:
        return None, warning
    counted = max(leaked - stranded, now.close_wait)
    return Violation(
        NAME,
        f"{counted} socket(s) still open {grace_s:g} s after every client left "
        f"({now.close_wait} in CLOSE_WAIT)",
        details=f"baseline: {baseline.describe()}\nnow:      {now.describe()}",
        count=max(counted, 1),
    ), warning


# -- from the trace --------------------------------------------------------------------------


def find(m: TraceModel) -> list[Finding]:
    if not m.records:
        return []
    # A process that died of a signal never got the chance to close anything: its open
    # fds say nothing about leaks (the crash itself is reported elsewhere).
    # Nor does one that releases fds behind the shim's back (libuv closes with a raw
    # syscall(SYS_close), exec drops close-on-exec fds): an fd that looks open may not be.
    skip = {pid for pid, h in m.headers.items() if h.flags & HeaderFlag.CRASHED}
    # Nor one that exited before the end of what is judged: the kernel closed every fd it
    # still held (a worker that exits after its one connection leaked nothing).
    skip.update(
        pid
        for pid, h in m.headers.items()
        if h.flags & HeaderFlag.EXITED and h.exit_seq <= m.end_seq
    )
    # Nor one that was gone at the cut-off with no exit in its trace: the harness killed it (a
    # fault's SIGKILL, a restart), or a signal no handler sees did (the OOM killer).  Its fds
    # were released by the kernel, not by the server, and prove nothing.
    skip.update(m.gone)
    skip.update(m.untraced_closes)
    out = []
    for inc in m.kernel.accepted:
        if not inc.open or inc.unknown or inc.pid in skip:
            continue
        ev = inc.ofd.peer_closed_idx
        if ev < 0:
            continue
        er = m.records[ev]
        if er.seq_out > m.end_seq:
            continue  # the server learned that its peer left only after what is judged
        how = "read returned 0" if er.op == Op.READ and er.ret == 0 else "epoll said HUP"
        if er.op in (Op.READ, Op.WRITE) and er.ret < 0:
            how = f"{call_str(er)} failed with a reset/broken pipe"
        summary = (
            f"{m.label(inc)} ({m.created_desc(inc)}): its peer closed at seq "
            f"{er.seq_out} ({how}) but it was still open at the end of the trace "
            f"(seq {m.end_seq})"
        )
        out.append(
            m.finding(
                RULE,
                summary,
                ev,
                inc.fd,
                refs=(inc.created_idx,),
                notes={ev: "peer gone"},
                pid=inc.pid,
            )
        )
    return out


# -- both ------------------------------------------------------------------------------------


def probe(ev: Evidence) -> tuple[Violation | None, str | None]:
    return check_fd_leak(ev.server, ev.baseline, ev.fd_grace_s)


def decide(ev: Evidence) -> list[Violation]:
    seen = ev.probes.get(NAME)
    outside, stranded = seen if isinstance(seen, tuple) else (None, None)
    if stranded:
        ev.warnings.append(stranded)
    traced = ev.traced(NAME)
    if outside is None:
        return traced
    if not traced:
        return [outside]
    first = traced[0]
    n = first.count
    details = (
        f"{outside.details}\n"
        f"the trace shows {n} connection{'s' if n != 1 else ''} whose peer was gone still "
        f"open; the first:\n{first.summary}\n{first.details}"
    )
    return [
        dataclasses.replace(
            outside,
            details=details,
            count=max(outside.count, n),
            artifacts=(*outside.artifacts, *first.artifacts),
        )
    ]


RULE = Rule(
    NAME,
    "a connection whose peer is gone was never closed (CLOSE_WAIT, fd count); connections "
    "the network stranded (server ESTABLISHED, client gone) are a warning",
    why=(
        "the peer is gone, but the server keeps the fd (with its registration and memory) "
        "open forever."
    ),
    traced=find,
    decide=decide,
    probe=probe,
)
