"""wrong-incarnation: each of the four shapes fires once per call; hand-offs and a new wait
batch do not."""

from __future__ import annotations

import sys
from pathlib import Path

from tracebuild import (
    C2,
    EAGAIN,
    ENOENT,
    EP,
    ET,
    HUP,
    IN,
    OUT,
    RDHUP,
    A,
    B,
    C,
    TraceBuilder,
    conn,
    counts,
    elf_file,
    server,
)

from afterclose.harness.trace.netpoller import is_go_program


def test_wrong_incarnation_double_close_never_revealed() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=2, epfd=EP, events=[(IN | RDHUP, A)])  # T2 owns 7#1: its event, its EOF
    t.read(tid=2, fd=7, ret=0)
    t.close(tid=2, fd=7)
    t.accept(tid=1, ret=7)
    t.close(tid=2, fd=7)
    v = t.check()
    assert counts(v) == {"wrong-incarnation": 1}
    assert "closed fd 7 twice" in v.violations[0].summary


def test_closing_a_file_another_thread_opened_on_the_number_is_a_hand_off() -> None:
    """Apache's event MPM: a worker opens the file it serves, and the worker that finishes the
    response's write completion closes it with the request's pool, on a number the second
    worker once closed for a connection of its own."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=2, epfd=EP, events=[(IN | RDHUP, A)])
    t.read(tid=2, fd=7, ret=0)
    t.close(tid=2, fd=7)
    t.fdnew(tid=3, ret=7)  # the file, opened by another worker
    t.read(tid=3, fd=7)
    t.close(tid=2, fd=7)
    assert counts(t.check()) == {}


def test_close_only_thread_closing_each_handed_over_fd_is_fine() -> None:
    """A closer/logger thread that is handed fds through a queue (invisible in the trace) and
    only ever closes them: closing 7#1 and then 7#2 is two hand-offs, not a double close."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.dup(tid=1, fd=7, ret=8)  # the logger's reference to the connection
    t.ctl_del(tid=1, epfd=EP, fd=7)
    t.close(tid=1, fd=7)
    t.close(tid=2, fd=8)  # logger: 8#1
    conn(t, 7, B)
    t.dup(tid=1, fd=7, ret=8)  # 8#2, handed to the logger in turn
    t.ctl_del(tid=1, epfd=EP, fd=7)
    t.close(tid=1, fd=7)
    t.close(tid=2, fd=8)  # logger: 8#2
    conn(t, 9, C)
    t.close(tid=2, fd=9)  # a lingering close of 9#1, handed over still registered
    conn(t, 9, C2)
    t.close(tid=2, fd=9)  # and of 9#2
    assert counts(t.check()) == {}


def test_wrong_incarnation_own_event() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=2, epfd=EP, events=[(IN, A)])  # T2 got 7#1
    t.close(tid=3, fd=7)
    t.accept(tid=1, ret=7)  # 7#2
    t.write(tid=2, fd=7)  # T2 still thinks 7 is 7#1
    t.read(tid=2, fd=7)  # same batch: same finding
    v = t.check()
    assert counts(v) == {"wrong-incarnation": 1}
    assert "before its next epoll_wait" in v.violations[0].summary


def _recycled_data_readded_around_a_wait(add_begins_before_the_wait_returns: bool) -> TraceBuilder:
    """T2 waits; T3 ends 7#1 (data A); T4 accepts 7#2 and ADDs it with A again (a pool that
    recycles its per-connection state); T2's wait returns an event carrying A; T2 reads 7."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A, events=IN | OUT | ET)
    w = t.begin(t.wait, tid=2, epfd=EP, events=[(OUT, A)])
    t.read(tid=3, fd=7, ret=0)
    t.ctl_del(tid=3, epfd=EP, fd=7)
    t.close(tid=3, fd=7)
    t.accept(tid=4, ret=7)  # 7#2
    if add_begins_before_the_wait_returns:
        add = t.begin(t.ctl_add, tid=4, epfd=EP, fd=7, data=A, events=IN | OUT | ET)
        t.end(w)
        t.end(add)
    else:
        t.end(w)
        t.ctl_add(tid=4, epfd=EP, fd=7, data=A, events=IN | OUT | ET)
    t.read(tid=2, fd=7, err=EAGAIN)
    return t


def test_event_an_add_in_flight_may_have_queued_proves_no_incarnation() -> None:
    """The ADD of 7#2 began before T2's wait returned: epoll_ctl queues a ready file and wakes
    the waiters before it returns, so the event may be 7#2's own (a fresh socket is writable
    at once), and T2's read of 7#2 may be for 7#2.  The data A cannot tell the two apart."""
    assert counts(_recycled_data_readded_around_a_wait(True).check()) == {}


