"""The built-in suite over pytest-xdist's ``ssh`` gateways, to two hosts made here: two network
namespaces, each with its own ``sshd`` and its own temporary folder (``TMPDIR``, as another
machine has its own /tmp), and the controller in a third.  Each host leases its targets' ports
and keeps its artifacts on its side; a failure's report, in the controller's JUnit XML, names
the host's folder, and the controller fetches it over SSH afterwards.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import capabilities
import pytest
from local_hosts import namespace_lan, ssh_hosts

pytestmark = [capabilities.requires("ip", "sshd"), pytest.mark.slow]
PASSES, FAILS = "test_keepalive_requests", "test_target_crashes"
# The user's own test, in each host's checkout (the gateway's chdir): a crash, every time.
CRASHING = f"""
import os, signal, time

def {FAILS}(target):
    os.kill(target.server.host_pids()[0], signal.SIGSEGV)
    time.sleep(0.3)
"""


def test_suite_over_ssh_gateways_each_host_keeps_its_artifacts(tmp_path: Path) -> None:
    controller_tmp, report = tmp_path / "controller-tmp", tmp_path / "suite.xml"
    controller_tmp.mkdir()
    with namespace_lan(2) as lan, ssh_hosts(tmp_path / "ssh", lan) as net:
        specs = []
        for host in net.hosts:
            (host.home / "test_crash.py").write_text(CRASHING)
            spec = f"ssh={host.name}//ssh_config={net.config}//python={sys.executable}"
            specs += ["--tx", f"{spec}//chdir={host.home}"]
        # No --basetemp: an ssh worker would take the controller's path as it is (and empty
        # it); each host's pytest makes its own under its own temporary folder.
        argv = [sys.executable, "-m", "pytest", "--target=seed-fixed", *specs, "--dist=each"]
        argv += ["-k", f"{PASSES} or {FAILS}", f"--junitxml={report}", "-p", "no:cacheprovider"]
        got = subprocess.run(
            lan.exec_argv(lan.hub, argv),
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env={**os.environ, "TMPDIR": str(controller_tmp)},
        )
        assert got.returncode == 1, got.stdout + got.stderr
        cases = ET.parse(report).getroot().findall(".//testcase")
        assert sorted(c.get("name", "") for c in cases) == [PASSES, PASSES, FAILS, FAILS]
        failures = [c.find("failure") for c in cases if c.get("name") == FAILS]
        assert all(c.find("failure") is None for c in cases if c.get("name") == PASSES)

        traces = {}
        for host in net.hosts:
            # The host leased its targets' ports in its own folder of leases.
            assert (host.tmp / "afterclose-ports").is_dir()
            # Its failure's report, in the controller's JUnit XML, names the host's folder.
            (failure,) = [f for f in failures if f is not None and str(host.tmp) in (f.text or "")]
            assert "[crash]" in (failure.text or "")
            where = re.search(r"^artifacts: (\S+)$", failure.text or "", re.MULTILINE)
            assert where is not None, failure.text
            folder = Path(where[1]).relative_to(host.tmp)
            # The controller fetches the host's artifacts over SSH.
            fetched = tmp_path / "fetched" / host.name
            fetched.mkdir(parents=True)
            tar = net.ssh(host, "tar", "-C", str(host.tmp), "-cf", "-", "pytest-of-root")
            pipe = subprocess.run(lan.exec_argv(lan.hub, tar), capture_output=True, timeout=60)
            assert pipe.returncode == 0, pipe.stderr
            subprocess.run(["tar", "-C", str(fetched), "-xf", "-"], input=pipe.stdout, check=True)
            assert (fetched / folder / "target.stdout").is_file()
            assert list((fetched / folder / "trace").glob("trace.*.bin"))
            (trace,) = fetched.glob(f"pytest-of-root/pytest-[0-9]*/{PASSES}0/trace/trace.*.bin")
            traces[host.name] = trace
    assert len({t.name for t in traces.values()}) == 2, traces  # one target each
    # The controller ran no test: nothing of the suite under its own temporary folder.
    assert not list(controller_tmp.rglob("test_*"))
