"""incomplete-evidence: a trace that lost records cannot pass, and says where and what to do."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from evidence_kit import evidence
from tracebuild import TraceBuilder, conn, counts, seed_race, server

from afterclose.faults.base import FaultReport
from afterclose.harness.oracle.judge import judge_trace
from afterclose.harness.oracle.rules.incomplete_evidence import PortHolder, decide
from afterclose.harness.trace.format import Header, Record

RULE = "incomplete-evidence"


@dataclasses.dataclass
class _Proc:
    header: Header
    path: Path


@dataclasses.dataclass
class _Trace:
    processes: tuple[_Proc, ...]
    records: tuple[Record, ...]
    lost_records: int
    warnings: tuple[str, ...] = ()
    complete: bool = True


def test_lost_records_are_reported_loudly() -> None:
    t = seed_race()
    v = t.check(lost_records=12)
    assert not v.complete
    assert any("12 records were lost" in w for w in v.warnings)
    assert counts(v)[RULE] == 1
    # Every other rule's timeline says its verdict may be wrong.
    assert all(
        "WARNING: the trace lost 12 records" in x.details for x in v.violations if x.rule != RULE
    )
    assert "WARNING" in v.render()


def test_a_clean_looking_trace_that_lost_records_cannot_pass() -> None:
    t = TraceBuilder()
    server(t)
    conn(t, 7, 0x55D0C2A0)
    assert t.check().ok
    v = t.check(lost_records=3)
    assert counts(v) == {RULE: 1}
    assert not v.ok
    (only,) = v.violations
    assert "lost 3 records" in only.summary and "AFTERCLOSE_TRACE_MB=" in only.summary


def test_names_the_process_file_and_a_larger_size(tmp_path: Path) -> None:
    t = seed_race()
    hdr = dataclasses.replace(t.headers()[100], lost_records=40, n_chunks=1024, chunk_records=4096)
    path = tmp_path / "trace.100.0.bin"
    v = judge_trace(_Trace((_Proc(hdr, path),), tuple(t.sorted_records()), 40))
    (finding,) = v.occurrences[RULE]
    assert f"pid 100 ({path}): 40 lost" in finding.summary
    # 1024 chunks of 4096 records of 64 bytes: a 256 MiB file; four times that is suggested.
    assert "AFTERCLOSE_TRACE_MB=1024" in finding.summary
    assert finding.timeline() == finding.summary  # about the whole trace: no timeline


def test_a_complete_or_merely_damaged_trace_does_not_fire(tmp_path: Path) -> None:
    t = seed_race()
    assert RULE not in counts(t.check())
    procs = tuple(_Proc(h, tmp_path / f"trace.{pid}.0.bin") for pid, h in t.headers().items())
    damaged = _Trace(procs, tuple(t.sorted_records()), 0, ("trace.100.0.bin: truncated",), False)
    v = judge_trace(damaged)
    assert not v.complete and RULE not in counts(v)


# -- a process that escaped the tracer ------------------------------------------------------


def _escaped(tmp_path: Path, holders: list[PortHolder], tracer: str = "preload") -> list[str]:
    (tmp_path / "trace.100.0.bin").write_bytes(b"")
    ev = evidence(probes={RULE: holders})
    assert ev.trace is not None
    ev.trace.tracer = tracer
    ev.trace.trace_dir = tmp_path
    return [v.summary for v in decide(ev) if v.rule == RULE]


def test_a_port_holder_without_the_shim_makes_the_evidence_incomplete(tmp_path: Path) -> None:
    # pid 100 has a trace file from before its exec, but its program now runs without the shim.
    (found,) = _escaped(tmp_path, [PortHolder(100, "/srv/server", 3, 100, False)])
    assert "pid 100 (/srv/server)" in found and "--tracer=ebpf" in found
    assert "LD_PRELOAD" in found


def test_a_port_holder_with_no_trace_file_makes_the_evidence_incomplete(tmp_path: Path) -> None:
    (found,) = _escaped(tmp_path, [PortHolder(101, "/srv/worker", 1, 101, True)])
    assert "pid 101" in found


def test_traced_port_holders_leave_the_evidence_complete(tmp_path: Path) -> None:
    # Holders in a container are named in its trace files by their PID in the container.
    holders = [PortHolder(100, "/srv/server", 3, 100, True), PortHolder(5000, "/x", 1, 100, None)]
    assert _escaped(tmp_path, holders) == []


def test_only_the_preload_tracer_is_judged_by_its_trace_files(tmp_path: Path) -> None:
    holder = PortHolder(7, "/srv/server", 1, 7, False)
    assert _escaped(tmp_path, [holder], tracer="ebpf") == []
    assert _escaped(tmp_path, [holder], tracer="") == []


def test_a_holder_seen_only_when_the_tracer_attached_still_counts(tmp_path: Path) -> None:
    # The server died during the scenario: the probe at the end found nobody on the port.
    ev = evidence(probes={RULE: []})
    assert ev.trace is not None
    ev.trace.tracer = "preload"
    ev.trace.trace_dir = tmp_path
    ev.trace.port_holders = [PortHolder(42, "/srv/server", 1, 42, False)]
    (found,) = [v.summary for v in decide(ev) if v.rule == RULE]
    assert "pid 42" in found


# --------------------------------------------------------------------------- under-delivered


def _storm_report(planned: int, not_started: int, **counts: int) -> FaultReport:
    from afterclose.harness.client import engine

    report = FaultReport("connection_storm")
    report.count("not_started", not_started)
    for key, n in counts.items():
        report.count(key.replace("__", ":"), n)
    engine.note_shortfall(report, planned)
    return report


def test_a_storm_the_harness_could_not_deliver_fails_with_the_shortfall_and_a_hint() -> None:
    from evidence_kit import evidence

    from afterclose.harness.oracle.rules import incomplete_evidence

    report = _storm_report(100_000, 78_929, connections=21_000)
    (obs,) = report.observations
    assert obs.values["not_started"] == 78_929 and obs.values["started"] == 21_071
    (v,) = incomplete_evidence.decide(evidence(obs))
    assert v.rule == RULE
    assert "started 21071 of its 100000 planned connections" in v.summary
    assert "lower rate" in v.summary and "processes" in v.summary


def test_a_shortfall_within_the_threshold_is_no_observation() -> None:
    assert _storm_report(1000, 100, connections=900).observations == []


def test_a_target_that_refused_is_judged_by_the_other_rules_not_excused() -> None:
    refused = _storm_report(1000, 500, errors__connect_econnrefused=400, connections=100)
    assert refused.observations == []
    reset = _storm_report(1000, 500, errors__connect_econnreset=200, connections=300)
    assert reset.observations == []
    gone = _storm_report(1000, 900, stopped_target_gone=1, connections=100)
    assert gone.observations == []


def test_no_observation_no_trace_loss_passes() -> None:
    from evidence_kit import evidence

    from afterclose.harness.oracle.rules import incomplete_evidence

    assert incomplete_evidence.decide(evidence()) == []


def test_the_storm_of_a_target_side_fault_may_fall_short_by_design() -> None:
    from afterclose.faults._server_side import add_storm

    storm = _storm_report(1000, 800, connections=200)
    assert storm.observations
    report = FaultReport("pause")
    add_storm(report, storm)
    assert report.observations == [] and report.counts["not_started"] == 800


# --------------------------------------------------------------------------- the tracer's gaps


def _gaps(gaps: list[str]) -> list[str]:
    ev = evidence()
    assert ev.trace is not None
    ev.trace.tracer = "ebpf"
    ev.trace.gaps = gaps
    return [v.summary for v in decide(ev) if v.rule == RULE]


def test_a_tracer_killed_before_it_drained_makes_the_evidence_incomplete() -> None:
    (found,) = _gaps(["bpftrace exited with status -9 before writing out all it had seen"])
    assert "status -9" in found and "cannot pass" in found


def test_a_tracer_that_never_attached_makes_the_evidence_incomplete() -> None:
    (found,) = _gaps(["the eBPF tracer never attached: nothing was traced"])
    assert "never attached" in found


def test_a_tracer_without_gaps_leaves_the_evidence_complete() -> None:
    assert _gaps([]) == []
