"""The LD_PRELOAD shim and the trace reader, on real processes.

Each test builds a small C program from ``tests/shim_programs/``, runs it with the shim
preloaded into a fresh trace folder and checks exact facts in what the reader decodes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import capabilities
import pytest
from paths import TESTS_DIR

from afterclose.harness import compile as cbuild
from afterclose.harness.errors import BuildError, TraceError
from afterclose.harness.trace import codegen, shim
from afterclose.harness.trace import format as fmt
from afterclose.harness.trace.format import (
    EPOLL_CTL_ADD,
    EPOLL_CTL_DEL,
    EPOLL_CTL_MOD,
    EPOLLET,
    EPOLLIN,
    HEADER_SIZE,
    HEADER_STRUCT,
    DupKind,
    HeaderFlag,
    IoKind,
    Op,
    Record,
    RecordFlag,
    WaitKind,
)
from afterclose.harness.trace.reader import Trace, read_trace_dir, read_trace_file

PROGRAMS = TESTS_DIR / "shim_programs"
EBADF = 9
ENOENT = 2
EAGAIN = 11


def program(name: str, sanitizer: str = "none") -> Path:
    return cbuild.build(
        cbuild.CBuild(
            name=f"shimtest-{name}",
            sources=(PROGRAMS / f"{name}.c",),
            cflags=("-O2", "-Wall", "-Wextra", "-pthread"),
            ldflags=("-pthread",),
            sanitizer=sanitizer,
        )
    )


def run_traced(
    cmd: Sequence[str | Path | int],
    trace_dir: Path,
    *,
    extra: dict[str, str] | None = None,
    asan_runtime: bool = False,
    check: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    trace_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env.update(shim.shim_env(trace_dir, extra=extra, asan_runtime=asan_runtime, base_env=env))
    proc = subprocess.run(
        [str(c) for c in cmd],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def values(stdout: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and value.lstrip("-").isdigit():
            out[key] = int(value)
    return out


def only(records: Iterable[Record], **fields: object) -> Record:
    found = [r for r in records if all(getattr(r, k) == v for k, v in fields.items())]
    assert len(found) == 1, f"expected one record with {fields}, found {found}"
    return found[0]


def calls(trace: Trace) -> list[tuple[int, int]]:
    """One (seq_in, seq_out) per traced call: events and pair FDNEWs share their call's."""
    return sorted({(r.seq_in, r.seq_out) for r in trace.records})


def exit_seqs(trace: Trace) -> list[int]:
    """The numbers the processes' exits took (a process that exited normally has one)."""
    return [p.header.exit_seq for p in trace.processes if p.header.flags & HeaderFlag.EXITED]


def assert_sequence_sane(trace: Trace) -> None:
    pairs = calls(trace)
    numbers = [n for pair in pairs for n in pair]
    assert all(seq_in < seq_out for seq_in, seq_out in pairs)
    assert len(numbers) == len(set(numbers)), "a sequence number was handed out twice"
    for proc in trace.processes:
        outs = [r.seq_out for r in proc.records]
        assert outs == sorted(outs)
    for wait_index, rec in enumerate(trace.records):
        if rec.op is Op.EPOLL_WAIT and rec.ret > 0:
            events = trace.records[wait_index + 1 : wait_index + 1 + rec.ret]
            assert [e.op for e in events] == [Op.EPOLL_EVENT] * rec.ret
            assert [e.arg for e in events] == list(range(rec.ret))
            assert {(e.seq_in, e.seq_out, e.fd) for e in events} == {
                (rec.seq_in, rec.seq_out, rec.fd)
            }


# --------------------------------------------------------------------------- lifecycle --


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trace, dict[str, int], Path]:
    trace_dir = tmp_path_factory.mktemp("lifecycle")
    proc = run_traced([program("lifecycle")], trace_dir)
    return read_trace_dir(trace_dir), values(proc.stdout), trace_dir


