"""Syscall faults and chaos: the shim's injections seen from the server side, and the Python side.

The C programs in ``tests/shim_programs/`` play the server through libc (so the shim sees and
may fault its calls) and the client through raw syscalls (never faulted); each prints what it
saw as ``key=value`` lines, and the trace must show the same injections, flagged INJECTED.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from paths import ROOT_DIR, TESTS_DIR

from afterclose.harness import cli, syscall_faults, tracers
from afterclose.harness import compile as cbuild
from afterclose.harness.errors import ScenarioError
from afterclose.harness.oracle import judge
from afterclose.harness.syscall_faults import SyscallFault
from afterclose.harness.trace import shim
from afterclose.harness.trace.format import IoKind, Op, Record, RecordFlag, WaitKind
from afterclose.harness.trace.reader import Trace, read_trace_dir

PROGRAMS = TESTS_DIR / "shim_programs"
EINTR, EAGAIN, EPIPE, EMFILE, ECONNABORTED, ECONNRESET = 4, 11, 32, 24, 103, 104


def program(name: str) -> Path:
    return cbuild.build(
        cbuild.CBuild(
            name=f"shimtest-{name}",
            sources=(PROGRAMS / f"{name}.c",),
            cflags=("-O2", "-Wall", "-Wextra", "-pthread"),
            ldflags=("-pthread",),
        )
    )


def run(
    args: Sequence[str | int],
    *,
    trace_dir: Path | None,
    faults: str | None = None,
    chaos: str | None = None,
    seed: int | None = 1,
    raw_seed: str | None = None,
    raw_faults: str | None = None,
    name: str = "faultprobe",
) -> subprocess.CompletedProcess[str]:
    """Run a probe with the shim preloaded (traced into ``trace_dir`` unless None).

    ``faults`` is written ``call=error:probability,...`` and encoded as the harness does;
    ``raw_faults`` and ``chaos`` go into the environment as they are."""
    env = dict(os.environ)
    for var in ("LD_PRELOAD", "AFTERCLOSE_TRACE_DIR", *_PT_VARS):
        env.pop(var, None)
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        env.update(shim.shim_env(trace_dir, base_env=env))
    else:
        env.update(shim.preload_env(base_env=env))
    if faults is not None:
        env[syscall_faults.ENV_FAULTS] = syscall_faults.to_env(spec(faults), 0)[
            syscall_faults.ENV_FAULTS
        ]
    if raw_faults is not None:
        env[syscall_faults.ENV_FAULTS] = raw_faults
    if chaos is not None:
        env[syscall_faults.ENV_CHAOS] = chaos
    if seed is not None or raw_seed is not None:
        env[syscall_faults.ENV_SEED] = raw_seed if raw_seed is not None else str(seed)
    return subprocess.run(
        [str(program(name)), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def spec(text: str) -> tuple[SyscallFault, ...]:
    """``read=eagain:0.5,write=short:0.1`` as validated faults."""
    calls: dict[str, dict[str, float]] = {}
    for item in text.split(","):
        call, _, rest = item.partition("=")
        error, _, probability = rest.partition(":")
        calls.setdefault(call, {})[error] = float(probability)
    return syscall_faults.parse(calls)


_PT_VARS = (syscall_faults.ENV_FAULTS, syscall_faults.ENV_CHAOS, syscall_faults.ENV_SEED)


def values(proc: subprocess.CompletedProcess[str]) -> dict[str, int]:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    out: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and value.lstrip("-").isdigit():
            out[key] = int(value)
    return out


def injected(trace: Trace) -> list[Record]:
    return [r for r in trace.records if r.injected]


def judged_clean(trace: Trace) -> None:
    verdict = judge.judge_trace(trace, cutoff_seq=None, trace_path="test")
    assert verdict.ok, verdict.render()


# ------------------------------------------------------------------------ each fault --


def test_epoll_wait_eintr_always_at_probability_one(tmp_path: Path) -> None:
    v = values(run(["wait", 30], trace_dir=tmp_path, faults="epoll_wait=eintr:1"))
    assert v["wait_eintr"] == 30 and v["wait_ok"] == 0
    assert v["poll_eintr"] == 0  # timeout 0 cannot be interrupted: never injected
    trace = read_trace_dir(tmp_path)
    inj = injected(trace)
    assert len(inj) == 30
    assert all(r.op is Op.EPOLL_WAIT and r.ret == -1 and r.err == EINTR for r in inj)
    assert all(r.kind == WaitKind.EPOLL_WAIT and r.flags & RecordFlag.INJECTED for r in inj)
    waits = [r for r in trace.records if r.op is Op.EPOLL_WAIT]
    assert len(waits) == 60  # 30 injected, 30 real polls
    assert all(r.ret == 1 for r in waits if not r.injected)
    judged_clean(trace)


def test_read_eagain_on_nonblocking_sockets_only(tmp_path: Path) -> None:
    v = values(run(["blocking", 20], trace_dir=tmp_path / "b", faults="read=eagain:1"))
    # A blocking socket and a pipe never get the lie.
    assert v == {"blocking_got": 20, "blocking_eagain": 0, "pipe_eagain": 0}
    assert not injected(read_trace_dir(tmp_path / "b"))

    v = values(run(["read", 60], trace_dir=tmp_path / "r", faults="read=eagain:0.5"))
    assert v["read_got"] == 60 and v["read_eagain"] > 0 and v["read_other"] == 0
    trace = read_trace_dir(tmp_path / "r")
    inj = injected(trace)
    assert len(inj) == v["read_eagain"]
    assert all(r.op is Op.READ and r.ret == -1 and r.err == EAGAIN for r in inj)
    assert {r.kind for r in inj} <= {IoKind.READ, IoKind.RECV, IoKind.RECVFROM}
    judged_clean(trace)


def test_read_eagain_spares_edge_triggered_registrations(tmp_path: Path) -> None:
    v = values(run(["edge", 30], trace_dir=tmp_path, faults="read=eagain:1"))
    assert v == {"et_eagain": 0, "oneshot_eagain": 30}


def test_short_writes_move_fewer_bytes_than_asked(tmp_path: Path) -> None:
    v = values(run(["write", 30], trace_dir=tmp_path, faults="write=short:1"))
    assert v["write_short"] == 30 and v["write_full"] == 0
    trace = read_trace_dir(tmp_path)
    inj = injected(trace)
    assert len(inj) == 30
    assert {r.kind for r in inj} == {IoKind.WRITE, IoKind.SEND, IoKind.WRITEV}
    for r in inj:
        assert r.op is Op.WRITE and r.err == 0 and r.data == 100 and 1 <= r.ret < 100
    assert sum(r.ret for r in inj) == v["write_sent"]
    judged_clean(trace)


@pytest.mark.parametrize(("error", "errno"), [("econnreset", ECONNRESET), ("epipe", EPIPE)])
def test_write_errors_leave_the_connection_dead(tmp_path: Path, error: str, errno: int) -> None:
    v = values(run(["write", 6], trace_dir=tmp_path, faults=f"write={error}:1"))
    assert v[f"write_{error}"] == 6 and v["write_sent"] == 0
    trace = read_trace_dir(tmp_path)
    inj = [r for r in injected(trace) if r.op is Op.WRITE]
    assert len(inj) == 6 and all(r.ret == -1 and r.err == errno for r in inj)
    # The shim's own shutdown that made each connection dead is in the trace, marked as the
    # harness's: on the writing thread, inside the write it failed.
    shutdowns = [r for r in injected(trace) if r.op is Op.SHUTDOWN]
    assert len(shutdowns) == 6 and len(injected(trace)) == 12
    for sd, w in zip(shutdowns, inj, strict=True):
        assert (sd.tid, sd.fd, sd.arg, sd.ret) == (w.tid, w.fd, 2, 0)
        assert w.seq_in < sd.seq_in < sd.seq_out < w.seq_out
    judged_clean(trace)


def test_write_econnreset_is_not_silently_harmless(tmp_path: Path) -> None:
    # After the injected reset the socket is dead for real: the write that follows fails too.
    v = values(run(["write", 10], trace_dir=tmp_path, faults="write=econnreset:0.3", seed=3))
    assert v["write_econnreset"] >= 1
    assert v["write_full"] + v["write_short"] + v["write_econnreset"] + v["write_epipe"] == 10
    writes = [r for r in read_trace_dir(tmp_path).records if r.op is Op.WRITE]
    after = writes[[w.injected for w in writes].index(True) + 1 :]
    assert after and all(w.ret == -1 and w.err in (EPIPE, ECONNRESET) for w in after)


def test_accept_errors_leave_the_connection_queued(tmp_path: Path) -> None:
    faults = "accept=emfile:0.3,accept=econnaborted:0.3"
    v = values(run(["accept", 20], trace_dir=tmp_path, faults=faults))
    assert v["accepted"] == 20  # every connection was still there to accept afterwards
    assert v["accept_emfile"] > 0 and v["accept_econnaborted"] > 0 and v["accept_other"] == 0
    trace = read_trace_dir(tmp_path)
    errs = Counter(r.err for r in injected(trace))
    assert errs == {EMFILE: v["accept_emfile"], ECONNABORTED: v["accept_econnaborted"]}
    assert all(r.op is Op.ACCEPT and r.ret == -1 and r.kind == 4 for r in injected(trace))
    judged_clean(trace)


def test_closed_fd_gets_the_real_ebadf(tmp_path: Path) -> None:
    # Every fault at probability 1, every call on a closed fd: the kernel's EBADF, never a lie.
    faults = "epoll_wait=eintr:1,read=eagain:1,write=econnreset:1,accept=emfile:1"
    src = tmp_path / "ebadf.c"
    src.write_text(
        textwrap.dedent(
            """\
            #define _GNU_SOURCE
            #include <errno.h>
            #include <stdio.h>
            #include <sys/epoll.h>
            #include <sys/socket.h>
            #include <unistd.h>
            int main(void)
            {
                int sv[2];
                struct epoll_event e;
                char c;
                socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv);
                int ep = epoll_create1(0);
                close(sv[0]);
                close(ep);
                int r[4], err[4];
                r[0] = (int)read(sv[0], &c, 1); err[0] = errno;
                r[1] = (int)write(sv[0], "x", 1); err[1] = errno;
                r[2] = epoll_wait(ep, &e, 1, 100); err[2] = errno;
                r[3] = accept(sv[0], NULL, NULL); err[3] = errno;
                for (int i = 0; i < 4; i++)
                    printf("r%d=%d\\ne%d=%d\\n", i, r[i], i, err[i]);
                return 0;
            }
            """
        )
    )
    exe = cbuild.build(cbuild.CBuild(name="shimtest-ebadf", sources=(src,), cflags=("-O2",)))
    (tmp_path / "t").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in (*_PT_VARS, "LD_PRELOAD")}
    env.update(shim.shim_env(tmp_path / "t", base_env={}))
    env[syscall_faults.ENV_FAULTS] = faults
    proc = subprocess.run([str(exe)], env=env, capture_output=True, text=True, check=False)
    v = values(proc)
    assert [v[f"r{i}"] for i in range(4)] == [-1] * 4
    assert [v[f"e{i}"] for i in range(4)] == [9] * 4  # EBADF, from the kernel
    assert not injected(read_trace_dir(tmp_path / "t"))


# ------------------------------------------------------------- probability and seed --

ALL = (
    "epoll_wait=eintr:0.3,read=eagain:0.3,write=short:0.3,write=econnreset:0.02,"
    "accept=emfile:0.2,accept=econnaborted:0.2"
)


def test_probability_zero_injects_nothing(tmp_path: Path) -> None:
    zero = ",".join(f"{c}={e}:0" for c, errs in syscall_faults.CALLS.items() for e in errs)
    v = values(run(["all", 30], trace_dir=tmp_path, faults=zero))
    assert v["wait_eintr"] == v["read_eagain"] == v["write_short"] == 0
    assert v["accept_emfile"] == v["accept_econnaborted"] == 0
    assert not injected(read_trace_dir(tmp_path))


def _sequence(trace: Trace) -> list[tuple[int, int, int, int, int, int]]:
    return [(r.op, r.flags, r.fd, r.ret, r.err, r.data) for r in injected(trace)]


def test_same_seed_same_injections(tmp_path: Path) -> None:
    runs = {}
    for key, seed in (("a", 42), ("b", 42), ("c", 43)):
        proc = run(["all", 40], trace_dir=tmp_path / key, faults=ALL, seed=seed)
        runs[key] = (values(proc), _sequence(read_trace_dir(tmp_path / key)))
    assert runs["a"][1], "nothing injected"
    assert runs["a"] == runs["b"]
    assert runs["a"][1] != runs["c"][1]


def test_malformed_encoding_one_line_and_no_injection(tmp_path: Path) -> None:
    # The user's syntax is not the shim's: only the encoded form of to_env() is read.
    proc = run(["read", 20], trace_dir=tmp_path, raw_faults="read=eagain:1")
    v = values(proc)
    assert proc.stderr.splitlines() == [
        "afterclose-shim: syscall faults disabled: AFTERCLOSE_SYSCALL_FAULTS: not the encoded "
        "spec of harness/syscall_faults.py at 'read=eagain:1' (call:error:threshold items in "
        "codes; set syscall faults with @pytest.mark.syscall_faults)"
    ]
    assert v["read_eagain"] == 0 and v["read_got"] == 20
    trace = read_trace_dir(tmp_path)
    assert trace.records and not injected(trace)  # tracing went on


READ, EAGAIN_CODE, SHORT = (
    syscall_faults.CALL_CODES["read"],
    syscall_faults.ERROR_CODES["eagain"],
    syscall_faults.ERROR_CODES["short"],
)


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"raw_faults": f"{READ}:{EAGAIN_CODE}:{2**32 + 1}"}, f"at '{READ}:{EAGAIN_CODE}:"),
        ({"raw_faults": f"{READ}:{SHORT}:100"}, "not the encoded spec"),  # not an error of read
        ({"raw_faults": f"{READ}:{EAGAIN_CODE}:5,{READ}:{EAGAIN_CODE}:5"}, "not the encoded"),
        ({"raw_faults": f"9:{EAGAIN_CODE}:5"}, "not the encoded spec"),
        ({"raw_faults": f"{READ}:{EAGAIN_CODE}"}, "not the encoded spec"),
        ({"chaos": "extreme"}, "chaos disabled: AFTERCLOSE_CHAOS: unknown level 'extreme'"),
        ({"chaos": "11"}, "chaos disabled: AFTERCLOSE_CHAOS: unknown level '11'"),
    ],
)
def test_malformed_env_values(tmp_path: Path, env: Mapping[str, str], says: str) -> None:
    proc = run(["read", 5], trace_dir=tmp_path, **env)
    assert values(proc)["read_eagain"] == 0
    assert len(proc.stderr.splitlines()) == 1 and says in proc.stderr, proc.stderr


def test_encoded_spec_is_codes_and_thresholds() -> None:
    faults = spec("read=eagain:0.05,write=short:0.1,write=econnreset:0.001")
    assert syscall_faults.to_env(faults, 7) == {
        "AFTERCLOSE_SYSCALL_FAULTS": "1:2:214748364,2:3:429496729,2:4:4294967",
        "AFTERCLOSE_FAULT_SEED": "7",
    }
    # floor(p * 2**32) of the decimal probability, 1 being the whole scale.
    assert [SyscallFault("read", "eagain", p).threshold for p in (0, 0.5, 1, 1e-3)] == [
        0,
        2**31,
        2**32,
        4294967,
    ]
    assert syscall_faults.CALL_CODES == {"epoll_wait": 0, "read": 1, "write": 2, "accept": 3}


def test_seed_unset_is_zero_and_bad_seed_disables_both(tmp_path: Path) -> None:
    proc = run(["read", 5], trace_dir=tmp_path / "a", faults="read=eagain:1", seed=None)
    v = values(proc)
    assert v["read_got"] == 0 and v["read_eagain"] == 500 and proc.stderr == ""  # 100 tries each
    proc = run(
        ["read", 5], trace_dir=tmp_path / "b", faults="read=eagain:1", seed=None, raw_seed="12x"
    )
    assert values(proc)["read_eagain"] == 0
    assert proc.stderr.splitlines() == [
        "afterclose-shim: syscall faults and chaos disabled: AFTERCLOSE_FAULT_SEED: not a whole "
        "number from 0 to 2**64-1: '12x'"
    ]


def test_faults_without_tracing_are_quiet(tmp_path: Path) -> None:
    proc = run(["read", 30], trace_dir=None, faults="read=eagain:0.5")
    assert values(proc)["read_eagain"] > 0
    assert proc.stderr == ""  # no "tracing disabled" line: perturbing only was asked for


# ----------------------------------------------------------------------------- chaos --


def test_chaos_delays_happen(tmp_path: Path) -> None:
    # Level 10: half of the 1000 waits and 1000 closes are held up, three quarters of those by
    # 1-200 us of spinning or sleeping: at least ~35 ms each whatever the load (delays only
    # add up), while the same calls without chaos take a few ms.
    off = values(run([1000], trace_dir=tmp_path / "off", chaos="off", name="chaosprobe"))
    high = values(run([1000], trace_dir=tmp_path / "hi", chaos="10", name="chaosprobe"))
    assert high["events"] == off["events"] == 1000
    assert high["wait_ns"] > 20e6, high
    assert high["close_ns"] > 20e6, high
    assert high["wait_ns"] > 2 * off["wait_ns"], (off, high)


# ------------------------------------------------------------------------ python side --


def test_parse_and_env() -> None:
    specs = syscall_faults.parse(
        {"read": {"eagain": 0.05}, "write": {"short": 0.1, "econnreset": 1e-3}}
    )
    assert specs == (
        SyscallFault("read", "eagain", 0.05),
        SyscallFault("write", "short", 0.1),
        SyscallFault("write", "econnreset", 0.001),
    )
    assert syscall_faults.to_env(specs, 7)["AFTERCLOSE_FAULT_SEED"] == "7"
    assert syscall_faults.to_env((), 7) == {}
    assert (
        syscall_faults.to_env([SyscallFault("read", "eagain", 1)], 0)["AFTERCLOSE_SYSCALL_FAULTS"]
        == f"1:2:{2**32}"
    )
    assert syscall_faults.chaos_env("off", 1) == {}
    assert syscall_faults.chaos_env("high", 1) == {
        "AFTERCLOSE_CHAOS": "8",
        "AFTERCLOSE_FAULT_SEED": "1",
    }
    assert [syscall_faults.chaos_level(x) for x in ("low", "on", "medium", "7")] == [3, 5, 5, 7]


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"reed": {"eagain": 0.1}}, ["key 'reed'", "did you mean 'read'?", "epoll_wait, read"]),
        ({"recv": {"eagain": 0.1}}, ["key 'recv'", "'recv' is covered by 'read'"]),
        ({"read": {"eagian": 0.1}}, ["key 'read.eagian'", "did you mean 'eagain'?"]),
        ({"write": {"reset": 0.1}}, ["key 'write.reset'", "short, econnreset, epipe"]),
        ({"read": {"eagain": 1.5}}, ["key 'read.eagain'", "from 0 to 1, got 1.5"]),
        ({"read": {"eagain": True}}, ["key 'read.eagain'", "from 0 to 1"]),
        ({"read": 0.1}, ["key 'read'", "must map errors to probabilities"]),
        ({"write": {"short": 0.6, "epipe": 0.6}}, ["key 'write'", "add up to 1.2"]),
    ],
)
def test_bad_spec_names_key_and_suggestion(spec: Mapping[str, object], says: list[str]) -> None:
    with pytest.raises(ScenarioError) as info:
        syscall_faults.parse(spec, where="test_x: syscall_faults")
    text = info.value.render()
    assert text.startswith("test_x: syscall_faults: key ")
    for part in says:
        assert part in text, text


def test_target_env_preloads_the_shim_to_perturb_without_tracing() -> None:
    quiet = tracers.target_env(tracers.NoTracer(), chaos="off", seed=5)
    assert quiet == {}
    env = tracers.target_env(tracers.NoTracer(), chaos="high", seed=5, extra={"X": "1"})
    assert env["AFTERCLOSE_CHAOS"] == "8" and env["AFTERCLOSE_FAULT_SEED"] == "5"
    assert env["LD_PRELOAD"].split(":")[-1] == str(shim.shim_path())
    assert "AFTERCLOSE_TRACE_DIR" not in env and env["X"] == "1"


def test_cli_takes_chaos() -> None:
    args = cli.build_parser().parse_args(["demo", "--chaos", "high"])
    assert args.chaos == "high"
    assert cli.build_parser().parse_args(["run", "--target=x", "f"]).chaos == "off"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--chaos", "11"])


# ------------------------------------------------------------------------ end to end --

MARKED = """
import pytest

