"""Hosts made on this machine for campaign tests: network namespaces joined by a bridge, a
Redis store in one of them, and an SSH server in each of the others.

A namespace LAN is a hub namespace holding a bridge and one veth pair per worker namespace
(the hub end on the bridge, the other end the worker's ``eth0``).  Every interface is created
inside a namespace the test made, so no packet ever reaches the host's own interfaces; the
namespaces (and with them the veth pairs and the bridge) are deleted on the way out, after the
processes started in them have been stopped by their PIDs.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from afterclose.harness.campaign.local_store import stop

SUBNET = "10.231.0"  # private to the namespaces below: nothing outside them has a route to it
READY_S = 15.0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass(frozen=True)
class Lan:
    hub: str  # the namespace with the bridge, at hub_address
    workers: tuple[str, ...]  # one namespace per worker, at addresses[i]
    hub_address: str
    addresses: tuple[str, ...]

    @staticmethod
    def exec_argv(namespace: str, argv: Sequence[str]) -> list[str]:
        # `ip netns exec` execs the command: the child's PID is the command's own.
        return ["ip", "netns", "exec", namespace, *argv]

    @staticmethod
    def namespace_of(pid: int) -> str:
        got = subprocess.run(
            ["ip", "netns", "identify", str(pid)], capture_output=True, text=True, timeout=30
        )
        return got.stdout.strip()


# A namespace of namespace_lan's: its stem names the test process that made it.
_OURS = re.compile(r"^acw-(\d+)-[0-9a-f]{4}-(?:hub|w\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans() -> list[str]:
    """Delete the namespaces of test processes that no longer run: one ended by SIGKILL never
    reached its ``finally``.  A namespace whose maker's PID runs again (reused) is left."""
    got = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    swept = []
    for line in got.stdout.splitlines():
        name = line.split(" ", 1)[0]
        m = _OURS.match(name)
        if m is not None and not _alive(int(m.group(1))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            swept.append(name)
    return swept


@contextlib.contextmanager
def namespace_lan(workers: int) -> Iterator[Lan]:
    """A hub namespace and ``workers`` worker namespaces on one bridge, each with loopback up
    (the targets listen on the worker's own 127.0.0.1); all deleted on exit, and those an
    earlier, killed test process left are deleted first."""
    sweep_orphans()
    stem = f"acw-{os.getpid()}-{secrets.token_hex(2)}"
    hub, names = f"{stem}-hub", tuple(f"{stem}-w{i}" for i in range(workers))
    created: list[str] = []
    try:
        for name in (hub, *names):
            _ip("netns", "add", name)
            created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        _ip("-n", hub, "link", "set", "br0", "up")
        addresses = []
        for i, name in enumerate(names):
            _ip("-n", hub, "link", "add", f"p{i}", "type", "veth", "peer", "eth0", "netns", name)
            _ip("-n", hub, "link", "set", f"p{i}", "master", "br0", "up")
            addresses.append(f"{SUBNET}.{i + 2}")
            _ip("-n", name, "addr", "add", f"{addresses[-1]}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
        yield Lan(hub, names, f"{SUBNET}.1", tuple(addresses))
    finally:
        for name in reversed(created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@contextlib.contextmanager
def redis_in(lan: Lan, log: Path, port: int = 6379) -> Iterator[str]:
    """A ``redis-server`` in the hub namespace, on the bridge's address; yields its URL once
    it answers.  Its log (``log``) names every client it accepted, by address."""
    binary = shutil.which("redis-server")
    assert binary is not None
    # Not protected mode: it refuses clients from anywhere but loopback without a password.
    argv = ["--port", str(port), "--bind", lan.hub_address, "--protected-mode", "no"]
    argv += ["--save", "", "--appendonly", "no", "--loglevel", "verbose", "--logfile", str(log)]
    proc = subprocess.Popen(lan.exec_argv(lan.hub, [binary, *argv]), stdout=subprocess.DEVNULL)
    try:
        # Asked from the hub itself: the workers' own connections are the only ones from theirs.
        ping = ["redis-cli", "-h", lan.hub_address, "-p", str(port), "PING"]
        deadline = time.monotonic() + READY_S
        while True:
            got = subprocess.run(
                lan.exec_argv(lan.hub, ping), capture_output=True, text=True, timeout=30
            )
            if got.stdout.strip() == "PONG":
                break
            assert proc.poll() is None, f"redis-server exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"redis-server did not answer: {got.stdout}"
            time.sleep(0.1)
        yield f"redis://{lan.hub_address}:{port}/0"
    finally:
        stop(proc)


def redis_clients(log: Path) -> set[str]:
    """The addresses ``redis_in``'s server accepted clients from."""
    return set(re.findall(r" Accepted ([0-9.]+):\d+", log.read_text()))


@dataclass(frozen=True)
class SshHost:
    name: str  # its name in the client configuration
    address: str
    home: Path  # a folder of its own, the gateways' chdir
    tmp: Path  # its own temporary folder (TMPDIR), as another machine has its own /tmp


@dataclass(frozen=True)
class SshHosts:
    config: Path  # the client configuration (ssh -F) naming every host
    hosts: tuple[SshHost, ...]

    def ssh(self, host: SshHost, *command: str) -> list[str]:
        return ["ssh", "-F", str(self.config), host.name, *command]


# sshd needs its privilege separation folder, /run/sshd, which the package's service makes
# at boot: each sshd here gets a private /run in a mount namespace of its own instead.
_SSHD_SHELL = 'mount -t tmpfs -o mode=755 tmpfs /run && mkdir -m 755 /run/sshd && exec "$@"'


@contextlib.contextmanager
def ssh_hosts(folder: Path, lan: Lan) -> Iterator[SshHosts]:
    """An ``sshd`` in every worker namespace of ``lan``, on port 22 of its address, that lets
    root in with a key made here (and with nothing else); the client configuration names
    the hosts ``host0``, ``host1``... and sends each its own ``TMPDIR``."""
    sshd = shutil.which("sshd")
    assert sshd is not None
    folder = folder.resolve()  # sshd reads its files by absolute paths only
    folder.mkdir(parents=True)
    for key in ("host_key", "client_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)],
            check=True,
            timeout=30,
        )
    host_key = (folder / "host_key.pub").read_text().strip()
    hosts = []
    for i, address in enumerate(lan.addresses):
        home, tmp = folder / f"host{i}" / "home", folder / f"host{i}" / "tmp"
        home.mkdir(parents=True)
        tmp.mkdir()
        hosts.append(SshHost(f"host{i}", address, home, tmp))
    (folder / "known_hosts").write_text("".join(f"{h.address} {host_key}\n" for h in hosts))
    (folder / "config").write_text(
        "".join(
            f"Host {h.name}\n  HostName {h.address}\n  User root\n"
            f"  IdentityFile {folder / 'client_key'}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {folder / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
            f"  BatchMode yes\n  LogLevel ERROR\n  SetEnv TMPDIR={h.tmp}\n"
            for h in hosts
        )
    )
    server = SshHosts(folder / "config", tuple(hosts))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, (namespace, host) in enumerate(zip(lan.workers, hosts, strict=True)):
            config = folder / f"sshd{i}.conf"
            config.write_text(
                f"ListenAddress {host.address}:22\nHostKey {folder / 'host_key'}\n"
                f"PidFile {folder / f'sshd{i}.pid'}\n"
                f"AuthorizedKeysFile {folder / 'client_key.pub'}\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nAcceptEnv TMPDIR\n"
            )
            argv = ["unshare", "--mount", "sh", "-c", _SSHD_SHELL, "sh"]
            with (folder / f"sshd{i}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        lan.exec_argv(namespace, [*argv, sshd, "-D", "-e", "-f", str(config)]),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + READY_S
        for proc, host in zip(procs, hosts, strict=True):
            while True:
                probe = lan.exec_argv(lan.hub, server.ssh(host, "true"))
                got = subprocess.run(probe, capture_output=True, text=True, timeout=30)
                if got.returncode == 0:
                    break
                log = (folder / f"sshd{hosts.index(host)}.log").read_text()
                assert proc.poll() is None, f"sshd exited with {proc.returncode}: {log}"
                assert time.monotonic() < deadline, f"sshd does not let in: {got.stderr}{log}"
                time.sleep(0.2)
        yield server
    finally:
        for proc in procs:
            stop(proc)
