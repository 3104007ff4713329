"""Kernels for the guest: a version, a Debian package name, a ``.deb``, or an unpacked kernel.

``resolve`` turns what the user typed into a ``KernelSource`` without downloading anything (it
only asks apt's index), so a typo fails before any test runs.  ``fetch`` then downloads and
unpacks the package once into the cache, keeping only the image, its config and the few
modules the guest needs.

Debian ships three amd64 flavours; only the generic one carries 9p, which the guest needs to
see the host's files (the ``cloud`` flavour has ``# CONFIG_NET_9P is not set``), so a bare
version picks generic images.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from afterclose.harness import compile as cbuild
from afterclose.harness.errors import AftercloseError
from afterclose.harness.kernel import archive
from afterclose.harness.kernel import modules as kmodules

VERSION_RE = re.compile(r"^\d+(\.\d+){0,2}$")
PACKAGE_RE = re.compile(r"^linux-image-[0-9][\w.+~-]*$")
# Generic amd64 images: unsigned first (same kernel as the signed one, no Secure Boot wrapper).
GENERIC_PATTERNS = (
    r"^linux-image-[0-9].*-amd64-unsigned$",
    r"^linux-image-[0-9][0-9.]*-[0-9]+-amd64$",
    r"^linux-image-[0-9][0-9.]*\+deb[0-9]+-amd64$",
)
FLAVOURS_WITHOUT_9P = ("-cloud-", "-rt-")


class KernelError(AftercloseError):
    """A kernel could not be found, fetched or booted."""


@dataclass(frozen=True)
class KernelSource:
    """Where a kernel comes from, and the short name used in test ids (``6.1.192``)."""

    spec: str
    label: str
    package: str | None = None
    version: str | None = None  # Debian version of the package
    path: Path | None = None  # a .deb, an unpacked package folder or a kernel image
    suite: str | None = None  # a Debian suite apt does not list: fetched by a private apt
    archive_packages: tuple[str, ...] = ()  # name=version of each package to download

    def describe(self) -> str:
        if self.package:
            where = f"Debian {self.suite} " if self.suite else "Debian "
            return f"{where}{self.package} {self.version}"
        return str(self.path)


@dataclass(frozen=True)
class Kernel:
    """An unpacked kernel in the cache: the image, its release, config and modules folder."""

    source: KernelSource
    image: Path
    release: str
    config: Path | None
    modules: Path | None  # lib/modules/<release>, or None for a kernel with everything built in

    def config_value(self, name: str) -> str | None:
        """``y``/``m``/a value for CONFIG_name, ``n`` if unset, None if the config is unknown."""
        if self.config is None:
            return None
        text = self.config.read_text(errors="replace")
        m = re.search(rf"^CONFIG_{name}=(.*)$", text, re.M)
        if m:
            return m.group(1).strip('"')
        return "n" if re.search(rf"^# CONFIG_{name} is not set$", text, re.M) else None


def _upstream(debian_version: str) -> str:
    """``6.1.192-2`` → ``6.1.192``; ``6.12.117-1~deb12u1`` → ``6.12.117``."""
    return debian_version.split("-", 1)[0].split("+", 1)[0]


def _apt(args: list[str]) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError:
        raise KernelError(
            f"{args[0]} not found: kernels are fetched as Debian packages",
            hint="run on Debian or Ubuntu, or pass --kernel=/path/to/vmlinuz (or a .deb)",
        ) from None
    except subprocess.TimeoutExpired:
        raise KernelError(f"{' '.join(args)} did not finish in 120 s") from None
    if proc.returncode != 0:
        raise KernelError(
            f"{' '.join(args)} failed (exit {proc.returncode})",
            details=proc.stderr.strip()[-2000:],
            hint="check the apt sources (apt-get update) or pass a kernel path",
        )
    return proc.stdout


@functools.cache
def debian_candidates() -> dict[str, str]:
    """Generic amd64 kernel packages apt knows, package name → Debian version."""
    names = [
        name
        for name in _apt(["apt-cache", "pkgnames", "linux-image-"]).split()
        if any(re.match(p, name) for p in GENERIC_PATTERNS)
        and not any(f in name for f in FLAVOURS_WITHOUT_9P)
    ]
    return _versions(sorted(names)) if names else {}


def _versions(packages: list[str]) -> dict[str, str]:
    out = _apt(["apt-cache", "show", "--no-all-versions", *packages])
    versions: dict[str, str] = {}
    package = None
    for line in out.splitlines():
        if line.startswith("Package: "):
            package = line.split(": ", 1)[1].strip()
        elif line.startswith("Version: ") and package:
            versions[package] = line.split(": ", 1)[1].strip()
    return versions


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version))


def resolve(spec: str) -> KernelSource:
    """What ``--kernel=spec`` means; raises KernelError naming what was tried."""
    spec = spec.strip()
    path = Path(spec).expanduser()
    if "/" in spec or path.exists():
        if not path.exists():
            raise KernelError(
                f"--kernel={spec}: no such file or folder",
                hint="give a kernel version (6.1, 6.12), a Debian package name "
                "(linux-image-...), a .deb, an unpacked package folder or a vmlinuz path",
            )
        return KernelSource(spec=spec, label=_path_label(path), path=path.resolve())
    if PACKAGE_RE.match(spec):
        found = debian_candidates()
        if spec not in found and _known_package(spec):
            found = _versions([spec])
        if spec not in found:
            raise KernelError(
                f"--kernel={spec}: apt knows no package of that name "
                f"(tried: apt-cache pkgnames {spec})",
                hint="list kernels with `afterclose kernels`; run apt-get update if the "
                "index is old",
            )
        version = found[spec]
        return KernelSource(spec=spec, label=_upstream(version), package=spec, version=version)
    if not VERSION_RE.match(spec):
        raise KernelError(
            f"--kernel={spec!r} is not a kernel version, a Debian package or a path",
            hint="examples: --kernel=6.1, --kernel=6.12.117, "
            "--kernel=linux-image-6.1.0-56-amd64-unsigned, --kernel=./vmlinuz",
        )
    candidates = debian_candidates()
    matching = {
        pkg: ver
        for pkg, ver in candidates.items()
        if _upstream(ver) == spec or _upstream(ver).startswith(spec + ".")
    }
    if not matching:
        return _from_archive(spec, candidates)
    best = _best(matching)
    return KernelSource(
        spec=spec, label=_upstream(matching[best]), package=best, version=matching[best]
    )


def _from_archive(spec: str, apt_candidates: dict[str, str]) -> KernelSource:
    """A version apt does not have: the newest match in the archive's suites, or KernelError
    naming everything that was tried."""
    found: list[archive.ArchiveKernel] = []
    offered: dict[str, list[str]] = {}
    problems: list[str] = []
    for suite in archive.SUITES:
        try:
            kernels = archive.kernels(suite, kernel_cache())
        except archive.ArchiveError as exc:
            problems.append(str(exc))
            continue
        offered[suite] = sorted({_upstream(k.version) for k in kernels}, key=_version_key)
        found += [
            k
            for k in kernels
            if _upstream(k.version) == spec or _upstream(k.version).startswith(spec + ".")
        ]
    if found:
        best = max(found, key=lambda k: (_version_key(k.version), k.suite == archive.SUITES[0]))
        return KernelSource(
            spec=spec,
            label=_upstream(best.version),
            package=best.name,
            version=best.version,
            suite=best.suite,
            archive_packages=best.packages,
        )
    have = sorted({_upstream(v) for v in apt_candidates.values()}, key=_version_key)
    tried = "apt-cache pkgnames linux-image-, names matching " + " or ".join(GENERIC_PATTERNS)
    suites = ", ".join(archive.SUITES)
    details = ["versions apt offers: " + (", ".join(have) if have else "none")]
    details += [f"versions Debian {s} offers: {', '.join(v) or 'none'}" for s, v in offered.items()]
    details += [f"apt (private lists of {suites}): {p}" for p in problems]
    hint = "pick one of those versions, or pass a .deb or a kernel image path"
    if problems:
        hint = (
            f"apt could not list {suites} (see above): check the machine's apt sources and "
            f"proxy, or name a Debian mirror with {archive.MIRROR_ENV}=URI; or pass a .deb "
            "or a kernel image path"
        )
    raise KernelError(
        f"--kernel={spec}: no Debian kernel package of version {spec} (tried: {tried}; then "
        f"{suites} on the machine's Debian mirror, through apt; generic amd64 flavour only)",
        details="\n".join(details),
        hint=hint,
    )


def _best(packages: dict[str, str]) -> str:
    """The newest version; for one version, the unsigned package (the same kernel as the
    signed one, without the Secure Boot wrapper)."""
    return max(packages, key=lambda p: (_version_key(packages[p]), p.endswith("-unsigned")))


def _known_package(name: str) -> bool:
    return name in _apt(["apt-cache", "pkgnames", name]).split()


def _path_label(path: Path) -> str:
    m = re.search(r"(\d+\.\d+(?:\.\d+)?)", path.name)
    return m.group(1) if m else path.name


def kernel_cache() -> Path:
    return cbuild.cache_root() / "kernels"


def fetch(source: KernelSource) -> Kernel:
    """Download and unpack ``source`` once (under a lock: xdist workers share the cache)."""
    if source.path is not None and source.path.suffix != ".deb":
        return _from_tree_or_image(source, source.path)
    key = source.package or source.path.stem  # type: ignore[union-attr]
    if source.version:
        key += "_" + source.version
    folder = kernel_cache() / re.sub(r"[^\w.+-]", "_", key)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tree = folder / "tree"
        # The marker names the modules kept: a newer module list unpacks the package again.
        wanted = ",".join((*kmodules.REQUIRED, *kmodules.OPTIONAL))
        marker = folder / ".complete"
        if not marker.exists() or marker.read_text() != wanted:
            shutil.rmtree(tree, ignore_errors=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                if source.archive_packages:
                    try:
                        debs = archive.download(source.archive_packages, kernel_cache(), Path(tmp))
                    except archive.ArchiveError as exc:
                        raise KernelError(
                            f"--kernel={source.spec}: downloading {source.describe()} failed",
                            details=str(exc),
                            hint="check the machine's apt sources and proxy (apt-get update "
                            f"should work), or name a Debian mirror with {archive.MIRROR_ENV}",
                        ) from None
                else:
                    debs = [source.path if source.path else _download(source, Path(tmp))]
                for deb in debs:
                    _unpack(deb, Path(tmp) / "x")
                _keep_needed(Path(tmp) / "x", tree)
            marker.write_text(wanted)
    return _from_tree_or_image(source, tree)


def _download(source: KernelSource, into: Path) -> Path:
    assert source.package and source.version
    # apt-get download drops privileges to _apt, which cannot write into root-only folders;
    # a 0755 download folder owned by root makes it fall back to unsandboxed with a warning.
    into.chmod(0o755)
    try:
        proc = subprocess.run(
            ["apt-get", "download", f"{source.package}={source.version}"],
            cwd=into,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise KernelError(f"downloading {source.package} took more than 900 s") from None
    debs = list(into.glob("*.deb"))
    if proc.returncode != 0 or not debs:
        raise KernelError(
            f"apt-get download {source.package}={source.version} failed (exit {proc.returncode})",
            details=proc.stderr.strip()[-2000:],
            hint="the apt index may be older than the archive: run apt-get update",
        )
    return debs[0]


def _unpack(deb: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            ["dpkg-deb", "-x", str(deb), str(into)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except FileNotFoundError:
        raise KernelError(
            "dpkg-deb not found: it unpacks Debian kernel packages",
            hint="install dpkg, or pass an unpacked kernel folder or a vmlinuz path",
        ) from None
    if proc.returncode != 0:
        raise KernelError(f"dpkg-deb -x {deb} failed", details=proc.stderr.strip()[-2000:])


def _keep_needed(unpacked: Path, tree: Path) -> None:
    """Keep the image, its config and only the modules a guest loads (decompressed)."""
    tree.mkdir(parents=True)
    (tree / "boot").mkdir()
    for f in (unpacked / "boot").glob("*"):
        if f.name.startswith(("vmlinuz-", "config-")):
            shutil.move(str(f), tree / "boot" / f.name)
    for root in (unpacked / "lib" / "modules", unpacked / "usr" / "lib" / "modules"):
        for release_dir in sorted(root.glob("*")) if root.is_dir() else []:
            kept = tree / "lib" / "modules" / release_dir.name
            (kept / "kernel").mkdir(parents=True)
            builtin = release_dir / "modules.builtin"
            if builtin.is_file():
                shutil.copy(builtin, kept / "modules.builtin")
            # The 7.x split layout keeps the image and config beside the modules.
            for name, dest in (("vmlinuz", "vmlinuz-"), ("config", "config-")):
                if (release_dir / name).is_file():
                    shutil.move(str(release_dir / name), tree / "boot" / (dest + release_dir.name))
            for name, data in kmodules.select(kmodules.ModuleTree(release_dir)):
                (kept / "kernel" / f"{name}.ko").write_bytes(data)
        if root.is_dir():
            break


def _from_tree_or_image(source: KernelSource, path: Path) -> Kernel:
    if path.is_dir():
        images = sorted((path / "boot").glob("vmlinuz-*")) or sorted(path.glob("vmlinuz-*"))
        if not images:
            raise KernelError(
                f"{path}: no boot/vmlinuz-* in this folder",
                hint="give an unpacked kernel package (dpkg-deb -x) or the image itself",
            )
        image = images[-1]
        release = image.name.removeprefix("vmlinuz-")
        base = path
    else:
        image = path
        release = image.name.removeprefix("vmlinuz-") if image.name.startswith("vmlinuz-") else ""
        base = path.parent.parent if path.parent.name == "boot" else path.parent
    modules = None
    for cand in (base / "lib" / "modules" / release, base / "usr" / "lib" / "modules" / release):
        if release and cand.is_dir():
            modules = cand
    if modules is None and path.is_dir():
        found = sorted((base / "lib" / "modules").glob("*"))
        if found:
            modules, release = found[-1], found[-1].name
    config = image.with_name(f"config-{release}") if release else None
    return Kernel(
        source=source,
        image=image,
        release=release or image.name,
        config=config if config and config.is_file() else None,
        modules=modules,
    )


def cached_kernels() -> list[Path]:
    root = kernel_cache()
    return sorted(p for p in root.glob("*") if (p / ".complete").exists()) if root.is_dir() else []


def host_release() -> str:
    return os.uname().release


def listing() -> list[str]:
    """Lines for ``afterclose kernels``: what apt offers per version, and what is cached."""
    lines = [f"host kernel: {host_release()}"]
    try:
        candidates = debian_candidates()
    except KernelError as exc:
        lines.append(f"apt: {exc.message}")
        candidates = {}
    by_series: dict[str, dict[str, str]] = {}
    for pkg, ver in candidates.items():
        series = ".".join(_upstream(ver).split(".")[:2])
        by_series.setdefault(series, {})[pkg] = ver
    if by_series:
        lines.append("from apt (--kernel=VERSION picks the newest):")
        for series in sorted(by_series, key=_version_key):
            pkg = _best(by_series[series])
            lines.append(f"  {series:<6} {_upstream(by_series[series][pkg]):<10} {pkg}")
    for suite in archive.SUITES:
        try:
            kernels = archive.kernels(suite, kernel_cache())
        except archive.ArchiveError as exc:
            lines.append(f"Debian {suite}: {exc}")
            continue
        lines.append(f"from Debian {suite} through apt (used when apt lacks the version):")
        for k in sorted(kernels, key=lambda k: _version_key(k.version)):
            lines.append(f"  {_upstream(k.version):<17} {k.name}")
    cached = cached_kernels()
    lines.append("cached:" if cached else "cached: none")
    lines.extend(f"  {p.name}" for p in cached)
    return lines
