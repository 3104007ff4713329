"""TLS for any protocol: the certificate the target serves, and the clients' context.

The certificate is self-signed for ``localhost``, ``127.0.0.1`` and ``::1``, made with
``openssl req`` (Debian's openssl) into the build cache on first use and made again when it is
a week old.  Each test's server gets a copy in its workdir, through the ``{tls_cert}`` and
``{tls_key}`` placeholders: the workdir is what a runner hands to the server's user (the Docker
runner's container runs as ``nobody``, and the cache's key is readable by its owner only).
Clients do not verify it: the harness tests what a server does with its connections, not who
it is.  Faults stay at the TCP level: a RST cuts a handshake or a record as it cuts a plaintext
request.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

from afterclose.harness.errors import AftercloseError

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
TLS_SUBDIR = "tls"
VALID_DAYS = 30
REMAKE_AFTER_S = 7 * 86400


class TlsSetupError(AftercloseError):
    """The harness could not make its TLS certificate."""


def _folder() -> Path:
    from afterclose.harness.compile import cache_root

    return cache_root() / "tls"


def certificate() -> tuple[Path, Path]:
    """``(cert, key)``: PEM files of the run's self-signed certificate."""
    folder = _folder()
    cert, key = folder / CERT_FILE, folder / KEY_FILE
    with contextlib.suppress(FileNotFoundError):
        if time.time() - cert.stat().st_mtime < REMAKE_AFTER_S and key.is_file():
            return cert, key
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Made in a fresh folder, then renamed into place: a concurrent run (xdist) sees either
    # no folder or a whole pair, never a key that does not match its certificate.
    fresh = Path(tempfile.mkdtemp(prefix="tls-", dir=folder.parent))
    try:
        _make(fresh / CERT_FILE, fresh / KEY_FILE)
        if folder.exists():
            stale = Path(tempfile.mkdtemp(prefix="tls-old-", dir=folder.parent))
            with contextlib.suppress(OSError):
                os.rename(folder, stale / "tls")
            shutil.rmtree(stale, ignore_errors=True)
        with contextlib.suppress(OSError):  # another run put its pair in place first
            os.rename(fresh, folder)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return cert, key


def _make(cert: Path, key: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise TlsSetupError(
            "tls = true needs openssl to make the target's certificate",
            hint="apt-get install -y openssl",
        )
    cmd = [
        openssl, "req", "-x509", "-newkey", "rsa:2048",
        "-nodes", "-sha256",
        "-days", str(VALID_DAYS), "-subj", "/CN=localhost",
        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
        "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise TlsSetupError(
            f"openssl req failed with exit status {proc.returncode}",
            details=proc.stderr[-2000:],
            hint=" ".join(cmd),
        )


def certificate_in(workdir: Path) -> tuple[Path, Path]:
    """``(cert, key)``: a copy of the run's pair in ``workdir/tls/``, for one test's server."""
    cert, key = certificate()
    folder = workdir / TLS_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    copies = folder / CERT_FILE, folder / KEY_FILE
    for source, copy in zip((cert, key), copies, strict=True):
        shutil.copyfile(source, copy)
    copies[1].chmod(0o600)
    return copies


@functools.cache
def client_context() -> ssl.SSLContext:
    """The clients' context: any TLS version the server offers, no verification."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for the harness's own TLS test servers."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx
