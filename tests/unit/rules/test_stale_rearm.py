"""stale-rearm: a reused number re-armed with its closed incarnation's data fires; data.fd,
small tags, shared tags, malloc reuse and pooled connections do not."""

from __future__ import annotations

from tracebuild import (
    C2,
    EEXIST,
    EP,
    ET,
    HUP,
    IN,
    ONESHOT,
    OUT,
    RDHUP,
    A,
    B,
    C,
    TraceBuilder,
    conn,
    counts,
    seed_race,
    server,
)


def test_legit_reuse_data_fd_convention() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, 7)
    t.wait(tid=1, epfd=EP, events=[(IN, 7)])
    t.close(tid=1, fd=7)
    t.accept(tid=1, ret=7)
    t.ctl_add(tid=1, epfd=EP, fd=7, data=7, events=IN | ONESHOT)
    t.ctl_mod(tid=1, epfd=EP, fd=7, data=7, events=IN | ONESHOT)
    t.wait(tid=1, epfd=EP, events=[(IN, 7)])
    t.read(tid=1, fd=7)
    assert counts(t.check()) == {}


def test_legit_reuse_data_fd_with_garbage_high_bits() -> None:
    """``ev.data.fd = fd`` writes 4 of the union's 8 bytes: the rest is stack garbage."""
    t = TraceBuilder()
    server(t)
    conn(t, 10, 0x7F760000000A)
    t.ctl_del(tid=1, epfd=EP, fd=10)
    t.close(tid=1, fd=10)
    t.accept(tid=1, ret=10)
    t.ctl_add(tid=1, epfd=EP, fd=10, data=0x7F760000000A)
    t.ctl_mod(tid=1, epfd=EP, fd=10, data=0x55AA00000000A, events=IN | OUT)
    t.wait(tid=1, epfd=EP, events=[(IN, 0x55AA00000000A)])
    assert counts(t.check()) == {}


def test_malloc_address_reuse() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.read(tid=1, fd=7, ret=0)
    t.ctl_del(tid=1, epfd=EP, fd=7)
    t.close(tid=1, fd=7)
    t.free(tid=1, ptr=A)
    conn(t, 8, A)  # malloc handed the same address to the next connection
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    conn(t, 7, B)
    t.read(tid=1, fd=8, ret=0)
    t.close(tid=1, fd=8)
    t.free(tid=1, ptr=A)
    conn(t, 7 + 2, C)
    t.close(tid=1, fd=7)
    t.accept(tid=1, ret=7)
    t.ctl_add(tid=1, epfd=EP, fd=7, data=A)  # and again, on a reused number
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    assert counts(t.check()) == {}


def test_seed_race() -> None:
    v = seed_race().check(trace_path="/runs/x/trace")
    assert counts(v) == {"stale-rearm": 1, "wrong-incarnation": 1, "event-for-freed-data": 1}
    stale = v.occurrences["stale-rearm"][0]
    assert stale.followups and len(stale.followups) == 1
    assert "1 event delivered with the stale data afterwards" in stale.summary
    wi = v.occurrences["wrong-incarnation"][0]
    assert wi.summary.startswith("T3 shut down fd 7#2 (a stranger's connection, accepted by T1")
    assert "while acting for fd 7#1" in wi.summary
    by_rule = {x.rule: x for x in v.violations}
    assert by_rule["stale-rearm"].artifacts == ("/runs/x/trace",)


def test_seed_race_twice_with_the_pointer_reused_in_between() -> None:
    t = seed_race()
    t.close(tid=11, fd=7)  # T1 got 7#2's event (with c): it closes 7#2
    t.accept(tid=11, ret=7)  # 7#3; malloc hands out c again (it was freed in round 1)
    t.ctl_add(tid=11, epfd=EP, fd=7, data=C, events=IN | ONESHOT | ET)
    t.wait(tid=11, epfd=EP, events=[(IN | RDHUP, C)])
    t.read(tid=12, fd=7, ret=0)
    t.free(tid=12, ptr=C)
    t.close(tid=12, fd=7)
    t.accept(tid=11, ret=7)  # 7#4
    t.ctl_add(tid=11, epfd=EP, fd=7, data=C2, events=IN | ONESHOT | ET)
    t.shutdown(tid=13, fd=7)
    t.ctl_mod(tid=13, epfd=EP, fd=7, data=C, events=IN | ONESHOT | ET)
    t.wait(tid=11, epfd=EP, events=[(IN, C)])
    v = t.check()
    assert counts(v) == {"stale-rearm": 2, "wrong-incarnation": 2, "event-for-freed-data": 2}
    assert [f.fd for f in v.occurrences["stale-rearm"]] == [7, 7]
    assert "fd 7#4" in v.occurrences["stale-rearm"][1].summary


