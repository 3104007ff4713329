"""Pictures and the ``afterclose trace show`` command.

The SVG timeline is checked on synthetic findings (well-formed, the lanes, the incarnations,
the red violating mark, bounded size however long the trace), then the command line and the
tracer's report-writing on a real trace: a tiny C program, run under the shim, that closes
a socket twice, two times over.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
from tracebuild import EBADF, IN, ONESHOT, RDHUP, TraceBuilder
from tracebuild import ET as EPOLLET_

from afterclose.harness import cli
from afterclose.harness import compile as cbuild
from afterclose.harness.oracle import registry
from afterclose.harness.oracle.judge import judge_records as check
from afterclose.harness.trace import shim
from afterclose.harness.trace.findings import Finding, TraceVerdict
from afterclose.harness.trace.format import Op, Record
from afterclose.harness.trace.reader import read_trace_dir, read_trace_files
from afterclose.harness.trace.svg import MAX_FILES_PER_RULE, render_svg, write_report
from afterclose.harness.tracers import PreloadTracer

SVG_NS = "{http://www.w3.org/2000/svg}"
LISTEN, EP = 3, 5
C, C2 = 0x7F00AA10, 0x7F00BB20
RED = "#d62728"


# -- helpers -----------------------------------------------------------------------------------


def seed_race() -> TraceBuilder:
    """The seed server's race: T1 hands 7#1 to T2, T2 closes it, T1 accepts 7#2, T3 (still
    acting for 7#1) shuts 7#2 down and re-arms it with 7#1's freed data."""
    t = TraceBuilder()
    t.socket(tid=11, ret=LISTEN)
    t.epoll_create(tid=11, ret=EP)
    t.ctl_add(tid=11, epfd=EP, fd=LISTEN, data=LISTEN)
    t.accept(tid=11, ret=7)
    t.ctl_add(tid=11, epfd=EP, fd=7, data=C, events=IN | ONESHOT | EPOLLET_)
    t.wait(tid=11, epfd=EP, events=[(IN | RDHUP, C)])
    t.read(tid=12, fd=7, ret=0)
    t.free(tid=12, ptr=C)
    t.close(tid=12, fd=7)
    t.wait(tid=11, epfd=EP, events=[(IN, LISTEN)])
    t.accept(tid=11, ret=7)
    t.ctl_add(tid=11, epfd=EP, fd=7, data=C2, events=IN | ONESHOT | EPOLLET_)
    t.shutdown(tid=13, fd=7)
    t.ctl_mod(tid=13, epfd=EP, fd=7, data=C, events=IN | ONESHOT | EPOLLET_)
    t.wait(tid=11, epfd=EP, events=[(IN, C)])
    return t


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg.encode("utf-8"))
    assert root.tag == f"{SVG_NS}svg"
    assert float(root.attrib["width"]) > 0 and float(root.attrib["height"]) > 0
    return root


def texts(root: ET.Element) -> list[str]:
    return ["".join(e.itertext()) for e in root.iter(f"{SVG_NS}text")]


def marks(root: ET.Element) -> list[tuple[str, ET.Element]]:
    """(tooltip, rect) of every call mark."""
    out = []
    for g in root.iter(f"{SVG_NS}g"):
        if g.attrib.get("class") != "mark":
            continue
        title = g.find(f"{SVG_NS}title")
        rect = g.find(f"{SVG_NS}rect")
        if title is not None and rect is not None:
            out.append((title.text or "", rect))
    return out


def tooltips(root: ET.Element) -> list[str]:
    """The tooltips of the calls and of the event deliveries."""
    out = []
    for g in root.iter(f"{SVG_NS}g"):
        title = g.find(f"{SVG_NS}title")
        if g.attrib.get("class") == "mark" and title is not None:
            out.append(title.text or "")
    return out


def counts(v: TraceVerdict) -> dict[str, int]:
    return {rule: len(occ) for rule, occ in v.occurrences.items()}


