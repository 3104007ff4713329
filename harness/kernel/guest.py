"""The guest's side: run the inner pytest and hand its results back through the results share.

``python -m afterclose.harness.kernel.guest /run/afterclose-results`` is the command the guest's
init runs.  It reads ``request.json`` (working folder, pytest arguments, environment), runs
pytest with the ``report`` plugin, then copies the test run's temporary folder (traces, SVG
timelines) into the share so that paths in reports can be rewritten to host paths.
Only the standard library is imported here: the host imports the file names too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REQUEST = "request.json"
REPORT = "report.jsonl"
SELECT = "select.txt"
GUEST_INFO = "guest.json"
PYTEST_LOG = "pytest.log"
BASETEMP_COPY = "basetemp"
# New files land in the overlay's tmpfs layer: shared-memory traces (MAP_SHARED) stay off
# 9p, which would have to write every page back through the host.
GUEST_BASETEMP = "/tmp/afterclose-guest"
COPY_LIMIT_BYTES = 64 << 20
# Set for the inner pytest: its replay commands name the kernel (--kernel=SPEC).
GUEST_KERNEL_ENV = "AFTERCLOSE_GUEST_KERNEL"


def _write_info(results: Path, info: dict[str, object]) -> None:
    tmp = results / f".{GUEST_INFO}.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    tmp.rename(results / GUEST_INFO)


def _copy_sparse(src: Path, dst: Path) -> None:
    # Trace files are mostly holes (sized for the worst case, filled as records come): copy
    # only the data extents (SEEK_DATA/SEEK_HOLE, which tmpfs and overlay support), leaving
    # holes in the copy, or every copy would move its full size through 9p.
    with src.open("rb") as fin, dst.open("wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            fin.seek(start)
            fout.seek(start)
            remaining = end - start
            while remaining > 0:
                chunk = fin.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                fout.write(chunk)
                remaining -= len(chunk)
            pos = end
        fout.truncate(size)
    shutil.copystat(src, dst)


def _copy_folders(folders: list[Path], dest: Path) -> list[str]:
    """Copy test folders under ``dest`` (same relative paths as under the guest's basetemp);
    files with more data than the limit are listed instead of copied."""
    skipped: list[str] = []
    root = Path(GUEST_BASETEMP)
    for top in folders:
        for folder, _dirs, files in os.walk(top):
            out = dest / Path(folder).relative_to(root)
            out.mkdir(parents=True, exist_ok=True)
            for name in files:
                src = Path(folder) / name
                try:
                    if src.is_symlink():
                        continue
                    if src.stat().st_blocks * 512 > COPY_LIMIT_BYTES:
                        skipped.append(str(src))
                        continue
                    _copy_sparse(src, out / name)
                except OSError as exc:
                    skipped.append(f"{src}: {exc}")
    return skipped


def _failed_folders(report: Path) -> list[Path]:
    """The temporary folders of tests that did not pass: their traces and timelines are what
    a report points at.  Passing tests' folders stay in the guest."""
    folders = []
    root = Path(GUEST_BASETEMP)
    for line in report.read_text().splitlines() if report.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        tmp = record.get("tmp_path")
        if tmp and record.get("outcome") == "failed" and Path(tmp).is_relative_to(root):
            folders.append(Path(tmp))
    return folders


def main(argv: list[str]) -> int:
    results = Path(argv[0])
    request = json.loads((results / REQUEST).read_text())
    env = {**os.environ, **request["env"]}
    info: dict[str, object] = {
        "release": os.uname().release,
        "version": os.uname().version,
        "machine": os.uname().machine,
        "cpus": os.cpu_count(),
    }
    _write_info(results, info)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *request["args"],
        "-p",
        "afterclose.harness.kernel.report",
        f"--afterclose-guest-report={results / REPORT}",
        f"--afterclose-guest-select={results / SELECT}",
        f"--basetemp={GUEST_BASETEMP}",
    ]
    started = time.monotonic()
    with (results / PYTEST_LOG).open("w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        code = subprocess.run(
            cmd, cwd=request["cwd"], env=env, stdout=log, stderr=subprocess.STDOUT, check=False
        ).returncode
    info["pytest_exit"] = code
    info["pytest_s"] = round(time.monotonic() - started, 1)
    info["not_copied"] = _copy_folders(_failed_folders(results / REPORT), results / BASETEMP_COPY)
    _write_info(results, info)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
