"""incomplete-evidence: the trace lost records, or a process escaped the tracer, so the run
cannot pass.

A trace file is a fixed number of chunks; when they are all taken, the shim counts what it
could not write in the file's header instead.  A missing close, epoll_ctl or free can hide a
violation or explain one away, so a verdict over such a trace proves nothing either way.

A process can also escape the preload tracer altogether: a wrapper that drops ``LD_PRELOAD``
(``env -u LD_PRELOAD``), a setuid program (the loader ignores it), a statically linked one.
When such a process holds the target's listening socket or a connection accepted on it, the
calls that decide the verdict were never seen.  Who holds the port's sockets is read from
``/proc`` when the tracer attaches and again before the server is stopped; a holder that does
not map the shim, or left no trace file, makes the evidence incomplete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from afterclose.harness import procfs
from afterclose.harness.oracle.evidence import UNDER_DELIVERED
from afterclose.harness.oracle.rule import Rule
from afterclose.harness.oracle.verdict import Violation
from afterclose.harness.trace.ebpf import ENV_RING_KB
from afterclose.harness.trace.facts import TraceModel
from afterclose.harness.trace.findings import Finding
from afterclose.harness.trace.format import DEFAULT_TRACE_MB
from afterclose.harness.trace.shim import SHIM_NAME

if TYPE_CHECKING:
    from afterclose.harness.oracle.judge import Evidence
    from afterclose.harness.runners.base import Server

NAME = "incomplete-evidence"
# The shim's knob for the size of each trace file (harness/trace/shim.py), and its default.
ENV_TRACE_MB = "AFTERCLOSE_TRACE_MB"
_MIB = 1 << 20


def find(m: TraceModel) -> list[Finding]:
    if not m.lost_records:
        return []
    where = []
    sizes = []
    first_pid = 0
    for pid, h in sorted(m.headers.items()):
        if not h.lost_records:
            continue
        first_pid = first_pid or pid
        sizes.append(h.n_chunks * h.chunk_records * h.record_size // _MIB)
        path = m.files.get(pid)
        where.append(f"pid {pid}" + (f" ({path})" if path else "") + f": {h.lost_records} lost")
    whose = "; ".join(where) or "no process's file says which"
    # Four times the file that filled up: a trace grows with the run, not in steps.
    bigger = 4 * max(max(sizes, default=DEFAULT_TRACE_MB), 1)
    summary = (
        f"the trace lost {m.lost_records} records ({whose}): a missing close, epoll_ctl or free "
        "could hide a violation or explain one away, so this run cannot pass; give each "
        f"process a larger trace file ({ENV_TRACE_MB}={bigger}; under the eBPF tracer, more "
        f"ring buffer: {ENV_RING_KB}) or run for less time"
    )
    return [Finding(NAME, summary, -1, 0, first_pid, 0, None, None, meaning=RULE.plain_meaning)]


# -- processes that escaped the tracer -----------------------------------------------------


@dataclass(frozen=True)
class PortHolder:
    """A process holding sockets of the target's port, as the probe saw it."""

    pid: int
    exe: str
    sockets: int
    # Its PID in its own PID namespace (a container's), which names its trace file.
    file_pid: int
    # The shim's library is mapped into it: None when its maps could not be read.
    shim_mapped: bool | None


def port_holders(server: Server) -> list[PortHolder]:
    """Who holds the server's port now.  Looked at twice: when the tracer attaches (the
    preload tracer's ``started``: a server that dies during the scenario still held its
    listening socket then) and by this rule's probe before the server is stopped."""
    owners = procfs.port_owners(server.host_pids(), server.port)
    inner = {host: pid for pid, host in procfs.namespace_pids(owners).items()}
    holders = []
    for pid, n in sorted(owners.items()):
        files = procfs.mapped_files(pid)
        mapped = None if files is None else any(Path(f).name.startswith(SHIM_NAME) for f in files)
        holders.append(PortHolder(pid, procfs.exe(pid), n, inner.get(pid, pid), mapped))
    return holders


