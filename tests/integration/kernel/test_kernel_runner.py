"""The kernel matrix: tests run inside qemu guests booted on Debian kernels.

The guest tests boot a real kernel under qemu (TCG here: this machine's /dev/kvm cannot boot
one) and run part of the built-in suite in it.  The kernel they use is
``AFTERCLOSE_TEST_KERNEL`` (default 6.1): the CI workflow's matrix sets it per job.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import capabilities
import pytest
from procs import alive

from afterclose.harness import compile as cbuild
from afterclose.harness.kernel import fetch, initramfs, modules
from afterclose.harness.kernel.matrix import inner_args, kernel_item_name

TEST_KERNEL = os.environ.get("AFTERCLOSE_TEST_KERNEL", "6.1")
needs_apt = capabilities.requires("apt-cache")  # kernels come from Debian packages
needs_qemu = capabilities.requires("kernel")


@pytest.fixture(autouse=True)
def shared_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # pytester points HOME at each test's folder: without this, every inner run would fetch
    # its kernel, build its target and probe KVM all over again.
    monkeypatch.setenv("AFTERCLOSE_CACHE_DIR", str(cbuild.cache_root()))


def test_inner_args_drop_what_only_the_host_uses() -> None:
    args = [
        "--target=seed-buggy", "--kernel", "6.1,6.12", "-n", "2", "--dist=load",
        "--kernel-timeout=900", "-n2", "--basetemp", "/tmp/x", "-p", "xdist", "-p", "myplug",
        "-k", "a or b", "tests/x.py",
    ]  # fmt: skip
    out = inner_args(args, xdist=True, fault_seed=7)
    assert out == [
        "--target=seed-buggy", "-p", "myplug", "-k", "a or b", "tests/x.py", "-n", "0",
        "--fault-seed=7",
    ]  # fmt: skip
    # A seed the user gave is kept as given, not doubled.
    assert inner_args(["--fault-seed=3"], xdist=False, fault_seed=3) == ["--fault-seed=3"]


def test_item_names_carry_the_kernel() -> None:
    assert kernel_item_name("test_x", "6.1.192") == "test_x[kernel-6.1.192]"
    assert kernel_item_name("test_x[a-b]", "6.12.117") == "test_x[a-b-kernel-6.12.117]"


def test_cpio_archive_lists_with_cpio_tool(tmp_path: Path) -> None:
    capabilities.need("cpio")  # reads the archive back
    w = initramfs.CpioWriter()
    w.directory("modules")
    w.file("modules/order", b"a.ko\n")
    w.file("init", b"\x7fELF...", 0o755)
    w.char_device("dev/console", 5, 1)
    archive = tmp_path / "i.cpio"
    archive.write_bytes(w.finish())
    out = subprocess.run(
        ["cpio", "-itv"], stdin=archive.open("rb"), capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r"^-rwxr-xr-x .* init$", out, re.M)
    assert re.search(r"^crw------- .* 5,\s+1 .* dev/console$", out, re.M)
    assert "modules/order" in out


def test_module_dependencies_come_from_modinfo() -> None:
    data = b"\x00license=GPL\x00depends=9pnet,netfs\x00retpoline=Y\x00name=9p\x00"
    assert modules.depends(data) == ["9pnet", "netfs"]
    assert modules.depends(b"\x00depends=\x00name=virtio\x00") == []


@needs_apt
def test_unknown_version_names_what_was_tried(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--target=seed-fixed", "--kernel=99.1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "--kernel=99.1: no Debian kernel package of version 99.1" in err
    assert "tried: apt-cache pkgnames linux-image-" in err
    assert re.search(r"versions apt offers: \d+\.\d+\.\d+", err)
    assert "Hint:" in err


def test_missing_kernel_path_and_nonsense_are_usage_errors(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--target=seed-fixed", "--kernel=./no/vmlinuz")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--kernel=./no/vmlinuz: no such file or folder" in result.stderr.str()
    result = pytester.runpytest_subprocess("--target=seed-fixed", "--kernel=six")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "is not a kernel version, a Debian package or a path" in result.stderr.str()


@needs_apt
def test_kernel_with_docker_runner_is_refused(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--target=seed-fixed", "--runner=docker", "--kernel=6.1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "inside a kernel guest targets run as processes" in result.stderr.str()


@needs_qemu
def test_kernel_that_does_not_boot_fails_each_test_with_qemus_words(
    pytester: pytest.Pytester,
) -> None:
    image = pytester.path / "vmlinuz-0.0-broken"
    image.write_bytes(b"not a kernel" * 100)
    result = pytester.runpytest_subprocess(
        "--target=seed-fixed", f"--kernel={image}", "-k", "half_close", "--kernel-timeout=60"
    )
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "test_half_close[kernel-0.0]" in out
    assert "the test did not run in the guest" in out
    assert "qemu's own messages" in out


@needs_apt
def test_cloud_flavour_without_9p_is_refused_with_a_hint(pytester: pytest.Pytester) -> None:
    names = subprocess.run(
        ["apt-cache", "pkgnames", "linux-image-"], capture_output=True, text=True, check=True
    ).stdout.split()
    cloud = sorted(n for n in names if re.match(r"^linux-image-6\.12\..*-cloud-amd64-unsigned$", n))
    if not cloud:
        pytest.skip("apt offers no 6.12 cloud kernel package (its config lacks 9p)")
    source = fetch.resolve(cloud[-1])
    kernel = fetch.fetch(source)
    with pytest.raises(fetch.KernelError) as info:
        initramfs.build(kernel)
    text = info.value.render()
    assert "CONFIG_NET_9P is not set" in text
    assert "generic flavour" in text


@needs_apt
@needs_qemu
@pytest.mark.slow
def test_seed_buggy_is_found_inside_a_guest(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(
        "--target=seed-buggy", f"--kernel={TEST_KERNEL}", "-k", "shutdown_race"
    )
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    label = fetch.resolve(TEST_KERNEL).label
    assert f"test_shutdown_race[kernel-{label}]" in out
    # The verdict names the guest's kernel, and a lifecycle rule or the crash.
    assert re.search(rf"on kernel {re.escape(TEST_KERNEL)}\.\S*-amd64 \(Debian linux-image-", out)
    assert re.search(r"use-after-close|freed-while-registered|crash|stale-event", out)
    # Its replay command runs the same test on the same kernel.
    assert f"--kernel={TEST_KERNEL}" in out


@needs_apt
@needs_qemu
@pytest.mark.slow
@pytest.mark.root
def test_seed_fixed_passes_inside_a_guest_with_netem(pytester: pytest.Pytester) -> None:
    capabilities.need("root")  # netem and the packet faults
    result = pytester.runpytest_subprocess(
        "--target=seed-fixed", f"--kernel={TEST_KERNEL}", "-k", "shutdown_race or netem", "-rA"
    )
    result.assert_outcomes(passed=2)
    out = result.stdout.str()
    label = fetch.resolve(TEST_KERNEL).label
    assert f"PASSED afterclose/scenarios.py::test_netem[kernel-{label}]" in out


def _children(pid: int) -> dict[int, str]:
    """Direct children of ``pid`` and their command lines, from /proc."""
    out: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out[int(entry.name)] = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                )
        except (OSError, ValueError, IndexError):
            continue
    return out


@needs_apt
@needs_qemu
@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_interrupt_stops_the_guest(pytester: pytest.Pytester, sig: str) -> None:
    # SIGINT runs pytest's teardown; SIGKILL (like an unhandled SIGTERM) runs none, and only
    # the kernel's parent-death signal stops qemu.
    import signal
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "--target=seed-fixed", f"--kernel={TEST_KERNEL}",
         "-k", "half_close", "-p", "no:cacheprovider"],
        cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    qemu: int | None = None
    try:
        deadline = time.monotonic() + 240
        while qemu is None and time.monotonic() < deadline and proc.poll() is None:
            qemu = next((p for p, cmd in _children(proc.pid).items() if "qemu-system" in cmd), None)
            time.sleep(0.2)
        assert qemu is not None, "the guest never started"
        time.sleep(2)
        proc.send_signal(signal.Signals[sig])
        proc.wait(timeout=60)
        gone = time.monotonic() + 10
        while alive(qemu) and time.monotonic() < gone:
            time.sleep(0.1)
        assert not alive(qemu), f"qemu {qemu} outlived the run ended by {sig}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if qemu is not None and alive(qemu):
            os.kill(qemu, signal.SIGKILL)


@needs_apt
def test_kernels_command_lists_what_apt_offers() -> None:
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "afterclose.harness.cli", "kernels"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert f"host kernel: {os.uname().release}" in out
    assert re.search(r"^  6\.\d+\s+6\.\d+\.\d+\s+linux-image-\S+$", out, re.M)


def test_netem_bad_parameters_are_named() -> None:
    from afterclose import faults
    from afterclose.harness.errors import ScenarioError

    with pytest.raises(ScenarioError) as info:
        faults.create_target("netem", {"loss_pct": 150}, where="s.toml: phase 1")
    assert "loss_pct" in info.value.render()
    with pytest.raises(ScenarioError) as info:
        faults.create_target("netem", {"delay_ms": 0, "reorder_pct": 20}, where="s.toml")
    assert "reorder_pct needs delay_ms > 0" in info.value.render()
    with pytest.raises(ScenarioError) as info:
        faults.create_target("netem", {"dealy_ms": 5}, where="s.toml")
    assert "delay_ms" in info.value.render()  # the did-you-mean hint


def test_netem_on_a_host_without_it_skips_and_says_where_it_runs(
    pytester: pytest.Pytester,
) -> None:
    from afterclose.faults import netem

    result = pytester.runpytest_subprocess("--target=seed-fixed", "-k", "netem", "-rs")
    if netem.unavailable_reason() is None:
        result.assert_outcomes(passed=1)  # this kernel has netem: the scenario runs
        return
    result.assert_outcomes(skipped=1)
    assert "tc netem is not available in this kernel" in result.stdout.str()
    assert "--kernel=6.1" in result.stdout.str()


def test_archive_layouts_split_and_single() -> None:
    from afterclose.harness.kernel import archive

    packages = {
        # 7.x: image, modules and config in three packages; all three must be there.
        "linux-binary-7.2.13+deb14-amd64": "7.2.13-1",
        "linux-modules-7.2.13+deb14-amd64": "7.2.13-1",
        "linux-base-7.2.13+deb14-amd64": "7.2.13-1",
        "linux-binary-7.3.1+deb14-amd64": "7.3.1-1",  # no modules package: left out
        "linux-binary-7.2.13+deb14-cloud-amd64": "7.2.13-1",  # cloud: no 9p
        "linux-image-6.12.117+deb13-amd64-unsigned": "6.12.117-1",
    }
    found = {k.name: k for k in archive.kernels_in("sid", packages)}
    assert set(found) == {
        "linux-binary-7.2.13+deb14-amd64",
        "linux-image-6.12.117+deb13-amd64-unsigned",
    }
    assert found["linux-binary-7.2.13+deb14-amd64"].packages == (
        "linux-binary-7.2.13+deb14-amd64=7.2.13-1",
        "linux-modules-7.2.13+deb14-amd64=7.2.13-1",
        "linux-base-7.2.13+deb14-amd64=7.2.13-1",
    )
    assert found["linux-image-6.12.117+deb13-amd64-unsigned"].packages == (
        "linux-image-6.12.117+deb13-amd64-unsigned=6.12.117-1",
    )


@needs_apt
@needs_qemu
@pytest.mark.slow
@pytest.mark.parametrize("spec", ["7", "6.12"])
def test_kernels_apt_lacks_or_has_resolve_and_boot(pytester: pytest.Pytester, spec: str) -> None:
    # 7.x is in no suite this machine's apt lists (it comes from sid through the private apt);
    # 6.12 may come from the machine's own apt or from trixie.  Both must boot and run a test.
    source = fetch.resolve(spec)
    assert source.label.startswith(spec + "."), source
    if spec == "7":
        assert source.suite == "sid" and len(source.archive_packages) == 3, source
    result = pytester.runpytest_subprocess(
        "--target=seed-fixed", f"--kernel={spec}", "-k", "half_close", "-rA"
    )
    result.assert_outcomes(passed=1)
    assert f"PASSED afterclose/scenarios.py::test_half_close[kernel-{source.label}]" in (
        result.stdout.str()
    )
