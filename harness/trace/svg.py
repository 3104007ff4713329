"""Pictures of findings: a self-contained SVG timeline per finding.

The picture shows what the text timeline (:mod:`.timeline`) shows, laid out in two
dimensions, and picks its records with the very same function, so both always agree and both
stay bounded however long the trace is:

* one horizontal lane per thread (``T1 (tid 4242)``), time running left to right in global
  syscall order (the shim's sequence numbers, so a call that was in flight while others ran
  spans them);
* above the lanes, one bar per incarnation of the finding's fd number, from the call that
  created it to the call that closed it (``fd 7#1``, ``fd 7#2``: one colour each);
* each call as a mark on its thread's lane, filled with the colour of the incarnation it acted
  on (grey when it is about something else), with an ``<title>`` tooltip holding the full call;
  the violating call is red and labelled with the rule;
* epoll events handed to a thread as diamonds under its epoll_wait, coloured by the
  incarnation their registration was made for;
* below the chart, the numbered list of the calls (the text timeline's lines), so a printed or
  non-interactive copy loses nothing.

The file needs nothing else: no script, no font, no stylesheet outside it.
"""

from __future__ import annotations

import re
from pathlib import Path

from afterclose.harness.trace import svg_layout as layout
from afterclose.harness.trace.findings import Finding, TraceVerdict
from afterclose.harness.trace.model import Incarnation
from afterclose.harness.trace.timeline import (
    MAX_LINES,
    TimelineContext,
    errname,
    fmt_data,
    thread_label,
)

__all__ = ["MAX_FILES_PER_RULE", "render_svg", "report_name", "write_report"]

MAX_FILES_PER_RULE = 50  # write_report(every=True): occurrences drawn per rule, at most
_MAX_CALL_CHARS = 180  # table lines longer than this are cut (the tooltip keeps them whole)
_MAX_TIP_CHARS = 2000

# Layout (px).
_MARGIN = 18
_LANE_H = 54
_MARK_H = 20
_BAR_H = 18
_BAR_ROW = 24
_ROW_H = 16  # table rows
_SANS = "DejaVu Sans, Helvetica, Arial, sans-serif"
_MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"

_RED = "#d62728"
_DARK_RED = "#8b0000"
_GREY = "#9e9e9e"
_INJECTED = "#6a3d9a"  # marks the harness injected (syscall faults, the shim's shutdown)
_INJECTED_FILL = "#efe6f7"
# Incarnation colours: distinct, none of them red (red is the violation).
_PALETTE = (
    "#1f77b4",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#17becf",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
)

_STYLE = f"""
.mono {{ font-family: {_MONO}; }}
.muted {{ fill: #666; }}
.mark:hover rect, .mark:hover polygon {{ stroke-width: 3; }}
.row:hover rect.bg {{ fill: #eef3fb; }}
"""

