"""The pytest plugin, driven through ``pytester``: options, errors, fixtures, the suite."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from paths import TESTS_DIR

ECHO = TESTS_DIR / "programs" / "http_echo.py"


def echo_manifest(folder: Path, mode: str = "ok") -> Path:
    path = folder / "echo.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name = "echo"
            command = ["{sys.executable}", "{ECHO}", "{{host}}", "{{port}}", "{mode}"]
            echo_path = true
            fd_grace_s = 1
            [ready]
            log = "READY"
            """
        )
    )
    return path


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--runner=vm"], "--runner='vm' is not valid; choose one of: process, docker"),
        (["--tracer=strace"], "--tracer='strace' is not valid"),
        (["--fault-seed=abc"], "--fault-seed='abc' is not a whole number"),
        (["--fault-seed=-1"], "--fault-seed='-1' must be between 0 and 2**64-1"),
        (["--chaos=extreme"], "--chaos='extreme' is not valid"),
        (["--sanitize=memory"], "--sanitize='memory' is not valid"),
        (["--target= "], "--target is empty"),
    ],
)
def test_bad_option_values(pytester: pytest.Pytester, args: list[str], expected: str) -> None:
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{expected}*"])


def test_unknown_target_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--target=seed-bugy")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown target 'seed-bugy'*", "*did you mean 'seed-buggy'?*"])


def test_broken_manifest_names_file_and_key(pytester: pytest.Pytester) -> None:
    bad = pytester.path / "bad.toml"
    bad.write_text('name = "x"\ncommand = ["x"]\n[ready]\nlgo = "READY"\n')
    result = pytester.runpytest(f"--target={bad}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"*{bad}: unknown key 'ready.lgo'*", "*did you mean 'ready.log'?*"]
    )
    assert "Traceback" not in result.stderr.str()


def test_a_target_that_cannot_run_in_a_container_stops_the_docker_runner_at_once(
    pytester: pytest.Pytester,
) -> None:
    manifest = pytester.path / "t.toml"
    manifest.write_text(
        'name = "t"\ncommand = ["x"]\n[docker]\nunsupported = "it needs a shell at start"\n'
    )
    result = pytester.runpytest(f"--target={manifest}", "--runner=docker")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            f"*{manifest}: docker.unsupported: target 't' cannot run under the Docker runner: "
            "it needs a shell at start*",
            "*Hint: run it with --runner=process*",
        ]
    )
    assert "Traceback" not in result.stderr.str()


def test_ini_options_are_validated_too(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nafterclose_runner = kvm\n")
    result = pytester.runpytest("--target=seed-fixed")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--runner='kvm' is not valid*"])


def test_target_fixture_skips_without_target(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(target):\n    pass\n")
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no target: run with --target=NAME*"])


def test_user_test_with_manifest_outside_package(pytester: pytest.Pytester) -> None:
    manifest = echo_manifest(pytester.path)
    pytester.makepyfile(
        test_mine="""
        from afterclose.harness.protocols import http

        def test_answers(target):
            r = http.get(target.host, target.port, "/mine", timeout_s=2)
            assert r.status == 200 and b"/mine" in r.body
        """
    )
    result = pytester.runpytest_subprocess(
        "--target=./echo.toml", "--no-builtin-suite", "--tracer=off", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"afterclose: target echo ({manifest})*tracer off*"])


def test_ini_target_and_builtin_suite_is_collected(pytester: pytest.Pytester) -> None:
    echo_manifest(pytester.path)
    pytester.makeini("[pytest]\nafterclose_target = ./echo.toml\nafterclose_tracer = off\n")
    result = pytester.runpytest_subprocess("--collect-only", "-q")
    result.stdout.fnmatch_lines(
        [
            "*scenarios.py::test_keepalive_requests",
            "*scenarios.py::test_reset_peer[[]before-request[]]",
            "*scenarios.py::test_half_close",
            "*scenarios.py::test_shutdown_race",
            "*scenarios.py::test_connection_storm",
        ]
    )


def test_violation_names_rule_target_seed_and_replay(pytester: pytest.Pytester) -> None:
    echo_manifest(pytester.path)
    pytester.makepyfile(
        test_kill="""
        import os, signal, time

        def test_crashes(target):
            os.kill(target.server.host_pids()[0], signal.SIGSEGV)
            time.sleep(0.3)
        """
    )
    result = pytester.runpytest_subprocess(
        "--target=./echo.toml", "--no-builtin-suite", "--tracer=off", "--fault-seed=4242"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*afterclose: 1 rule(s) violated by target 'echo' (seed 4242*",
            "*[[]crash[]] target 'echo' killed by SIGSEGV during the scenario*",
            "*replay: pytest --target=./echo.toml --fault-seed=4242 --tracer=off -k test_crashes*",
        ]
    )


def test_a_start_up_failure_is_printed_once_with_a_path_hint(pytester: pytest.Pytester) -> None:
    manifest = pytester.path / "nope.toml"
    manifest.write_text('name = "nope"\ncommand = ["nosuchprog", "{port}"]\n')
    pytester.makepyfile("def test_x(target):\n    pass\n")
    result = pytester.runpytest(f"--target={manifest}", "--tracer=off", "--no-builtin-suite")
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    # Once in the error report; the short summary's line (full length under CI) comes after.
    report = out.split("short test summary info")[0]
    assert report.count("cannot start target 'nope'") == 1, out
    assert "During handling of the above exception" not in out
    assert "'nosuchprog' is looked up on PATH" in out
    assert "resolved relative to the manifest's folder" not in out
