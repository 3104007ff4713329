"""Kernels from Debian suites this machine's apt does not list (sid, trixie).

The suite's ``InRelease`` is fetched from the Debian archive and checked with ``gpgv``
against the Debian archive keyring. The ``Packages.xz`` it names is then checked against its
SHA256 there, and each package against the SHA256 in ``Packages``. apt's own sources are never
touched.

From 7.x on, Debian splits a kernel into ``linux-binary-ABI`` (the image),
``linux-modules-ABI`` (the module tree) and ``linux-base-ABI`` (config, ``modules.builtin``),
all under ``/usr/lib/modules/RELEASE/``. Older suites ship one
``linux-image-ABI-unsigned`` package.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ARCHIVE_URL = "http://deb.debian.org/debian"
SUITES = ("sid", "trixie")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
INDEX_MAX_AGE_S = 24 * 3600
_KEEP = ("linux-image-", "linux-binary-", "linux-modules-", "linux-base-")
_OTHER_FLAVOURS = ("-cloud-", "-rt-")


class ArchiveError(Exception):
    """The archive could not be reached or did not check out; the message says which."""


@dataclass(frozen=True)
class ArchiveFile:
    filename: str  # path under ARCHIVE_URL
    sha256: str
    size: int


@dataclass(frozen=True)
class ArchiveKernel:
    suite: str
    name: str  # linux-image-…-unsigned, or linux-binary-… for the split layout
    version: str
    files: tuple[ArchiveFile, ...]


def _get(url: str, timeout_s: float = 120.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            data: bytes = response.read()
            return data
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise ArchiveError(f"cannot fetch {url}: {exc}") from None


def _verified_packages(suite: str) -> bytes:
    """The suite's main/binary-amd64 Packages, signature- and checksum-checked."""
    if shutil.which("gpgv") is None or not KEYRING.is_file():
        raise ArchiveError(
            f"cannot check the archive's signature: needs gpgv and {KEYRING} "
            "(apt-get install gpgv debian-archive-keyring)"
        )
    release = _get(f"{ARCHIVE_URL}/dists/{suite}/InRelease")
    with tempfile.NamedTemporaryFile(suffix=".InRelease") as f:
        f.write(release)
        f.flush()
        check = subprocess.run(
            ["gpgv", "--keyring", str(KEYRING), f.name],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    if check.returncode != 0:
        raise ArchiveError(f"{suite}/InRelease: bad signature: {check.stderr.strip()[-300:]}")
    m = re.search(
        rb"^ ([0-9a-f]{64})\s+\d+\s+main/binary-amd64/Packages\.xz$", release, re.M
    )  # the SHA256 section (the MD5 one has 32 digits)
    if m is None:
        raise ArchiveError(f"{suite}/InRelease names no main/binary-amd64/Packages.xz")
    packed = _get(f"{ARCHIVE_URL}/dists/{suite}/main/binary-amd64/Packages.xz")
    if hashlib.sha256(packed).hexdigest() != m.group(1).decode():
        raise ArchiveError(f"{suite}/main/binary-amd64/Packages.xz does not match its SHA256")
    return lzma.decompress(packed)


def _parse(packages: bytes) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for stanza in packages.decode(errors="replace").split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        name = fields.get("Package", "")
        if name.startswith(_KEEP) and "-dbg" not in name:
            out[name] = {k: fields.get(k, "") for k in ("Version", "Filename", "SHA256", "Size")}
    return out


def index(suite: str, cache: Path) -> dict[str, dict[str, str]]:
    """Kernel packages of ``suite``, cached for a day under ``cache``."""
    path = cache / f"archive-{suite}.json"
    try:
        saved = json.loads(path.read_text())
        if time.time() - float(saved["fetched"]) < INDEX_MAX_AGE_S:
            return dict(saved["packages"])
    except (OSError, ValueError, KeyError):
        pass
    packages = _parse(_verified_packages(suite))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fetched": time.time(), "packages": packages}))
    tmp.rename(path)
    return packages


def _file(fields: dict[str, str]) -> ArchiveFile:
    return ArchiveFile(fields["Filename"], fields["SHA256"], int(fields["Size"] or 0))


def kernels(suite: str, cache: Path) -> list[ArchiveKernel]:
    """The generic amd64 kernels of ``suite``, in either packaging layout."""
    idx = index(suite, cache)
    found: list[ArchiveKernel] = []
    for name, fields in idx.items():
        if any(f in name for f in _OTHER_FLAVOURS):
            continue
        if re.match(r"^linux-image-\d[\w.+~-]*-amd64-unsigned$", name):
            found.append(ArchiveKernel(suite, name, fields["Version"], (_file(fields),)))
            continue
        m = re.match(r"^linux-binary-(\d[\w.+~-]*-amd64)$", name)
        if m:
            parts = [name, f"linux-modules-{m.group(1)}", f"linux-base-{m.group(1)}"]
            if all(p in idx for p in parts):
                files = tuple(_file(idx[p]) for p in parts)
                found.append(ArchiveKernel(suite, name, fields["Version"], files))
    return found


def download(files: tuple[ArchiveFile, ...], into: Path) -> list[Path]:
    """Download and SHA256-check each package into ``into``."""
    debs = []
    for f in files:
        data = _get(f"{ARCHIVE_URL}/{f.filename}", timeout_s=900)
        if hashlib.sha256(data).hexdigest() != f.sha256:
            raise ArchiveError(f"{f.filename}: download does not match its SHA256")
        path = into / Path(f.filename).name
        path.write_bytes(data)
        debs.append(path)
    return debs
