"""The trace model builder: legitimate patterns that look like bugs (fd-number reuse, fork,
dup, fds the shim never saw) make no rule fire; threads, sorting, trace-like input, scale."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tracebuild import (
    EBADF,
    EP,
    IN,
    LISTEN,
    ONESHOT,
    OUT,
    RDHUP,
    A,
    B,
    TraceBuilder,
    conn,
    counts,
    seed_race,
    server,
)

from afterclose.harness.oracle.judge import judge_records, judge_trace
from afterclose.harness.trace.format import Header, HeaderFlag, Record


def test_legit_reuse_with_new_data() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.read(tid=1, fd=7, ret=0)
    t.ctl_del(tid=1, epfd=EP, fd=7)
    t.close(tid=1, fd=7)
    t.free(tid=1, ptr=A)
    conn(t, 7, B)
    t.wait(tid=1, epfd=EP, events=[(IN, B)])
    t.read(tid=1, fd=7)
    t.ctl_mod(tid=1, epfd=EP, fd=7, data=B, events=IN | OUT)
    t.write(tid=1, fd=7)
    v = t.check()
    assert counts(v) == {}, v.render()
    assert v.ok
    assert v.stats.incarnations == 4  # 3, 5, 7#1, 7#2
    assert v.stats.events == 2


def test_legit_reuse_across_threads_with_event_for_new_connection() -> None:
    """T2 closes 7#1, T1 accepts 7#2, T2 then gets an event for 7#2 and closes it: T2 knew."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.close(tid=2, fd=7)
    conn(t, 7, B)
    t.wait(tid=2, epfd=EP, events=[(IN, B)])
    t.close(tid=2, fd=7)
    assert counts(t.check()) == {}


def test_close_after_del_and_free_after_del_close() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.ctl_del(tid=2, epfd=EP, fd=7)
    t.close(tid=2, fd=7)
    t.free(tid=2, ptr=A)
    t.wait(tid=1, epfd=EP)
    assert counts(t.check()) == {}


def test_fork_child_closes_its_copy() -> None:
    t = TraceBuilder(pid=100)
    server(t)
    conn(t, 7, A)
    t.fork(tid=1, child=200)
    t.close(tid=200, fd=7, pid=200)
    t.close(tid=200, fd=LISTEN, pid=200)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.read(tid=1, fd=7)
    v = t.check()
    assert counts(v) == {}
    assert v.stats.processes == 2


def test_fork_child_with_inherited_epoll_fd() -> None:
    t = TraceBuilder(pid=100)
    server(t)
    conn(t, 7, A)
    t.fork(tid=1, child=200)
    t.wait(tid=200, epfd=EP, events=[(IN, A)], pid=200)
    t.read(tid=200, fd=7, pid=200)
    t.ctl_mod(tid=200, epfd=EP, fd=7, data=A, pid=200)
    assert counts(t.check()) == {}


def test_dup_closed_while_original_registered() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.dup(tid=1, fd=7, ret=9)
    t.close(tid=1, fd=9)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.read(tid=1, fd=7)
    assert counts(t.check()) == {}


def test_unknown_origin_fds_are_never_reported() -> None:
    t = TraceBuilder()
    server(t)
    t.read(tid=1, fd=0)
    t.write(tid=1, fd=1)
    t.close(tid=1, fd=2)
    t.write(tid=1, fd=2, err=EBADF)
    # A pipe the shim did not see: 10/11.
    t.write(tid=2, fd=11)
    t.read(tid=1, fd=10)
    t.ctl_add(tid=1, epfd=EP, fd=10, data=A)
    t.close(tid=1, fd=10)
    t.close(tid=1, fd=10, err=EBADF)
    t.read(tid=1, fd=10, err=EBADF)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    v = t.check()
    assert counts(v) == {}
    assert v.warnings == []


def test_event_while_its_add_is_in_flight_is_not_unattributed() -> None:
    """The kernel may deliver an event for a new registration before epoll_ctl(ADD) returns to
    the shim: the event's seq_out is then below the ADD's.  It is not a registration made
    behind the shim's back."""
    t = TraceBuilder()
    server(t)
    t.accept(tid=2, ret=7)
    add = t.begin(t.ctl_add, tid=2, epfd=EP, fd=7, data=A)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.end(add)
    t.read(tid=1, fd=7)
    v = t.check()
    assert counts(v) == {}
    assert not any("no traced epoll_ctl set" in w for w in v.warnings), v.warnings
    t.wait(tid=1, epfd=EP, events=[(IN, B)])  # B: set by nothing at all
    assert any("1 epoll events carried data" in w for w in t.check().warnings)