_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _esc(text: str) -> str:
    """Text safe inside an XML element or a double-quoted attribute."""
    text = _XML_BAD.sub("\ufffd", text)
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def _n(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _wrap(text: str, width_chars: int) -> list[str]:
    words = text.split()
    lines: list[str] = []
    cur = ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width_chars:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    if cur:
        lines.append(cur)
    return lines or [""]


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tint(colour: str, amount: float = 0.35) -> str:
    """``colour`` mixed with white: ``amount`` of colour."""
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    mix = [round(255 - (255 - c) * amount) for c in (r, g, b)]
    return "#" + "".join(f"{c:02x}" for c in mix)


# -- rendering -------------------------------------------------------------------------------

# The legend's marks: fill, stroke, stroke width.
_LEGEND_MARKS = {
    "mark": (_tint(_PALETTE[0]), _PALETTE[0], "1.5"),
    "grey": ("#eeeeee", _GREY, "1.5"),
    "red": (_RED, _DARK_RED, "2"),
}


def render_svg(
    finding: Finding,
    *,
    max_lines: int = MAX_LINES,
    occurrence: tuple[int, int] | None = None,
    trace_path: str | None = None,
) -> str:
    """A self-contained SVG timeline of one finding (bounded: at most about ``max_lines``
    calls, however long the trace).  ``occurrence`` is (n, of) for the header; ``trace_path``
    overrides the path the rules pass recorded."""
    ctx = finding._ctx
    rule = finding.rule
    notes = finding.shown_notes()
    if ctx is not None and ctx.records:
        items, leading, trailing = layout.build_items(ctx, finding, notes, max_lines)
    else:
        items, leading, trailing = [], 0, 0
    path = trace_path if trace_path is not None else (ctx.trace_path if ctx else None)

    # -- header text (wrapped once the width is known) -----------------------------------
    about: list[str] = []
    if finding.fd is not None:
        about.append(f"fd {finding.fd}")
    if finding.data is not None:
        about.append(f"data {fmt_data(finding.data)}")
    where = f" in pid {finding.pid}" if ctx is not None and ctx.multi_process else ""
    subject = " and ".join(about) or "the finding"

    # -- lanes, incarnations, axis --------------------------------------------------------
    lanes = layout.lane_order(ctx, (it.key for it in items)) if ctx is not None else []
    lane_labels = {k: thread_label(ctx, k[0], k[1]) for k in lanes} if ctx is not None else {}
    label_w = max([150.0, *(layout.text_w(t, 12) + 24 for t in lane_labels.values())])
    x0 = _MARGIN + label_w + layout.SLOT + (layout.GAP if leading else 0)
    axis = layout.Axis(items, x0)
    if leading:
        axis.left -= layout.GAP

    incs: dict[int, Incarnation] = {}
    for it in items:
        if it.inc is not None:
            incs.setdefault(it.inc.id, it.inc)
        for ev in it.events:
            if ev.inc is not None:
                incs.setdefault(ev.inc.id, ev.inc)
    ordered = sorted(incs.values(), key=lambda i: (i.pid, i.ordinal, i.id))
    colours = {inc.id: _PALETTE[n % len(_PALETTE)] for n, inc in enumerate(ordered)}
    bars = layout.bars(ctx, ordered, colours, axis) if ctx is not None else []
    bar_rows = max((b.row for b in bars), default=-1) + 1

    # -- the table's lines -----------------------------------------------------------------
    t0 = ctx.records[items[0].first].t_ns if ctx is not None and items else 0
    rows: list[tuple[layout.Item | None, str]] = []
    if leading:
        rows.append((None, f"… {leading} earlier related records not shown"))
    for it in items:
        if it.hidden_before:
            rows.append((None, f"… {it.hidden_before} related records not shown"))
        rows.append((it, ""))
    if trailing:
        rows.append((None, f"… {trailing} later related records not shown"))
    thread_w = max([6, *(len(t) for t in lane_labels.values())])
    seq_w = max([7, *(len(f"{it.seq_in}-{it.seq_out}") for it in items)])

    def call_text(it: layout.Item) -> str:
        text = it.text
        if it.count > 1:
            text += f"  (\u00d7{it.count}: {it.count - 1} more identical calls)"
        if it.note:
            text += f"  -- {it.note}"
        return text

    table_chars = max([60, *(len(_cut(call_text(it), _MAX_CALL_CHARS)) for it in items)])
    col_seq = _MARGIN + 44
    col_us = col_seq + layout.text_w("x" * seq_w, 11, mono=True) + 14
    col_thread = col_us + layout.text_w("x" * 10, 11, mono=True) + 14
    col_call = col_thread + layout.text_w("x" * thread_w, 11, mono=True) + 14
    table_right = col_call + 20 + layout.text_w("x" * table_chars, 11, mono=True) + _MARGIN

    width = max(940.0, axis.right + _MARGIN + (layout.GAP if trailing else 0), table_right)
    chars = int((width - 2 * _MARGIN) / (13 * 0.54))

    head: list[tuple[str, str]] = []  # (css-ish style key, text)
    for n, line in enumerate(_wrap(f"what happened: {finding.summary}", chars)):
        head.append(("body" if n else "body-first", line))
    if finding.why:
        for n, line in enumerate(_wrap(f"why it is a bug: {finding.why}", chars)):
            head.append(("body" if n else "body-first", line))
    if path:
        head.append(("path", f"trace: {path}"))
    if ctx is not None and ctx.incomplete:
        for line in _wrap(f"WARNING: {ctx.incomplete}", chars):
            head.append(("warn", line))

    out: list[str] = []
    y = _MARGIN + 20.0
    occ = ""
    if occurrence is not None and occurrence[1] > 1:
        occ = f"(occurrence {occurrence[0]} of {occurrence[1]})"
    body: list[str] = []
    body.append(
        f'<text x="{_MARGIN}" y="{_n(y)}" font-size="20" font-weight="bold" fill="{_RED}">'
        f"{_esc(rule)}"
        + (f'<tspan dx="10" font-size="14" font-weight="normal">{_esc(occ)}</tspan>' if occ else "")
        + "</text>"
    )
    desc = finding.meaning
    if desc:
        dx = _MARGIN + layout.text_w(rule, 20) + (layout.text_w(occ, 14) + 10 if occ else 0) + 16
        if dx + len(desc) * 14 * 0.54 > width - _MARGIN:
            dx = _MARGIN
            y += 20
        body.append(
            f'<text x="{_n(dx)}" y="{_n(y)}" font-size="14" class="muted">{_esc(desc)}</text>'
        )
    y += 8
    for kind, line in head:
        y += 19 if kind.endswith("first") or kind in ("path", "warn") else 17
        style = ' font-size="13"'
        if kind == "warn":
            style += ' fill="#b35900" font-weight="bold"'
        elif kind == "path":
            style += ' class="mono muted"'
        label, sep, rest = line.partition(": ")
        if kind == "body-first" and sep:
            body.append(
                f'<text x="{_MARGIN}" y="{_n(y)}"{style}><tspan font-weight="bold">'
                f"{_esc(label)}:</tspan> {_esc(rest)}</text>"
            )
        else:
            body.append(f'<text x="{_MARGIN}" y="{_n(y)}"{style}>{_esc(line)}</text>')

    # -- legend -------------------------------------------------------------------------------
    y += 30
    lx = float(_MARGIN)
    legend: list[tuple[str, str]] = [
        ("bar", "fd incarnation: from the call that created it to the call that closed it"),
        ("mark", "a call on that incarnation"),
        ("grey", "a related call not on the fd (epoll_wait, free, ...)"),
        ("red", "the violating call"),
        ("event", "epoll event delivered for it"),
        ("gap", "related records left out"),
    ]
    for kind, text in legend:
        need = 34 + len(text) * 11 * 0.54 + 26
        if lx + need > width - _MARGIN and lx > _MARGIN:
            lx = _MARGIN
            y += 20
        sy = y - 4
        if kind == "bar":
            body.append(
                f'<rect x="{_n(lx)}" y="{_n(sy - 6)}" width="26" height="12" rx="3" '
                f'fill="{_PALETTE[0]}"/>'
            )
        elif kind in _LEGEND_MARKS:
            fill, stroke, stroke_width = _LEGEND_MARKS[kind]
            body.append(
                f'<rect x="{_n(lx)}" y="{_n(sy - 7)}" width="26" height="14" rx="3" '
                f'fill="{fill}" stroke="{stroke}" stroke-width="{stroke_width}"/>'
            )
        elif kind == "event":
            body.append(_diamond(lx + 13, sy, 6, _PALETTE[0]))
        else:
            body.append(
                f'<line x1="{_n(lx + 13)}" y1="{_n(sy - 8)}" x2="{_n(lx + 13)}" '
                f'y2="{_n(sy + 8)}" stroke="#888" stroke-width="2" stroke-dasharray="2 3"/>'
            )
        body.append(f'<text x="{_n(lx + 34)}" y="{_n(y)}" font-size="11">{_esc(text)}</text>')
        lx += need
    y += 2
    how = (
        f"Timeline of {subject}{where}: one lane per thread, calls left to right in global "
        "syscall order (seq); a call that was in flight while others ran spans them.  Numbers "
        "refer to the list below (* = annotated there); hover a mark for its full call.  "
        "ADD/MOD/DEL = epoll_ctl, shut = shutdown, dashed outline = the call failed."
    )
    for line in _wrap(how, int((width - 2 * _MARGIN) / (11 * 0.54))):
        y += 15
        body.append(
            f'<text x="{_MARGIN}" y="{_n(y)}" font-size="11" class="muted">{_esc(line)}</text>'
        )
    y += 6

    # -- the chart ----------------------------------------------------------------------------
    focus_item = next((it for it in items if it.focus), None)
    callout_y = y + 6
    bands_top = callout_y + 30
    bars_bottom = bands_top + bar_rows * _BAR_ROW
    lanes_top = bars_bottom + (10 if bar_rows else 0)
    lanes_bottom = lanes_top + len(lanes) * _LANE_H
    lane_y = {k: lanes_top + n * _LANE_H + _LANE_H / 2 + 4 for n, k in enumerate(lanes)}
    chart_left = _MARGIN + label_w

    chart: list[str] = []
    # Lane backgrounds and labels.
    for n, k in enumerate(lanes):
        top = lanes_top + n * _LANE_H
        fill = "#f4f6f8" if n % 2 == 0 else "#ffffff"
        chart.append(
            f'<rect x="{_MARGIN}" y="{_n(top)}" width="{_n(axis.right - _MARGIN)}" '
            f'height="{_LANE_H}" fill="{fill}"/>'
        )
        chart.append(
            f'<text x="{_n(_MARGIN + 8)}" y="{_n(lane_y[k] + 4)}" font-size="12" '
            f'font-weight="bold">{_esc(lane_labels[k])}</text>'
        )
        chart.append(
            f'<line x1="{_n(chart_left)}" y1="{_n(lane_y[k])}" x2="{_n(axis.right)}" '
            f'y2="{_n(lane_y[k])}" stroke="#c8ccd0" stroke-width="1"/>'
        )
    if bar_rows and finding.fd is not None:
        label = f"fd {finding.fd}" + (f" (pid {finding.pid})" if where else "")
        chart.append(
            f'<text x="{_n(_MARGIN + 8)}" y="{_n(bands_top + _BAR_ROW / 2 + 4)}" '
            f'font-size="12" font-weight="bold">{_esc(label)}</text>'
        )
        chart.append(
            f'<text x="{_n(_MARGIN + 8)}" y="{_n(bands_top + _BAR_ROW / 2 + 17)}" '
            f'font-size="10" class="muted">incarnations</text>'
        )
    behind = len(chart)  # what is drawn from here on goes over the lanes
    # Gaps: where related records were left out.
    for anchor, hidden in axis.gaps:
        gx = axis.gap_x(anchor)
        chart.append(_gap(gx, bands_top, lanes_bottom, f"{hidden} related records not shown"))
    if leading:
        chart.append(
            _gap(
                axis.left + layout.GAP / 2, bands_top, lanes_bottom, f"{leading} earlier not shown"
            )
        )
    if trailing:
        chart.append(
            _gap(
                axis.right + layout.GAP / 2, bands_top, lanes_bottom, f"{trailing} later not shown"
            )
        )
    # Incarnation bars and their guide lines down through the lanes.
    for bar in bars:
        by = bands_top + bar.row * _BAR_ROW + (_BAR_ROW - _BAR_H) / 2
        for x, open_end in ((bar.x1, bar.open_left), (bar.x2, bar.open_right)):
            if not open_end:
                chart.append(
                    f'<line x1="{_n(x)}" y1="{_n(by + _BAR_H)}" x2="{_n(x)}" '
                    f'y2="{_n(lanes_bottom)}" stroke="{bar.colour}" stroke-width="1.2" '
                    f'stroke-dasharray="4 3" opacity="0.7"/>'
                )
        chart.append(_bar(bar, by))
    # Marks.
    for it in items:
        chart.append(_mark(ctx, it, axis, lane_y[it.key], colours, lane_labels[it.key]))
    # The callout naming the rule above the violating call.
    if focus_item is not None:
        fx = (axis.at(focus_item.seq_in) + axis.at(focus_item.seq_out)) / 2
        fy = lane_y[focus_item.key] - _MARK_H / 2 - 14
        cw = layout.text_w(rule, 12) + 20
        cx = min(max(fx - cw / 2, chart_left), width - _MARGIN - cw)
        chart.insert(
            behind,
            f'<line x1="{_n(fx)}" y1="{_n(callout_y + 22)}" x2="{_n(fx)}" y2="{_n(fy)}" '
            f'stroke="{_RED}" stroke-width="2" stroke-dasharray="5 3"/>',
        )
        chart.append(
            f"<g><title>{_esc(_tip(finding.summary))}</title>"
            f'<rect x="{_n(cx)}" y="{_n(callout_y)}" width="{_n(cw)}" height="22" rx="4" '
            f'fill="{_RED}"/>'
            f'<text x="{_n(cx + cw / 2)}" y="{_n(callout_y + 15.5)}" font-size="12" '
            f'font-weight="bold" text-anchor="middle" fill="#ffffff">{_esc(rule)}</text></g>'
        )
    if not items:
        chart.append(
            f'<text x="{_MARGIN}" y="{_n(lanes_top + 16)}" font-size="13" class="muted">'
            f"{_esc('(no trace records to draw: the finding carries no trace context)')}</text>"
        )
        lanes_bottom = lanes_top + 24
    # The axis.
    ay = lanes_bottom + 14
    if items:
        chart.append(
            f'<line x1="{_n(chart_left)}" y1="{_n(lanes_bottom + 2)}" x2="{_n(axis.right)}" '
            f'y2="{_n(lanes_bottom + 2)}" stroke="#555" stroke-width="1"/>'
        )
        # Ticks at item starts, far enough apart for their numbers; the focus always has one.
        ticks: list[tuple[float, int]] = []
        room = layout.text_w(str(items[-1].seq_out), 10) + 14
        for it in items:
            x = axis.at(it.seq_in)
            if ticks and x - ticks[-1][0] < room:
                if not it.focus:
                    continue
                ticks.pop()
            ticks.append((x, it.seq_in))
        for x, seq in ticks:
            chart.append(
                f'<line x1="{_n(x)}" y1="{_n(lanes_bottom + 2)}" x2="{_n(x)}" '
                f'y2="{_n(lanes_bottom + 6)}" stroke="#555"/>'
                f'<text x="{_n(x)}" y="{_n(ay + 4)}" font-size="10" class="muted" '
                f'text-anchor="middle">{seq}</text>'
            )
        chart.append(
            f'<text x="{_n(chart_left - 8)}" y="{_n(ay + 4)}" font-size="10" class="muted" '
            f'text-anchor="end">seq →</text>'
        )
    y = ay + 30

    # -- the numbered list ---------------------------------------------------------------------
    table: list[str] = []
    hy = y
    for x, text in (
        (_MARGIN + 6.0, "#"),
        (col_seq, "seq"),
        (col_us, "µs"),
        (col_thread, "thread"),
        (col_call, "call"),
    ):
        table.append(
            f'<text x="{_n(x)}" y="{_n(hy)}" font-size="11" font-weight="bold" class="mono">'
            f"{_esc(text)}</text>"
        )
    y = hy + 6
    for row, text in rows:
        top = y
        y += _ROW_H
        base = y - 4
        if row is None:
            table.append(
                f'<text x="{_n(col_call)}" y="{_n(base)}" font-size="11" class="mono muted" '
                f'font-style="italic">{_esc(text)}</text>'
            )
            continue
        r = ctx.records[row.first] if ctx is not None else None
        us = (r.t_ns - t0) / 1000.0 if r is not None else 0.0
        bg = "#fde2e2" if row.focus else "#ffffff"
        colour = _RED if row.focus else colours.get(row.inc.id, _GREY) if row.inc else _GREY
        weight = ' font-weight="bold"' if row.focus else ""
        full = call_text(row)
        table.append(
            f'<g class="row"><title>{_esc(_tip(full))}</title>'
            f'<rect class="bg" x="{_MARGIN}" y="{_n(top + 1)}" '
            f'width="{_n(width - 2 * _MARGIN)}" height="{_ROW_H}" fill="{bg}"/>'
            f'<rect x="{_MARGIN + 2}" y="{_n(top + 3)}" width="28" height="{_ROW_H - 4}" '
            f'rx="3" fill="{_tint(colour, 0.5) if not row.focus else _RED}"/>'
            f'<text x="{_n(_MARGIN + 16)}" y="{_n(base)}" font-size="11" text-anchor="middle" '
            f'class="mono"{weight}{" fill=" + chr(34) + "#fff" + chr(34) if row.focus else ""}>'
            f"{row.num}</text>"
            f'<text x="{_n(col_seq)}" y="{_n(base)}" font-size="11" class="mono"{weight}>'
            f"{row.seq_in}-{row.seq_out}</text>"
            f'<text x="{_n(col_us)}" y="{_n(base)}" font-size="11" class="mono"{weight}>'
            f"{us:.1f}</text>"
            f'<text x="{_n(col_thread)}" y="{_n(base)}" font-size="11" class="mono"{weight}>'
            f"{_esc(lane_labels.get(row.key, ''))}</text>"
            f'<text x="{_n(col_call)}" y="{_n(base)}" font-size="11" class="mono"{weight}>'
            f"{_esc(_cut(full, _MAX_CALL_CHARS))}</text></g>"
        )
    if not rows:
        y += _ROW_H
    height = y + _MARGIN

    out.append('<?xml version="1.0" encoding="UTF-8"?>')
    out.append(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_n(width)}" height="{_n(height)}" '
        f'viewBox="0 0 {_n(width)} {_n(height)}">'
    )
    out.append(f"<title>{_esc(f'afterclose {rule}: {finding.summary}')}</title>")
    out.append(f"<style>{_STYLE}</style>")
    out.append(f'<rect width="{_n(width)}" height="{_n(height)}" fill="#ffffff"/>')
    # Defaults by inheritance, so that every element's own attributes win (a style sheet rule
    # would override them).
    out.append(f'<g font-family="{_SANS}" fill="#222222">')
    out.extend(body)
    out.extend(chart)
    out.extend(table)
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _tip(text: str) -> str:
    return _cut(text, _MAX_TIP_CHARS)


