"""The eBPF back-end: trace a running process tree with bpftrace, from outside.

The LD_PRELOAD shim sees only what goes through libc's dynamic symbols.  A statically linked
server, a Go server (raw syscalls), libc's own internal closes, ``syscall(SYS_close, ...)``,
``close_range`` and ``dup2`` behind the library's back are all invisible to it, and all visible
to the kernel's syscall tracepoints.  This package runs ``harness/trace/afterclose.bt``
on the target's host PIDs and turns what it prints into the very same :class:`Record` stream the
shim writes, one standard ``trace.<pid>.0.bin`` per process, so the model, every rule, the
timelines and ``afterclose trace show`` work unchanged.

Sequence numbers
    The shim takes seq_in/seq_out from one atomic counter shared by every traced process.
    bpftrace 0.17 has no global atomic counter a program can read back (``count()`` is
    per-CPU and ``@x++`` on a map is a non-atomic load/add/store), so the eBPF back-end uses
    ``bpf_ktime_get_ns()`` instead: seq_in is CLOCK_MONOTONIC read in the ``sys_enter``
    tracepoint, before the syscall body runs, and seq_out is read in ``sys_exit``, after it
    returned.  What the rules need is "A's seq_out < B's seq_in proves A's effect happened
    before B's", across CPUs.  That holds when the clock is consistent across CPUs to better
    than the distance between the time stamp and the effect it brackets (hundreds of
    nanoseconds: the tracepoint, the BPF program and its map operations run between them).
    The kernel keeps the ``tsc`` clocksource only if the TSCs are synchronised (else it falls
    back to a global clocksource), and ``ktime_get_mono_fast_ns`` may read a few nanoseconds
    early across a timekeeping update; both are far inside that margin.  Equal time stamps
    prove nothing (the rules use strict comparisons), and ``AFTERCLOSE_EBPF_GUARD_NS`` widens
    every interval by that many nanoseconds on each side for machines whose clock one trusts
    less (a virtual machine with an unstable TSC, say).  The cut-off is
    ``time.monotonic_ns()`` of the harness: the same clock.

Attaching late
    The target is already running (and ready) when tracing attaches, so its listening socket,
    its epoll instances and their registrations exist before the first record.  After attach
    the tracer reads ``/proc/PID/fd`` and ``/proc/PID/fdinfo/<epfd>`` (its ``tfd: N events: E
    data: D ... ino: I`` lines) and writes synthetic SOCKET / FDNEW / EPOLL_CREATE / DUP /
    EPOLL_CTL(ADD) records just before the first real one, so events of registrations made
    before attach map to the right connection.  An fd number that a traced call created,
    closed or replaced before the scan finished is not seeded (its state at attach time is not
    known): it is of unknown origin, which no rule ever reports on.  A call already in the
    kernel when tracing attached (an ``epoll_wait`` blocked in the loop thread, typically) has
    no entry record and is not printed.

Which processes
    The pids the runner reports (host PID namespace, so a container's processes too), and
    every child they fork afterwards (``sched_process_fork`` adds it before it can run; a
    thread is no child).  A FORK record in the parent copies its table to the child's, as
    with the shim.

Cost
    Every traced call costs the target two BPF programs and, for each printed line, a
    perf-buffer write and a wake-up of bpftrace, which formats the line in user space.  The
    wake-up is the expensive part: bpftrace 0.17's perf buffers wake their reader on every
    event, and a profile shows each line raising an irq_work (``perf_output_put_handle`` ->
    ``irq_work_queue``: a self-IPI, which in a virtual machine is an exit to the hypervisor)
    before bpftrace is woken.  On the 2-vCPU virtual machine
    of docs/benchmarks.md (``bench/tracer_call_cost.py``) a printed line cost the traced
    thread 7.7-9.0 µs of CPU and bpftrace 2.5-4.3 µs more, a traced call that printed nothing
    0.7-1.2 µs (the shim: 0.05-0.3 µs a call).  The program therefore prints a repeated
    read/write (same thread, same fd, same epoll batch, no fd change in the process since)
    and a MOD that re-sets a registration's own data only once, and counts a wait that returns
    the same batch as the thread's last printed one with nothing printed in between (a spin)
    instead of printing it; the parser puts those waits back (``AFTERCLOSE_EBPF_ALL_IO=1``
    prints them all; see ``afterclose.bt``), and bpftrace's output is fully buffered (one
    write(2) per buffer, not per line: that halved bpftrace's CPU per line).  The perf
    buffer is ``BPFTRACE_PERF_RB_PAGES`` pages per CPU (1024 unless set); events it drops are
    counted from bpftrace's "Lost N events" lines and every report says the trace is
    incomplete.

Stopping
    SIGINT alone loses events: bpftrace 0.17 discards, unprinted, every event it reads after a
    SIGINT that found it busy reading its buffers (exiting 0 all the same: a tenth of a
    flood's lines in some runs), and does not act on one that arrives while no event follows
    (until it is SIGKILLed).  The harness first makes the program stop printing and waits
    until bpftrace has written that out (a handshake through an lseek(2) the program
    recognises, see "Stopping" in ``afterclose.bt``), then sends SIGINT, nudging it with one
    more event if it does not exit.  The program counts what it printed; lines neither in the
    output nor counted lost make the run's evidence incomplete, as does a bpftrace SIGKILLed.

What it does not see: ``free()`` (the two free rules, :data:`UNCHECKED_RULES`, are not checked:
every report says so, and so do pytest's header and summary),
io_uring, fds passed over unix sockets (SCM_RIGHTS: the receiver's ``recvmsg`` creates fds
the model does not learn about; they are of unknown origin), and execve's close-on-exec sweep.

The package's parts: :mod:`.program` (the bpftrace program's text), :mod:`.bpftrace` (running
it: can it run here, attach, stop), :mod:`.output` (what it printed), :mod:`.procscan` (the fd
tables read from /proc after attach, and the records that seed them), :mod:`.tracefiles` (the
trace files written from both), :mod:`.targets` (which targets need it) and :mod:`.session`
(``--tracer=ebpf``).
"""

