"""The eBPF tracer (``--tracer=ebpf``, harness/trace/ebpf/ and its C program and loader).

The first tests need nothing: they feed the parser and the trace writer made-up loader output
and check the records, the seeding from /proc and the choice of tracer.  The rest run the
tracer for real (root, clang and libbpf installed, x86_64) against the built-in targets: the same
scenario gives the same verdict under the shim and under eBPF on seed-fixed/seed-buggy, the
static and Go targets (invisible to the shim) are judged by eBPF, lost events are reported,
and the plugin runs the suite with it.
"""

from __future__ import annotations

import itertools
import os
import platform
import re
import sys
import uuid
from pathlib import Path

import capabilities
import pytest
from paths import ROOT_DIR

from afterclose.harness.errors import AftercloseError
from afterclose.harness.manifest import Manifest, load_manifest, resolve_target
from afterclose.harness.oracle import judge
from afterclose.harness.oracle.rules.event_after_close import NAME as EVENT_AFTER_CLOSE
from afterclose.harness.oracle.rules.event_for_freed_data import NAME as EVENT_FOR_FREED_DATA
from afterclose.harness.oracle.rules.freed_while_registered import NAME as FREED_WHILE_REGISTERED
from afterclose.harness.oracle.rules.stale_rearm import NAME as STALE_REARM
from afterclose.harness.oracle.rules.use_after_close import NAME as USE_AFTER_CLOSE
from afterclose.harness.oracle.rules.wrong_incarnation import NAME as WRONG_INCARNATION
from afterclose.harness.session import Harness, Outcome, Settings
from afterclose.harness.trace import ebpf, reader
from afterclose.harness.trace.codegen import ebpf_constants
from afterclose.harness.trace.format import EPOLL_CTL_ADD, IoKind, Op
from afterclose.harness.tracers import choose_tracer

ROOT = ROOT_DIR
RUN_ID = uuid.uuid4().hex  # one build of each target for the whole module
LIFECYCLE = {
    EVENT_AFTER_CLOSE,
    USE_AFTER_CLOSE,
    STALE_REARM,
    WRONG_INCARNATION,
    FREED_WHILE_REGISTERED,
    EVENT_FOR_FREED_DATA,
}
needs_ebpf = capabilities.requires("ebpf")
needs_go = capabilities.requires("go")


def manifest(name: str) -> Manifest:
    return load_manifest(resolve_target(name, ROOT))


# -- no root needed: the parser, the writer, the seeding, the choice -----------------------