def _diamond(cx: float, cy: float, r: float, fill: str, stroke: str = "#333") -> str:
    pts = f"{_n(cx)},{_n(cy - r)} {_n(cx + r)},{_n(cy)} {_n(cx)},{_n(cy + r)} {_n(cx - r)},{_n(cy)}"
    return f'<polygon points="{pts}" fill="{fill}" stroke="{stroke}" stroke-width="1"/>'


def _gap(x: float, top: float, bottom: float, tip: str) -> str:
    return (
        f"<g><title>{_esc(tip)}</title>"
        f'<line x1="{_n(x)}" y1="{_n(top)}" x2="{_n(x)}" y2="{_n(bottom)}" stroke="#888" '
        f'stroke-width="2" stroke-dasharray="2 4"/>'
        f'<text x="{_n(x)}" y="{_n(top - 3)}" font-size="10" class="muted" '
        f'text-anchor="middle">⋯{_esc(tip.split()[0])}</text></g>'
    )


def _bar(bar: layout.Bar, y: float) -> str:
    x1, x2 = bar.x1, bar.x2
    parts = [f"<g><title>{_esc(_tip(bar.tip))}</title>"]
    parts.append(
        f'<rect x="{_n(x1)}" y="{_n(y)}" width="{_n(x2 - x1)}" height="{_BAR_H}" rx="4" '
        f'fill="{bar.colour}"/>'
    )
    mid = y + _BAR_H / 2
    if bar.open_left:
        parts.append(
            f'<polygon points="{_n(x1 - 7)},{_n(mid)} {_n(x1 + 1)},{_n(y)} '
            f'{_n(x1 + 1)},{_n(y + _BAR_H)}" fill="{bar.colour}"/>'
        )
    if bar.open_right:
        parts.append(
            f'<polygon points="{_n(x2 + 7)},{_n(mid)} {_n(x2 - 1)},{_n(y)} '
            f'{_n(x2 - 1)},{_n(y + _BAR_H)}" fill="{bar.colour}"/>'
        )
    lw = layout.text_w(bar.label, 11)
    if x2 - x1 >= lw + 10:
        parts.append(
            f'<text x="{_n(x1 + 6)}" y="{_n(mid + 4)}" font-size="11" font-weight="bold" '
            f'fill="#ffffff">{_esc(bar.label)}</text>'
        )
    else:
        parts.append(
            f'<text x="{_n(x2 + 4)}" y="{_n(mid + 4)}" font-size="11" font-weight="bold" '
            f'fill="{bar.colour}" stroke="#ffffff" stroke-width="3" paint-order="stroke">'
            f"{_esc(bar.label)}</text>"
        )
    parts.append("</g>")
    return "".join(parts)