# -- the picture -------------------------------------------------------------------------------


def test_svg_of_the_seed_race() -> None:
    v = seed_race().check(trace_path="/runs/x/trace")
    finding = v.occurrences["stale-rearm"][0]
    root = parse(render_svg(finding))
    words = texts(root)
    joined = "\n".join(words)
    # Header: the rule, its one-line meaning, why it is a bug, the trace.
    assert words[0] == "stale-rearm"
    assert registry.BY_NAME["stale-rearm"].plain_meaning in words
    assert "why it is a bug:" in joined and "trace: /runs/x/trace" in words
    # One lane per thread, labelled like the text timeline.
    for lane in ("T1 (tid 11)", "T2 (tid 12)", "T3 (tid 13)"):
        assert lane in words
    # Both incarnations of fd 7 as labelled bars, in different colours.
    assert "fd 7#1" in words and "fd 7#2" in words
    bars = {}
    for g in root.iter(f"{SVG_NS}g"):
        title = g.find(f"{SVG_NS}title")
        rect = g.find(f"{SVG_NS}rect")
        if title is not None and rect is not None and (title.text or "").startswith("fd 7#"):
            bars[(title.text or "").split("\n")[0]] = rect.attrib["fill"]
    assert set(bars) == {"fd 7#1", "fd 7#2"} and bars["fd 7#1"] != bars["fd 7#2"]
    # The violating call: one red mark, its tooltip the full call; the rule names it.
    red = [(tip, r) for tip, r in marks(root) if r.attrib["fill"] == RED]
    assert len(red) == 1
    tip = red[0][0]
    assert "T3 (tid 13)" in tip
    assert "epoll_ctl(5, MOD, fd 7#2, IN|ONESHOT|ET, data=0x7f00aa10)" in tip
    assert words.count("stale-rearm") == 2  # the title and the callout over the mark
    # Other calls are there with their tooltips: the closes, accepts and event deliveries.
    tips = tooltips(root)
    assert any("close(7) -> fd 7#1 ends" in t for t in tips)
    assert any("accept(3) = 7  -> fd 7#2 (new connection)" in t for t in tips)
    assert any(t.startswith("event IN data=0x7f00aa10 -> fd 7#2") for t in tips)
    # And the numbered list below holds the text timeline's lines.
    assert any("shutdown(7, SHUT_RDWR) on fd 7#2" in w for w in words)


def test_svg_marks_each_rule_and_reports_one_file_per_rule(tmp_path: Path) -> None:
    v = seed_race().check(trace_path="/runs/x/trace")
    assert counts(v) == {"stale-rearm": 1, "wrong-incarnation": 1, "event-for-freed-data": 1}
    paths = write_report(v, tmp_path / "out")
    # One per rule, in the verdict's (rule) order.
    assert [p.name for p in paths] == [f"timeline-{x.rule}.svg" for x in v.violations]
    for p in paths:
        root = parse(p.read_text(encoding="utf-8"))
        rule = p.stem.removeprefix("timeline-")
        assert texts(root)[0] == rule
        assert sum(r.attrib["fill"] == RED for _, r in marks(root)) == 1
    wi = ET.fromstring((tmp_path / "out" / "timeline-wrong-incarnation.svg").read_bytes())
    (tip,) = [t for t, r in marks(wi) if r.attrib["fill"] == RED]
    assert "shutdown(7, SHUT_RDWR) on fd 7#2" in tip


