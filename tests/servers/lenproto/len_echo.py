"""A correct server of the length-prefixed protocol in docs/protocols.md, on asyncio:
``len_echo.py HOST PORT``.  Each frame is echoed; a frame over 1 MiB closes the connection.
Prints READY once listening."""

from __future__ import annotations

import asyncio
import struct
import sys


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            (size,) = struct.unpack("!I", await reader.readexactly(4))
            if size > 1 << 20:
                break
            writer.write(struct.pack("!I", size) + await reader.readexactly(size))
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(echo, sys.argv[1], int(sys.argv[2]))
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
