"""The watchdog that removes a test process's containers when that process dies without its
exit handlers: SIGKILL, or an abort.

``reaper.start_watchdog`` starts it once per process, in a session of its own (a Ctrl-C of
the terminal does not reach it), with a pipe on its stdin whose other end only the test
process holds.  The kernel closes that end however the process dies; the watchdog reads
EOF and force-removes every container labelled with the process's token.  After a normal
exit the exit handlers have removed them already and it finds none.
"""

from __future__ import annotations

import signal
import sys


def main(argv: list[str]) -> int:
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    token = argv[0]
    while sys.stdin.buffer.read(4096):
        pass
    from afterclose.harness.runners.docker.engine import connect
    from afterclose.harness.runners.docker.reaper import LABEL_PROC, remove_quietly

    client = connect()
    try:
        for item in client.api.containers(all=True, filters={"label": f"{LABEL_PROC}={token}"}):
            remove_quietly(client, item["Id"])
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