def test_write_report_every_occurrence_and_nothing_for_a_clean_trace(tmp_path: Path) -> None:
    t = seed_race()
    t.close(tid=11, fd=7)
    t.accept(tid=11, ret=7)
    t.ctl_add(tid=11, epfd=EP, fd=7, data=C, events=IN | ONESHOT | EPOLLET_)
    t.wait(tid=11, epfd=EP, events=[(IN | RDHUP, C)])
    t.read(tid=12, fd=7, ret=0)
    t.free(tid=12, ptr=C)
    t.close(tid=12, fd=7)
    t.accept(tid=11, ret=7)
    t.ctl_add(tid=11, epfd=EP, fd=7, data=C2, events=IN | ONESHOT | EPOLLET_)
    t.shutdown(tid=13, fd=7)
    t.ctl_mod(tid=13, epfd=EP, fd=7, data=C, events=IN | ONESHOT | EPOLLET_)
    v = t.check()
    assert counts(v)["stale-rearm"] == 2
    names = [p.name for p in write_report(v, tmp_path, every=True)]
    assert "timeline-stale-rearm.svg" in names and "timeline-stale-rearm-2.svg" in names
    second = (tmp_path / "timeline-stale-rearm-2.svg").read_text(encoding="utf-8")
    assert "occurrence 2 of 2" in "\n".join(texts(parse(second)))
    assert "fd 7#4" in texts(parse(second))
    assert MAX_FILES_PER_RULE >= 2

    clean = TraceBuilder()
    clean.socket(tid=1, ret=3)
    clean.close(tid=1, fd=3)
    assert write_report(clean.check(), tmp_path / "none") == []
    assert not (tmp_path / "none").exists()


def test_svg_escapes_and_survives_a_finding_without_context() -> None:
    v = seed_race().check(trace_path="/runs/<&\"x'>\x01/\udcff/trace")
    svg = render_svg(v.occurrences["stale-rearm"][0])
    words = texts(parse(svg))
    assert any(w.startswith("trace: /runs/<&\"x'>") for w in words)
    bare = Finding("use-after-close", "close(3) <twice> & more", 0, 1, 100, 1, 3, None)
    root = parse(render_svg(bare))
    joined = "\n".join(texts(root))
    assert "use-after-close" in joined and "close(3) <twice> & more" in joined


def _fast_records(pid: int, first_seq: int, n: int, fd: int) -> list[Record]:
    """n successful reads of ``fd`` by three threads, built without Record.__init__ (a frozen
    dataclass sets each field through object.__setattr__: a million of them take seconds)."""
    new = object.__new__
    (s_pid, s_si, s_so, s_t, s_tid, s_op, s_fl, s_fd, s_arg, s_data, s_ev, s_err, s_ret) = (
        Record.__dict__[name].__set__
        for name in (
            "pid",
            "seq_in",
            "seq_out",
            "t_ns",
            "tid",
            "op",
            "flags",
            "fd",
            "arg",
            "data",
            "events",
            "err",
            "ret",
        )
    )
    out: list[Record] = []
    append = out.append
    read = Op.READ
    for k in range(n):
        s = first_seq + 2 * k
        r = new(Record)
        s_pid(r, pid)
        s_si(r, s)
        s_so(r, s + 1)
        s_t(r, s * 1000)
        s_tid(r, 1 + k % 3)
        s_op(r, read)
        s_fl(r, 0)
        s_fd(r, fd)
        s_arg(r, 0)
        s_data(r, 0)
        s_ev(r, 0)
        s_err(r, 0)
        s_ret(r, 100)
        append(r)
    return out