def test_event_before_the_recycled_add_began_is_wrong_incarnation() -> None:
    """The same calls with 7#2's ADD begun after the wait returned: the event was 7#1's."""
    v = _recycled_data_readded_around_a_wait(False).check()
    assert counts(v) == {"wrong-incarnation": 1}
    assert "got an event for fd 7#1" in v.violations[0].summary


def _pooled_state_handed_to_another_number(
    setter_tid: int, data: int, *, tear_down: bool = False
) -> TraceBuilder:
    """T2 got an event for 7#1 (data A); T3 ends 7#1; T4 accepts 9 and T{setter_tid}
    registers it with ``data``; T2 reads 9 (or deletes and closes it) before its next wait."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A, events=IN | OUT | ET)
    t.wait(tid=2, epfd=EP, events=[(IN | RDHUP, A)])
    t.read(tid=3, fd=7, ret=0)
    t.ctl_del(tid=3, epfd=EP, fd=7)
    t.close(tid=3, fd=7)
    t.accept(tid=4, ret=9)
    t.ctl_add(tid=setter_tid, epfd=EP, fd=9, data=data, events=IN | OUT | ET)
    if tear_down:  # the old hang-up handled on the new connection
        t.ctl_del(tid=2, epfd=EP, fd=9)
        t.close(tid=2, fd=9)
    else:
        t.read(tid=2, fd=9)
    return t


def test_wrong_incarnation_through_recycled_data_on_another_number() -> None:
    for tear_down in (False, True):
        v = _pooled_state_handed_to_another_number(4, A, tear_down=tear_down).check()
        assert counts(v) == {"wrong-incarnation": 1}
        assert "another thread set its data for fd 9#1" in v.violations[0].summary


def test_a_number_registered_with_other_data_or_by_the_thread_itself_is_fine() -> None:
    assert counts(_pooled_state_handed_to_another_number(4, B).check()) == {}
    assert counts(_pooled_state_handed_to_another_number(2, A).check()) == {}


def test_wrong_incarnation_own_event_close() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=2, epfd=EP, events=[(IN | HUP, A)])
    t.ctl_del(tid=3, epfd=EP, fd=7)
    t.close(tid=3, fd=7)
    conn(t, 7, B)
    t.close(tid=2, fd=7)  # T2 closes a stranger's connection
    v = t.check()
    assert counts(v) == {"wrong-incarnation": 1}
    text = v.violations[0].details
    assert any(
        ln.lstrip().startswith(">>>") and "close(7) -> fd 7#2 ends" in ln
        for ln in text.splitlines()
    )


def test_own_event_after_a_new_wait_is_fine() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.wait(tid=2, epfd=EP, events=[(IN, A)])
    t.close(tid=3, fd=7)
    t.accept(tid=1, ret=7)
    t.wait(tid=2, epfd=EP)
    t.write(tid=2, fd=7)
    assert counts(t.check()) == {}


def test_wrong_incarnation_mod_enoent() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.close(tid=2, fd=7)
    t.accept(tid=1, ret=7)  # not registered yet
    t.ctl_mod(tid=3, epfd=EP, fd=7, data=A, err=ENOENT)
    v = t.check()
    assert counts(v) == {"wrong-incarnation": 1}
    assert "ENOENT" in v.violations[0].summary


def go_netpoll_round(exe: str) -> TraceBuilder:
    """Go's runtime: threads T1..T3 all run the netpoller on one instance.  T2's wait gets
    7#1's event, which only readies 7#1's goroutine; it runs on T3, reads EOF and closes; T1
    accepts 7#2 and registers the recycled pollDesc; 7#2's goroutine then runs on T2, which
    reads its request before T2 polls again."""
    t = TraceBuilder(exe=exe)
    server(t)
    t.wait(tid=3, epfd=EP)
    conn(t, 7, A, events=IN | ET)
    t.wait(tid=2, epfd=EP, events=[(IN, A)])
    t.read(tid=3, fd=7, ret=0)
    t.ctl_del(tid=3, epfd=EP, fd=7)
    t.close(tid=3, fd=7)
    conn(t, 7, A, events=IN | ET)
    t.read(tid=2, fd=7)
    return t


def test_go_netpoller_thread_does_not_own_its_batch(tmp_path: Path) -> None:
    go = elf_file(tmp_path / "server", [".text", ".go.buildinfo"])
    assert counts(go_netpoll_round(str(go)).check()) == {}


def test_the_same_calls_in_a_c_program_are_wrong_incarnation(tmp_path: Path) -> None:
    c = elf_file(tmp_path / "server", [".text", ".data"])
    v = go_netpoll_round(str(c)).check()
    assert counts(v) == {"wrong-incarnation": 1}
    assert "got an event for fd 7#1" in v.violations[0].summary
    assert "called read(7) on fd 7#2" in v.violations[0].summary


def test_go_loop_on_one_locked_thread_still_owns_its_batch(tmp_path: Path) -> None:
    """A Go program running its own epoll loop on a locked OS thread (targets/go-fixed): one
    thread waits on the instance, so its batch is its own."""
    go = elf_file(tmp_path / "server", [".text", ".go.buildinfo"])
    t = TraceBuilder(exe=str(go))
    server(t)
    conn(t, 7, A)
    t.wait(tid=2, epfd=EP, events=[(IN, A)])
    t.close(tid=3, fd=7)
    t.accept(tid=1, ret=7)
    t.read(tid=2, fd=7)
    assert counts(t.check()) == {"wrong-incarnation": 1}


def test_go_program_is_told_by_its_section_table(tmp_path: Path) -> None:
    assert is_go_program(str(elf_file(tmp_path / "go", [".text", ".note.go.buildid"])))
    assert not is_go_program(str(elf_file(tmp_path / "c", [".text", ".data"])))
    assert not is_go_program(sys.executable)
    assert not is_go_program(str(tmp_path / "missing"))
    (tmp_path / "script").write_text("#!/bin/sh\n")
    assert not is_go_program(str(tmp_path / "script"))


def goroutine_moves_threads(exe: str) -> TraceBuilder:
    """A goroutine reads 7#2 and DELs it on T8, then closes it on T1, which had closed 7#1
    for another goroutine: one goroutine, two threads (caddy, test_connection_storm)."""
    t = TraceBuilder(exe=exe)
    server(t)
    t.wait(tid=8, epfd=EP)
    conn(t, 7, A, tid=6, events=IN | ET)
    t.wait(tid=1, epfd=EP, events=[(IN | HUP, A)])
    t.read(tid=1, fd=7, err=104)  # ECONNRESET
    t.ctl_del(tid=1, epfd=EP, fd=7)
    t.close(tid=1, fd=7)
    conn(t, 7, B, tid=6, events=IN | ET)
    t.wait(tid=8, epfd=EP, events=[(IN, B)])
    t.read(tid=8, fd=7)
    t.ctl_del(tid=8, epfd=EP, fd=7)
    t.wait(tid=1, epfd=EP)
    t.close(tid=1, fd=7)
    return t


def test_go_goroutine_closing_on_another_thread_is_no_double_close(tmp_path: Path) -> None:
    go = elf_file(tmp_path / "server", [".text", ".go.buildinfo"])
    assert counts(goroutine_moves_threads(str(go)).check()) == {}
    c = elf_file(tmp_path / "c-server", [".text"])
    v = goroutine_moves_threads(str(c)).check()
    assert counts(v) == {"wrong-incarnation": 1}
    assert "closed fd 7 twice" in v.violations[0].summary
