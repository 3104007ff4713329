"""The guest's initramfs: a static init (``guest_init.c``) and the modules it loads.

Built by the harness on first use for each kernel and cached; the archive is an uncompressed
``newc`` cpio, which every kernel unpacks without a decompressor built in.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import os
import stat
from pathlib import Path

from afterclose.harness import compile as cbuild
from afterclose.harness.kernel import modules as kmodules
from afterclose.harness.kernel.fetch import Kernel, KernelError

INIT_SOURCE = "guest_init.c"


def _init_binary() -> Path:
    src = Path(str(importlib.resources.files("afterclose.harness.kernel") / INIT_SOURCE))
    spec = cbuild.CBuild(
        name="afterclose-guest-init",
        sources=(src,),
        cflags=("-O2", "-Wall", "-Werror"),
        ldflags=("-static",),
    )
    return cbuild.build(spec)


class CpioWriter:
    """Just enough of the ``newc`` format: directories, regular files and device nodes."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        fields = (
            self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
            0, 0, rdev[0], rdev[1], len(name) + 1, 0,
        )  # fmt: skip
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self.buf.write(name.encode() + b"\0")
        self._pad()
        self.buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def build(kernel: Kernel) -> Path:
    """The initramfs for ``kernel``; raises KernelError if the guest could not see the host."""
    selection = kmodules.select(kmodules.ModuleTree(kernel.modules) if kernel.modules else None)
    _check_required(kernel, selection)
    init = _init_binary().read_bytes()
    h = hashlib.sha256(init)
    for name, data in selection:
        h.update(name.encode())
        h.update(hashlib.sha256(data).digest())
    out = kernel.image.parent.parent / f"initramfs-{h.hexdigest()[:16]}.cpio"
    if kernel.source.path is not None and kernel.source.path.suffix != ".deb":
        # A user's own kernel folder stays untouched: its initramfs goes to the cache.
        out = cbuild.cache_root() / "kernels" / "initramfs" / out.name
    if out.is_file():
        return out
    cpio = CpioWriter()
    for d in ("dev", "proc", "sys", "lower", "upper", "newroot", "modules"):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)
    cpio.file("init", init, 0o755)
    for name, data in selection:
        cpio.file(f"modules/{name}.ko", data)
    cpio.file("modules/order", "".join(f"{n}.ko\n" for n, _ in selection).encode())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    tmp.write_bytes(cpio.finish())
    tmp.rename(out)
    return out


# What the guest needs from the kernel's config, and the module that carries each.
REQUIRED_CONFIG = {
    "VIRTIO_PCI": "virtio_pci",
    "NET_9P": "9pnet",
    "NET_9P_VIRTIO": "9pnet_virtio",
    "9P_FS": "9p",
    "OVERLAY_FS": "overlay",
}


def _check_required(kernel: Kernel, selection: list[tuple[str, bytes]]) -> None:
    """KernelError if the config says the guest could not mount the host's files.

    With no config (a bare image of the user's) nothing is known: the boot itself tells, and
    a failed mount in the guest ends it with the init's message on the console."""
    if kernel.config is None:
        return
    loaded = {name for name, _ in selection}
    problems = []
    for symbol, module in REQUIRED_CONFIG.items():
        value = kernel.config_value(symbol)
        if value in (None, "n"):
            problems.append(f"CONFIG_{symbol} is not set")
        elif value == "m" and module not in loaded:
            problems.append(f"CONFIG_{symbol}=m but {module}.ko is not in the package")
    if problems:
        raise KernelError(
            f"kernel {kernel.release} ({kernel.source.describe()}) cannot share the host's "
            f"files with the guest: {'; '.join(problems)}",
            hint="use Debian's generic flavour (linux-image-*-amd64-unsigned), not cloud or rt;"
            " a kernel of your own needs VIRTIO_PCI, NET_9P, NET_9P_VIRTIO, 9P_FS and "
            "OVERLAY_FS",
        )
