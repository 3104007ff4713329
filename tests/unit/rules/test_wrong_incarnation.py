"""wrong-incarnation: each of the four shapes fires once per call; hand-offs and a new wait
batch do not."""

from __future__ import annotations

import sys
from pathlib import Path

from tracebuild import (
    C2,
    ENOENT,
    EP,
    ET,
    HUP,
    IN,
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