@pytest.mark.slow
def test_svg_size_is_bounded_on_a_million_record_trace() -> None:
    """Every one of a million reads is about the finding's fd: the picture still shows a
    bounded window around the violating call."""
    t = TraceBuilder()
    t.socket(tid=1, ret=LISTEN)
    t.epoll_create(tid=1, ret=EP)
    t.accept(tid=1, ret=7)
    t.ctl_add(tid=1, epfd=EP, fd=7, data=C)
    n = 1_000_000
    enabled = gc.isenabled()
    gc.disable()
    try:
        t.records.extend(_fast_records(t.pid, t.seq + 1, n, 7))
    finally:
        if enabled:
            gc.enable()
    t.seq += 2 * n
    t.close(tid=2, fd=7)
    t.read(tid=3, fd=7, err=EBADF)
    # No call overlaps another: the records are already in seq_out order (no need to sort).
    v = check(t.records, t.headers(), trace_path="/runs/big/trace")
    assert v.stats.records > n
    (finding,) = v.occurrences["use-after-close"]
    svg = render_svg(finding)  # how fast: bench/trace_scale.py
    assert len(svg.encode()) < 120_000, len(svg)
    root = parse(svg)
    red = [tip for tip, r in marks(root) if r.attrib["fill"] == RED]
    assert len(red) == 1 and "read(7) = -1 EBADF (fd 7#1 was already closed)" in red[0]
    words = texts(root)
    assert "fd 7#1" in words
    # The creation is kept however far back, and the left-out records are counted.
    assert any("accept(3) = 7  -> fd 7#1 (new connection)" in w for w in words)
    assert any("related records not shown" in w for w in words)
    assert len(marks(root)) <= 45


# -- a real trace: a program that closes a socket twice ---------------------------------------

DOUBLE_CLOSE_C = r"""
#include <errno.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

int main(void) {
    for (int round = 0; round < 2; round++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) return 2;
        if (close(fd) != 0) return 3;
        int rc = close(fd); /* the bug: the number is no longer ours */
        printf("fd=%d rc=%d errno=%d\n", fd, rc, errno);
        if (rc != -1 || errno != EBADF) return 4;
    }
    return 0;
}
"""


def _double_close_program(base: Path) -> Path:
    src = base / "double_close.c"
    src.write_text(DOUBLE_CLOSE_C)
    return cbuild.build(
        cbuild.CBuild(name="tracereport-double-close", sources=(src,), cflags=("-O2", "-Wall"))
    )