def write_output(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_parse_output(tmp_path: Path) -> None:
    out = write_output(
        tmp_path / "ebpf.out",
        [
            "B 1000",
            # op pid tid in out flags fd arg data events ret
            "2 10 11 1100 1200 4 3 0 0 0 7",
            "8 10 11 1300 1400 0 4 64 140000 1 2",  # a wait carrying its first event
            "9 10 11 1300 1400 0 4 1 150000 5 0",
            "Lost 17 events",
            "3 10 12 1500 1600 0 7 0 0 0 -9",
            "T 300",
            "X 10 10 1700",
            "E 10 1800",
            "garbage",
            "S 1900",  # the stop: records end here
            "",
            "@n: 7",  # the loader's exit: the lines handed over (4 records, T, X, E)
        ],
    )
    parsed = ebpf.parse_output(out)
    assert parsed.begin_ns == 1000
    assert parsed.lost == 17
    assert parsed.truncated_waits == 1
    assert parsed.execs == [(10, 10, 1700)]
    assert parsed.exits == {10: 1800}
    assert parsed.malformed == 1
    assert (parsed.stopped_ns, parsed.printed, parsed.lines) == (1900, 7, 7)
    assert parsed.unwritten() == 0
    # Handed over, neither in the file nor counted lost: never read out by the loader.
    assert ebpf.ParsedOutput(printed=30, lines=10, lost=5).unwritten() == 15
    assert ebpf.ParsedOutput(printed=None, lines=10).unwritten() == 0
    ops = [r[0] for r in parsed.records]
    assert ops == [Op.ACCEPT, Op.EPOLL_WAIT, Op.EPOLL_EVENT, Op.EPOLL_EVENT, Op.CLOSE]
    wait, first, second = parsed.records[1:4]
    assert wait[8:10] == (0, 0) and wait[10] == 2
    assert first[6:10] == (4, 0, 140000, 1)  # fd = epfd, arg = index, data, events
    assert second[7] == 1


def test_parse_output_expands_repeated_waits(tmp_path: Path) -> None:
    out = write_output(
        tmp_path / "ebpf.out",
        [
            "8 10 11 1300 1400 0 4 64 140000 1 2",  # the printed wait, two events
            "9 10 11 1300 1400 0 4 1 150000 5 0",
            "R 11 3 1500 1900 1300 1400",  # three more like it, between 1500 and 1900
            "R 11 1 2000 2100 9999 9999",  # repeats a wait not in the output
            "",
            "@n: 4",
            "@wr[11]: (2, 2200, 2300, 1300, 1400)",  # counted, no R line written yet
        ],
    )
    parsed = ebpf.parse_output(out)
    assert (parsed.repeated, parsed.unmatched_repeats, parsed.malformed) == (5, 1, 0)
    assert parsed.lines == 4 and parsed.unwritten() == 0
    waits = [r for r in parsed.records if r[0] == Op.EPOLL_WAIT]
    assert [(w[3], w[4]) for w in waits] == [(1300, 1400)] + [(1500, 1900)] * 3 + [(2200, 2300)] * 2
    # Each copy brings both events back, in order, right behind its wait.
    again = parsed.records[3:6]
    assert [r[0] for r in again] == [Op.EPOLL_WAIT, Op.EPOLL_EVENT, Op.EPOLL_EVENT]
    assert [(r[8], r[9]) for r in again[1:]] == [(140000, 1), (150000, 5)]
    assert all((r[3], r[4]) == (1500, 1900) for r in again)


def snapshot(pid: int, start: int, end: int) -> ebpf.ProcSnapshot:
    snap = ebpf.ProcSnapshot(pid=pid, ppid=1, exe="/srv/server", start_ns=start, end_ns=end)
    snap.links = {
        0: "/dev/null",
        3: "socket:[500]",
        4: "anon_inode:[eventpoll]",
        5: "socket:[501]",
        6: "socket:[500]",  # a dup of the listener
        8: "socket:[502]",
    }
    snap.inodes = {0: 1, 3: 500, 4: 9, 5: 501, 6: 500, 8: 502}
    snap.epoll = {
        4: [
            ebpf.Registration(tfd=3, events=1, data=0x5000, ino=500),
            ebpf.Registration(tfd=5, events=1, data=0x6000, ino=501),
            ebpf.Registration(tfd=9, events=1, data=0x7000, ino=777),  # fd 9 is gone
        ]
    }
    return snap


def test_trace_files_seed_what_attach_found(tmp_path: Path) -> None:
    """Seeds rebuild the table as of attach, minus numbers a traced call changed before the
    scan ended; kernel results become (ret -1, err); the files read back as a Trace."""
    pid = 10
    parsed = ebpf.ParsedOutput(begin_ns=1000)
    parsed.records = [
        # close(5) raced the scan (entered before it ended): fd 5 is not seeded
        (Op.CLOSE, pid, 11, 1100, 1150, 0, 5, 0, 0, 0, 0),
        (Op.ACCEPT, pid, 11, 3000, 3100, 4, 3, 0, 0, 0, 5),
        (Op.EPOLL_CTL, pid, 11, 3200, 3300, EPOLL_CTL_ADD, 5, 4, 0x8000, 1, 0),
        (Op.EPOLL_WAIT, pid, 11, 3400, 3500, 0, 4, 64, 0, 0, 1),
        (Op.EPOLL_EVENT, pid, 11, 3400, 3500, 0, 4, 0, 0x5000, 1, 0),
        (Op.READ, pid, 12, 3600, 3700, 0, 8, 0, 0, 0, -512),  # ERESTARTSYS: EINTR
        (Op.CLOSE, pid, 12, 3800, 3900, 0, 8, 0, 0, 0, 0),
        (Op.CLOSE, pid, 12, 4000, 4100, 0, 8, 0, 0, 0, -9),  # a double close
    ]
    built = ebpf.build_trace_files(parsed, [snapshot(pid, 1050, 1200)], tmp_path)
    assert [p.name for p in built.files] == [f"trace.{pid}.0.bin"]
    trace = reader.read_trace_dir(tmp_path)
    recs = trace.records
    seeds = recs[: built.seeded]
    assert [(r.op, r.fd, r.ret) for r in seeds] == [
        (Op.FDNEW, 0, 0),
        (Op.SOCKET, 0, 3),
        (Op.EPOLL_CREATE, 0, 4),
        (Op.DUP, 3, 6),
        (Op.SOCKET, 0, 8),
        (Op.EPOLL_CTL, 3, 0),  # only fd 3's registration: 5 was touched, 9 is gone
    ]
    assert seeds[-1].data == 0x5000 and seeds[-1].arg == 4
    assert all(a.seq_out < b.seq_in for a, b in itertools.pairwise(seeds))
    assert seeds[-1].seq_out < min(r.seq_in for r in recs[built.seeded :])
    real = recs[built.seeded :]
    assert [r.op for r in real][:5] == [
        Op.CLOSE,
        Op.ACCEPT,
        Op.EPOLL_CTL,
        Op.EPOLL_WAIT,
        Op.EPOLL_EVENT,
    ]
    eintr = next(r for r in real if r.op == Op.READ)
    assert (eintr.ret, eintr.err) == (-1, 4)
    last = real[-1]
    assert (last.op, last.ret, last.err) == (Op.CLOSE, -1, 9)
    verdict = judge.judge_trace(trace)
    assert verdict.count(USE_AFTER_CLOSE) == 1
    assert "double close" in verdict.occurrences[USE_AFTER_CLOSE][0].summary
    # The listener's event maps to the seeded registration: no unattributed-event warning.
    assert not any("no traced epoll_ctl set" in w for w in verdict.warnings)


def test_lost_events_mark_the_trace_incomplete(tmp_path: Path) -> None:
    parsed = ebpf.ParsedOutput(begin_ns=1000, lost=5)
    parsed.records = [(Op.SOCKET, 20, 20, 1100, 1200, 0, 0, 0, 0, 0, 3)]
    ebpf.build_trace_files(parsed, [], tmp_path)
    trace = reader.read_trace_dir(tmp_path)
    assert trace.lost_records == 5 and not trace.complete


def test_program_record_constants_come_from_format_py() -> None:
    constants = ebpf_constants()
    for op in Op:
        assert constants[f"OP_{op.name}"] == int(op)
    for kind in IoKind:
        assert constants[f"IO_{kind.name}"] == int(kind)
    # The program defines none itself, and every one it names is given to it at build time.
    source = (ebpf.C_DIR / "tracer.bpf.c").read_text()
    assert not re.search(r"#define (OP|IO|DUPK|WAITK|ACCEPTK|EPOLL_CTL)_", source)
    used = set(re.findall(r"\b(?:OP|IO|DUPK|WAITK|ACCEPTK|EPOLL_CTL)_[A-Z0-9_]+\b", source))
    assert used and used <= set(constants), sorted(used - set(constants))


def test_a_bad_tracer_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ebpf.loader, "unavailable", lambda: None)
    monkeypatch.setenv(ebpf.ENV_RING_KB, "lots")
    with pytest.raises(AftercloseError) as info:
        ebpf.EbpfRun(Path("/nonexistent"), [1])
    text = info.value.render()
    assert f"{ebpf.ENV_RING_KB}='lots' is not a whole number of at least 1" in text
    assert "Hint: unset it" in text


