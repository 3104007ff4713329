"""A process that exits holding a connection has not leaked it (``fd-leak``, both tracers).

``tests/servers/oneshot.c`` forks workers that each serve one connection and exit without
closing it once the peer has left; the kernel closes every fd of an exiting process.  The
trace shows the peer gone (read returned 0) and no close, so only knowing that the process
exited keeps ``fd-leak`` from blaming a correct server.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import capabilities
import pytest
from paths import TESTS_DIR

from afterclose.harness.session import Harness, Settings
from afterclose.harness.trace.format import HeaderFlag, Op
from afterclose.harness.trace.reader import read_trace_dir

ONESHOT = TESTS_DIR / "servers" / "oneshot.c"


def run_oneshot(tmp_path: Path, tracer: str) -> tuple[list[str], Path]:
    manifest = tmp_path / "oneshot.toml"
    manifest.write_text(
        f"""
name = "oneshot"
command = ["{{build}}", "{{host}}", "{{port}}"]
echo_path = true
fd_grace_s = 2.0
[compile]
sources = ["{ONESHOT}"]
cflags = ["-O2", "-Wall"]
[ready]
log = "READY"
"""
    )
    settings = Settings(
        target=str(manifest), rootdir=tmp_path, run_id=uuid.uuid4().hex, tracer=tracer
    )
    with Harness(settings).start(tmp_path / "run", f"oneshot-{tracer}") as run:
        run.run_fault(
            "connection_storm",
            rate_per_s=50,
            concurrency=2,
            duration_s=10,
            max_connections=12,
            mix={"keepalive": 1},
        )
        outcome = run.finish()
    assert outcome.trace_dir is not None
    return [v.render() for v in outcome.violations], outcome.trace_dir


@pytest.mark.parametrize(
    "tracer",
    [
        "preload",
        pytest.param("ebpf", marks=[capabilities.requires("ebpf"), pytest.mark.root]),
    ],
)
def test_a_process_that_exits_holding_fds_leaked_none(tracer: str, tmp_path: Path) -> None:
    violations, trace_dir = run_oneshot(tmp_path, tracer)
    trace = read_trace_dir(trace_dir)
    exited = [p for p in trace.processes if p.header.flags & HeaderFlag.EXITED]
    # Workers that served a connection whose peer left, and exited: the case under test.
    served = [
        p
        for p in exited
        if any(r.op == Op.READ and r.ret == 0 for r in p.records)
        and any(r.op == Op.ACCEPT and r.ret >= 0 for r in p.records)
        and not any(r.op == Op.CLOSE for r in p.records)
    ]
    assert served, [(p.pid, p.header.flags) for p in trace.processes]
    assert all(p.header.exit_seq > 0 for p in exited)
    assert violations == []
