"""Containers never outlive the test process that started them.

Every container carries labels naming the process that started it.  It is removed when the
test stops it, at interpreter exit (``atexit``), on SIGTERM (a handler removes this process's
containers, then lets the signal kill the process as before), and otherwise by
:func:`sweep_containers` the next time a runner is created, once its owner is dead.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import uuid
import warnings
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from afterclose.harness import procfs
from afterclose.harness.runners.docker.engine import Engine, connect

LABEL = "afterclose"
LABEL_SESSION = "afterclose.session"
LABEL_PID = "afterclose.pid"
LABEL_PID_START = "afterclose.pidstart"
LABEL_PIDNS = "afterclose.pidns"
LABEL_BOOT = "afterclose.boot"
LABEL_PROC = "afterclose.proc"
LABEL_TARGET = "afterclose.target"
LABEL_TEST = "afterclose.test"


# ------------------------------------------------------------------- identity and labels


_PROC_TOKEN = uuid.uuid4().hex
_SESSION: str | None = None


def session_id() -> str:
    """One id per test run: ``AFTERCLOSE_SESSION`` if set, else the id pytest-xdist gives all
    workers of one run, else one generated for this process."""
    global _SESSION
    for var in ("AFTERCLOSE_SESSION", "PYTEST_XDIST_TESTRUNUID"):
        value = os.environ.get(var)
        if value:
            return value
    if _SESSION is None:
        _SESSION = uuid.uuid4().hex[:16]
    return _SESSION


def process_token() -> str:
    """Names this process's containers (renewed in a forked child)."""
    return _PROC_TOKEN


def process_label() -> str:
    """The label filter that matches exactly the containers this process started."""
    return f"{LABEL_PROC}={_PROC_TOKEN}"


def owner_labels(session: str) -> dict[str, str]:
    pid = os.getpid()
    return {
        LABEL: "1",
        LABEL_SESSION: session,
        LABEL_PID: str(pid),
        LABEL_PID_START: procfs.start_time(pid) or "",
        LABEL_PIDNS: procfs.pid_namespace(),
        LABEL_BOOT: procfs.boot_id(),
        LABEL_PROC: _PROC_TOKEN,
    }


def owner_alive(labels: Mapping[str, str]) -> bool | None:
    """Whether the process that started a container still runs; None if we cannot tell
    (it lives in another PID namespace, e.g. a pytest inside another container)."""
    if labels.get(LABEL_BOOT) not in (None, "", procfs.boot_id()):
        return False  # the machine rebooted since: that process is gone
    if labels.get(LABEL_PIDNS, procfs.pid_namespace()) != procfs.pid_namespace():
        return None
    try:
        pid = int(labels[LABEL_PID])
    except (KeyError, ValueError):
        return None
    return procfs.alive(pid, labels.get(LABEL_PID_START) or None)


def containers_using(client: Any, folder: str, *labels: str) -> list[str]:
    """Names of the harness's containers (every one carries ``afterclose=1``; ``labels``
    narrow them, e.g. ``afterclose.target=nginx``) that mount something under ``folder``.
    Each run mounts its own test folders: this tells its containers from those of other runs
    on the machine."""
    listed = client.containers.list(
        all=True, filters={"label": [f"{LABEL}=1", *labels]}, ignore_removed=True
    )
    root = folder.rstrip("/") + "/"
    return [
        str(c.name)
        for c in listed
        if any(f"{m.get('Source', '')}/".startswith(root) for m in c.attrs.get("Mounts", []))
    ]


# ----------------------------------------------------------------- cleanup of leftovers


_REGISTRY_LOCK = threading.RLock()
_LIVE: dict[str, Engine] = {}  # container name -> engine, for every container not removed
_ENGINES: dict[Engine, None] = {}  # engines this process created containers on
_ATEXIT_INSTALLED = False
_SIGTERM_INSTALLED = False


def register(name: str, engine: Engine) -> None:
    with _REGISTRY_LOCK:
        _LIVE[name] = engine
        _ENGINES[engine] = None


def unregister(name: str) -> None:
    with _REGISTRY_LOCK:
        _LIVE.pop(name, None)


def remove_quietly(client: Any, ref: str) -> bool:
    """Force-remove a container (SIGKILL + delete); False if it was not there."""
    import docker.errors

    try:
        client.api.remove_container(ref, force=True)
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as exc:
        # 409: a removal is already in progress (another cleanup path got there first).
        if exc.status_code != 409:
            raise
    return True