def test_lifecycle_records_exact_facts(lifecycle: tuple[Trace, dict[str, int], Path]) -> None:
    trace, v, _ = lifecycle
    assert trace.complete and trace.lost_records == 0 and trace.warnings == ()
    parent = next(p for p in trace.processes if p.header.fork_seq == 0)
    recs = parent.records
    assert parent.header.exe.endswith("shimtest-lifecycle")
    assert parent.header.flags & HeaderFlag.FREE_TRACKING

    sockets = [r for r in recs if r.op is Op.SOCKET]
    assert [r.ret for r in sockets] == [v["listen"], v["client"]]
    acc = only(recs, op=Op.ACCEPT)
    assert (acc.fd, acc.ret, acc.flags, acc.err) == (v["listen"], v["accepted"], 0, 0)
    assert only(recs, op=Op.EPOLL_CREATE).ret == v["epoll"]

    add = only(recs, op=Op.EPOLL_CTL, flags=EPOLL_CTL_ADD)
    assert (add.fd, add.arg, add.events, add.data, add.ret) == (
        v["accepted"],
        v["epoll"],
        EPOLLIN,
        0x1234,
        0,
    )
    wr = only(recs, op=Op.WRITE)
    assert (wr.fd, wr.flags, wr.ret) == (v["client"], IoKind.WRITE, 5)
    wait = only(recs, op=Op.EPOLL_WAIT)
    assert (wait.fd, wait.arg, wait.ret, wait.flags) == (v["epoll"], 8, 1, WaitKind.EPOLL_WAIT)
    event = only(recs, op=Op.EPOLL_EVENT)
    assert (event.fd, event.arg, event.data, event.events) == (v["epoll"], 0, 0x1234, EPOLLIN)
    assert (event.seq_in, event.seq_out) == (wait.seq_in, wait.seq_out)
    assert recs[recs.index(wait) + 1] is event
    rd = only(recs, op=Op.READ)
    assert (rd.fd, rd.ret, rd.flags) == (v["accepted"], 5, IoKind.READ)
    assert wr.seq_out < wait.seq_in < wait.seq_out < rd.seq_in

    closes = [r for r in recs if r.op is Op.CLOSE and r.fd == v["client"]]
    assert [(r.ret, r.err) for r in closes] == [(0, 0), (-1, EBADF)]
    dup = only(recs, op=Op.DUP)
    assert (dup.fd, dup.arg, dup.ret, dup.flags) == (v["accepted"], 100, 100, DupKind.DUP2)
    assert all(r.pid == parent.pid and r.tid == parent.pid for r in recs)
    assert all(r.t_ns >= parent.header.start_ns for r in recs)


def test_lifecycle_fork_child_writes_its_own_file(
    lifecycle: tuple[Trace, dict[str, int], Path],
) -> None:
    trace, v, trace_dir = lifecycle
    assert len(trace.processes) == 2
    parent, child = sorted(trace.processes, key=lambda p: p.header.fork_seq)
    fork = only(parent.records, op=Op.FORK)
    assert fork.ret == v["child"] == child.pid
    assert child.path == trace_dir / f"trace.{v['child']}.0.bin"
    assert child.header.ppid == parent.pid
    assert child.header.fork_seq == fork.seq_in
    assert [(r.op, r.fd, r.ret) for r in child.records] == [(Op.CLOSE, 100, 0)]
    assert child.records[0].seq_in > fork.seq_in
    # Each process's close of 100 is in its own file.
    closes_100 = Counter(r.pid for r in trace.records if r.op is Op.CLOSE and r.fd == 100)
    assert closes_100 == {parent.pid: 1, child.pid: 1}


