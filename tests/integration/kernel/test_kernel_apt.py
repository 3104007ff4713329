"""Kernels from suites the machine's apt lacks come through apt itself, on the machine's mirror.

The mirror here is a signed local file mirror that the test builds, named by a machine apt
configuration (``APT_CONFIG``) that afterclose has never seen: nothing of the code's own may
point at it, and the machine's ``/etc/apt`` and ``/var/lib/apt`` must come out unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import capabilities
import procs
import pytest

from afterclose.harness.kernel import archive, fetch

pytestmark = capabilities.requires("apt-cache", "gpg", "dpkg-scanpackages")

SPLIT = "9.9.1+deb99-amd64"
SINGLE = "9.8.1+deb98-amd64"


def _deb(pool: Path, name: str, version: str, files: dict[str, bytes]) -> None:
    root = pool / f"{name}_src"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "DEBIAN").mkdir(parents=True, exist_ok=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: amd64\n"
        "Maintainer: afterclose tests <tests@localhost>\nDescription: a test kernel package\n"
    )
    subprocess.run(
        ["dpkg-deb", "--build", "--root-owner-group", str(root), str(pool / f"{name}.deb")],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(root)


def _suite(mirror: Path, suite: str, gnupg: dict[str, str]) -> None:
    index = mirror / "dists" / suite / "main" / "binary-amd64"
    index.mkdir(parents=True)
    packages = subprocess.run(
        ["dpkg-scanpackages", "--multiversion", f"pool/{suite}"],
        cwd=mirror,
        check=True,
        capture_output=True,
    ).stdout
    (index / "Packages").write_bytes(packages)
    digest = hashlib.sha256(packages).hexdigest()
    release = mirror / "dists" / suite / "Release"
    release.write_text(
        f"Origin: Debian\nLabel: Debian\nSuite: {suite}\nCodename: {suite}\n"
        "Architectures: amd64\nComponents: main\n"
        f"SHA256:\n {digest} {len(packages)} main/binary-amd64/Packages\n"
    )
    subprocess.run(
        ["gpg", "--batch", "--yes", "--clearsign", "-o", str(release.with_name("InRelease")),
         str(release)],
        env=gnupg, check=True, capture_output=True,
    )  # fmt: skip


def _machine_tree_digest() -> str:
    h = hashlib.sha256()
    for top in ("/etc/apt", "/var/lib/apt"):
        for dirpath, dirnames, filenames in sorted(os.walk(top)):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath, name)
                h.update(str(path).encode())
                if path.is_file() and not path.is_symlink():
                    h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture
def file_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A signed file mirror with sid (a split 7.x-style kernel) and trixie (a single package),
    named by a machine apt configuration whose sources list only 'stable' on it."""
    gnupg = {**os.environ, "GNUPGHOME": str(tmp_path / "gnupg")}
    (tmp_path / "gnupg").mkdir(mode=0o700)
    try:
        subprocess.run(
            ["gpg", "--batch", "--passphrase", "", "--quick-gen-key",
             "afterclose tests <tests@localhost>", "default", "default", "never"],
            env=gnupg, check=True, capture_output=True,
        )  # fmt: skip
        key = tmp_path / "mirror-key.gpg"
        key.write_bytes(subprocess.run(["gpg", "--export"], env=gnupg, check=True,
                                       capture_output=True).stdout)  # fmt: skip
        mirror = tmp_path / "mirror"
        image = b"not a real kernel image\n"
        _deb(mirror / "pool/sid", f"linux-binary-{SPLIT}", "9.9.1-1",
             {f"usr/lib/modules/{SPLIT}/vmlinuz": image})  # fmt: skip
        _deb(mirror / "pool/sid", f"linux-modules-{SPLIT}", "9.9.1-1",
             {f"usr/lib/modules/{SPLIT}/modules.builtin": b"kernel/fs/9p/9p.ko\n"})  # fmt: skip
        _deb(mirror / "pool/sid", f"linux-base-{SPLIT}", "9.9.1-1",
             {f"usr/lib/modules/{SPLIT}/config": b"CONFIG_NET_9P=y\n"})  # fmt: skip
        config = b"CONFIG_NET_9P=y\n"
        _deb(mirror / "pool/trixie", f"linux-image-{SINGLE}-unsigned", "9.8.1-1",
             {f"boot/vmlinuz-{SINGLE}": image, f"boot/config-{SINGLE}": config})  # fmt: skip
        for suite in archive.SUITES:
            _suite(mirror, suite, gnupg)
    finally:
        # Key generation and signing start a gpg-agent for this home, a daemon that would
        # outlive the test.
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=gnupg, check=False,
                       capture_output=True)  # fmt: skip
    # _apt, which apt-get drops to, must be able to read the mirror and the key.
    for path in (tmp_path, *tmp_path.rglob("*")):
        path.chmod(path.stat().st_mode | 0o055 | (0o011 if path.is_dir() else 0))

    sources = tmp_path / "machine.list"
    sources.write_text(f"deb [signed-by={key}] file:{mirror} stable main\n")
    (tmp_path / "machine-parts.d").mkdir()
    conf = tmp_path / "machine-apt.conf"
    conf.write_text(
        f'Dir::Etc::SourceList "{sources}";\nDir::Etc::SourceParts "{tmp_path}/machine-parts.d";\n'
    )
    monkeypatch.setenv("APT_CONFIG", str(conf))
    monkeypatch.setenv("AFTERCLOSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(archive.MIRROR_ENV, raising=False)
    # What apt offers is cached per process: this machine's apt is not the test's, before or after.
    fetch.debian_candidates.cache_clear()
    yield mirror
    fetch.debian_candidates.cache_clear()


def test_the_mirror_is_the_one_the_machine_apt_names(file_mirror: Path) -> None:
    mirror = archive.machine_mirror()
    assert mirror.uri == f"file:{file_mirror}"
    assert mirror.signed_by is not None and mirror.signed_by.endswith("mirror-key.gpg")
    assert mirror.named_in.endswith("machine.list:1")


def test_a_version_only_another_suite_has_is_resolved_and_fetched_through_apt(
    file_mirror: Path,
) -> None:
    before = _machine_tree_digest()
    split = fetch.resolve("9.9")
    assert (split.suite, split.package, split.label) == ("sid", f"linux-binary-{SPLIT}", "9.9.1")
    assert split.archive_packages == tuple(
        f"linux-{part}-{SPLIT}=9.9.1-1" for part in ("binary", "modules", "base")
    )
    kernel = fetch.fetch(split)
    assert kernel.release == SPLIT and kernel.image.read_bytes() == b"not a real kernel image\n"
    assert kernel.config_value("NET_9P") == "y"

    single = fetch.resolve("9.8")
    assert (single.suite, single.package) == ("trixie", f"linux-image-{SINGLE}-unsigned")
    assert fetch.fetch(single).release == SINGLE
    # apt kept its lists in afterclose's cache, not in the machine's.
    lists = Path(os.environ["AFTERCLOSE_CACHE_DIR"]) / "kernels/apt/state/lists"
    assert any(p.name.endswith("_dists_sid_InRelease") for p in lists.iterdir())
    assert _machine_tree_digest() == before


def test_a_mirror_with_a_bad_signature_is_refused_by_apt(file_mirror: Path) -> None:
    inrelease = file_mirror / "dists/sid/InRelease"
    # Clear-signed text ignores trailing blanks: change a word the signature covers.
    inrelease.write_text(inrelease.read_text().replace("Codename: sid", "Codename: sie"))
    with pytest.raises(fetch.KernelError) as err:
        fetch.resolve("9.9")
    text = err.value.render()
    assert "--kernel=9.9" in text and "sid, trixie" in text
    assert "apt-get" in text and "update" in text and "BADSIG" in text  # apt's own words
    assert archive.MIRROR_ENV in text


def test_a_version_no_suite_has_names_the_suites_tried(file_mirror: Path) -> None:
    with pytest.raises(fetch.KernelError) as err:
        fetch.resolve("9.7")
    text = err.value.render()
    assert "versions Debian sid offers: 9.9.1" in text
    assert "versions Debian trixie offers: 9.8.1" in text


def test_the_signed_mirror_leaves_no_gpg_agent(file_mirror: Path) -> None:
    home = str(file_mirror.parent / "gnupg")
    until = time.monotonic() + 5  # gpgconf asks the agent to exit; it may take a moment
    while (left := procs.with_argument(home)) and time.monotonic() < until:
        time.sleep(0.05)
    assert left == []
