"""Reliability of detection on the zoo: how often, and how fast, each buggy target is found by
the rule that names its mechanism, and that its fixed twin draws no report.

    python3 bench/zoo.py [--preload-runs 10] [--ebpf-runs 5] [--fixed-runs 1]
                         [--targets redis-333,libuv-1148] [--scenarios ci|all] [--no-doc]

One run is one pytest session of the built-in suite against ``zoo/<name>`` with a fresh
fault seed: by default the scenarios that find the target (``targets/zoo/__init__.py``,
as CI runs them); ``--scenarios all`` runs the whole suite.  Per run the script reads the
session's JUnit report and counts time as the sum of the test durations up to and including
the first test that failed (time to the first report) and the first whose report names the
target's root-cause rule (time to the root cause).  A run "found" the target when some test
reported its root-cause rule.  Fixed twins run the same scenarios under the preload tracer;
any failed test counts as a report.  eBPF runs are skipped (and the table says so) when
the eBPF tracer cannot run here, and for a target whose root-cause rule decides from records
the eBPF tracer does not write (free(): ``ebpf.UNCHECKED_RULES``): such a row would only count
misses.

The rows measured replace their own rows of the table between the markers in docs/zoo.md
(the others stay), and a line under the markers gives the date, the machine, its load and
the exact command of the run.  With ``--preload-runs 0`` the fixed twins' runs rewrite the
twin cell of the target's preload row and nothing else.
"""

from __future__ import annotations

import argparse
import random
import shlex
import statistics
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import _common as c

from afterclose.harness.oracle.registry import NAMES
from afterclose.harness.trace import ebpf
from afterclose.targets.zoo import ZOO, ZooEntry

DOC = c.ROOT / "docs" / "zoo.md"
BEGIN, END = "<!-- bench/zoo.py: begin -->", "<!-- bench/zoo.py: end -->"
RUN_TIMEOUT_S = 1800
NOT_OBSERVABLE = "the rule needs free() records, which the eBPF tracer does not see"


@dataclass
class Run:
    first_s: float | None  # time to the first report (None: no test failed)
    root_s: float | None  # time to the root-cause rule (None: not reported)
    wall_s: float
    rules: list[str] = field(default_factory=list)


def _scenarios(entry: ZooEntry, which: str) -> list[str]:
    return ["-k", entry.scenarios] if which == "ci" else []


def one_run(target: str, tracer: str, selection: list[str], rule: str, workdir: Path) -> Run:
    """One pytest session; times from its JUnit report."""
    junit = workdir / f"{target}-{tracer}-{random.randrange(2**32):08x}.xml"
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:xdist",
        "-p",
        "no:cacheprovider",
        "-q",
        f"--target=zoo/{target}",
        f"--tracer={tracer}",
        f"--fault-seed={random.randrange(2**32)}",
        f"--junitxml={junit}",
        *selection,
    ]
    result = c.run_tool(argv, timeout_s=RUN_TIMEOUT_S, cwd=workdir)
    elapsed = 0.0
    first: float | None = None
    root: float | None = None
    rules: list[str] = []
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            elapsed += float(case.get("time", "0"))
            bad = case.find("failure") is not None or case.find("error") is not None
            if not bad:
                continue
            text = "".join(case.itertext())
            if first is None:
                first = elapsed
            for name in set(_rule_names(text)):
                if name not in rules:
                    rules.append(name)
            if root is None and f"[{rule}]" in text:
                root = elapsed
        junit.unlink()
    return Run(first, root, result.wall_s, rules)


def _rule_names(text: str) -> list[str]:
    return [n for n in NAMES if f"[{n}]" in text]