def _mark(
    ctx: TimelineContext | None,
    it: layout.Item,
    axis: layout.Axis,
    cy: float,
    colours: dict[int, str],
    who: str,
) -> str:
    x1 = axis.at(it.seq_in) - layout.PAD
    x2 = axis.at(it.seq_out) + layout.PAD
    top = cy - _MARK_H / 2
    r = ctx.records[it.first] if ctx is not None else None
    if it.focus:
        fill, stroke, text_fill, sw = _RED, _DARK_RED, "#ffffff", 2.5
    elif it.inc is not None:
        c = colours.get(it.inc.id, _GREY)
        fill, stroke, text_fill, sw = _tint(c), c, "#111111", 1.5
    else:
        fill, stroke, text_fill, sw = "#eeeeee", _GREY, "#333333", 1.2
    failed = r is not None and r.ret < 0
    dash = ' stroke-dasharray="3 2"' if failed and not it.focus else ""
    injected = r is not None and r.injected
    if injected and not it.focus:
        # The harness's doing (a syscall fault, the shim's own shutdown): never drawn as a
        # plain server call.
        fill, stroke, text_fill, sw = _INJECTED_FILL, _INJECTED, "#111111", 1.5
        dash = ' stroke-dasharray="1 2"'
    tip = f"#{it.num}  {who}  seq {it.seq_in}-{it.seq_out}\n{it.text}"
    if it.count > 1:
        tip += f"\n(\u00d7{it.count} identical calls)"
    if it.note:
        tip += f"\n-- {it.note}"
    parts = [f'<g class="mark"><title>{_esc(_tip(tip))}</title>']
    parts.append(
        f'<rect x="{_n(x1)}" y="{_n(top)}" width="{_n(x2 - x1)}" height="{_MARK_H}" rx="4" '
        f'fill="{fill}" stroke="{stroke}" stroke-width="{sw}"{dash}/>'
    )
    name = it.name or "?"
    parts.append(
        f'<text x="{_n((x1 + x2) / 2)}" y="{_n(cy + 3.5)}" font-size="10" text-anchor="middle" '
        f'fill="{text_fill}"{" font-weight=" + chr(34) + "bold" + chr(34) if it.focus else ""}>'
        f"{_esc(name)}</text>"
    )
    num_fill = _RED if it.focus else "#555555"
    parts.append(
        f'<text x="{_n((x1 + x2) / 2)}" y="{_n(top - 3)}" font-size="9" text-anchor="middle" '
        f'fill="{num_fill}"{" font-weight=" + chr(34) + "bold" + chr(34) if it.note else ""}>'
        f"{it.num}{'*' if it.note else ''}</text>"
    )
    below = top + _MARK_H + 10
    if failed and r is not None:
        parts.append(
            f'<text x="{_n((x1 + x2) / 2)}" y="{_n(below)}" font-size="9" '
            f'text-anchor="middle" fill="{_DARK_RED}">{_esc(errname(r.err))}</text>'
        )
        below += 10
    if injected:
        parts.append(
            f'<text x="{_n((x1 + x2) / 2)}" y="{_n(below)}" font-size="9" '
            f'text-anchor="middle" fill="{_INJECTED}">injected</text>'
        )
    parts.append("</g>")
    # The events this wait returned about fd/data, under its right end.
    ex = x2 - 6
    for ev in it.events:
        c = colours.get(ev.inc.id, _GREY) if ev.inc is not None else _GREY
        parts.append(
            f'<g class="mark"><title>{_esc(_tip(ev.text))}</title>'
            f"{_diamond(ex, top + _MARK_H + 9, 6, c)}</g>"
        )
        ex -= 14
    return "".join(parts)


