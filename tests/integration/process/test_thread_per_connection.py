"""A thread-per-connection server keeps every trace record (tests/servers/threaded.c).

Each thread the shim sees takes a chunk of the trace file for its records; a server that
starts one thread per connection must get those chunks back when its threads exit, or the file
fills after a few hundred connections however few records each made.  The trace file here is
small (4 MiB: fifteen chunks of 4096 records) so that a few hundred connections would overflow
it without that, while the few threads alive at once (the clients keep at most two connections
open) each still find a chunk; the 100,000-connection case with the default size is measured
by hand (docs/verdicts.md).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from paths import TESTS_DIR

from afterclose.harness.session import Harness, Settings
from afterclose.harness.trace.format import Op
from afterclose.harness.trace.reader import read_trace_dir

THREADED = TESTS_DIR / "servers" / "threaded.c"
CONNECTIONS = 400


def harness_for(tmp_path: Path) -> Harness:
    manifest = tmp_path / "threaded.toml"
    manifest.write_text(
        f"""
name = "threaded"
command = ["{{build}}", "{{host}}", "{{port}}"]
echo_path = true
fd_grace_s = 2.0
[compile]
sources = ["{THREADED}"]
cflags = ["-O2", "-Wall", "-pthread"]
ldflags = ["-pthread"]
[ready]
log = "READY"
"""
    )
    settings = Settings(
        target=str(manifest), rootdir=tmp_path, run_id=uuid.uuid4().hex, tracer="preload"
    )
    return Harness(settings)


def test_thread_per_connection_storm_loses_no_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AFTERCLOSE_TRACE_MB", "4")
    harness = harness_for(tmp_path)
    with harness.start(tmp_path / "run", "test-threaded") as run:
        run.run_fault(
            "connection_storm",
            rate_per_s=2000,
            concurrency=2,
            duration_s=30,
            max_connections=CONNECTIONS,
            mix={"keepalive": 1, "close": 1},
        )
        outcome = run.finish()
    assert outcome.trace_dir is not None
    trace = read_trace_dir(outcome.trace_dir)
    assert trace.lost_records == 0 and trace.complete, trace.warnings
    (proc,) = trace.processes
    # More threads wrote records than the file has chunks: chunks were given back and reused.
    writers = {r.tid for r in proc.records}
    assert len(writers) > proc.header.n_chunks
    # Every connection's accept and its thread's close are in the trace (the readiness probe
    # and the liveness check add a connection or two of their own).
    accepted = sum(r.op == Op.ACCEPT and r.ret >= 0 for r in proc.records)
    closed = sum(r.op == Op.CLOSE and r.tid != proc.pid for r in proc.records)
    assert accepted >= CONNECTIONS
    assert closed == accepted
    assert outcome.ok, [v.rule for v in outcome.violations]
