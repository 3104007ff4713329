"""The eBPF back-end: trace a running process tree from outside, with a BPF program of its own.

The LD_PRELOAD shim sees only what goes through libc's dynamic symbols.  A statically linked
server, a Go server (raw syscalls), libc's own internal closes, ``syscall(SYS_close, ...)``,
``close_range`` and ``dup2`` behind the library's back are all invisible to it, and all visible
to the kernel's syscall tracepoints.  This package builds ``c/tracer.bpf.c`` (clang) and its
loader ``c/loader.c`` (libbpf) on first use, runs the loader on the target's host PIDs and
turns what it prints into the very same :class:`Record` stream the shim writes, one standard
``trace.<pid>.0.bin`` per process, so the model, every rule, the timelines and ``afterclose
trace show`` work unchanged.

Sequence numbers
    The shim takes seq_in/seq_out from one atomic counter shared by every traced process. An
    atomic counter shared by every CPU would make each traced call of each CPU contend on one
    cache line, so the eBPF back-end uses ``bpf_ktime_get_ns()`` instead: seq_in is
    CLOCK_MONOTONIC read in the ``sys_enter`` tracepoint, before the syscall body runs, and
    seq_out is read in ``sys_exit``, after it returned.  What the rules need is "A's seq_out <
    B's seq_in proves A's effect happened before B's", across CPUs.  That holds when the clock
    is consistent across CPUs to better than the distance between the time stamp and the effect
    it brackets (hundreds of nanoseconds: the tracepoint, the BPF program and its map operations
    run between them). The kernel keeps the ``tsc`` clocksource only if the TSCs are
    synchronised (else it falls back to a global clocksource), and ``ktime_get_mono_fast_ns``
    may read a few nanoseconds early across a timekeeping update; both are far inside that
    margin.  Equal time stamps prove nothing (the rules use strict comparisons), and
    ``AFTERCLOSE_EBPF_GUARD_NS`` widens every interval by that many nanoseconds on each side for
    machines whose clock one trusts less (a virtual machine with an unstable TSC, say).  The
    cut-off is ``time.monotonic_ns()`` of the harness: the same clock.

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
    Every traced call costs the target two BPF programs (``tp_btf`` tracepoints on syscall
    entry and exit) and, for each line, a write into a ring buffer shared by all CPUs.  The
    program does not wake the loader for a line (``BPF_RB_NO_WAKEUP``) unless the ring buffer
    is filling up: the loader polls it every 20 ms.  A wake-up per line raises an irq_work
    (a self-IPI, which in a virtual machine is an exit to the hypervisor) before the reader
    is woken; on the 2-vCPU virtual machine of docs/benchmarks.md, when bpftrace 0.17 traced
    here with one such wake-up per line, a printed line cost the traced thread 7.7-9.0 µs of
    CPU.  The program also prints a repeated read/write (same thread, same fd, same epoll
    batch, no fd change in the process since) and a MOD that re-sets a registration's own
    data only once, and counts a wait that returns the same batch as the thread's last
    printed one with nothing printed in between (a spin) instead of printing it; the parser
    puts those waits back (``AFTERCLOSE_EBPF_ALL_IO=1`` prints them all; see
    ``c/tracer.bpf.c``).  The ring buffer is ``AFTERCLOSE_EBPF_RING_KB`` KiB (16384 unless
    set); lines it has no room for are counted, and every report then says the trace is
    incomplete.

Stopping
    On SIGINT the loader sets the program's halt switch (nothing is printed after it), reads
    the ring buffer out, waits for probes already past the switch and reads it again, then
    prints the waits still counted and how many lines the program handed over.  Lines neither
    in the output nor counted lost make the run's evidence incomplete, as does a loader that
    had to be SIGKILLed.

What it does not see: ``free()`` (the two free rules, :data:`UNCHECKED_RULES`, are not checked:
every report says so, and so do pytest's header and summary),
io_uring, fds passed over unix sockets (SCM_RIGHTS: the receiver's ``recvmsg`` creates fds
the model does not learn about; they are of unknown origin), and execve's close-on-exec sweep.

The package's parts: ``c/`` (the BPF program and its loader), :mod:`.loader` (building them,
can it run here, attach, stop), :mod:`.output` (what the loader printed), :mod:`.procscan` (the fd
tables read from /proc after attach, and the records that seed them), :mod:`.tracefiles` (the
trace files written from both), :mod:`.targets` (which targets need it) and :mod:`.session`
(``--tracer=ebpf``).
"""

from __future__ import annotations

from afterclose.harness.trace.ebpf.loader import (
    C_DIR,
    ENV_ALL_IO,
    ENV_MAP_KEYS,
    ENV_RING_KB,
    EbpfRun,
    tracer_build,
    unavailable,
)
from afterclose.harness.trace.ebpf.output import ParsedOutput, RawRecord, parse_output
from afterclose.harness.trace.ebpf.procscan import (
    ProcSnapshot,
    Registration,
    scan_process,
    seed_records,
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
    "C_DIR",
    "ENV_ALL_IO",
    "ENV_GUARD_NS",
    "ENV_MAP_KEYS",
    "ENV_RING_KB",
    "UNCHECKED_RULES",
    "BuiltTrace",
    "EbpfRun",
    "EbpfTracer",
    "ParsedOutput",
    "ProcSnapshot",
    "RawRecord",
    "Registration",
    "build_trace_files",
    "elf_kind",
    "guard_ns_from_env",
    "parse_output",
    "prefers_ebpf",
    "scan_process",
    "seed_records",
    "tracer_build",
    "unavailable",
]
