"""Kernels from Debian suites this machine's apt does not list (sid, trixie), fetched by apt.

apt itself does the work, through a private configuration under afterclose's cache: its own
sources list naming the suites on the *machine's own* Debian mirror (the one its apt sources
use, or ``AFTERCLOSE_APT_MIRROR``), its own state, lists and cache folders, and an empty dpkg
status. Everything else comes from the machine's apt configuration, so proxies, auth and
trusted keys apply, apt checks the signatures and the hashes, and the machine's own
``/etc/apt`` and ``/var/lib/apt`` are never written.

From 7.x on, Debian splits a kernel into ``linux-binary-ABI`` (the image),
``linux-modules-ABI`` (the module tree) and ``linux-base-ABI`` (config, ``modules.builtin``),
all under ``/usr/lib/modules/RELEASE/``. Older suites ship one
``linux-image-ABI-unsigned`` package.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SUITES = ("sid", "trixie")
MIRROR_ENV = "AFTERCLOSE_APT_MIRROR"
INDEX_MAX_AGE_S = 24 * 3600
APT_TIMEOUT_S = 900
_KEEP = ("linux-image-", "linux-binary-", "linux-modules-", "linux-base-")
_OTHER_FLAVOURS = ("-cloud-", "-rt-")
# Pockets of a release that carry no kernels of their own suite.
_POCKETS = ("-security", "-updates", "-backports", "-proposed-updates")


class ArchiveError(Exception):
    """apt could not list or fetch the suite's kernels; the message says what apt said."""


@dataclass(frozen=True)
class Mirror:
    """A Debian mirror: its URI, the keyring its source entry trusts, and where it was named."""

    uri: str
    signed_by: str | None
    named_in: str


@dataclass(frozen=True)
class ArchiveKernel:
    suite: str
    name: str  # linux-image-…-unsigned, or linux-binary-… for the split layout
    version: str
    packages: tuple[str, ...]  # what `apt-get download` takes: name=version, one per package


