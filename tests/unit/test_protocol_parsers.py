"""The built-in protocols' parsers, fed byte streams recorded from real servers (redis-server
7, memcached 1.6, mosquitto 2 and the seed servers of tests/servers), cut at every byte; the
protocol registry and the user protocol of docs/protocols.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from paths import ROOT_DIR

from afterclose.harness import protocols
from afterclose.harness.errors import ManifestError
from afterclose.harness.manifest import parse_manifest
from afterclose.harness.protocols import base, memcached, mqtt, resp

TAG = "/ac/abc/3/1"
TAG2 = "/ac/abc/3/2"

# What the real servers sent back for two requests on one connection (see the module doc).
RECORDED: dict[str, bytes] = {
    "resp": b"+OK\r\n$11\r\n/ac/abc/3/1\r\n+OK\r\n$11\r\n/ac/abc/3/2\r\n",
    "memcached": b"STORED\r\nVALUE afterclose:abc-3 0 11\r\n/ac/abc/3/1\r\nEND\r\n"
    b"STORED\r\nVALUE afterclose:abc-3 0 11\r\n/ac/abc/3/2\r\nEND\r\n",
    # CONNACK, SUBACK, then the two messages delivered back.
    "mqtt": b" \x02\x00\x00\x90\x03\x00\x01\x000\x1d\x00\x10afterclose/abc-3/ac/abc/3/1"
    b"0\x1d\x00\x10afterclose/abc-3/ac/abc/3/2",
    "line": b"/ac/abc/3/1\n/ac/abc/3/2\n",
}
EXPECTED_BODIES: dict[str, list[bytes]] = {
    "resp": [TAG.encode(), TAG2.encode()],
    "memcached": [TAG.encode(), TAG2.encode()],
    "mqtt": [b"", b"", TAG.encode(), TAG2.encode()],
    "line": [TAG.encode(), TAG2.encode()],
}


def replies(name: str, stream: bytes, cut: int) -> list[base.Reply]:
    parser = protocols.builtin(name).parser()
    out: list[base.Reply] = []
    for piece in (stream[:cut], stream[cut:]):
        parser.feed(piece)
        while (reply := parser.next()) is not None:
            out.append(reply)
    assert parser.buffered == b""
    return out


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_recorded_streams_parse_whole_at_every_cut(name: str) -> None:
    stream = RECORDED[name]
    for cut in range(len(stream) + 1):
        got = replies(name, stream, cut)
        assert [r.body for r in got] == EXPECTED_BODIES[name], cut
        assert all(200 <= r.status < 300 for r in got)


@pytest.mark.parametrize("name", ["resp", "memcached", "mqtt", "line"])
def test_a_reply_answers_its_own_tag_only(name: str) -> None:
    proto = protocols.builtin(name)
    reply = replies(name, RECORDED[name], 0)[-1]
    assert proto.answers(reply, TAG2, echoes=False)
    assert not proto.answers(reply, TAG, echoes=False)  # another request's: cross-talk


def test_requests_carry_the_tag_and_the_connections_key() -> None:
    assert protocols.builtin("line").request(TAG, "h", 1) == b"/ac/abc/3/1\n"
    assert resp.command(b"GET", b"k") == b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    assert protocols.builtin("resp").request(TAG, "h", 1) == (
        b"*3\r\n$3\r\nSET\r\n$16\r\nafterclose:abc-3\r\n$11\r\n/ac/abc/3/1\r\n"
        b"*2\r\n$3\r\nGET\r\n$16\r\nafterclose:abc-3\r\n"
    )
    assert protocols.builtin("memcached").request(TAG2, "h", 1) == (
        b"set afterclose:abc-3 0 0 11\r\n/ac/abc/3/2\r\nget afterclose:abc-3\r\n"
    )
    prologue = protocols.builtin("mqtt").prologue(TAG)
    assert prologue.startswith(b"\x10") and b"MQTT\x04\x02" in prologue
    assert b"afterclose-abc-3" in prologue and b"\x82" in prologue
    assert mqtt.encode_length(321) == b"\xc1\x02"


RECORDED_ERRORS = [
    ("resp", b"-ERR Protocol error: invalid bulk length\r\n", 400),
    ("resp", b"$-1\r\n", 404),
    ("resp", b"*2\r\n$1\r\na\r\n:5\r\n", 200),
    ("memcached", b"CLIENT_ERROR bad command line format\r\n", 400),
    ("memcached", b"ERROR\r\n", 400),
    ("memcached", b"END\r\n", 404),
    ("mqtt", b"\xd0\x00", 200),  # PINGRESP
    ("mqtt", b" \x02\x00\x05", 405),  # CONNACK: not authorised
]


@pytest.mark.parametrize(("name", "stream", "status"), RECORDED_ERRORS)
def test_error_replies_have_their_status(name: str, stream: bytes, status: int) -> None:
    (reply,) = replies(name, stream, len(stream))
    assert reply.status == status


GARBAGE = [
    ("resp", b"HTTP/1.1 200 OK\r\n"),
    ("resp", b"$abc\r\n"),
    ("resp", b"$5\r\nhelloXX"),
    ("resp", b"+" + b"x" * (resp.MAX_LINE + 10)),
    ("memcached", b"HTTP/1.1 200 OK\r\n"),
    ("memcached", b"VALUE k 0 3\r\nabcXX"),
    ("memcached", b"x" * (memcached.MAX_LINE + 10)),
    ("mqtt", b"\x10\x00"),  # CONNECT comes from clients, never from a broker
    ("mqtt", b"\x20\xff\xff\xff\xff\x01"),  # a remaining length over 4 bytes
    ("mqtt", b"\x22\x02\x00\x00"),  # CONNACK with flags
    ("line", b"y" * ((1 << 20) + 10)),
]


@pytest.mark.parametrize(("name", "stream"), GARBAGE)
def test_bytes_that_are_no_reply_raise(name: str, stream: bytes) -> None:
    parser = protocols.builtin(name).parser()
    parser.feed(stream)
    with pytest.raises(base.GarbageReply):
        parser.next()


def test_a_lone_ok_before_the_close_is_a_cut_reply_not_an_answer() -> None:
    for name, stream in (("resp", b"+OK\r\n"), ("memcached", b"STORED\r\n")):
        parser = protocols.builtin(name).parser()
        parser.feed(stream)
        parser.feed_eof()
        assert parser.next() is None
        assert parser.buffered == stream


def test_every_malformed_variant_is_made() -> None:
    for name in protocols.BUILTIN:
        proto = protocols.builtin(name)
        assert proto.name == name
        for variant in proto.malformed_variants:
            assert proto.malformed(variant, TAG, "127.0.0.1", 80)
        assert len(proto.large_request(TAG, 4000, "h", 1)) >= 4000


# ---- manifests


def manifest(tmp_path: Path, extra: str) -> dict[str, object]:
    import tomllib

    return tomllib.loads(f'name = "t"\ncommand = ["./s"]\n{extra}')


def test_the_protocol_keys(tmp_path: Path) -> None:
    path = tmp_path / "target.toml"
    plain = parse_manifest(manifest(tmp_path, ""), path)
    assert (plain.protocol, plain.tls, plain.speaks.name) == ("http", False, "http")
    tls = parse_manifest(manifest(tmp_path, 'protocol = "resp"\ntls = true\n'), path)
    assert (tls.speaks.name, tls.tls) == ("resp", True)
    ready = parse_manifest(manifest(tmp_path, 'protocol = "raw"\n[ready]\nprotocol = true\n'), path)
    assert ready.ready.strategy == "protocol"
    with pytest.raises(ManifestError, match="unknown protocol 'redis'"):
        parse_manifest(manifest(tmp_path, 'protocol = "redis"\n'), path)
    with pytest.raises(ManifestError, match="choose one readiness strategy"):
        parse_manifest(manifest(tmp_path, "[ready]\nprotocol = true\nport = true\n"), path)
    with pytest.raises(ManifestError, match="no file"):
        parse_manifest(manifest(tmp_path, 'protocol = "nothere:P"\n'), path)
    (tmp_path / "notproto.py").write_text("class P:\n    pass\n")
    with pytest.raises(ManifestError, match="not a Protocol subclass"):
        parse_manifest(manifest(tmp_path, 'protocol = "notproto:P"\n'), path)


# ---- the user protocol of docs/protocols.md

LENPROTO = ROOT_DIR / "tests" / "servers" / "lenproto"


def test_the_docs_example_is_the_tested_file_and_short() -> None:
    text = (ROOT_DIR / "docs" / "protocols.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    example = (LENPROTO / "lenproto.py").read_text()
    assert example in blocks
    assert len(example.splitlines()) < 40


def test_the_user_protocol_resolves_and_parses() -> None:
    speaks = parse_manifest(
        manifest(LENPROTO, 'protocol = "lenproto:LengthPrefixed"\n'), LENPROTO / "target.toml"
    ).speaks
    assert speaks.name == "length-prefixed" and isinstance(speaks, base.Protocol)
    request = speaks.request(TAG, "h", 1)
    assert request == b"\x00\x00\x00\x0b" + TAG.encode()
    parser = speaks.parser()
    parser.feed(request[:6])
    assert parser.next() is None
    parser.feed(request[6:])
    reply = parser.next()
    assert reply is not None and speaks.answers(reply, TAG, echoes=False)
    parser.feed(b"\xff\xff\xff\xff")
    with pytest.raises(base.GarbageReply):
        parser.next()


NOTICE = b"HTTP/1.1 408 Request Time-out\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "notice"),
    [
        (NOTICE, True),
        (b"HTTP/1.0 408 Request Timeout\r\n\r\nbody until the close", True),
        (NOTICE + NOTICE, False),
        (NOTICE[:-2], False),
        (NOTICE.replace(b"408", b"200"), False),
        (b"-ERR timeout\r\n", False),
    ],
)
def test_only_one_whole_408_is_http_s_notice_of_an_idle_close(data: bytes, notice: bool) -> None:
    assert protocols.builtin("http").close_notice(data) is notice
    assert protocols.builtin("resp").close_notice(data) is False