def probe(ev: Evidence) -> list[PortHolder]:
    return port_holders(ev.server)


def untraced_holders(holders: list[PortHolder], trace_dir: Path) -> list[PortHolder]:
    """The holders the preload tracer did not trace: the shim is not in the process (its
    current program, after any exec), or it left no trace file."""
    out: dict[int, PortHolder] = {}
    for h in holders:
        has_file = any(trace_dir.glob(f"trace.{h.file_pid}.*.bin"))
        if (h.shim_mapped is False or not has_file) and h.pid not in out:
            out[h.pid] = h
    return list(out.values())


def decide(ev: Evidence) -> list[Violation]:
    return [*ev.traced(NAME), *_tracer_gaps(ev), *_untraced(ev), *_under_delivered(ev)]


def _tracer_gaps(ev: Evidence) -> list[Violation]:
    gaps = ev.trace.gaps if ev.trace is not None else []
    if not gaps:
        return []
    return [
        Violation(
            NAME,
            f"{gaps[0]}: what the tracer did not record could hide a violation, so this run "
            "cannot pass; run it again on a quieter machine, for less time, or with "
            "--tracer=preload",
            details="\n".join(gaps[1:]),
            count=len(gaps),
        )
    ]


def _untraced(ev: Evidence) -> list[Violation]:
    trace = ev.trace
    if trace is None or trace.tracer != "preload" or trace.trace_dir is None:
        return []
    probed = ev.probes.get(NAME)
    seen = [*trace.port_holders, *(probed if isinstance(probed, list) else ())]
    holders = [h for h in seen if isinstance(h, PortHolder)]
    missing = untraced_holders(holders, trace.trace_dir)
    if not missing:
        return []
    first = missing[0]
    names = "; ".join(
        f"pid {h.pid} ({h.exe or 'unknown program'}) holding {h.sockets} socket(s) of the "
        "port" + (" (no trace file)" if h.shim_mapped else ", the shim not loaded")
        for h in missing
    )
    return [
        Violation(
            NAME,
            f"pid {first.pid} ({first.exe or 'unknown program'}) serves the target's port but "
            "was not traced: its closes and epoll calls were never seen, so this run cannot "
            "pass; run it with --tracer=ebpf, or keep LD_PRELOAD in its environment (a wrapper "
            "such as `env -u LD_PRELOAD` or a setuid or static program drops the shim)",
            details=f"untraced: {names}",
            count=len(missing),
        )
    ]


def _under_delivered(ev: Evidence) -> list[Violation]:
    short = ev.observations(UNDER_DELIVERED)
    if not short or ev.perturbed:
        # Injected syscall faults or chaos slow the server on purpose (asyncio, say, stops
        # accepting for a second after an injected EMFILE): its pace, not the harness's.
        return []
    # The storms that fell short: their plan was the load the verdict would speak for.
    shown = "\n".join(o.detail for o in short)
    return [
        Violation(
            NAME,
            f"{short[0].detail}; a pass would speak for load that never came: run fewer "
            "connections (max_connections), a lower rate (rate_per_s) or more client "
            "processes (processes), or a shorter --storm-duration",
            details=shown if len(short) > 1 else "",
            count=len(short),
        )
    ]


RULE = Rule(
    NAME,
    "the evidence is incomplete, so the run cannot pass: the trace lost records (a trace file "
    "filled up: a missing call could hide a violation) or the tracer itself died or was killed "
    "before it wrote out what it saw, a process holding the target's "
    "listening socket or its connections was not traced, or a storm started fewer than half of "
    "its planned connections while the target accepted what it got and client slots were free "
    "(the harness could not keep up; a target that refused them, or kept every slot busy, is "
    "judged by the other rules instead)",
    traced=find,
    decide=decide,
    probe=probe,
)