def _run_traced(exe: Path, env_extra: dict[str, str]) -> None:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env.update(env_extra)
    proc = subprocess.run(
        [str(exe)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


@dataclass
class DoubleClose:
    trace_dir: Path
    exe: Path


@pytest.fixture(scope="module")
def double_close(tmp_path_factory: pytest.TempPathFactory) -> DoubleClose:
    base = tmp_path_factory.mktemp("double-close")
    exe = _double_close_program(base)
    trace_dir = base / "trace"
    trace_dir.mkdir()
    _run_traced(exe, shim.shim_env(trace_dir, base_env={}))
    return DoubleClose(trace_dir, exe)


def test_trace_show_folder_reports_use_after_close(
    double_close: DoubleClose, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["trace", "show", str(double_close.trace_dir)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{double_close.trace_dir}: 1 process(es), ")
    assert "0 lost" in out and "tracereport-double-close" in out
    assert "[use-after-close] double close: T1 called close(" in out
    assert "(+1 more)" in out and "occurrence 2 of 2" not in out
    assert "the same thread closed it twice" in out
    assert ">>>" in out and "was already closed" in out  # the text timeline


def test_trace_show_single_file_svg_and_all(
    double_close: DoubleClose, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (file,) = double_close.trace_dir.glob("trace.*.bin")
    out_dir = tmp_path / "pictures"
    assert cli.main(["trace", "show", str(file), "--svg", str(out_dir), "--all"]) == 1
    out = capsys.readouterr().out
    assert "use-after-close" in out
    assert "-- use-after-close: occurrence 2 of 2" in out
    assert out.count(">>>") == 2  # both occurrences' timelines
    picture = out_dir / "timeline-use-after-close.svg"
    assert f"wrote {picture}" in out
    assert f"wrote {out_dir / 'timeline-use-after-close-2.svg'}" in out
    root = parse(picture.read_text(encoding="utf-8"))
    words = texts(root)
    assert words[0] == "use-after-close(occurrence 1 of 2)"  # the second part is a tspan
    assert any(w.startswith("T1 (tid ") for w in words)
    assert f"trace: {file}" in words
    red = [tip for tip, r in marks(root) if r.attrib["fill"] == RED]
    assert len(red) == 1 and "EBADF" in red[0]


def test_trace_show_cutoff_before_the_second_close(
    double_close: DoubleClose, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = read_trace_dir(double_close.trace_dir)
    failed = [r for r in trace.records if r.op is Op.CLOSE and r.err == EBADF]
    assert len(failed) == 2
    cutoff = failed[0].seq_in - 1
    assert cli.main(["trace", "show", str(double_close.trace_dir), "--cutoff", str(cutoff)]) == 0
    out = capsys.readouterr().out
    assert "no violation" in out and f"judged up to seq {cutoff}" in out


def test_read_trace_files_matches_the_folder(double_close: DoubleClose) -> None:
    files = list(double_close.trace_dir.glob("trace.*.bin"))
    one = read_trace_files(files)
    whole = read_trace_dir(double_close.trace_dir)
    assert one.records == whole.records and one.complete == whole.complete


@pytest.mark.parametrize("kind", ["missing", "empty-folder", "not-a-trace"])
def test_trace_show_bad_path_exits_2_naming_it(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nope"
    if kind == "empty-folder":
        path.mkdir()
    elif kind == "not-a-trace":
        path = tmp_path / "trace.1.0.bin"
        path.write_bytes(b"PK\x03\x04" + b"x" * 9000)
    assert cli.main(["trace", "show", str(path)]) == 2
    captured = capsys.readouterr()
    assert str(path) in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "empty-file"])
def test_trace_show_refuses_what_holds_no_records(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "trace.1.0.bin"
    if kind == "fifo":
        os.mkfifo(path)  # opened without O_NONBLOCK, this would wait for a writer forever
    elif kind == "dev-zero":
        path = Path("/dev/zero")
    else:
        path.write_bytes(b"")
    assert cli.main(["trace", "show", str(path)]) == 2
    captured = capsys.readouterr()
    assert "no violation" not in captured.out
    expected = {
        "fifo": "not a regular file (a FIFO)",
        "dev-zero": "not a regular file (a character device)",
        "empty-file": "no records: nothing to judge",
    }[kind]
    assert f"{path}: {expected}" in captured.err


def test_trace_show_judges_the_good_files_and_names_the_bad_one(
    double_close: DoubleClose, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "trace"
    shutil.copytree(double_close.trace_dir, folder)
    (folder / "trace.99999.0.bin").write_bytes(b"PK\x03\x04" + b"x" * 9000)
    assert cli.main(["trace", "show", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "[use-after-close] double close" in out
    assert "WARNING: trace.99999.0.bin: left out, not an afterclose trace" in out


def test_trace_show_bad_path_from_the_command_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-trace"
    proc = subprocess.run(
        [sys.executable, "-m", "afterclose.harness.cli", "trace", "show", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert f"{missing}: no such trace folder or file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_tracer_analyse_writes_the_timeline_beside_the_trace(
    double_close: DoubleClose, tmp_path: Path
) -> None:
    tracer = PreloadTracer(tmp_path / "trace", "none")
    _run_traced(double_close.exe, tracer.env())
    outcome = tracer.analyse(None)
    (violation,) = [v for v in outcome.violations if v.rule == "use-after-close"]
    picture = tmp_path / "timeline-use-after-close.svg"
    assert violation.artifacts == (str(tmp_path / "trace"), str(picture))
    assert f"see: {picture}" in violation.render()
    parse(picture.read_text(encoding="utf-8"))
    assert len(outcome.warnings) == len(set(outcome.warnings))


def test_tracer_analyse_draws_nothing_for_a_clean_run(tmp_path: Path) -> None:
    tracer = PreloadTracer(tmp_path / "trace", "none")
    _run_traced(Path("/bin/true"), tracer.env())
    outcome = tracer.analyse(None)
    assert not outcome.violations
    assert not list(tmp_path.glob("timeline-*"))
