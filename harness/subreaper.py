"""The supervisor between the harness and a process target: nothing the target starts
outlives the harness.

Run as ``python3 -I -S subreaper.py FD PARENT [KEY=VALUE ...] -- ARGV...`` (standard library
only, so it starts in milliseconds and loads no preload library: the target's environment
additions come as ``KEY=VALUE`` arguments and reach only the target).

A die-with-parent signal reaches only the direct child of the harness; what that child forks
or daemonizes is reparented to PID 1 and runs on.  This supervisor is a child subreaper
(PR_SET_CHILD_SUBREAPER): every orphan below it, a double-forked daemon included, is
reparented to it instead of to PID 1, so it can always find and kill its whole subtree.  It
does so when

* the harness closes its end of the socket ``FD`` (``ProcessServer.stop``), or dies, by any
  signal, SIGKILL included (the kernel closes the socket; and PR_SET_PDEATHSIG wakes us);
* its parent changes (the harness died before the prctl took effect).

It writes ``started PID``, then ``exited CODE`` or ``signaled SIG`` for the target's main
process on ``FD``, and exits once its subtree is empty and the harness let go of it.
It handles (not ignores: an ignored signal would stay ignored in the target after exec) the
signals a stop or a fault sends to the target's process group, so those reach only the
target.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# Signals the harness or a fault sends to the whole group; SIGCHLD wakes the loop.
_HANDLED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGPIPE,
    signal.SIGALRM,
    signal.SIGCHLD,
)
_POLL_S = 0.5


def _noop(signum: int, frame: object) -> None:
    """Wakes the loop through the wakeup fd; the loop itself decides."""


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                text = f.read()
        except OSError:
            continue
        ppid = int(text[text.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out: list[int] = []
    stack = list(children.get(root, ()))
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


def kill_subtree() -> None:
    """SIGKILL everything below us until nothing is left; a process forking meanwhile is
    caught on the next pass, and orphans of killed parents come to us (the subreaper)."""
    me = os.getpid()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = descendants(me)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return
        if not pids:
            time.sleep(0.01)


def main(argv: list[str]) -> int:
    fd, parent = int(argv[0]), int(argv[1])
    split = argv.index("--")
    extra = dict(item.split("=", 1) for item in argv[2:split])
    command = argv[split + 1 :]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGHUP, 0, 0, 0)
    link = socket.socket(fileno=fd)
    if os.getppid() != parent:
        return 0
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for signum in _HANDLED:
        signal.signal(signum, _noop)
    try:
        # Python ignores SIGPIPE and SIGXFSZ; an ignored signal stays ignored across exec.
        main_pid = os.posix_spawnp(
            command[0],
            command,
            {**os.environ, **extra},
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, *_HANDLED),
        )
    except OSError as exc:
        link.sendall(f"failed {exc.errno}\n".encode())
        return 127
    link.sendall(f"started {main_pid}\n".encode())
    main_done = False
    harness_gone = False
    while True:
        try:
            while True:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                if pid == main_pid and not main_done:
                    main_done = True
                    if os.WIFSIGNALED(status):
                        line = f"signaled {os.WTERMSIG(status)}\n"
                    else:
                        line = f"exited {os.waitstatus_to_exitcode(status)}\n"
                    try:
                        link.sendall(line.encode())
                    except OSError:
                        harness_gone = True
        except ChildProcessError:
            if harness_gone:
                return 0
        if harness_gone or os.getppid() != parent:
            kill_subtree()
            return 0
        ready, _, _ = select.select([link.fileno(), wake_r], [], [], _POLL_S)
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
        if link.fileno() in ready:
            try:
                harness_gone = link.recv(64) == b""
            except OSError:
                harness_gone = True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
