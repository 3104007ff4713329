"""crash: what counts as a sanitizer report in the server's stderr (a real server that dies is
tested in tests/integration/process/test_blackbox_oracle.py)."""

from __future__ import annotations

from afterclose.harness.oracle.rules import crash


def test_sanitizer_reports_are_found_and_quoted() -> None:
    stderr = "starting\n==1==ERROR: AddressSanitizer: heap-use-after-free\n" + "#0 frame\n" * 40
    quoted = crash.sanitizer_report(stderr)
    assert quoted is not None
    assert quoted.startswith("==1==ERROR: AddressSanitizer: heap-use-after-free")
    assert "(16 more lines in the target's stderr)" in quoted
    assert crash.sanitizer_report("x.c:3:5: runtime error: signed integer overflow") is not None


def test_ordinary_output_is_not_a_report() -> None:
    assert crash.sanitizer_report("") is None
    assert crash.sanitizer_report("listening on 127.0.0.1:8080\nERROR: bad request\n") is None
