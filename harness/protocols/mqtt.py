"""MQTT 3.1.1.

Each connection opens a session: CONNECT (client id ``afterclose-<run-id>-<conn#>``, clean
session) and SUBSCRIBE (QoS 0) to its own topic ``afterclose/<run-id>-<conn#>``.  A request is
a QoS 0 PUBLISH of the tag to that topic; its reply is the message the broker delivers back on
the subscription, so a message carrying another connection's tag is cross-talk.
"""

from __future__ import annotations

import struct
from typing import ClassVar

from afterclose.harness.protocols import base
from afterclose.harness.protocols.base import Frame, GarbageReply

MAX_PACKET = 64 << 20
KEEPALIVE_S = 60

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = range(8, 15)
# What a broker may send a client, and the fixed-header flags each must carry (None: any).
_FROM_BROKER: dict[int, int | None] = {
    CONNACK: 0,
    PUBLISH: None,
    PUBACK: 0,
    PUBREC: 0,
    PUBREL: 2,
    PUBCOMP: 0,
    SUBACK: 0,
    UNSUBACK: 0,
    PINGRESP: 0,
}
_NAMES = {CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK", PUBREC: "PUBREC",
          PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBACK: "SUBACK", UNSUBACK: "UNSUBACK",
          PINGRESP: "PINGRESP"}  # fmt: skip

MALFORMED: dict[str, bytes] = {
    "reserved-type": b"\x00\x00",
    "bad-length": b"\x30\xff\xff\xff\xff\x01",
    "bad-flags": b"\xc3\x00",
    "auth-in-3.1.1": b"\xf0\x00",
}


def encode_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + encode_length(len(body)) + body


def utf8(text: bytes) -> bytes:
    return struct.pack("!H", len(text)) + text


def connect(client_id: bytes) -> bytes:
    return packet(CONNECT, 0, utf8(b"MQTT") + bytes([4, 0x02]) + struct.pack("!H", KEEPALIVE_S)
                  + utf8(client_id))  # fmt: skip


def subscribe(topic: bytes, packet_id: int = 1) -> bytes:
    return packet(SUBSCRIBE, 2, struct.pack("!H", packet_id) + utf8(topic) + b"\x00")


def publish(topic: bytes, payload: bytes) -> bytes:
    return packet(PUBLISH, 0, utf8(topic) + payload)


def topic_of(tag: str) -> bytes:
    return f"afterclose/{base.session_of(tag)}".encode()


class MqttParser(base.ReplyParser):
    def next(self) -> Frame | None:
        buf = self._buf
        if not buf:
            return None
        kind, flags = buf[0] >> 4, buf[0] & 0x0F
        expected = _FROM_BROKER.get(kind, -1)
        if expected == -1 or (expected is not None and flags != expected):
            raise GarbageReply(f"not an MQTT packet from a broker: {bytes(buf[:20])!r}", bytes(buf))
        size, shift, pos = 0, 0, 1
        while True:
            if pos >= len(buf):
                return None
            if pos > 4:
                raise GarbageReply("MQTT remaining length over 4 bytes", bytes(buf[:20]))
            size |= (buf[pos] & 0x7F) << shift
            shift += 7
            pos += 1
            if not buf[pos - 1] & 0x80:
                break
        if size > MAX_PACKET:
            raise GarbageReply(f"MQTT packet of {size} bytes", bytes(buf[:20]))
        if len(buf) < pos + size:
            return None
        body = bytes(buf[pos : pos + size])
        del buf[: pos + size]
        return self._frame(kind, flags, body)

    def _frame(self, kind: int, flags: int, body: bytes) -> Frame:
        name = _NAMES[kind]
        if kind == PUBLISH:
            qos = (flags >> 1) & 3
            if qos == 3 or len(body) < 2:
                raise GarbageReply(f"bad MQTT PUBLISH (flags {flags:#x})", body[:40])
            start = 2 + struct.unpack("!H", body[:2])[0] + (2 if qos else 0)
            if start > len(body):
                raise GarbageReply("MQTT PUBLISH topic longer than the packet", body[:40])
            return Frame(200, body[start:], kind=name)
        if kind == CONNACK:
            if len(body) != 2:
                raise GarbageReply("MQTT CONNACK of the wrong size", body)
            return Frame(200 if body[1] == 0 else 400 + body[1], b"", kind=name)
        if kind == SUBACK:
            if len(body) < 3:
                raise GarbageReply("MQTT SUBACK too short", body)
            return Frame(400 if 0x80 in body[2:] else 200, b"", kind=name)
        return Frame(200, b"", kind=name)


class Mqtt(base.Protocol):
    name: ClassVar[str] = "mqtt"
    malformed_variants: ClassVar[tuple[str, ...]] = tuple(MALFORMED)
    tagged_replies: ClassVar[bool] = True
    prologue_replies: ClassVar[int] = 2  # CONNACK, SUBACK

    def prologue(self, session: str) -> bytes:
        client_id = f"afterclose-{base.session_of(session)}".encode()
        return connect(client_id) + subscribe(topic_of(session))

    def answers(self, reply: base.Reply, tag: str, *, echoes: bool) -> bool:
        # Only a delivered message answers a PUBLISH; an acknowledgement there is out of turn.
        if getattr(reply, "kind", "PUBLISH") != "PUBLISH" and 200 <= reply.status < 300:
            return False
        return super().answers(reply, tag, echoes=echoes)

    def request(self, tag: str, host: str, port: int, *, close: bool = False) -> bytes:
        return publish(topic_of(tag), tag.encode())

    def parser(self) -> MqttParser:
        return MqttParser()

    def large_request(self, tag: str, size: int, host: str, port: int) -> bytes:
        return publish(topic_of(tag), tag.encode() + b" " + b"x" * max(size - len(tag) - 1, 0))

    def malformed(self, variant: str, tag: str, host: str, port: int) -> bytes:
        return MALFORMED[variant].replace(b"{tag}", tag.encode())

    def liveness_request(self, path: str, host: str, port: int) -> bytes:
        return self.request(path, host, port)
