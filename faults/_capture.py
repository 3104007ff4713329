"""Sniffing what went over the loopback wire, to check what the packet faults did."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

from afterclose.faults._forging import LOOPBACK_IFACE
from afterclose.faults._packets import require_support
from afterclose.harness.errors import ScenarioError


@dataclass(frozen=True)
class Segment:
    """One captured TCP segment (duplicates on ``lo`` removed)."""

    src_port: int
    dst_port: int
    flags: str
    seq: int
    ack: int
    payload_len: int
    time: float  # when the kernel saw it, wall clock (time.time())


class Capture:
    """Sniff TCP segments to/from ``port`` on ``lo`` while in the ``with`` block (scapy).

    A capture filter needs libpcap: without it scapy's sniffer starts fine and silently sees
    nothing, so the filter is compiled first and a failure raises.  Every segment is seen twice
    on ``lo`` (once leaving, once arriving), with checksums left partial: the copies are equal
    and consecutive, and :attr:`segments` keeps one.
    """

    def __init__(self, port: int, *, start_timeout_s: float = 5.0) -> None:
        self.port = port
        self.start_timeout_s = start_timeout_s
        self._sniffer: Any = None
        self._raw: list[Any] = []

    def __enter__(self) -> Capture:
        require_support("capture")
        # The layers first: they register the link type of lo (ARPHRD_LOOPBACK, read as
        # Ethernet, in scapy.layers.l2 which inet imports); without them every captured frame
        # decodes as raw bytes.
        import scapy.layers.inet  # noqa: F401
        from scapy.arch.common import compile_filter
        from scapy.sendrecv import AsyncSniffer

        flt = f"tcp port {self.port}"
        try:
            compile_filter(flt, iface=LOOPBACK_IFACE)
        except Exception as exc:
            raise ScenarioError(
                f"cannot compile the capture filter {flt!r}: {exc}",
                where="packet capture",
                hint="sniffing with a filter needs libpcap (apt-get install libpcap0.8)",
            ) from None
        started = threading.Event()
        self._sniffer = AsyncSniffer(
            iface=LOOPBACK_IFACE,
            filter=flt,
            store=True,
            started_callback=started.set,
        )
        self._sniffer.start()
        if not started.wait(self.start_timeout_s):
            self._sniffer.stop(join=False)
            raise ScenarioError("the packet capture did not start", where="packet capture")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sniffer is not None:
            time.sleep(0.05)  # let the capture thread catch up with the last segments
            with contextlib.suppress(Exception):
                self._raw = list(self._sniffer.stop() or [])
            self._sniffer = None

    @property
    def segments(self) -> list[Segment]:
        from scapy.layers.inet import TCP

        out: list[Segment] = []
        previous = b""
        for pkt in self._raw:
            raw = bytes(pkt)
            if raw == previous or TCP not in pkt:
                previous = raw
                continue
            previous = raw
            tcp = pkt[TCP]
            out.append(
                Segment(
                    int(tcp.sport),
                    int(tcp.dport),
                    str(tcp.flags),
                    int(tcp.seq),
                    int(tcp.ack),
                    len(bytes(tcp.payload)),
                    float(pkt.time),
                )
            )
        return out
