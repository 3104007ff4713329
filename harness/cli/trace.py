"""``afterclose trace show``: judge a saved trace, print its timelines, draw them."""

from __future__ import annotations

import argparse
from pathlib import Path

from afterclose.harness.errors import AftercloseError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    trace = sub.add_parser("trace", help="saved traces")
    trace_sub = trace.add_subparsers(dest="trace_command", required=True)
    show_parser = trace_sub.add_parser(
        "show",
        help="print a saved trace's verdict",
        description="Judge a saved trace: exit 1 when a rule is violated, 0 when none is, "
        "2 when the path is not a readable trace.",
    )
    show_parser.add_argument("path", help="a trace folder (trace.*.bin files) or one trace file")
    show_parser.add_argument(
        "--cutoff",
        type=int,
        default=None,
        metavar="SEQ",
        help="ignore calls that began after sequence number SEQ",
    )
    show_parser.add_argument(
        "--all", action="store_true", help="print (and draw) every occurrence, not the first"
    )
    show_parser.add_argument(
        "--svg",
        default=None,
        metavar="OUT_DIR",
        help="write an SVG timeline per violated rule into OUT_DIR",
    )
    show_parser.set_defaults(func=show)


def show(args: argparse.Namespace) -> int:
    from afterclose.harness.errors import TraceError
    from afterclose.harness.oracle import judge
    from afterclose.harness.trace import reader, svg
    from afterclose.harness.trace.format import TRACE_GLOB

    path = Path(args.path)
    hint = "pass the trace folder of a run (its workdir's trace/) or one trace file"
    try:
        if path.is_dir():
            if not any(path.glob(TRACE_GLOB)):
                raise TraceError(f"no {TRACE_GLOB} files in this folder", where=path, hint=hint)
            # One bad file must not hide what the good ones prove: it is named and left out.
            trace = reader.read_trace_files(path.glob(TRACE_GLOB), skip_bad=True)
        elif path.exists():
            trace = reader.read_trace_files([path])
        else:
            raise TraceError("no such trace folder or file", where=path, hint=hint)
    except OSError as exc:
        raise TraceError(f"cannot read: {exc.strerror or exc}", where=path, hint=hint) from exc
    if not trace.records:
        # An empty trace proves nothing: it is not a pass.
        details = "\n".join(trace.warnings) or None
        raise TraceError(
            "no records: nothing to judge",
            where=path,
            details=details,
            hint="a trace holds records once the traced process made a traced call; "
            "check that the target ran with the tracer",
        )
    result = judge.judge_trace(trace, cutoff_seq=args.cutoff, trace_path=str(path))
    print(
        f"{path}: {len(trace.processes)} process(es), {len(trace.records)} records, "
        f"{trace.lost_records} lost" + ("" if trace.complete else " (incomplete)")
    )
    for proc in trace.processes:
        state = " crashed" if proc.crashed else ""
        print(
            f"  pid {proc.pid} ({proc.header.exe or '?'}): {len(proc.records)} records, "
            f"{proc.lost_records} lost{state}  [{proc.path.name}]"
        )
    if args.cutoff is not None:
        print(f"  judged up to seq {args.cutoff}")
    # check_trace puts the reader's warnings first in its own.
    for warning in dict.fromkeys((*trace.warnings, *result.warnings)):
        print(f"WARNING: {warning}")
    for violation in result.violations:
        print(violation.render())
        if args.all:
            occ = result.occurrences.get(violation.rule, [])
            for n, finding in enumerate(occ[1:], 2):
                print(f"\n  -- {violation.rule}: occurrence {n} of {len(occ)}")
                print("\n".join("    " + line for line in finding.timeline().splitlines()))
    if not result.violations:
        print("no violation")
    if args.svg is not None:
        out_dir = Path(args.svg)
        try:
            written = svg.write_report(result, out_dir, every=args.all, trace_path=str(path))
        except OSError as exc:
            raise AftercloseError(
                f"cannot write the timeline pictures: {exc.strerror or exc}", where=out_dir
            ) from exc
        for picture in written:
            print(f"wrote {picture}")
    return 1 if result.violations else 0
