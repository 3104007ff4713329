"""What the kernel says about a target's sockets: ``/proc/PID/fd`` and the TCP tables."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}


def socket_inodes(pid: int) -> dict[int, int]:
    """fd number -> socket inode for one process (empty if it is gone)."""
    result: dict[int, int] = {}
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = os.listdir(fd_dir)
    except OSError:
        return result
    for name in entries:
        try:
            link = os.readlink(fd_dir / name)
        except OSError:
            continue  # closed while we looked
        if link.startswith("socket:["):
            result[int(name)] = int(link[8:-1])
    return result


def socket_fd_count(pids: list[int]) -> int:
    return sum(len(socket_inodes(pid)) for pid in pids)


@dataclass(frozen=True)
class TcpSocket:
    local_port: int
    remote_port: int
    state: str
    inode: int
    local_addr: str = ""  # as the table spells it: hex, in the kernel's byte order
    remote_addr: str = ""

    def peer_key(self) -> tuple[str, int, str, int]:
        """How the other end of this connection appears in the same table."""
        return (self.remote_addr, self.remote_port, self.local_addr, self.local_port)

    def key(self) -> tuple[str, int, str, int]:
        return (self.local_addr, self.local_port, self.remote_addr, self.remote_port)


def tcp_sockets(pid: int) -> list[TcpSocket]:
    """TCP sockets of the network namespace ``pid`` lives in (IPv4 and IPv6)."""
    out: list[TcpSocket] = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            local, remote, state, inode = fields[1], fields[2], int(fields[3], 16), int(fields[9])
            local_addr, local_port = local.rsplit(":", 1)
            remote_addr, remote_port = remote.rsplit(":", 1)
            out.append(
                TcpSocket(
                    local_port=int(local_port, 16),
                    remote_port=int(remote_port, 16),
                    state=TCP_STATES.get(state, str(state)),
                    inode=inode,
                    local_addr=local_addr,
                    remote_addr=remote_addr,
                )
            )
    return out


@dataclass(frozen=True)
class SocketCensus:
    """The target's open socket fds and the states of its TCP connections on its port."""

    socket_fds: int
    states: Counter[str]
    # ESTABLISHED on the target's side while the client's side is gone or closing: see
    # ``census``.  Part of the ESTABLISHED count in ``states``.
    stranded: int = 0

    @property
    def close_wait(self) -> int:
        return self.states.get("CLOSE_WAIT", 0)

    def describe(self) -> str:
        states = ", ".join(f"{k} {v}" for k, v in sorted(self.states.items())) or "none"
        if self.stranded:
            states += f" ({self.stranded} ESTABLISHED with the client's end gone)"
        return f"{self.socket_fds} socket fds; connections on the port: {states}"


def settled_census(
    pids: Callable[[], list[int]], port: int, quiet_s: float = 0.25, cap_s: float = 3.0
) -> SocketCensus:
    """The census once the target's processes and socket fds stopped changing for ``quiet_s``.

    A server that is ready may still be settling: nginx's workers pass channel fds between
    each other for a moment after the first one answers.  A baseline taken then is wrong.
    """
    deadline = time.monotonic() + cap_s
    last: tuple[tuple[int, ...], int] | None = None
    since = time.monotonic()
    while True:
        now_pids = pids()
        state = (tuple(sorted(now_pids)), socket_fd_count(now_pids))
        now = time.monotonic()
        if state != last:
            last, since = state, now
        elif now - since >= quiet_s or now >= deadline:
            return census(now_pids, port)
        time.sleep(0.02)


def census(pids: list[int], port: int) -> SocketCensus:
    inodes: set[int] = set()
    fds = 0
    for pid in pids:
        owned = socket_inodes(pid)
        fds += len(owned)
        inodes.update(owned.values())
    # Only the target's own sockets count: the table also holds every client's.
    states: Counter[str] = Counter()
    stranded = 0
    if pids:
        table = tcp_sockets(pids[0])
        established = {s.key() for s in table if s.state == "ESTABLISHED"}
        for sock in table:
            if sock.inode not in inodes or sock.local_port != port or sock.state == "LISTEN":
                continue
            states[sock.state] += 1
            # A connection stays ESTABLISHED on the server's side until a FIN or an RST from
            # the client arrives.  When the network lost or reordered those (netem, forged
            # packets; an RST behind delayed data meets RFC 5961's challenge ACK, and that can
            # be lost too), the client's end is gone while the server was never told: no
            # server can close what its kernel still calls live.  Loopback clients appear in
            # this same table, so the peer is checked, not assumed.
            if (
                sock.state == "ESTABLISHED"
                and _loopback(sock.remote_addr)
                and sock.peer_key() not in established
            ):
                stranded += 1
    return SocketCensus(socket_fds=fds, states=states, stranded=stranded)


def _loopback(addr_hex: str) -> bool:
    """``addr_hex`` as /proc/net/tcp{,6} spells it: 127.0.0.0/8, ::1 or ::ffff:127.x."""
    if len(addr_hex) == 8:  # IPv4, little-endian on x86: the first octet is the last byte
        return addr_hex[6:8] == "7F"
    if len(addr_hex) == 32:
        if addr_hex == "00000000000000000000000001000000":
            return True
        return addr_hex[:24] == "0" * 16 + "FFFF0000" and addr_hex[30:32] == "7F"
    return False
