"""AFTERCLOSE_REQUIRE turns a skip for lack of a capability into a failure that says what to do."""

from __future__ import annotations

import capabilities
import pytest

ABSENT = capabilities.Capability(
    "absent", "a thing this machine lacks", "apt-get install -y thing", lambda: "thing not found"
)

PLUGIN = 'pytest_plugins = ["capabilities"]\n'


@pytest.fixture
def absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(capabilities.CAPABILITIES, "absent", ABSENT)
    capabilities.missing.cache_clear()


def test_missing_capability_skips_with_its_reason(
    absent: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(capabilities.REQUIRE_ENV, "docker")
    with pytest.raises(pytest.skip.Exception) as info:
        capabilities.need("absent")
    assert "needs absent" in str(info.value) and "thing not found" in str(info.value)


def test_required_capability_fails_naming_it_and_the_command(
    absent: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(capabilities.REQUIRE_ENV, "root, absent")
    with pytest.raises(pytest.fail.Exception) as info:
        capabilities.need("absent")
    text = str(info.value)
    assert "needs absent" in text and "thing not found" in text
    assert "AFTERCLOSE_REQUIRE names absent" in text and "apt-get install -y thing" in text


def test_unknown_name_in_the_variable_stops_the_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(PLUGIN)
    pytester.makepyfile("def test_x():\n    pass\n")
    monkeypatch.setenv(capabilities.REQUIRE_ENV, "docker,dokcer")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*AFTERCLOSE_REQUIRE: unknown capability dokcer*"])


def test_marker_goes_through_the_same_decision(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(PLUGIN)
    pytester.makepyfile(
        "import pytest\n\n@pytest.mark.requires('go', 'cpio')\ndef test_x():\n    pass\n"
    )
    monkeypatch.setitem(capabilities.CAPABILITIES, "go", ABSENT)
    capabilities.missing.cache_clear()
    try:
        monkeypatch.setenv(capabilities.REQUIRE_ENV, "go")
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
        result.assert_outcomes(errors=1)  # in set-up
        result.stdout.fnmatch_lines(["*AFTERCLOSE_REQUIRE names go*"])
        monkeypatch.delenv(capabilities.REQUIRE_ENV)
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rs")
        result.assert_outcomes(skipped=1)
    finally:
        capabilities.missing.cache_clear()


def test_the_summary_names_what_was_skipped_and_the_command_that_enables_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AFTERCLOSE_REQUIRE", raising=False)  # CI's own run requires them all
    pytester.makeconftest(PLUGIN)
    pytester.makepyfile(
        "import capabilities\n\n"
        "def test_a():\n    capabilities.lacking('redis-server', 'redis-server is not on PATH')\n\n"
        "def test_b():\n    capabilities.lacking('redis-server', 'redis-server is not on PATH')\n\n"
        "def test_c():\n    pass\n"
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(
        [
            "*= skipped for a missing capability =*",
            "redis-server: 2 test(s) skipped (the redis-server tool): redis-server is not on PATH",
            "    to enable them: apt-get install -y redis-server",
        ]
    )
