"""A small threaded HTTP/1.1 server for runner tests: ``http_echo.py HOST PORT [MODE]``.

Modes: ``ok`` (answers with its path), ``forker`` (also starts two sleeping grandchildren),
``silent`` (listens but prints nothing), ``die`` (prints to stderr and exits 3 before listening),
``ignore-term`` (ignores SIGTERM), ``daemon`` (double-forks; the daemon, in a session of
its own, serves while the first process sleeps), ``error500`` (answers 500),
``elsewhere`` (ignores the port it is given and listens on one the kernel picks).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODE = "ok"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = (self.path + "\n").encode()
        self.send_response(500 if MODE == "error500" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else "ok"
    global MODE
    MODE = mode
    if mode == "elsewhere":
        port = 0
    if mode == "die":
        print("fatal: cannot open config /etc/nowhere.conf", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "forker":
        for _ in range(2):
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(f"CHILDREN {os.getpid()}", flush=True)
    if mode == "daemon" and os.fork() != 0:
        signal.pause()  # the first process stays, as a shell's ``wait`` would
        return
    if mode == "daemon":
        os.setsid()
        if os.fork() != 0:
            os._exit(0)  # the daemon is reparented to the nearest subreaper
        print(f"DAEMON {os.getpid()}", flush=True)
    server = ThreadingHTTPServer((host, port), Handler)
    if mode != "silent":
        print("READY", flush=True)
    else:
        time.sleep(0)
    server.serve_forever()


if __name__ == "__main__":
    main()