def test_thread_names_are_stable_and_in_order_of_appearance() -> None:
    v = seed_race().check()
    ctx_names = [f.timeline() for f in v.occurrences["stale-rearm"]]
    assert "T1 (tid 11)" in ctx_names[0] and "T2 (tid 12)" in ctx_names[0]
    assert v.stats.threads == 3


def test_timeline_window_is_bounded() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    for _ in range(200):
        t.read(tid=1, fd=7)
    t.close(tid=2, fd=7)
    for _ in range(200):
        t.read(tid=1, fd=8)
    t.read(tid=3, fd=7, err=EBADF)
    for _ in range(50):
        t.write(tid=1, fd=8)
    v = t.check()
    text = v.violations[0].details
    rows = [ln for ln in text.splitlines() if " T" in ln and "(tid" in ln]
    assert len(rows) <= 40
    assert "related records not shown" in text
    assert "accept(3) = 7" in text  # the creation is kept, however far back


@dataclass
class _Proc:
    header: Header
    path: Path


@dataclass
class _Trace:
    processes: tuple[_Proc, ...]
    records: tuple[Record, ...]
    lost_records: int
    warnings: tuple[str, ...]
    complete: bool = True


def test_check_trace_accepts_a_trace_like_object(tmp_path: Path) -> None:
    t = seed_race()
    hdr = t.headers()[100]
    hdr = Header(**{**{f: getattr(hdr, f) for f in Header.__slots__}, "flags": HeaderFlag(3)})
    tr = _Trace(
        (_Proc(hdr, tmp_path / "trace.100.0.bin"),),
        tuple(t.sorted_records()),
        0,
        ("pid 100: something odd",),
    )
    v = judge_trace(tr)
    assert counts(v)["stale-rearm"] == 1
    assert v.warnings[0] == "pid 100: something odd"
    assert any("filled up" in w for w in v.warnings)
    assert v.violations[0].artifacts == (str(tmp_path / "trace.100.0.bin"),)


def test_check_trace_damaged_trace_is_incomplete(tmp_path: Path) -> None:
    t = seed_race()
    procs = tuple(_Proc(h, tmp_path / f"trace.{pid}.0.bin") for pid, h in t.headers().items())
    tr = _Trace(procs, tuple(t.sorted_records()), 0, ("trace.100.0.bin: truncated",), False)
    v = judge_trace(tr, trace_path="/runs/7/trace")
    assert not v.complete
    assert v.warnings[0] == "trace.100.0.bin: truncated"
    assert all("WARNING: the trace is incomplete" in x.details for x in v.violations)
    assert all(x.artifacts == ("/runs/7/trace",) for x in v.violations)
    assert seed_race().check().complete


def test_unsorted_input_is_sorted() -> None:
    t = seed_race()
    recs = list(reversed(t.sorted_records()))
    v = judge_records(recs, t.headers())
    assert counts(v) == counts(t.check())


def test_many_connections_without_a_violation() -> None:
    """~17k records of correct connections; how the checking time grows: bench/trace_scale.py."""
    t = TraceBuilder()
    server(t)
    for n in range(1500):
        fd = 7 + n % 50
        ptr = 0x10000 + (n % 97) * 64
        conn(t, fd, ptr, events=IN | ONESHOT)
        t.wait(tid=1, epfd=EP, events=[(IN, ptr)])
        t.read(tid=2, fd=fd)
        t.ctl_mod(tid=2, epfd=EP, fd=fd, data=ptr, events=IN | ONESHOT)
        t.wait(tid=1, epfd=EP, events=[(IN | RDHUP, ptr)])
        t.read(tid=2, fd=fd, ret=0)
        t.ctl_del(tid=2, epfd=EP, fd=fd)
        t.close(tid=2, fd=fd)
        t.free(tid=2, ptr=ptr)
    recs = t.sorted_records()
    assert len(recs) > 15_000
    v = judge_records(recs, t.headers())
    assert counts(v) == {}, v.render()