def remove_own_containers() -> list[str]:
    """Remove every container this process started and has not removed yet; best effort."""
    with _REGISTRY_LOCK:
        names = dict(_LIVE)
        engines = list(_ENGINES)
    removed: list[str] = []
    for engine in engines:
        try:
            client = engine.client()
            for name, owner in names.items():
                if owner == engine and remove_quietly(client, name):
                    removed.append(name)
                unregister(name)
            # A container whose create call was interrupted before we learnt its name is
            # found by this process's label.
            for item in client.api.containers(all=True, filters={"label": process_label()}):
                if remove_quietly(client, item["Id"]):
                    removed.append(str(item.get("Names", [item["Id"]])[0]).lstrip("/"))
            client.close()
        except Exception as exc:  # an exit handler must not raise
            warnings.warn(f"afterclose: could not remove containers: {exc}", stacklevel=1)
    return removed


def sweep_containers(session_id: str | None = None, *, client: Any = None) -> list[str]:
    """Remove containers labelled ``afterclose=1`` whose starting process is dead (pytest was
    SIGKILLed, or the machine lost power).  Containers without our owner labels, and those
    whose owner lives in another PID namespace, are never touched.  Returns removed names."""
    own = client is None
    if client is None:
        client = connect()
    label_filter = [f"{LABEL}=1"]
    if session_id is not None:
        label_filter.append(f"{LABEL_SESSION}={session_id}")
    removed: list[str] = []
    try:
        for item in client.api.containers(all=True, filters={"label": label_filter}):
            labels: dict[str, str] = item.get("Labels") or {}
            if LABEL_PID not in labels or LABEL_PROC not in labels:
                continue
            if owner_alive(labels) is not False:
                continue
            if remove_quietly(client, item["Id"]):
                removed.append(str((item.get("Names") or [item["Id"]])[0]).lstrip("/"))
    finally:
        if own:
            client.close()
    return removed


def _on_sigterm_factory(previous: Any) -> Callable[[int, FrameType | None], None]:
    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        try:
            remove_own_containers()
        finally:
            if callable(previous):
                previous(signum, frame)
            else:
                # Die of SIGTERM as before, so whoever sent it sees the usual status.
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

    on_sigterm.afterclose = True  # type: ignore[attr-defined]
    return on_sigterm


_WATCHDOG: int | None = None  # this process's end of the watchdog's stdin


def start_watchdog() -> None:
    """Once per process: the watchdog (``watchdog.py``) that removes this process's
    containers if it dies without running its exit handlers (SIGKILL).

    Spawned, not a ``Popen``: nothing waits for it, and it ends after this process does."""
    global _WATCHDOG
    with _REGISTRY_LOCK:
        if _WATCHDOG is not None:
            return
        read_end, write_end = os.pipe()  # both close-on-exec; dup2 makes stdin inheritable
        try:
            os.posix_spawn(
                sys.executable,
                [sys.executable, "-m", "afterclose.harness.runners.docker.watchdog", _PROC_TOKEN],
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, read_end, 0),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
                ],
                setsid=True,  # a Ctrl-C of the terminal is not for it
            )
        except OSError as exc:
            os.close(write_end)
            warnings.warn(f"afterclose: no container watchdog: {exc}", stacklevel=2)
            return
        finally:
            os.close(read_end)
        _WATCHDOG = write_end


def install_exit_handlers() -> None:
    """``atexit`` covers normal exits and Ctrl-C (KeyboardInterrupt unwinds to it).  SIGTERM
    kills Python without running atexit, so it gets a handler: only from the main thread (the
    only one allowed to set handlers; retried on the next runner otherwise) and only over the
    default or a Python handler (an ignored SIGTERM stays ignored)."""
    global _ATEXIT_INSTALLED, _SIGTERM_INSTALLED
    start_watchdog()
    with _REGISTRY_LOCK:
        if not _ATEXIT_INSTALLED:
            atexit.register(remove_own_containers)
            _ATEXIT_INSTALLED = True
        if _SIGTERM_INSTALLED or threading.current_thread() is not threading.main_thread():
            return
        _SIGTERM_INSTALLED = True
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN or previous is None or getattr(previous, "afterclose", False):
        return
    signal.signal(signal.SIGTERM, _on_sigterm_factory(previous))


def _after_fork_in_child() -> None:
    # A forked child must not remove its parent's containers at its own exit, and must not
    # inherit a lock some other thread of the parent held at the fork.
    global _PROC_TOKEN, _REGISTRY_LOCK, _WATCHDOG
    _PROC_TOKEN = uuid.uuid4().hex
    _REGISTRY_LOCK = threading.RLock()
    if _WATCHDOG is not None:
        os.close(_WATCHDOG)  # the parent's; this process starts its own with its first runner
    _WATCHDOG = None
    _LIVE.clear()
    _ENGINES.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
