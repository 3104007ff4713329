"""What the eBPF loader printed: the lines of ``c/loader.c`` (see its header) parsed into raw
records and the counts every report states (lost events, truncated waits, execs), the
processes that exited, and whether every line the program printed reached the file."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from afterclose.harness.errors import TraceError
from afterclose.harness.trace.format import Op

__all__ = ["ParsedOutput", "RawRecord", "parse_output"]

_LOST_RE = re.compile(rb"^Lost (\d+) events")
_COUNT_RE = re.compile(rb"^@n: (\d+)$")
_PENDING_RE = re.compile(rb"^@wr\[(\d+)\]: \((\d+), (\d+), (\d+), (\d+), (\d+)\)$")

# Raw record: op, pid, tid, seq_in, seq_out, flags, fd, arg, data, events, ret (kernel result).
RawRecord = tuple[int, int, int, int, int, int, int, int, int, int, int]
# Repeated waits: tid, count, first seq_in, last seq_out, and the (seq_in, seq_out) of the
# thread's printed wait they repeat.
Repeat = tuple[int, int, int, int, int, int]


@dataclass
class ParsedOutput:
    records: list[RawRecord] = field(default_factory=list)
    begin_ns: int = 0
    lost: int = 0
    truncated_waits: int = 0
    execs: list[tuple[int, int, int]] = field(default_factory=list)  # pid, tid, ns
    exits: dict[int, int] = field(default_factory=dict)  # pid -> ns its last thread exited
    malformed: int = 0
    lines: int = 0  # lines of the kinds the program counts in @n: records, T, X, E, R
    printed: int | None = None  # @n, which the loader prints at its exit (None: it did not)
    stopped_ns: int = 0  # the "S" line: when the program stopped printing records
    repeated: int = 0  # waits the program counted instead of printing (expanded here)
    unmatched_repeats: int = 0  # repeated waits whose printed wait is not in the output

    def unwritten(self) -> int:
        """How many lines the program printed that neither reached the file nor were counted
        lost (the loader never read them); 0 when it did not say how many it printed."""
        if self.printed is None:
            return 0
        return max(self.printed - self.lines - self.lost, 0)

    def extend(self, other: ParsedOutput) -> None:
        """Add what another loader run of the same trace printed (after a restart): its
        times come from the same clock, so the records merge by their numbers."""
        self.records.extend(other.records)
        begins = [b for b in (self.begin_ns, other.begin_ns) if b > 0]
        self.begin_ns = min(begins, default=0)
        self.lost += other.lost
        self.truncated_waits += other.truncated_waits
        self.execs.extend(other.execs)
        self.exits.update(other.exits)
        self.malformed += other.malformed
        self.lines += other.lines
        if self.printed is not None and other.printed is not None:
            self.printed += other.printed
        else:
            self.printed = None  # one of them did not say
        self.stopped_ns = max(self.stopped_ns, other.stopped_ns)
        self.repeated += other.repeated
        self.unmatched_repeats += other.unmatched_repeats


def parse_output(path: Path) -> ParsedOutput:
    """Parse the lines of ``c/loader.c`` (see its header); records keep their print order."""
    out = ParsedOutput()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TraceError(f"cannot read the eBPF trace: {exc.strerror}", where=path) from exc
    append = out.records.append
    repeats: list[Repeat] = []
    for line in raw.split(b"\n"):
        if not line:
            continue
        c = line[0]
        if 0x30 <= c <= 0x39:  # a digit: a record
            out.lines += 1
            parts = line.split()
            if len(parts) != 11:
                out.malformed += 1
                continue
            try:
                op, pid, tid, si, so, fl, fd, arg, data, ev, ret = map(int, parts)
            except ValueError:
                out.malformed += 1
                continue
            if op == Op.EPOLL_WAIT:
                # The wait line carries its first event (one ring-buffer entry less).
                append((op, pid, tid, si, so, fl, fd, arg, 0, 0, ret))
                if ret > 0:
                    append((Op.EPOLL_EVENT, pid, tid, si, so, 0, fd, 0, data, ev, 0))
            else:
                append((op, pid, tid, si, so, fl, fd, arg, data, ev, ret))
        elif line.startswith(b"B "):
            out.begin_ns = int(line[2:])
        elif line.startswith(b"Lost "):
            m = _LOST_RE.match(line)
            if m is not None:
                out.lost += int(m.group(1))
        elif line.startswith(b"T "):
            out.lines += 1
            out.truncated_waits += 1
        elif line.startswith(b"X "):
            out.lines += 1
            parts = line.split()
            if len(parts) == 4:
                out.execs.append((int(parts[1]), int(parts[2]), int(parts[3])))
        elif line.startswith(b"E "):
            out.lines += 1
            parts = line.split()
            if len(parts) == 3:
                out.exits[int(parts[1])] = int(parts[2])
            else:
                out.malformed += 1
        elif line.startswith(b"R "):
            out.lines += 1
            parts = line.split()
            if len(parts) != 7:
                out.malformed += 1
                continue
            tid, count, first_in, last_out, orig_in, orig_out = map(int, parts[1:])
            repeats.append((tid, count, first_in, last_out, orig_in, orig_out))
        elif line.startswith(b"@wr["):
            m = _PENDING_RE.match(line)
            if m is None:
                out.malformed += 1
            else:
                tid, count, first_in, last_out, orig_in, orig_out = map(int, m.groups())
                repeats.append((tid, count, first_in, last_out, orig_in, orig_out))
        elif line.startswith(b"S "):
            out.stopped_ns = int(line[2:])
        elif line.startswith(b"@n: "):
            m = _COUNT_RE.match(line)
            if m is None:
                out.malformed += 1
            else:
                out.printed = int(m.group(1))
        else:
            out.malformed += 1
    if repeats:
        _expand_repeats(out, repeats)
    return out


def _expand_repeats(out: ParsedOutput, repeats: list[Repeat]) -> None:
    """The program prints a wait whose batch (result and every event) repeats that of the
    thread's last printed wait, with nothing printed in the process since, as a count only
    (see c/tracer.bpf.c).  Each becomes a copy of that wait and its events again, as the shim
    records them; all copies of one run bear the run's first seq_in and last seq_out (each
    happened within), which proves no order the calls did not have."""
    batches: dict[tuple[int, int, int], list[RawRecord]] = {}
    for r in out.records:
        if r[0] in (Op.EPOLL_WAIT, Op.EPOLL_EVENT):
            batches.setdefault((r[2], r[3], r[4]), []).append(r)
    for tid, count, first_in, last_out, orig_in, orig_out in repeats:
        batch = batches.get((tid, orig_in, orig_out))
        if batch is None:
            out.unmatched_repeats += count
            continue
        out.repeated += count
        again: list[RawRecord] = [
            (r[0], r[1], r[2], first_in, last_out, r[5], r[6], r[7], r[8], r[9], r[10])
            for r in batch
        ]
        for _ in range(count):
            out.records.extend(again)