def test_seed_race_timeline() -> None:
    v = seed_race().check(trace_path="/runs/x/trace")
    text = v.occurrences["stale-rearm"][0].timeline()
    lines = text.splitlines()
    assert lines[0].startswith("stale-rearm: ")
    assert "trace: /runs/x/trace" in text
    marked = [ln for ln in lines if ln.lstrip().startswith(">>>")]
    assert len(marked) == 1
    assert "T3 (tid 13)" in marked[0]
    assert "epoll_ctl(5, MOD, fd 7#2, IN|ONESHOT|ET, data=0x7f00aa10)" in marked[0]
    assert "data of 7#1" in marked[0] or "data of fd 7#1" in marked[0]
    assert any("accept(3) = 7  -> fd 7#2 (new connection)" in ln for ln in lines)
    assert any("close(7) -> fd 7#1 ends" in ln and "T2 (tid 12)" in ln for ln in lines)
    assert any("free(0x7f00aa10)" in ln for ln in lines)
    assert any("-> fd 7#2" in ln and "epoll_wait(5) -> [IN data=0x7f00aa10" in ln for ln in lines)
    assert any("delivered with the stale data" in ln for ln in lines)
    assert "why it is a bug" in text
    # The wrong-incarnation report marks the shutdown.
    wi = v.occurrences["wrong-incarnation"][0].timeline()
    assert any(
        ln.lstrip().startswith(">>>") and "shutdown(7, SHUT_RDWR) on fd 7#2" in ln
        for ln in wi.splitlines()
    )
    # And the verdict's Violation carries the first occurrence's timeline.
    det = {x.rule: x.details for x in v.violations}
    assert det["stale-rearm"] == text


def readd_by_a_stranger(*, served: bool = False) -> TraceBuilder:
    """7#1, registered by T1 with A, is closed; the acceptor T1 gets 7#2; T3, which never
    touched 7#1, ADDs 7#2 with A, freed by nobody (after serving a request on it: ``served``)."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.close(tid=2, fd=7)
    t.accept(tid=1, ret=7)
    if served:
        t.read(tid=3, fd=7)
        t.write(tid=3, fd=7)
    t.ctl_add(tid=3, epfd=EP, fd=7, data=A)
    return t


def test_stale_rearm_by_add_without_free_then_the_owner_add_fails() -> None:
    """T3 re-adds 7#1's pointer on the reused number; the acceptor, 7#2's owner, then registers
    its own connection and gets EEXIST: two owners, one of them stale."""
    t = readd_by_a_stranger()
    t.ctl_add(tid=1, epfd=EP, fd=7, data=B, err=EEXIST)
    v = t.check()
    assert counts(v) == {"stale-rearm": 1}
    assert "epoll_ctl(5, ADD, 7) in T3" in v.violations[0].summary


def test_stale_rearm_by_add_without_free_then_the_owner_sets_its_data() -> None:
    t = readd_by_a_stranger()
    t.ctl_mod(tid=1, epfd=EP, fd=7, data=B)  # the owner's MOD replaces the stale value
    assert counts(t.check()) == {"stale-rearm": 1}


def test_pooled_first_add_by_the_worker_handed_the_connection_is_not_stale() -> None:
    """Apache's event MPM: the listener T1 accepts 7#2 and queues it (no syscall shows that);
    worker T3 serves its request and ADDs it for keep-alive with the address its recycled pool
    gave it, the one 7#1 had.  Nobody else registers 7#2: the value is its own, and its
    events are served on 7#2."""
    t = readd_by_a_stranger(served=True)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.ctl_del(tid=1, epfd=EP, fd=7)
    t.read(tid=4, fd=7)
    t.write(tid=4, fd=7)
    t.ctl_add(tid=4, epfd=EP, fd=7, data=A)  # the next keep-alive round, same value
    assert counts(t.check()) == {}


