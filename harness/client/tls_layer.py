"""TLS over a connection's own raw socket, in memory.

The connection keeps its raw socket (the faults need exact FINs and RSTs), so TLS runs on an
``ssl.SSLObject`` between two memory buffers: what it writes to ``outgoing`` the connection
sends as it sends plaintext, what arrives goes into ``incoming``.  A fault that cuts bytes
therefore cuts TLS records and handshakes at the TCP level, where it cuts a plaintext request.
"""

from __future__ import annotations

import ssl

from afterclose.harness.protocols.tls import client_context


class TlsLayer:
    def __init__(self, host: str) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = client_context().wrap_bio(self.incoming, self.outgoing, server_hostname=host)
        self.handshaken = False

    def step(self) -> bool:
        """Advance the handshake: True once done; what to send is then in ``outgoing``.
        Raises ``ssl.SSLError`` when the server broke it."""
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        self.handshaken = True
        return True

    def wire(self) -> bytes:
        """The bytes TLS wants sent now."""
        return self.outgoing.read()

    def encrypt(self, data: bytes) -> bytes:
        """``data`` as TLS records (plus anything TLS had waiting)."""
        if data:
            self.obj.write(data)
        return self.outgoing.read()

    def feed(self, raw: bytes) -> None:
        """Ciphertext that arrived; b"" at the peer's FIN."""
        if raw:
            self.incoming.write(raw)
        else:
            self.incoming.write_eof()

    def decrypt(self, max_bytes: int) -> bytes | None:
        """Plaintext; b"" at the end of the stream (close_notify, or a FIN, even mid-record:
        the connection sees it as the peer's close); None while more ciphertext is needed.
        Other ``ssl.SSLError``s (records that are not TLS) pass through."""
        try:
            return self.obj.read(max_bytes)
        except ssl.SSLWantReadError:
            return b"" if self.incoming.eof else None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""
