"""Two soak workers in two network namespaces share one Redis store in a third, as workers on
two machines of one network would: they search seed-buggy together, a failure worker A found
is replayed by worker B, and B, interrupted with SIGINT, resumes its campaign.

The namespaces, the bridge and the veth pairs are this test's own (local_hosts.py); the store
is reached at its bridge address, never through the host's loopback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import capabilities
import pytest
from local_hosts import Lan, namespace_lan, redis_clients, redis_in, sweep_orphans
from soak_workers import SOAK, finished_rounds, interruptible

from afterclose.harness.campaign.local_store import stop

pytestmark = [capabilities.requires("ip", "redis-server"), pytest.mark.slow]


def _worker(lan: Lan, n: int, argv: list[str], log: Path) -> subprocess.Popen[str]:
    with log.open("w") as out:
        return subprocess.Popen(
            lan.exec_argv(lan.workers[n], argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=interruptible,
        )


def test_workers_in_two_namespaces_find_replay_and_resume(tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_log, b_log, store_log = tmp_path / "a.log", tmp_path / "b.log", tmp_path / "redis.log"
    with namespace_lan(2) as lan, redis_in(lan, store_log) as url:
        assert url.startswith(f"redis://{lan.hub_address}:")
        common = [*SOAK, "--target=seed-buggy", "--mix=generated", "--faults=shutdown_race"]
        common.append(f"--db={url}")
        # Both start on the one store at once, each from its own namespace.
        a = _worker(
            lan, 0, [*common, "--seed=1", "--duration=150s", f"--campaign-dir={a_dir}"], a_log
        )
        b = _worker(
            lan, 1, [*common, "--seed=2", "--duration=10m", f"--campaign-dir={b_dir}"], b_log
        )
        try:
            # B's state is written once it reached the store, as its first round begins: it
            # is interrupted there (a round it had not finished is not recorded).
            deadline = time.monotonic() + 120
            while not (b_dir / "state.json").exists():
                assert b.poll() is None, b_log.read_text()
                assert time.monotonic() < deadline, "worker B did not start in 120 s"
                time.sleep(0.05)
            assert Lan.namespace_of(b.pid) == lan.workers[1]
            b.send_signal(signal.SIGINT)
            assert b.wait(timeout=60) == 130, b_log.read_text()
            done = len(finished_rounds(b_dir))
            assert f"interrupted after round {done}:" in b_log.read_text()
            # A searches on until seed-buggy breaks, and saves the failing example.
            assert a.wait(timeout=200) == 1, a_log.read_text()
        finally:
            stop(a)
            stop(b)
        (found,) = [r for r in finished_rounds(a_dir) if r["rules"]]
        (written,) = (a_dir / "findings").glob("*.toml")

        # B resumes its campaign: its next round replays what A saved in the store.
        resumed = subprocess.run(
            lan.exec_argv(
                lan.workers[1],
                [*common, f"--campaign-dir={b_dir}", f"--max-rounds={done + 1}"],
            ),
            capture_output=True,
            text=True,
            timeout=180,
        )
    # The store was reached from both namespaces, through the bridge, and from nowhere else.
    assert redis_clients(store_log) == {lan.hub_address, *lan.addresses}
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode in (0, 1), out
    assert f"resuming the campaign in {b_dir} at round {done + 1} (seed 2," in resumed.stdout
    assert re.search(r"replaying \d+ shared example\(s\)", resumed.stderr), out
    rounds = finished_rounds(b_dir)
    assert [r["number"] for r in rounds] == list(range(1, done + 2))
    assert rounds[-1]["kind"] == "shared" and rounds[-1]["scenario"] == found["scenario"]
    state = json.loads((b_dir / "state.json").read_text())
    assert state["invocations"] == 2 and state["seed"] == 2
    if rounds[-1]["rules"]:  # the race showed again in B: A wrote it, B says so
        assert resumed.returncode == 1
        assert "another worker wrote it (" in resumed.stderr and str(written) in resumed.stderr
        assert not (b_dir / "findings").exists()
    else:
        assert resumed.returncode == 0, out


def test_namespaces_of_a_killed_test_process_are_swept() -> None:
    # A process that has ended stands for a test process killed before its clean-up.
    gone = subprocess.Popen(["true"])
    gone.wait()
    left, live = f"acw-{gone.pid}-beef-hub", f"acw-{os.getpid()}-beef-w0"
    for name in (left, live):
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        swept = sweep_orphans()
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert left in swept and left not in names
        assert live not in swept and live in names
    finally:
        for name in (left, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