def test_pooled_first_add_is_stale_once_the_owner_adds_after_a_del() -> None:
    t = readd_by_a_stranger(served=True)
    t.ctl_del(tid=1, epfd=EP, fd=7)
    t.ctl_add(tid=1, epfd=EP, fd=7, data=B)
    v = t.check()
    assert counts(v) == {"stale-rearm": 1, "wrong-incarnation": 2}
    assert "T3 read from fd 7#2" in v.occurrences["wrong-incarnation"][0].summary


def test_pooled_first_add_stays_unproved_when_the_same_thread_changes_its_data() -> None:
    t = readd_by_a_stranger()
    t.ctl_mod(tid=3, epfd=EP, fd=7, data=B)  # the same owner moving its connection's state
    assert counts(t.check()) == {}


def test_stale_add_not_reported_when_the_owner_add_raced_its_close() -> None:
    """T3 registers what the acceptor T2 accepts.  Its ADD of A for 7#1 is still in flight when
    T1 gets 7#1's event, closes 7#1 and frees A -- before the shim's ADD wrapper learned that A
    is epoll data, so the free leaves no record.  malloc then hands A out again for 7#2: that
    is reuse, not a stale re-arm."""
    t = TraceBuilder()
    server(t)
    t.accept(tid=2, ret=7)
    add = t.begin(t.ctl_add, tid=3, epfd=EP, fd=7, data=A)
    t.wait(tid=1, epfd=EP, events=[(IN | HUP, A)])
    t.read(tid=1, fd=7, err=104)  # ECONNRESET
    t.ctl_del(tid=1, epfd=EP, fd=7)
    t.close(tid=1, fd=7)  # ... and free(A), unrecorded
    t.end(add)
    t.accept(tid=2, ret=7)
    t.ctl_add(tid=3, epfd=EP, fd=7, data=A)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    t.read(tid=1, fd=7)
    v = t.check()
    assert counts(v) == {}, v.render()
    assert not v.warnings, v.warnings


def test_stale_add_not_checked_without_free_tracking() -> None:
    t = TraceBuilder(free_tracking=False)
    server(t)
    conn(t, 7, A)
    t.close(tid=2, fd=7)
    t.accept(tid=1, ret=7)
    t.ctl_add(tid=3, epfd=EP, fd=7, data=A)
    v = t.check()
    assert counts(v) == {}
    assert any("free() was not tracked" in w for w in v.warnings)


def test_stale_add_small_data_is_a_tag() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, 42)  # index/slot 42
    t.close(tid=2, fd=7)
    t.accept(tid=1, ret=7)
    t.ctl_add(tid=1, epfd=EP, fd=7, data=42)
    assert counts(t.check()) == {}


def test_shared_tag_data_is_never_attributed() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    conn(t, 8, A)  # the same value on two live registrations: a tag
    t.close(tid=2, fd=7)
    t.accept(tid=1, ret=7)
    t.ctl_add(tid=1, epfd=EP, fd=7, data=B)
    t.ctl_mod(tid=3, epfd=EP, fd=7, data=A)
    assert counts(t.check()) == {}


def test_pool_reuse_first_add_by_creator_is_not_stale() -> None:
    """nginx keeps connections in a preallocated pool: the next connection on the same fd
    number may get the same pointer (same tag bit) with no free() between, registered by the
    thread that accepted it."""
    t = TraceBuilder()
    server(t)
    conn(t, 7, A)
    t.close(tid=1, fd=7)
    t.accept(tid=1, ret=7)
    t.ctl_add(tid=1, epfd=EP, fd=7, data=A)
    t.wait(tid=1, epfd=EP, events=[(IN, A)])
    assert counts(t.check()) == {}