@pytest.mark.parametrize("raw", ["-3", "1e3", "ten"])
def test_a_bad_guard_names_the_variable(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv(ebpf.ENV_GUARD_NS, raw)
    with pytest.raises(AftercloseError) as info:
        ebpf.guard_ns_from_env()
    assert f"{ebpf.ENV_GUARD_NS}={raw!r} is not a whole number of at least 0" in str(info.value)
    monkeypatch.setenv(ebpf.ENV_GUARD_NS, " 250 ")
    assert ebpf.guard_ns_from_env() == 250


def test_auto_prefers_ebpf_for_static_and_go_targets() -> None:
    assert ebpf.prefers_ebpf(manifest("static-buggy"))
    assert ebpf.prefers_ebpf(manifest("static-fixed"))
    assert ebpf.prefers_ebpf(manifest("go-buggy"))  # before or after its build
    assert ebpf.prefers_ebpf(manifest("go-fixed"))
    assert not ebpf.prefers_ebpf(manifest("seed-fixed"))
    assert ebpf.elf_kind(Path(sys.executable).resolve()) in ("dynamic", "static")
    assert ebpf.elf_kind(Path(__file__)) == "other"


def hide_clang(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")


def test_missing_clang_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hide_clang(monkeypatch, tmp_path)
    with pytest.raises(AftercloseError) as info:
        choose_tracer("ebpf", manifest("static-buggy"), "process")
    text = info.value.render()
    assert "needs clang to build its BPF program" in text
    assert "Hint: install clang and libbpf-dev (Debian/Ubuntu: apt-get install" in text
    # auto falls back to the shim (whose analysis then says it saw nothing of a static binary)
    assert choose_tracer("auto", manifest("static-buggy"), "process") == "preload"


def test_missing_clang_is_a_usage_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hide_clang(monkeypatch, tmp_path)
    result = pytester.runpytest("--target=static-buggy", "--tracer=ebpf")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the eBPF tracer needs clang*", "*Hint: install clang*"])


def test_not_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    with pytest.raises(AftercloseError, match="the eBPF tracer needs root"):
        choose_tracer("ebpf", manifest("seed-fixed"), "process")


# -- with the tracer running -----------------------------------------------------------------


def storm(target: str, tracer: str, workdir: Path, seed: int = 7) -> tuple[str, Outcome]:
    """One run of the built-in race scenario (test_shutdown_race's fault) on ``target``, then
    RSTs right after connect.  Whether a racing RST finds the server before it has read the
    request depends on how fast the server runs; one sent before the request always makes
    its read fail (static-buggy's error path: the double close)."""
    harness = Harness(
        Settings(target=target, rootdir=ROOT, run_id=RUN_ID, tracer=tracer, fault_seed=seed)
    )
    with harness.start(workdir, "ebpf-test") as run:
        run.run_fault(
            "shutdown_race", connections=300, concurrency=20, close_mode="mixed", max_delay_us=500
        )
        run.run_fault("reset_peer", phase="before-request", connections=20, concurrency=4)
        outcome = run.finish()
    return harness.tracer_mode, outcome


def lifecycle(outcome: Outcome) -> set[str]:
    return {v.rule for v in outcome.violations} & LIFECYCLE


def describe(outcome: Outcome) -> str:
    return "\n".join([*(v.render() for v in outcome.violations), *outcome.warnings])


@pytest.mark.parametrize("tracer", ["preload", "ebpf"])
@needs_ebpf
@pytest.mark.slow
@pytest.mark.root
def test_seed_fixed_passes_under_both_tracers(tracer: str, tmp_path: Path) -> None:
    mode, outcome = storm("seed-fixed", tracer, tmp_path / "run")
    assert mode == tracer
    assert outcome.ok, describe(outcome)
    assert not any("LOST" in w for w in outcome.warnings), outcome.warnings


@pytest.mark.parametrize("tracer", ["preload", "ebpf"])
@needs_ebpf
@pytest.mark.slow
@pytest.mark.root
def test_seed_buggy_found_under_both_tracers(tracer: str, tmp_path: Path) -> None:
    seen: list[str] = []
    for attempt in range(6):  # a race: give it a few rounds
        _, outcome = storm("seed-buggy", tracer, tmp_path / f"run{attempt}", seed=attempt)
        found = lifecycle(outcome)
        if found:
            return
        seen.append(describe(outcome))
    pytest.fail(f"no lifecycle rule under --tracer={tracer} in 6 runs:\n" + "\n---\n".join(seen))


@pytest.mark.parametrize(
    ("target", "buggy"),
    [
        ("static-buggy", True),
        ("static-fixed", False),
        pytest.param("go-buggy", True, marks=needs_go),
        pytest.param("go-fixed", False, marks=needs_go),
    ],
)
@needs_ebpf
@pytest.mark.slow
@pytest.mark.root
def test_static_and_go_targets_under_auto(target: str, buggy: bool, tmp_path: Path) -> None:
    for attempt in range(3):
        workdir = tmp_path / f"run{attempt}"
        mode, outcome = storm(target, "auto", workdir, seed=attempt)
        assert mode == "ebpf", "auto must pick eBPF for a static or Go binary"
        if not buggy:
            assert outcome.ok, describe(outcome)
            return
        found = lifecycle(outcome)
        if found:
            # The trace folder holds standard trace files: `afterclose trace show` judges
            # them the same way.
            trace = reader.read_trace_dir(workdir / "trace")
            again = {v.rule for v in judge.judge_trace(trace).violations}
            assert found <= again
            return
    pytest.fail(f"{target}: no lifecycle rule in 3 runs:\n{describe(outcome)}")


@needs_ebpf
@pytest.mark.slow
@pytest.mark.root
def test_lost_events_are_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A one-page ring buffer and every read/write printed: a storm overflows it between two
    # reads of the loader.
    monkeypatch.setenv(ebpf.ENV_RING_KB, "4")
    monkeypatch.setenv(ebpf.ENV_ALL_IO, "1")
    warnings: list[str] = []
    for attempt in range(3):
        harness = Harness(Settings(target="seed-fixed", rootdir=ROOT, run_id=RUN_ID, tracer="ebpf"))
        with harness.start(tmp_path / f"run{attempt}", "lost") as run:
            run.run_fault(
                "connection_storm",
                rate_per_s=2000,
                concurrency=100,
                duration_s=2.0 * (attempt + 1),
                max_connections=8000,
                mix={"keepalive": 1},
            )
            outcome = run.finish()
        warnings = outcome.warnings
        lost = [w for w in warnings if "eBPF tracer LOST" in w]
        if lost:
            assert f"{ebpf.ENV_RING_KB}=4 KiB" in lost[0]
            assert any("trace incomplete" in w for w in warnings)
            return
    pytest.fail(f"no lost events reported with a one-page ring buffer: {warnings}")


@needs_ebpf
@pytest.mark.slow
@pytest.mark.root
def test_plugin_runs_the_suite_with_ebpf(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(
        "--target=static-buggy",
        "--tracer=auto",
        "-p",
        "no:cacheprovider",
        "-k",
        # An RST sent before the request always makes the server's read fail: static-buggy's
        # error path (a racing one finds a fast server done with the request in some runs).
        "test_reset_peer and before-request",
    )
    result.stdout.fnmatch_lines(
        [
            "afterclose: target static-buggy*tracer ebpf*",
            "*[[]use-after-close[]]*",
            "*1 failed*",
        ]
    )


@needs_ebpf
@pytest.mark.slow
@pytest.mark.root
def test_a_pass_under_ebpf_says_which_rules_it_did_not_check(pytester: pytest.Pytester) -> None:
    """The eBPF tracer writes no free() records: the header and the summary of passes name the
    two rules that were not checked, not only each test's captured warnings."""
    result = pytester.runpytest_subprocess(
        "--target=seed-fixed",
        "--tracer=ebpf",
        "-p",
        "no:cacheprovider",
        "-k",
        "test_keepalive_requests",
    )
    unchecked = "the eBPF tracer does not see free(): " + " and ".join(ebpf.UNCHECKED_RULES)
    result.stdout.fnmatch_lines(
        [f"afterclose: {unchecked} are not checked*", f"afterclose: 1 passed, but {unchecked}*"]
    )
    assert result.ret == pytest.ExitCode.OK
