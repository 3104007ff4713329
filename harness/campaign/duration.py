"""Durations on the command line: ``90s``, ``10m``, ``8h``, ``1h30m``, ``2d``."""

from __future__ import annotations

import re

from afterclose.harness.errors import CampaignError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_duration(text: str, option: str = "--duration") -> float:
    """Seconds in ``text``: one or more ``<number><unit>`` parts, units s, m, h, d."""
    value = text.strip().lower()
    parts = _PART.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise CampaignError(
            f"{option}={text!r} is not a duration",
            hint=f"a number and a unit (s, m, h or d), e.g. {option}=90s, {option}=10m, "
            f"{option}=8h or {option}=1h30m",
        )
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise CampaignError(f"{option}={text!r} is no time at all", hint=f"e.g. {option}=10m")
    return seconds


def format_duration(seconds: float) -> str:
    """``1h02m03s``-style, to the second."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