def test_lifecycle_free_of_registered_pointer_only(
    lifecycle: tuple[Trace, dict[str, int], Path],
) -> None:
    trace, v, _ = lifecycle
    mod = only(trace.records, op=Op.EPOLL_CTL, flags=EPOLL_CTL_MOD)
    assert mod.data == v["registered"]
    frees = [r for r in trace.records if r.op is Op.FREE]
    assert [(r.data, r.pid) for r in frees] == [(v["registered"], trace.processes[0].pid)]
    assert frees[0].seq_in > mod.seq_out
    assert all(r.data != v["unregistered"] for r in trace.records)
    parent = trace.processes[0]
    assert parent.header.free_table_used == 2  # 0x1234 and the pointer
    assert parent.header.free_table_slots == 1 << 20


def test_lifecycle_sequence_numbers(lifecycle: tuple[Trace, dict[str, int], Path]) -> None:
    trace, _, trace_dir = lifecycle
    assert_sequence_sane(trace)
    # Nothing else ran in this folder: the counter stopped at the last number handed out,
    # each process's exit taking one too (HeaderFlag.EXITED).
    exits = exit_seqs(trace)
    assert len(exits) == len(trace.processes)
    numbers = sorted([*(n for pair in calls(trace) for n in pair), *exits])
    assert shim.read_seq(trace_dir) == numbers[-1]
    assert numbers == list(range(1, len(numbers) + 1))


def test_free_tracking_off(tmp_path: Path) -> None:
    run_traced([program("lifecycle")], tmp_path, extra={"AFTERCLOSE_FREE_TRACKING": "0"})
    trace = read_trace_dir(tmp_path)
    assert not any(r.op is Op.FREE for r in trace.records)
    assert all(not p.header.flags & HeaderFlag.FREE_TRACKING for p in trace.processes)
    assert any(r.op is Op.EPOLL_WAIT for r in trace.records)


# ------------------------------------------------------------------------ every op --