from __future__ import annotations

from afterclose.harness.trace.ebpf.bpftrace import (
    ENV_ALL_IO,
    ENV_BPFTRACE,
    ENV_MAP_KEYS,
    ENV_RING_PAGES,
    BpftraceRun,
    bpftrace_path,
    ensure_tracefs,
    unavailable,
)
from afterclose.harness.trace.ebpf.output import ParsedOutput, RawRecord, parse_output
from afterclose.harness.trace.ebpf.procscan import (
    ProcSnapshot,
    Registration,
    scan_process,
    seed_records,
)
from afterclose.harness.trace.ebpf.program import (
    BT_SOURCE,
    DEDUP_MARK,
    FORMAT_MARK,
    SEED_MARK,
    STOP_MARK,
    program_text,
)
from afterclose.harness.trace.ebpf.session import (
    ENV_GUARD_NS,
    UNCHECKED_RULES,
    EbpfTracer,
    guard_ns_from_env,
)
from afterclose.harness.trace.ebpf.targets import elf_kind, prefers_ebpf
from afterclose.harness.trace.ebpf.tracefiles import BuiltTrace, build_trace_files

__all__ = [
    "BT_SOURCE",
    "DEDUP_MARK",
    "ENV_ALL_IO",
    "ENV_BPFTRACE",
    "ENV_GUARD_NS",
    "ENV_MAP_KEYS",
    "ENV_RING_PAGES",
    "FORMAT_MARK",
    "SEED_MARK",
    "STOP_MARK",
    "UNCHECKED_RULES",
    "BpftraceRun",
    "BuiltTrace",
    "EbpfTracer",
    "ParsedOutput",
    "ProcSnapshot",
    "RawRecord",
    "Registration",
    "bpftrace_path",
    "build_trace_files",
    "elf_kind",
    "ensure_tracefs",
    "guard_ns_from_env",
    "parse_output",
    "prefers_ebpf",
    "program_text",
    "scan_process",
    "seed_records",
    "unavailable",
]
