"""The compiled storm engine's Python side: its ABI mirror, the plan's encoding, the request
templates, when it declines a plan, and its HTTP parser against the Python one."""

from __future__ import annotations

import ctypes
import random
import re
import socket
from dataclasses import replace

import pytest
from hypothesis import given, settings

from afterclose.faults.base import Endpoint
from afterclose.faults.connection_storm import BEHAVIOURS, ConnectionStorm, draw
from afterclose.harness import explore
from afterclose.harness.client import behaviours as b
from afterclose.harness.client import native
from afterclose.harness.client.conn import Remote
from afterclose.harness.protocols import builtin
from afterclose.harness.protocols.base import GarbageReply
from afterclose.harness.protocols.http import ResponseParser

HEADER = (native.CSRC / "storm.h").read_text()
TAG = "/ac/5eed/7/2"


def remote(**endpoint: object) -> Remote:
    return Remote.resolve("connection_storm", Endpoint("127.0.0.1", 8080, **endpoint), "5eed")


def define(name: str) -> int:
    m = re.search(rf"#define {name} (\d+)", HEADER)
    assert m is not None, name
    return int(m.group(1))


def test_the_ctypes_mirror_matches_the_header() -> None:
    counts = re.search(r"enum \{\s*(C_CONNECTIONS.*?)AC_COUNTS", HEADER, re.S)
    assert counts is not None
    names = [n.strip() for n in counts.group(1).split(",") if n.strip()]
    assert len(names) == native.N_COUNTS
    assert names[-3:] == ["C_STARTED", "C_DONE", "C_EVENTS_OVER"]
    assert define("AC_ABI") == native.ABI
    assert define("AC_ERRNOS") == native.N_ERRNOS
    assert define("AC_STATUSES") == native.N_STATUSES
    assert define("AC_EVENTS") == native.N_EVENTS
    assert define("AC_EVENT_BYTES") == native.EVENT_BYTES
    engine_h = (native.CSRC / "engine.h").read_text()
    assert f"#define AWAIT_MAX {native.AWAIT_MAX}" in engine_h


def test_every_behaviour_of_the_mix_is_encoded() -> None:
    rng = random.Random(3)
    for behaviour in BEHAVIOURS:
        for _ in range(50):
            action = draw(rng, behaviour)
            record = native.encode(action)
            assert record is not None and len(record) == 8, action
    assert native.encode(b.IdleHold(100, request=True)) is None


def test_records_carry_the_drawn_parameters() -> None:
    kind, flags, a, b_, c = native._ACTION.unpack(
        native.encode(b.RaceAction("garbage", "rst", 150, valid_first=True)) or b""
    )
    assert native.KINDS[kind] == "race" and flags == native.RACE_RST | native.RACE_VALID_FIRST
    assert (a, b_, c) == (b.MALFORMED_VARIANTS.index("garbage"), 150, 0)
    record = native.encode(b.ResetAction("mid-response", pipeline=5, read_bytes=200))
    assert native._ACTION.unpack(record or b"") == (7, 0, 3, 5, 200)
    assert native.encode(b.SlowSender(4, 9)) == native._ACTION.pack(4, 0, 4, 9, 0)
    # More requests written at once than the engine awaits: the asyncio engine's.
    assert native.encode(b.HalfCloseAction(native.AWAIT_MAX + 1, one_write=True)) is None


def test_templates_rebuild_the_protocols_requests() -> None:
    for endpoint in ({}, {"request_headers": (("X-Key", "v"),), "large_path": "/big"}):
        r = remote(**endpoint)
        templates = native.Templates.of(r)
        assert isinstance(templates, native.Templates)
        http, host, port = r.protocol, "127.0.0.1", 8080
        large = r.endpoint.large_path
        wanted = [
            http.request(TAG, host, port),
            http.request(TAG, host, port, close=True),
            http.path_request(large, TAG, host, port) if large else http.request(TAG, host, port),
            *(http.malformed(v, TAG, host, port) for v in b.MALFORMED_VARIANTS),
        ]
        for (pre, post, has_tag), request in zip(templates.parts, wanted, strict=True):
            assert pre + (TAG.encode() if has_tag else b"") + post == request


def test_plans_it_cannot_perform_stay_on_asyncio() -> None:
    actions = ConnectionStorm(max_connections=40).plan(random.Random(1))
    plan = native.prepare(remote(), actions)
    assert isinstance(plan, native.NativePlan) and len(plan.records) == 8 * len(actions)
    line = replace(remote(), protocol=builtin("line"))
    assert "protocol line" in str(native.prepare(line, actions))
    assert "TLS" in str(native.prepare(remote(tls=True), actions))
    held = native.prepare(remote(), [*actions, b.IdleHold(10, request=False)])
    assert isinstance(held, str) and "idle_hold" in held


def test_ipv6_addresses_are_packed_as_sockaddr_in6() -> None:
    r = replace(remote(), family=socket.AF_INET6, sockaddr=("::1", 8080, 0, 0))
    raw = native._sockaddr(r)
    assert len(raw) == 28 and raw[:2] == socket.AF_INET6.to_bytes(2, "little")
    assert raw[2:4] == (8080).to_bytes(2, "big") and raw[8:24] == socket.inet_pton(
        socket.AF_INET6, "::1"
    )


class _Reply(ctypes.Structure):
    _fields_ = [
        ("status", ctypes.c_int),
        ("keep_alive", ctypes.c_int),
        ("owned", ctypes.c_int),
        ("body", ctypes.c_void_p),
        ("body_len", ctypes.c_size_t),
        ("consumed", ctypes.c_size_t),
        ("partial_len", ctypes.c_size_t),
    ]


def c_parse(data: bytes, eof: bool) -> tuple[object, ...]:
    lib = native._library()
    reply = _Reply()
    buf = ctypes.create_string_buffer(data, len(data) or 1)
    got = lib.http_next(buf, ctypes.c_size_t(len(data)), int(eof), ctypes.byref(reply))
    if got == 0:
        return ("more",)
    if got == 2:
        return ("garbage",)
    body = ctypes.string_at(reply.body, reply.body_len) if reply.body_len else b""
    return ("reply", reply.status, bool(reply.keep_alive), body, reply.consumed)


def py_parse(data: bytes, eof: bool) -> tuple[object, ...]:
    parser = ResponseParser()
    parser.feed(data)
    if eof:
        parser.feed_eof()
    try:
        reply = parser.next()
    except GarbageReply:
        return ("garbage",)
    if reply is None:
        return ("more",)
    return ("reply", reply.status, reply.keep_alive, reply.body, len(data) - len(parser.buffered))


RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 2\r\n\r\nno",
    b"HTTP/1.1 200 OK\r\nconnection: Keep-Alive, CLOSE\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 204 No Content\r\n\r\nleft",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nuntil the close",
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 20x OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nbad name: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n: empty\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX:\r\nContent-Length: 1\r\n\r\nz",
    b"HTTP/",
    b"HTTP/1.1 200 OK\r\n",
    b"HTTX/1.1 200 OK\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"",
]


@pytest.mark.parametrize("data", RESPONSES)
@pytest.mark.parametrize("eof", [False, True])
def test_the_c_parser_reads_what_the_python_one_reads(data: bytes, eof: bool) -> None:
    assert c_parse(data, eof) == py_parse(data, eof)


@settings(max_examples=20, database=None, deadline=None)
@given(explore.fault_strategy("connection_storm"))
def test_exploration_leaves_the_engine_at_its_default(drawn: tuple[str, dict[str, object]]) -> None:
    name, params = drawn
    assert name == "connection_storm" and "engine" not in params and "mix" in params
