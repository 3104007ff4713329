"""The kernel's TCP sockets by sock_diag (``NETLINK_SOCK_DIAG``), asked for by port.

``/proc/net/tcp`` prints every TCP socket of the network namespace as text, TIME_WAIT ones
included: after a few storms a shared machine holds tens of thousands, and reading and parsing
the table took 0.1 to 0.6 s per call, several calls per test.  sock_diag runs a small filter
program in the kernel (``INET_DIAG_REQ_BYTECODE``: local or remote port equal to the target's)
and returns binary records of the few sockets that match, in about a millisecond.  The netlink
socket answers for the harness's own network namespace only: :mod:`procfs` falls back to the
``/proc`` table of the target's namespace when it runs in another (a container's).
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass

# <linux/netlink.h>, <linux/sock_diag.h>, <linux/inet_diag.h>
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 1
NLM_F_DUMP = 0x300
INET_DIAG_REQ_BYTECODE = 1
NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
DIAG_REQ = struct.Struct("=BBBxI")  # family, protocol, ext, pad, states
SOCKID = struct.Struct("!HH16s16s")  # sport, dport, src[4], dst[4] (network order)
SOCKID_TAIL = struct.Struct("=III")  # if, cookie[2] (host order)
DIAG_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans
DIAG_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
NO_COOKIE = 0xFFFFFFFF
ALL_STATES = 0xFFFFFFFF
_NLA = struct.Struct("=HH")  # attribute length, type
_BC_OP = struct.Struct("=BBH")  # code, yes, no: jumps in bytes from this op
_BC_JMP = 1
_BC_S_EQ = 11
_BC_D_EQ = 12
_RECV_BYTES = 1 << 16
_seq = itertools.count(1)


@dataclass(frozen=True)
class DiagSocket:
    """One TCP socket as sock_diag describes it; addresses are 16 raw bytes (an IPv4 one
    in the first 4)."""

    family: int
    state: int
    local_port: int
    remote_port: int
    local_raw: bytes
    remote_raw: bytes
    inode: int

    def proc_address(self, raw: bytes) -> str:
        """``raw`` spelled the way ``/proc/net/tcp{,6}`` spells it: 32-bit words read in host
        byte order, printed as hex."""
        words = 1 if self.family == socket.AF_INET else 4
        return "".join(
            f"{int.from_bytes(raw[i * 4 : i * 4 + 4], sys.byteorder):08X}" for i in range(words)
        )


def _port_filter(port: int) -> bytes:
    """The filter ``sport == port or dport == port``, compiled the way ``ss`` compiles an
    ``or``.  A jump to the exact end accepts, one 4 bytes past it rejects; the kernel's audit
    follows the "yes" jumps, so every op must be reached by them."""
    return b"".join(
        (
            _BC_OP.pack(_BC_S_EQ, 8, 12),  # yes: to the JMP; no: to the D_EQ
            _BC_OP.pack(0, 0, port),
            _BC_OP.pack(_BC_JMP, 4, 12),  # a JMP always takes "no": to the end, accept
            _BC_OP.pack(_BC_D_EQ, 8, 12),  # yes: the end, accept; no: past it, reject
            _BC_OP.pack(0, 0, port),
        )
    )


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, seq, payload) of each netlink message in one datagram."""
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _, seq, _ = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size:
            break
        yield kind, seq, data[offset + NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3


def _dump(nl: socket.socket, family: int, port: int) -> Iterator[DiagSocket]:
    sockid = SOCKID.pack(0, 0, bytes(16), bytes(16)) + SOCKID_TAIL.pack(0, NO_COOKIE, NO_COOKIE)
    program = _port_filter(port)
    attribute = _NLA.pack(_NLA.size + len(program), INET_DIAG_REQ_BYTECODE) + program
    body = DIAG_REQ.pack(family, socket.IPPROTO_TCP, 0, ALL_STATES) + sockid + attribute
    seq = next(_seq) & 0xFFFFFFFF
    flags = NLM_F_REQUEST | NLM_F_DUMP
    header = NLMSGHDR.pack(NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, flags, seq, 0)
    nl.sendto(header + body, (0, 0))
    head = DIAG_MSG_HEAD.size
    while True:
        data = nl.recv(_RECV_BYTES)
        for kind, got, payload in _messages(data):
            if got != seq:
                continue
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", payload)
                if code:
                    raise OSError(-code, "sock_diag dump refused")
                return
            fam, state, _, _ = DIAG_MSG_HEAD.unpack_from(payload)
            sport, dport, src, dst = SOCKID.unpack_from(payload, head)
            tail = head + SOCKID.size + SOCKID_TAIL.size
            inode = DIAG_MSG_TAIL.unpack_from(payload, tail)[4]
            yield DiagSocket(fam, state, sport, dport, src, dst, inode)


def port_sockets(port: int) -> list[DiagSocket]:
    """Every TCP socket (IPv4 and IPv6) of the harness's network namespace with ``port`` at
    either end.  Raises OSError when sock_diag is missing or refuses."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        out = list(_dump(nl, socket.AF_INET, port))
        # No IPv6 in this kernel (nor a tcp6 table): no IPv6 sockets either.
        with contextlib.suppress(OSError):
            out += list(_dump(nl, socket.AF_INET6, port))
        return out