def _run(args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(
            args,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=APT_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError:
        raise ArchiveError(
            f"{args[0]} not found: kernels from other suites come through apt"
        ) from None
    except subprocess.TimeoutExpired:
        raise ArchiveError(f"`{' '.join(_shown(args))}` took over {APT_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
        raise ArchiveError(f"`{' '.join(_shown(args))}` failed (exit {proc.returncode}): {said}")
    return proc.stdout


def _shown(args: list[str]) -> list[str]:
    # The -o options are long and the same every time: name the command and its verb.
    return [a for i, a in enumerate(args) if a != "-o" and (i == 0 or args[i - 1] != "-o")]


# --------------------------------------------------------------------------- the machine's mirror


def machine_mirror() -> Mirror:
    """The Debian mirror the machine's apt sources use (``AFTERCLOSE_APT_MIRROR`` wins).

    Among the sources' ``deb ... main`` entries of a release (not its -security or -updates
    pockets), the one most surely Debian's: labelled Debian in its Release file (known only
    once the machine ran ``apt-get update``), signed by the Debian archive keyring, or at a
    path ending in ``/debian``; the first such entry on a tie.
    """
    named = os.environ.get(MIRROR_ENV, "").strip()
    if named:
        return Mirror(named.rstrip("/"), None, MIRROR_ENV)
    labels: dict[str, str] = {}
    fmt = "$(SOURCESENTRY)\t$(LABEL)"
    for line in _run(["apt-get", "indextargets", "--format", fmt]).splitlines():
        entry, _, label = line.partition("\t")
        labels.setdefault(entry, label)
    # Without release information apt lists every configured index (and no labels).
    fmt = "$(REPO_URI)\t$(RELEASE)\t$(COMPONENT)\t$(TARGET_OF)\t$(IDENTIFIER)\t$(SOURCESENTRY)"
    out = _run(["apt-get", "indextargets", "--no-release-info", "--format", fmt])
    best: tuple[int, Mirror] | None = None
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) != 6:
            continue
        uri, release, component, target_of, identifier, entry = fields
        if (target_of, component, identifier) != ("deb", "main", "Packages"):
            continue
        if release.endswith(_POCKETS):
            continue
        mirror = Mirror(uri.rstrip("/"), _signed_by(entry), entry)
        score = (
            4 * (labels.get(entry) == "Debian")
            + 2 * ("debian-archive" in (mirror.signed_by or ""))
            + mirror.uri.endswith("/debian")
        )
        if best is None or score > best[0]:
            best = (score, mirror)
    if best is None:
        raise ArchiveError(
            "the machine's apt sources name no `deb URI RELEASE main` entry "
            f"(apt-get indextargets listed {len(out.splitlines())} index(es))"
        )
    return best[1]


def _signed_by(entry: str) -> str | None:
    """The Signed-By of the source entry ``FILE:N`` (deb822 stanza or one-line entry N)."""
    path_text, _, number = entry.rpartition(":")
    try:
        text = Path(path_text).read_text()
        n = int(number)
    except (OSError, ValueError):
        return None
    if path_text.endswith(".sources"):
        stanzas = [s for s in re.split(r"\n\s*\n", text) if s.strip()]
        if 1 <= n <= len(stanzas):
            m = re.search(r"^Signed-By:\s*(\S+)\s*$", stanzas[n - 1], re.M | re.I)
            return m.group(1) if m else None
        return None
    lines = text.splitlines()
    if 1 <= n <= len(lines):
        m = re.search(r"\[[^]]*signed-by=([^\s\]]+)", lines[n - 1])
        return m.group(1) if m else None
    return None


# --------------------------------------------------------------------------- the private apt


@dataclass(frozen=True)
class PrivateApt:
    """apt with its own sources, state and cache under ``root``, the machine's config else."""

    root: Path
    mirror: Mirror

    @property
    def options(self) -> list[str]:
        r = self.root
        pairs = {
            "Dir::Etc::SourceList": r / "sources.list",
            "Dir::Etc::SourceParts": r / "sources.list.d",
            "Dir::Etc::Preferences": r / "preferences",
            "Dir::Etc::PreferencesParts": r / "preferences.d",
            "Dir::State": r / "state",
            "Dir::State::Status": r / "status",
            "Dir::Cache": r / "cache",
            "Acquire::Languages": "none",
        }
        return [arg for key, value in pairs.items() for arg in ("-o", f"{key}={value}")]

    def prepare(self) -> None:
        for sub in ("sources.list.d", "preferences.d", "state/lists/partial", "cache/archives"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "cache/archives/partial").mkdir(exist_ok=True)
        (self.root / "status").touch()
        signed = f" [signed-by={self.mirror.signed_by}]" if self.mirror.signed_by else ""
        lines = [f"deb{signed} {self.mirror.uri} {suite} main" for suite in SUITES]
        wanted = "\n".join(lines) + "\n"
        sources = self.root / "sources.list"
        if not sources.exists() or sources.read_text() != wanted:
            sources.write_text(wanted)
            (self.root / "updated").unlink(missing_ok=True)

    def update(self) -> None:
        """``apt-get update`` of the private lists, at most once a day."""
        stamp = self.root / "updated"
        try:
            if time.time() - stamp.stat().st_mtime < INDEX_MAX_AGE_S:
                return
        except OSError:
            pass
        _run(["apt-get", *self.options, "-q", "update"])
        stamp.touch()

    def packages_file(self, suite: str) -> str:
        """The verified ``Packages`` index of ``suite``, decompressed."""
        fmt = "$(FILENAME)\t$(RELEASE)"
        out = _run(
            ["apt-get", *self.options, "indextargets", "--format", fmt, "Identifier: Packages"]
        )
        for line in out.splitlines():
            filename, _, release = line.partition("\t")
            if release == suite and Path(filename).exists():
                return _run(["/usr/lib/apt/apt-helper", "cat-file", filename])
        raise ArchiveError(f"apt fetched no Packages index of {suite} from {self.mirror.uri}")

    def download(self, packages: tuple[str, ...], into: Path) -> list[Path]:
        """``apt-get download`` of ``name=version`` packages into ``into``; apt checks hashes."""
        # apt-get download drops privileges to _apt, which cannot write into root-only folders;
        # a 0755 download folder owned by root makes it fall back to unsandboxed with a warning.
        into.chmod(0o755)
        _run(["apt-get", *self.options, "-q", "download", *packages], cwd=into)
        return sorted(into.glob("*.deb"))


@contextmanager
def private_apt(cache: Path) -> Iterator[PrivateApt]:
    """The private apt under ``cache/apt``, locked (xdist workers share the cache)."""
    apt = PrivateApt(cache / "apt", machine_mirror())
    apt.root.mkdir(parents=True, exist_ok=True)
    with (apt.root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        apt.prepare()
        yield apt


# --------------------------------------------------------------------------- the kernels


def _parse(packages: str) -> dict[str, str]:
    """Kernel package name -> version, from a ``Packages`` index."""
    out: dict[str, str] = {}
    for stanza in packages.split("\n\n"):
        m = re.search(r"^Package:\s*(\S+)", stanza, re.M)
        v = re.search(r"^Version:\s*(\S+)", stanza, re.M)
        if m and v and m.group(1).startswith(_KEEP) and "-dbg" not in m.group(1):
            out[m.group(1)] = v.group(1)
    return out


def index(suite: str, cache: Path) -> dict[str, str]:
    """Kernel packages of ``suite`` (name -> version), refreshed through apt once a day."""
    saved_path = cache / f"archive-{suite}.json"
    with private_apt(cache) as apt:
        apt.update()
        stamp = (apt.root / "updated").stat().st_mtime
        try:
            saved = json.loads(saved_path.read_text())
            if saved["updated"] == stamp and saved["mirror"] == apt.mirror.uri:
                return dict(saved["packages"])
        except (OSError, ValueError, KeyError):
            pass
        packages = _parse(apt.packages_file(suite))
        tmp = saved_path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"updated": stamp, "mirror": apt.mirror.uri, "packages": packages})
        )
        tmp.rename(saved_path)
        return packages