def test_every_intercepted_call(tmp_path: Path) -> None:
    proc = run_traced([program("allops")], tmp_path)
    v = values(proc.stdout)
    trace = read_trace_dir(tmp_path)
    assert trace.complete
    assert_sequence_sane(trace)
    parent = next(p for p in trace.processes if p.header.fork_seq == 0)
    recs = parent.records

    def fdnew_call(*fds: int) -> list[Record]:
        found = [r for r in recs if r.op is Op.FDNEW and r.ret in fds]
        assert [r.ret for r in found] == list(fds)
        assert len({(r.seq_in, r.seq_out) for r in found}) == 1
        return found

    fdnew_call(v["sp0"], v["sp1"])
    fdnew_call(v["pipe0"], v["pipe1"])
    fdnew_call(v["pipeb0"], v["pipeb1"])
    for key in ("eventfd", "timerfd", "signalfd", "memfd", "inotify1", "inotify0", "devnull"):
        fdnew_call(v[key])
    # signalfd on an existing fd creates nothing and is not recorded.
    assert len([r for r in recs if r.op is Op.FDNEW and r.ret == v["signalfd"]]) == 1
    failed_open = only(recs, op=Op.FDNEW, ret=-1)
    assert failed_open.err == ENOENT

    io: Counter[tuple[Op, IoKind, int]] = Counter(
        (r.op, IoKind(r.flags), r.fd) for r in recs if r.op in (Op.READ, Op.WRITE)
    )
    for op, kind, fd in [
        (Op.WRITE, IoKind.SEND, v["sp0"]),
        (Op.READ, IoKind.RECV, v["sp1"]),
        (Op.WRITE, IoKind.SENDTO, v["sp0"]),
        (Op.READ, IoKind.RECVFROM, v["sp1"]),
        (Op.WRITE, IoKind.SENDMSG, v["sp0"]),
        (Op.READ, IoKind.RECVMSG, v["sp1"]),
        (Op.WRITE, IoKind.WRITEV, v["sp0"]),
        (Op.READ, IoKind.READV, v["sp1"]),
        (Op.WRITE, IoKind.SENDFILE, v["pipe1"]),
        (Op.READ, IoKind.READ, v["pipe0"]),
    ]:
        assert io[(op, kind, fd)] == 1, (op, kind, fd)
    eagain = only(recs, op=Op.READ, fd=v["eventfd"])
    assert (eagain.ret, eagain.err) == (-1, EAGAIN)
    shut = only(recs, op=Op.SHUTDOWN)
    assert (shut.fd, shut.arg) == (v["sp0"], 1)

    dups = [(DupKind(r.flags), r.fd, r.arg, r.ret) for r in recs if r.op is Op.DUP]
    assert dups == [
        (DupKind.FCNTL_DUPFD, v["pipe0"], 50, v["dupfd"]),
        (DupKind.FCNTL_DUPFD_CLOEXEC, v["pipe0"], 60, v["dupfd_cloexec"]),
        (DupKind.DUP, v["pipe0"], -1, v["dup"]),
        (DupKind.DUP3, v["pipe0"], 70, 70),
    ]

    ep = v["epoll"]
    assert only(recs, op=Op.EPOLL_CREATE).ret == ep
    ctls = [
        (r.flags, r.fd, r.arg, r.events, r.data, r.ret, r.err) for r in recs if r.op is Op.EPOLL_CTL
    ]
    assert ctls == [
        (EPOLL_CTL_ADD, v["eventfd"], ep, EPOLLIN | EPOLLET, 0xFEEDFACECAFEBEEF, 0, 0),
        (EPOLL_CTL_ADD, 12345, ep, EPOLLIN | EPOLLET, 0xFEEDFACECAFEBEEF, -1, EBADF),
        (EPOLL_CTL_MOD, v["eventfd"], ep, EPOLLIN, 7, 0, 0),
        (EPOLL_CTL_DEL, v["eventfd"], ep, 0, 0, 0, 0),
    ]
    waits = [r for r in recs if r.op is Op.EPOLL_WAIT]
    assert [WaitKind(r.flags) for r in waits] == [
        WaitKind.EPOLL_PWAIT,
        WaitKind.EPOLL_PWAIT2,
        WaitKind.EPOLL_WAIT,
    ]
    assert waits[0].ret == 1 and waits[2].ret == 0
    assert waits[1].ret == 1 or waits[1].err == 38  # ENOSYS on kernels before 5.11
    events = [r for r in recs if r.op is Op.EPOLL_EVENT]
    assert all((e.data, e.events, e.fd) == (7, EPOLLIN, ep) for e in events)
    assert len(events) == waits[0].ret + max(waits[1].ret, 0)

    acc = only(recs, op=Op.ACCEPT)
    assert (acc.fd, acc.ret, acc.flags) == (v["unix_listen"], v["accepted4"], 4)

    cr = only(recs, op=Op.CLOSE_RANGE)
    assert (cr.fd, cr.data, cr.arg, cr.ret) == (50, 0xFFFFFFFFFFFFFFFF, 0, 0)

    # vfork is run as fork: the child's close lands in the child's own file.
    fork = only(recs, op=Op.FORK)
    assert fork.ret == v["vfork_child"]
    assert not any(r.op is Op.CLOSE and r.fd == v["dup"] for r in recs)
    child = next(p for p in trace.processes if p.pid == v["vfork_child"])
    assert child.header.fork_seq == fork.seq_in and child.header.ppid == parent.pid
    assert [(r.op, r.fd) for r in child.records] == [(Op.CLOSE, v["dup"])]


# --------------------------------------------------------------------------- threads --

THREADS, ITERS = 8, 20000
# per thread: pipe() (2 FDNEW), ITERS write + ITERS read, 2 close
EXPECTED_THREAD_RECORDS = THREADS * (2 + 2 * ITERS + 2)


