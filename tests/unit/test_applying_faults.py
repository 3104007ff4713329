"""The parts that let the built-in suite fit a server and say when it could not: the request
headers, the fixed large path, a fault's applied check, the stretch of --storm-duration and
the new manifest keys."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from afterclose import faults
from afterclose.faults.base import FaultReport
from afterclose.harness import manifest as mf
from afterclose.harness import options, replay
from afterclose.harness.errors import ManifestError, OptionError
from afterclose.harness.protocols.http import HTTP, TAG_HEADER, Http, ResponseParser
from afterclose.harness.session import Settings


def test_requests_ask_for_keep_alive_unless_they_ask_for_close() -> None:
    kept = HTTP.request("/ac/r/0/0", "127.0.0.1", 80)
    assert b"\r\nConnection: keep-alive\r\n" in kept
    closing = HTTP.request("/ac/r/0/0", "127.0.0.1", 80, close=True)
    assert b"keep-alive" not in closing and b"\r\nConnection: close\r\n" in closing


def test_manifest_headers_are_sent_and_replace_host_and_connection() -> None:
    proto = HTTP.configured((("Host", "example.org"), ("Connection", "close"), ("X-A", "1")))
    raw = proto.request("/ac/r/0/0", "127.0.0.1", 80)
    assert raw.count(b"Host:") == 1 and b"Host: example.org\r\n" in raw
    assert raw.count(b"Connection:") == 1 and b"Connection: close\r\n" in raw
    assert b"X-A: 1\r\n" in raw
    assert HTTP.configured(()) is HTTP


def test_a_fixed_path_request_carries_its_tag_in_a_header() -> None:
    raw = Http().path_request("/big", "/ac/r/3/1", "127.0.0.1", 80)
    assert raw.startswith(b"GET /big HTTP/1.1\r\n")
    assert f"{TAG_HEADER}: /ac/r/3/1\r\n".encode() in raw


def _write(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "t.toml"
    path.write_text(f'name = "t"\ncommand = ["./x"]\n{extra}\n')
    return path


def test_the_new_manifest_keys_are_read(tmp_path: Path) -> None:
    m = mf.load_manifest(
        _write(
            tmp_path,
            'request_headers = { Host = "x" }\nlarge_path = "/big"\nidle_timeout_s = 15',
        )
    )
    assert dict(m.request_headers) == {"Host": "x"}
    assert m.large_path == "/big" and m.idle_timeout_s == 15.0
    plain = mf.load_manifest(_write(tmp_path, ""))
    assert dict(plain.request_headers) == {} and plain.large_path is None
    assert plain.idle_timeout_s is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('request_headers = { "Bad Name" = "x" }', "is not a request header"),
        ('request_headers = { X = "a\\r\\nB: c" }', "is not a request header"),
        ('large_path = "big"', "an HTTP path starts with '/'"),
        ("idle_timeout_s = 0", "must be greater than 0"),
    ],
)
def test_bad_values_of_the_new_keys_are_named(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ManifestError) as err:
        mf.load_manifest(_write(tmp_path, extra))
    assert message in err.value.render()


def test_a_fault_that_did_nothing_it_exists_for_says_why_and_which_key() -> None:
    fault = faults.get_any("forged_rst").from_params({}, "t")
    report = FaultReport("forged_rst")
    report.count("connections", 4)
    report.count("not_kept_alive", 4)
    reason = fault.check_applied(report)
    assert reason == report.unapplied
    assert "rst_forged = 0" in reason and "not_kept_alive=4" in reason
    assert "request_headers" in reason
    report.count("rst_forged")
    report.unapplied = ""
    assert fault.check_applied(report) == ""


def test_a_target_that_died_is_no_unapplied_fault() -> None:
    fault = faults.get_any("reset_peer").from_params({}, "t")
    report = FaultReport("reset_peer")
    report.count("stopped_target_gone")
    assert fault.check_applied(report) == ""


def test_storm_duration_stretches_storms_at_their_own_rate() -> None:
    storm = faults.get_any("connection_storm")
    params: dict[str, object] = {"rate_per_s": 800, "duration_s": 4.0, "max_connections": 4000}
    stretched = storm.stretched(params, 20.0)
    assert stretched == {"rate_per_s": 800, "duration_s": 20.0, "max_connections": 16000}
    assert storm.stretched(params, 2.0) == params  # never shortened
    assert faults.get_any("netem").stretched({}, 9.0) == {"storm_s": 9.0}
    assert faults.get_any("idle_hold").stretched({"hold_s": 3.0}, 9.0) == {"hold_s": 9.0}
    assert faults.get_any("reset_peer").stretched({"connections": 5}, 9.0) == {"connections": 5}


def test_the_idle_hold_plan_holds_idle_connections_first_then_churns() -> None:
    fault = faults.get_any("idle_hold").from_params(
        {"idle_connections": 3, "hold_s": 2.0, "rate_per_s": 10}, "t"
    )
    schedule = fault.schedule(random.Random(7))
    assert len(schedule) == 3 + 20
    assert all(": idle_hold 2000ms" in line for line in schedule[:3])
    assert not any(": idle_hold" in line for line in schedule[3:])
    assert schedule == fault.schedule(random.Random(7))


def test_the_storm_duration_option_is_checked_and_replayed(tmp_path: Path) -> None:
    assert options.STORM_DURATION.check("20") == 20.0
    with pytest.raises(OptionError):
        options.STORM_DURATION.check("0")
    settings = Settings(target="t", rootdir=tmp_path, run_id="r", storm_duration=20.0)
    assert "--storm-duration=20.0" in replay.command(settings, "pytest", ["-k", "x"])
    assert "--storm-duration=20.0" in replay.command(settings, "run", ["reset_peer"])


def test_an_answer_to_a_fixed_path_parses_as_usual() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    reply = parser.next()
    assert reply is not None and reply.body == b"abc" and reply.keep_alive


def test_the_liveness_request_carries_the_manifest_headers_too() -> None:
    raw = HTTP.configured((("Host", "example.org"),)).liveness_request("/", "127.0.0.1", 80)
    assert b"Host: example.org\r\n" in raw and b"Connection: close\r\n" in raw
