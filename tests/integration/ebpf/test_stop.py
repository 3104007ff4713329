"""The eBPF tracer under a flood of waits: stopping it writes out every line its program
handed over (harness/trace/ebpf/__init__.py, "Stopping"), and a wait that returns the same
batch again is counted, not printed, and comes back as the shim would record it.  The flood: a
level-triggered event the process never reads makes every epoll_wait return it at once."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import capabilities
import pytest

from afterclose.harness.oracle import judge
from afterclose.harness.oracle.rules.busy_loop import NAME as BUSY_LOOP
from afterclose.harness.trace import ebpf, reader
from afterclose.harness.trace.format import Op

pytestmark = [capabilities.requires("ebpf"), pytest.mark.root]

SPINNER = """
import os, select, sys
ep = select.epoll()
r, w = os.pipe()
ep.register(r, select.EPOLLIN)
os.write(w, b"x")
print("READY", flush=True)
while True:
    ep.poll(0)
"""


@pytest.fixture
def spinner() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SPINNER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"READY\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def trace_for(folder: Path, pid: int, seconds: float, *, dedup_io: bool) -> ebpf.EbpfRun:
    run = ebpf.EbpfRun(folder, [pid], dedup_io=dedup_io)
    try:
        time.sleep(seconds)
    finally:
        status = run.stop()
    assert status == 0, run.log_text()
    return run


def test_stop_writes_out_every_line_printed_under_a_flood(
    tmp_path: Path, spinner: subprocess.Popen[bytes]
) -> None:
    # Every wait printed (no counting of repeats): a flood of lines.
    run = trace_for(tmp_path / "ebpf", spinner.pid, 2.0, dedup_io=False)
    parsed = ebpf.parse_output(run.output)
    assert parsed.stopped_ns > 0  # the stop's "S" line
    assert parsed.printed is not None and parsed.printed > 1000, parsed.printed
    # Every line handed over is in the output or counted lost: the loader read the ring
    # buffer out after the halt switch, and again once the probes past it were done.
    assert parsed.unwritten() == 0, (parsed.printed, parsed.lines, parsed.lost)
    assert parsed.repeated == 0 and parsed.malformed == 0


def test_repeated_waits_are_counted_then_expanded(
    tmp_path: Path, spinner: subprocess.Popen[bytes]
) -> None:
    run = ebpf.EbpfRun(tmp_path / "ebpf", [spinner.pid])
    try:
        snap = ebpf.scan_process(spinner.pid)
        time.sleep(1.5)
    finally:
        status = run.stop()
    assert status == 0, run.log_text()
    parsed = ebpf.parse_output(run.output)
    assert parsed.unwritten() == 0 and parsed.unmatched_repeats == 0 and parsed.malformed == 0
    waits = [r for r in parsed.records if r[0] == Op.EPOLL_WAIT]
    events = [r for r in parsed.records if r[0] == Op.EPOLL_EVENT]
    # Nearly every wait was counted, not printed; each comes back with its event.
    assert parsed.repeated > 1000 and parsed.lines * 10 < len(waits), (parsed.lines, len(waits))
    assert len(events) == len(waits) and len({(e[8], e[9]) for e in events}) == 1
    assert all(w[3] <= w[4] for w in waits)
    # The trace shows the spin as the shim's would: busy-loop names it.
    assert snap is not None
    ebpf.build_trace_files(parsed, [snap], tmp_path / "trace")
    verdict = judge.judge_trace(reader.read_trace_dir(tmp_path / "trace"))
    assert verdict.count(BUSY_LOOP) >= 1, verdict.warnings
