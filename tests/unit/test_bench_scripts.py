"""Every benchmark script still imports what it uses: `--help` runs its imports and its
argument parser, without measuring anything."""

from __future__ import annotations

import subprocess
import sys

import pytest
from paths import ROOT_DIR

SCRIPTS = sorted(p for p in (ROOT_DIR / "bench").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_runs(script: object) -> None:
    proc = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