def _times(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "-"
    return f"{statistics.median(got):.1f} s / {max(got):.1f} s"


@dataclass
class Row:
    entry: ZooEntry
    tracer: str
    runs: list[Run]
    note: str = ""

    def cells(self) -> list[str]:
        n = len(self.runs)
        found = sum(r.root_s is not None for r in self.runs)
        if not n:
            return [self.entry.name, f"`{self.entry.rule}`", self.tracer, self.note, "", ""]
        return [
            self.entry.name,
            f"`{self.entry.rule}`",
            self.tracer,
            f"{found} / {n}",
            _times([r.first_s for r in self.runs]),
            _times([r.root_s for r in self.runs]),
        ]


HEAD = [
    "target",
    "root-cause rule",
    "tracer",
    "runs found / runs",
    "first report: median / worst",
    "root-cause rule: median / worst",
    "fixed twin: reports / runs",
]


def table_rows(rows: list[Row], fixed: dict[str, tuple[int, int]]) -> dict[tuple[str, str], str]:
    """(target, tracer) -> its table line."""
    out = {}
    for row in rows:
        reports, runs = fixed.get(row.entry.name, (0, 0))
        twin = f"{reports} / {runs}" if row.tracer == "preload" and runs else ""
        out[(row.entry.name, row.tracer)] = "| " + " | ".join([*row.cells(), twin]) + " |"
    return out


def block(runs_lines: list[str], lines: dict[tuple[str, str], str]) -> str:
    order = {e.name: k for k, e in enumerate(ZOO)}
    keys = sorted(lines, key=lambda k: (order.get(k[0], len(order)), k[1] != "preload"))
    head = ["| " + " | ".join(HEAD) + " |", "|" + " --- |" * len(HEAD)]
    body = "\n".join(head + [lines[k] for k in keys])
    return f"{BEGIN}\n" + "\n".join(runs_lines) + f"\n\n{body}\n{END}"


def with_twin(line: str, twin: str) -> str:
    """A table line whose last cell (the fixed twin's) says ``twin``."""
    cells = line.strip().strip("|").split("|")
    return "| " + " | ".join([*(c.strip() for c in cells[:-1]), twin]) + " |"


def write_doc(
    run_line: str, lines: dict[tuple[str, str], str], twins: dict[str, str] | None = None
) -> str:
    """Merge the new rows into docs/zoo.md's table: rows of targets and tracers measured now
    replace the old ones; the others stay, with the lines saying which run made them.
    ``twins`` (target -> cell) rewrites the fixed-twin cell of a preload row not measured
    now (``--preload-runs 0``)."""
    doc = DOC.read_text() if DOC.exists() else ""
    runs: list[str] = []
    old: dict[tuple[str, str], str] = {}
    if BEGIN in doc and END in doc:
        inside = doc[doc.index(BEGIN) + len(BEGIN) : doc.index(END)]
        for line in inside.strip().splitlines():
            cells = [x.strip() for x in line.strip("|").split("|")]
            row = len(cells) == len(HEAD) and cells[0] not in (HEAD[0], "---")
            if line.startswith("| ") and row:
                old[(cells[0], cells[2])] = line
            elif line.strip() and not line.startswith("|"):
                runs.append(line.strip())
    for name, twin in (twins or {}).items():
        if (name, "preload") in old and (name, "preload") not in lines:
            old[(name, "preload")] = with_twin(old[(name, "preload")], twin)
    text = block([*runs, run_line], {**old, **lines})
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + text + doc[doc.index(END) + len(END) :]
    else:
        doc += "\n" + text + "\n"
    DOC.write_text(doc)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preload-runs", type=int, default=10)
    ap.add_argument("--ebpf-runs", type=int, default=5)
    ap.add_argument("--fixed-runs", type=int, default=1)
    ap.add_argument("--targets", default="", help="comma-separated zoo names (default: all)")
    ap.add_argument("--scenarios", choices=("ci", "all"), default="ci")
    ap.add_argument("--no-doc", action="store_true", help="print the table only")
    args = ap.parse_args()
    wanted = [t for t in args.targets.split(",") if t]
    entries = [e for e in ZOO if not wanted or e.name in wanted]
    ebpf_missing = _ebpf_missing() if args.ebpf_runs else None
    rows: list[Row] = []
    fixed: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory(prefix="afterclose-zoo-bench-") as tmp:
        work = Path(tmp)
        for e in entries:
            sel = _scenarios(e, args.scenarios)
            runs = []
            for i in range(args.preload_runs):
                runs.append(one_run(e.name, "preload", sel, e.rule, work))
                print(f"{e.name} preload {i + 1}/{args.preload_runs}: {runs[-1]}", flush=True)
            if args.preload_runs:
                rows.append(Row(e, "preload", runs))
            if args.ebpf_runs:
                if e.rule in ebpf.UNCHECKED_RULES:
                    rows.append(Row(e, "ebpf", [], note=f"not run: {NOT_OBSERVABLE}"))
                elif ebpf_missing:
                    rows.append(Row(e, "ebpf", [], note=f"not run: {ebpf_missing}"))
                else:
                    runs = []
                    for i in range(args.ebpf_runs):
                        runs.append(one_run(e.name, "ebpf", sel, e.rule, work))
                        print(f"{e.name} ebpf {i + 1}/{args.ebpf_runs}: {runs[-1]}", flush=True)
                    rows.append(Row(e, "ebpf", runs))
            if not args.fixed_runs:
                continue
            twin = [
                one_run(f"{e.name}-fixed", "preload", sel, e.rule, work)
                for _ in range(args.fixed_runs)
            ]
            fixed[e.name] = (sum(r.first_s is not None for r in twin), len(twin))
            print(f"{e.name}-fixed: {fixed[e.name][0]} reports in {len(twin)} runs", flush=True)
    command = "python3 bench/zoo.py " + shlex.join(sys.argv[1:])
    targets = ", ".join(e.name for e in entries)
    run_line = (
        f"- {c.today()}; {c.machine().describe()}; load {c.load()}; `{command.strip()}`; "
        f"scenarios: {args.scenarios}; targets: {targets}"
    )
    lines = table_rows(rows, fixed)
    twins = {name: f"{reports} / {runs}" for name, (reports, runs) in fixed.items()}
    print(write_doc(run_line, lines, twins) if not args.no_doc else block([run_line], lines))
    found = sum(r.root_s is not None for row in rows for r in row.runs)
    total = sum(len(row.runs) for row in rows)
    print(f"found by the root-cause rule: {found} / {total} runs")
    return 0


def _ebpf_missing() -> str | None:
    missing = ebpf.unavailable()
    return missing[0] if missing else None


if __name__ == "__main__":
    raise SystemExit(main())
