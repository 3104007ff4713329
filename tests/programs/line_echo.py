"""A correct line-echo server on asyncio: ``line_echo.py HOST PORT [CERT KEY]``.

Each line received is written back as it is; with a certificate and key it speaks TLS.  Prints
READY once listening.
"""

from __future__ import annotations

import asyncio
import ssl
import sys


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()


async def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    context = None
    if len(sys.argv) == 5 and sys.argv[3]:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(sys.argv[3], sys.argv[4])
    server = await asyncio.start_server(echo, host, port, ssl=context, limit=1 << 20)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