def kernels_in(suite: str, idx: dict[str, str]) -> list[ArchiveKernel]:
    """The generic amd64 kernels of an index, in either packaging layout."""
    found: list[ArchiveKernel] = []
    for name, version in idx.items():
        if any(f in name for f in _OTHER_FLAVOURS):
            continue
        if re.match(r"^linux-image-\d[\w.+~-]*-amd64-unsigned$", name):
            found.append(ArchiveKernel(suite, name, version, (f"{name}={version}",)))
            continue
        m = re.match(r"^linux-binary-(\d[\w.+~-]*-amd64)$", name)
        if m:
            parts = [name, f"linux-modules-{m.group(1)}", f"linux-base-{m.group(1)}"]
            if all(p in idx for p in parts):
                pinned = tuple(f"{p}={idx[p]}" for p in parts)
                found.append(ArchiveKernel(suite, name, version, pinned))
    return found


def kernels(suite: str, cache: Path) -> list[ArchiveKernel]:
    """The generic amd64 kernels ``suite`` offers on the machine's mirror."""
    return kernels_in(suite, index(suite, cache))


def download(packages: tuple[str, ...], cache: Path, into: Path) -> list[Path]:
    """Fetch ``packages`` (``name=version``) through the private apt into ``into``."""
    with private_apt(cache) as apt:
        apt.update()
        debs = apt.download(packages, into)
    if len(debs) < len(packages):
        raise ArchiveError(f"apt-get download fetched {len(debs)} of {len(packages)} package(s)")
    return debs