STORM = dict(rate_per_s=200, concurrency=10, duration_s=0.5, max_connections=60,
             mix={"keepalive": 1, "close": 1})


@pytest.mark.syscall_faults(read={"eagain": 0.3}, write={"short": 0.3})
def test_marked(target):
    target.run_fault("connection_storm", **STORM)
    outcome = target.finish()
    from afterclose.harness.trace.reader import read_trace_dir
    trace = read_trace_dir(outcome.trace_dir)
    print("INJECTED", sum(r.injected for r in trace.records))
    assert outcome.ok


@pytest.mark.syscall_faults(raed={"eagain": 0.3})
def test_misspelt(target):
    pass
"""


@pytest.mark.slow
def test_marker_reaches_the_target_and_bad_ones_are_scenario_errors(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_m=MARKED)
    result = pytester.runpytest_subprocess(
        "--target=seed-fixed", "--no-builtin-suite", "--chaos=low", "-s", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*fault seed*, chaos low*"])
    line = next(ln for ln in result.stdout.lines if ln.startswith("INJECTED") or " INJECTED " in ln)
    assert int(line.split("INJECTED")[1].split()[0]) > 0
    result.stdout.fnmatch_lines(
        [
            "*test_m.py::test_misspelt: syscall_faults: key 'raed': unknown syscall 'raed'*",
            "*did you mean 'read'?*",
        ]
    )


@pytest.mark.slow
def test_seed_fixed_survives_the_builtin_syscall_fault_scenario(tmp_path: Path) -> None:
    from afterclose.harness.session import Harness, Settings

    harness = Harness(
        Settings(
            target="seed-fixed",
            rootdir=ROOT_DIR,
            run_id=uuid.uuid4().hex,
            tracer="preload",
            fault_seed=2024,
            chaos="medium",
        )
    )
    from afterclose.harness.suite import scenarios

    marks: list[pytest.Mark] = getattr(scenarios.test_syscall_faults, "pytestmark", [])
    marker = next(m for m in marks if m.name == "syscall_faults")
    specs = syscall_faults.from_marker(marker.args, marker.kwargs, where="test")
    name = "test_syscall_faults"
    env = syscall_faults.to_env(specs, harness.seed_for(name))
    with harness.start(tmp_path, name, extra_env=env) as target:
        scenarios.test_syscall_faults(target)
        outcome = target.finish()
    assert outcome.ok, target.failure_message(outcome)
    kinds = Counter((r.op, r.err) for r in injected(read_trace_dir(tmp_path / "trace")))
    assert kinds[(Op.READ, EAGAIN)] > 0 and kinds[(Op.WRITE, 0)] > 0, kinds