# -- files -----------------------------------------------------------------------------------


def report_name(rule: str, n: int = 1) -> str:
    """``timeline-<rule>.svg`` for a rule's first occurrence, ``timeline-<rule>-<n>.svg``
    after."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", rule)
    return f"timeline-{safe}.svg" if n == 1 else f"timeline-{safe}-{n}.svg"


def write_report(
    verdict: TraceVerdict,
    out_dir: Path,
    *,
    every: bool = False,
    trace_path: str | None = None,
) -> list[Path]:
    """Write one SVG per rule with findings (its first occurrence; with ``every``, up to
    :data:`MAX_FILES_PER_RULE` occurrences each) into ``out_dir``; return their paths in
    rule order."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    for rule, found in verdict.occurrences.items():
        # A finding about the whole trace (index -1) has no timeline to draw.
        occ = [f for f in found if f.index >= 0]
        if not occ:
            continue
        if not written:
            out_dir.mkdir(parents=True, exist_ok=True)
        chosen = occ[:MAX_FILES_PER_RULE] if every else occ[:1]
        for n, finding in enumerate(chosen, 1):
            path = out_dir / report_name(rule, n)
            svg = render_svg(finding, occurrence=(n, len(occ)), trace_path=trace_path)
            path.write_text(svg, encoding="utf-8")
            written.append(path)
    return written