def test_threads_lose_nothing(tmp_path: Path) -> None:
    run_traced([program("threads"), THREADS, ITERS], tmp_path)
    trace = read_trace_dir(tmp_path)
    assert trace.complete and trace.lost_records == 0
    assert len(trace.records) == EXPECTED_THREAD_RECORDS
    assert_sequence_sane(trace)
    by_tid = Counter(r.tid for r in trace.records)
    assert len(by_tid) == THREADS
    assert set(by_tid.values()) == {2 + 2 * ITERS + 2}
    io = [r for r in trace.records if r.op in (Op.READ, Op.WRITE)]
    assert len(io) == THREADS * 2 * ITERS and all(r.ret == 1 for r in io)
    # Each thread's write precedes its read: per-thread order survives the merge.
    for tid in by_tid:
        ops = [r.op for r in trace.records if r.tid == tid and r.op in (Op.READ, Op.WRITE)]
        assert ops == [Op.WRITE, Op.READ] * ITERS


def test_concurrent_processes_share_one_counter(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env.update(shim.shim_env(tmp_path, base_env=env))
    procs = [
        subprocess.Popen([str(program("threads")), "4", "5000"], env=env, stdout=subprocess.DEVNULL)
        for _ in range(3)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    trace = read_trace_dir(tmp_path)
    assert len(trace.processes) == 3 and trace.complete
    assert len(trace.records) == 3 * 4 * (2 + 2 * 5000 + 2)
    assert_sequence_sane(trace)
    numbers = sorted([*(n for pair in calls(trace) for n in pair), *exit_seqs(trace)])
    assert numbers == list(range(1, len(numbers) + 1))
    assert shim.read_seq(tmp_path) == numbers[-1]


def test_threads_tiny_trace_reports_lost_records(tmp_path: Path) -> None:
    run_traced(
        [program("threads"), THREADS, ITERS],
        tmp_path,
        extra={"AFTERCLOSE_TRACE_MB": "1", "AFTERCLOSE_TRACE_CHUNK": "64"},
    )
    trace = read_trace_dir(tmp_path)
    (proc,) = trace.processes
    assert proc.header.chunk_records == 64
    assert proc.header.n_chunks == ((1 << 20) - HEADER_SIZE) // (65 * 64)
    assert trace.lost_records > 0 and not trace.complete
    # Every record is either written or counted.
    assert len(trace.records) + trace.lost_records == EXPECTED_THREAD_RECORDS
    assert len(trace.records) <= proc.header.n_chunks * 64
    assert any("records lost (buffer full)" in w and proc.path.name in w for w in trace.warnings)
    assert_sequence_sane(trace)


# ------------------------------------------------------------------------ robustness --


def test_signal_handlers_writing_mid_record_lose_nothing(tmp_path: Path) -> None:
    # Tiny chunks so that handlers also land while a writer takes a new chunk.
    proc = run_traced(
        [program("signals"), 200_000], tmp_path, extra={"AFTERCLOSE_TRACE_CHUNK": "16"}
    )
    v = values(proc.stdout)
    assert v["handled"] > 0
    trace = read_trace_dir(tmp_path)
    assert trace.complete
    counts = Counter(r.op for r in trace.records)
    assert counts[Op.READ] == v["reads"]
    assert counts[Op.WRITE] == v["handled"]
    assert_sequence_sane(trace)


def test_crash_keeps_records(tmp_path: Path) -> None:
    proc = run_traced([program("crash")], tmp_path, check=False)
    assert proc.returncode == -signal.SIGSEGV
    trace = read_trace_dir(tmp_path)
    (p,) = trace.processes
    assert [r.op for r in p.records] == [Op.SOCKET, Op.CLOSE] * 10
    assert p.crashed
    assert any("fatal signal" in w for w in trace.warnings)


def test_python_process(tmp_path: Path) -> None:
    code = (
        "import socket\n"
        "a, b = socket.socketpair()\n"
        "a.send(b'ping')\n"
        "assert b.recv(4) == b'ping'\n"
        "print('fds', a.fileno(), b.fileno())\n"
        "a.close(); b.close()\n"
    )
    proc = run_traced([sys.executable, "-c", code], tmp_path)
    fa, fb = (int(x) for x in proc.stdout.split()[1:3])
    trace = read_trace_dir(tmp_path)
    assert trace.complete
    (p,) = [p for p in trace.processes if any(r.op is Op.FDNEW and r.ret == fa for r in p.records)]
    recs = p.records
    pair = [r for r in recs if r.op is Op.FDNEW and r.ret in (fa, fb)]
    assert [r.ret for r in pair[-2:]] == [fa, fb]
    send = only(recs, op=Op.WRITE, fd=fa, flags=IoKind.SEND)
    recv = only(recs, op=Op.READ, fd=fb, flags=IoKind.RECV)
    assert send.ret == recv.ret == 4 and send.seq_out < recv.seq_in
    # Python's start-up opened and closed fds with the same numbers before: look after recv.
    closes = [r.fd for r in recs if r.op is Op.CLOSE and r.seq_in > recv.seq_out]
    assert closes[:2] == [fa, fb]
    assert_sequence_sane(trace)


def test_asan_target_runs_under_the_shim(tmp_path: Path) -> None:
    try:
        shim.asan_runtime_path()
        exe = program("lifecycle", sanitizer="address")
    except BuildError as exc:  # no ASan runtime on this machine
        capabilities.lacking("asan", str(exc))
    proc = run_traced(
        [exe],
        tmp_path,
        asan_runtime=True,
        extra={"ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1"},
    )
    v = values(proc.stdout)
    trace = read_trace_dir(tmp_path)
    assert trace.complete and len(trace.processes) == 2
    event = only(trace.records, op=Op.EPOLL_EVENT)
    assert (event.data, event.events) == (0x1234, EPOLLIN)
    assert only(trace.records, op=Op.FORK).ret == v["child"]
    assert_sequence_sane(trace)


def test_exec_starts_a_new_file(tmp_path: Path) -> None:
    sh = shutil.which("sh")
    true = shutil.which("true")
    assert sh and true
    run_traced([sh, "-c", f"exec {true}"], tmp_path)
    names = sorted(p.name for p in tmp_path.glob("trace.*.bin"))
    assert len(names) == 2
    pids = {n.split(".")[1] for n in names}
    assert len(pids) == 1
    assert [n.split(".")[2] for n in names] == ["0", "1"]
    trace = read_trace_dir(tmp_path)
    assert [Path(p.header.exe).name for p in trace.processes][1] == "true"


def test_disabled_without_trace_dir_passes_through(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["LD_PRELOAD"] = str(shim.shim_path())
    env.pop("AFTERCLOSE_TRACE_DIR", None)
    proc = subprocess.run(
        [str(program("lifecycle"))], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    # Once per process image: the forked child inherits the "already said" state.
    assert proc.stderr.splitlines() == [
        "afterclose-shim: tracing disabled: AFTERCLOSE_TRACE_DIR is not set"
    ]
    assert values(proc.stdout)["child"] > 0


def test_unusable_trace_dir_passes_through(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    env = dict(os.environ)
    env.update(shim.shim_env(missing, base_env={}))
    proc = subprocess.run(
        [str(program("allops"))], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("afterclose-shim: tracing disabled: cannot open ")
    assert "seq.bin" in proc.stderr and "ENOENT" in proc.stderr
    assert not missing.exists()


def test_shim_builds_warning_free(tmp_path: Path) -> None:
    out = tmp_path / "shim.so"
    proc = subprocess.run(
        [
            cbuild.compiler(),
            "-shared",
            *shim.CFLAGS,
            "-Werror",
            "-o",
            str(out),
            *map(str, shim.SHIM_SOURCES),
            *shim.LDFLAGS,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_shim_is_in_parts_each_under_900_lines() -> None:
    names = {p.name for p in shim.SHIM_SOURCES}
    assert {"records.c", "wrappers.c", "faults.c", "chaos.c", "freetrack.c"} <= names
    for part in (*shim.SHIM_SOURCES, *shim.SHIM_DIR.glob("*.h")):
        assert len(part.read_text().splitlines()) <= 900, part


def test_checked_in_format_header_is_generated_from_format_py() -> None:
    text = codegen.shim_header()
    assert text.startswith("/* Generated by harness/trace/codegen.py")
    assert codegen.SHIM_HEADER.read_text() == text, (
        "harness/shim/format.h is stale: python -m afterclose.harness.trace.codegen"
    )
    for op in Op:
        assert f" OP_{op.name} = {int(op)}," in text  # several to a line
    assert f"#define REC_INJECTED {int(RecordFlag.INJECTED):#x}u" in text


def test_stale_format_header_is_rewritten_before_a_build(tmp_path: Path) -> None:
    header = tmp_path / "format.h"
    header.write_text("/* stale */\n")
    assert codegen.ensure_shim_header(header) == header
    assert header.read_text() == codegen.shim_header()
    assert not [p for p in tmp_path.iterdir() if p != header]  # no temporary left behind


def test_c_structs_match_the_python_layout(tmp_path: Path) -> None:
    # Compiled and run: the generated header's sizes and offsets as the C compiler sees them.
    probe = tmp_path / "layout.c"
    fields = [("ac_record", f) for f, _ in fmt.RECORD_FIELDS]
    fields += [("ac_header", f) for f, _ in fmt.HEADER_FIELDS]
    lines = [
        f'    printf("{s}.{f} %zu %zu\\n", offsetof(struct {s}, {f}), '
        f"sizeof(((struct {s} *)0)->{f}));"
        for s, f in fields
    ]
    probe.write_text(
        f'#include <stdio.h>\n#include "{codegen.SHIM_HEADER}"\nint main(void)\n{{\n'
        + "\n".join(lines)
        + "\n    return 0;\n}\n"
    )
    exe = tmp_path / "layout"
    subprocess.run([cbuild.compiler(), "-o", str(exe), str(probe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    seen = {name: (int(o), int(n)) for name, o, n in (ln.split() for ln in out.splitlines())}
    for struct_name, layout in (("ac_record", fmt.RECORD_FIELDS), ("ac_header", fmt.HEADER_FIELDS)):
        for name, code in layout:
            size = struct.calcsize("<" + code)
            assert seen[f"{struct_name}.{name}"] == (fmt.field_offset(layout, name), size)


# --------------------------------------------------------------------- python side --


def test_shim_env_keeps_existing_preload_and_puts_asan_first(tmp_path: Path) -> None:
    so = str(shim.shim_path())
    env = shim.shim_env(tmp_path, base_env={"LD_PRELOAD": "/opt/a.so:/opt/b.so"})
    assert env["LD_PRELOAD"].split(":") == ["/opt/a.so", "/opt/b.so", so]
    assert env["AFTERCLOSE_TRACE_DIR"] == str(tmp_path.resolve())
    assert env["AFTERCLOSE_FREE_TRACKING"] == "1"
    off = shim.shim_env(tmp_path, free_tracking=False, base_env={}, extra={"X": "1"})
    assert off["LD_PRELOAD"] == so and off["AFTERCLOSE_FREE_TRACKING"] == "0" and off["X"] == "1"
    try:
        asan = str(shim.asan_runtime_path())
    except BuildError as exc:
        capabilities.lacking("asan", str(exc))
    env = shim.shim_env(tmp_path, asan_runtime=True, base_env={"LD_PRELOAD": "/opt/a.so"})
    assert env["LD_PRELOAD"].split(":") == [asan, "/opt/a.so", so]


def test_relabel_pid_moves_header_chunks_and_name(tmp_path: Path) -> None:
    run_traced([program("readloop"), "20"], tmp_path, extra={"AFTERCLOSE_TRACE_CHUNK": "8"})
    (before,) = read_trace_dir(tmp_path).processes
    host = before.pid + 100000
    moved = shim.relabel_pid(tmp_path, before.pid, host)
    assert [p.name for p in moved] == [f"trace.{host}.0.bin"]
    (after,) = read_trace_dir(tmp_path).processes
    assert after.pid == after.header.pid == host
    assert [dataclasses.replace(r, pid=before.pid) for r in after.records] == list(before.records)
    with moved[0].open("rb") as f:
        f.seek(HEADER_SIZE)
        assert fmt.CHUNK_HEADER_STRUCT.unpack(f.read(fmt.CHUNK_HEADER_STRUCT.size))[1] == host


def test_read_seq_without_a_counter(tmp_path: Path) -> None:
    assert shim.read_seq(tmp_path) == 0
    (tmp_path / "seq.bin").write_bytes(struct.pack("<Q", 77))
    assert shim.read_seq(tmp_path) == 77


def _one_trace_file(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    run_traced([program("crash")], src, check=False, extra={"AFTERCLOSE_TRACE_MB": "1"})
    (file,) = src.glob("trace.*.bin")
    return file


def test_truncated_file_is_a_trace_error_naming_it(tmp_path: Path) -> None:
    file = _one_trace_file(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    for size, words in [
        (100, "smaller than the 4096-byte header"),
        (HEADER_SIZE + 1000, "promises"),
    ]:
        target = bad / "trace.4242.0.bin"
        with file.open("rb") as f:
            target.write_bytes(f.read(size))
        with pytest.raises(TraceError) as info:
            read_trace_file(target)
        assert str(target) in str(info.value) and words in str(info.value)
        with pytest.raises(TraceError) as info:
            read_trace_dir(bad)
        assert "trace.4242.0.bin" in str(info.value)


def test_foreign_file_is_a_trace_error(tmp_path: Path) -> None:
    target = tmp_path / "trace.1.0.bin"
    target.write_bytes(b"PK\x03\x04" + b"x" * 9000)
    with pytest.raises(TraceError, match="not an afterclose trace") as info:
        read_trace_dir(tmp_path)
    assert str(target) in str(info.value)


def test_corrupt_chunk_count_is_a_trace_error(tmp_path: Path) -> None:
    file = _one_trace_file(tmp_path)
    data = bytearray(file.read_bytes())
    struct.pack_into("<Q", data, HEADER_SIZE + 8, 999_999)
    target = tmp_path / "trace.9.0.bin"
    target.write_bytes(bytes(data))
    with pytest.raises(TraceError, match="claims 999999 records"):
        read_trace_file(target)


def test_version_mismatch_is_a_trace_error(tmp_path: Path) -> None:
    file = _one_trace_file(tmp_path)
    data = bytearray(file.read_bytes())
    fields = list(HEADER_STRUCT.unpack_from(data, 0))
    fields[1] = 99
    HEADER_STRUCT.pack_into(data, 0, *fields)
    target = tmp_path / "trace.9.0.bin"
    target.write_bytes(bytes(data))
    with pytest.raises(TraceError, match="version 99"):
        read_trace_file(target)


def test_header_never_written_is_skipped_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "trace.5.0.bin").write_bytes(b"\0" * (2 * HEADER_SIZE))
    trace = read_trace_dir(tmp_path)
    assert trace.processes == () and not trace.complete
    assert any("header never written" in w for w in trace.warnings)


def test_missing_folder_is_a_trace_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="trace folder not found"):
        read_trace_dir(tmp_path / "nope")


def test_million_records_are_all_read(tmp_path: Path) -> None:
    # How fast: bench/trace_scale.py.
    proc = run_traced([program("readloop"), 1_000_000], tmp_path)
    assert values(proc.stdout)["calls"] == 1_000_000
    trace = read_trace_dir(tmp_path)
    reads = [r for r in trace.records if r.op is Op.READ]
    assert len(reads) == 1_000_000 and trace.complete
