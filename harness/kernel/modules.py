"""The kernel modules a guest needs, found in a kernel package's module tree.

Debian packages ship no ``modules.dep`` (``depmod`` writes it at install time), so the
dependencies are read from each module's ``.modinfo`` section (``depends=a,b``).  Modules are
compressed with xz from 6.12 on; the guest's init loads them with ``finit_module`` and no
flags, so they are stored decompressed.
"""

from __future__ import annotations

import lzma
import re
from dataclasses import dataclass
from pathlib import Path

# The guest cannot start without these (unless built in): virtio transport, the 9p file
# system the host's root is shared with, and overlay for a writable root on top of it.
REQUIRED = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
# Loaded when the kernel has them: the netem fault's qdiscs and filter.  The guest has no
# module tree of its own, so the kernel cannot load them on demand.
OPTIONAL = ("sch_netem", "sch_prio", "cls_u32")

_DEPENDS_RE = re.compile(rb"(?:^|\x00)depends=([^\x00]*)\x00")


def _norm(name: str) -> str:
    return name.replace("-", "_")


def module_name(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return _norm(name.removesuffix(".ko"))


@dataclass(frozen=True)
class ModuleTree:
    root: Path  # lib/modules/<release>

    def index(self) -> dict[str, Path]:
        return {module_name(p): p for p in (self.root / "kernel").rglob("*.ko*")}

    def builtin(self) -> set[str]:
        listing = self.root / "modules.builtin"
        if not listing.is_file():
            return set()
        return {module_name(Path(line.strip())) for line in listing.read_text().splitlines()}


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix in (".zst", ".gz"):
        import gzip

        if path.suffix == ".gz":
            return gzip.decompress(data)
        raise ValueError(f"{path}: zstd-compressed modules are not supported")
    return data


def depends(data: bytes) -> list[str]:
    m = _DEPENDS_RE.search(data)
    if not m or not m.group(1):
        return []
    return [_norm(d) for d in m.group(1).decode().split(",") if d]


def select(tree: ModuleTree | None) -> list[tuple[str, bytes]]:
    """The modules to load, dependencies first, as (name, decompressed module) pairs; those
    built in or absent are left out (the kernel's config tells whether absence matters)."""
    if tree is None:
        return []
    index = tree.index()
    builtin = tree.builtin()
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin or name not in index:
            return
        seen.add(name)
        data = read_module(index[name])
        for dep in depends(data):
            visit(dep)
        order.append((name, data))

    for name in (*REQUIRED, *OPTIONAL):
        visit(name)
    return order
