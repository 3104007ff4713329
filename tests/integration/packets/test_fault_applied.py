"""A packet fault that could not be applied is a SKIP that names the manifest key which fixes
it, unless the run showed a violation meanwhile (judged first: a FAIL naming the rule).

The server is tests/servers/picky.c in its explicit-keepalive mode: it keeps a connection
open only when the request asks for it, so a manifest that makes every request say
``Connection: close`` leaves the forged segments nothing to hit."""

from __future__ import annotations

import pytest
from picky import picky_manifest

QUIET = ("-p", "no:cacheprovider", "-p", "no:xdist", "-rs")
CLOSE_EVERY = 'request_headers = { Connection = "close" }'


def test_a_forged_segment_with_no_kept_alive_connection_skips_with_the_key(
    pytester: pytest.Pytester,
) -> None:
    manifest = picky_manifest(pytester.path, "explicit-keepalive", CLOSE_EVERY)
    result = pytester.runpytest_subprocess(f"--target={manifest}", "-k", "forged_rst", *QUIET)
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(
        ["*fault 'forged_rst': not applied (rst_forged = 0*not_kept_alive=*request_headers*"]
    )


def test_a_violation_seen_while_trying_still_fails(pytester: pytest.Pytester) -> None:
    # The liveness check expects 404 from a server that answers 200: a violation of the run.
    manifest = picky_manifest(
        pytester.path, "explicit-keepalive", CLOSE_EVERY, "liveness_status = 404"
    )
    result = pytester.runpytest_subprocess(
        f"--target={manifest}", "-k", "forged_fin and single", *QUIET
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*[[]liveness[]]*expected 404*"])


def test_with_the_keep_alive_header_the_forged_faults_apply(pytester: pytest.Pytester) -> None:
    manifest = picky_manifest(pytester.path, "explicit-keepalive")
    result = pytester.runpytest_subprocess(f"--target={manifest}", "-k", "forged", *QUIET)
    result.assert_outcomes(passed=4)


def test_with_large_path_a_small_answer_server_gets_its_mid_response_faults(
    pytester: pytest.Pytester,
) -> None:
    manifest = picky_manifest(pytester.path, "small", 'large_path = "/big"')
    result = pytester.runpytest_subprocess(
        f"--target={manifest}", "-k", "rst_mid_response or mid-response", *QUIET
    )
    result.assert_outcomes(passed=2)
