"""The engine: a drawn plan of connections, performed by asyncio loops (uvloop when it is
installed), at a target rate (or all at once), under a concurrency cap: in this process
(:func:`run_plan`, for the single client faults) or in several forked worker processes
(:func:`run_storm`, for ``connection_storm``).  Both run the same worker loop (:func:`_work`),
except where a storm's workers hand their share to the compiled engine
(:mod:`.native`, chosen by :func:`choose_engine`): same shares, rate, cap, counts and stop flag.

The parent draws nothing and decides nothing at run time: the plan (one action per connection)
is made before, from the seed, and the schedule is the plan.  Connection ``i`` is performed by
worker ``i % processes`` and starts no earlier than ``start + i / rate_per_s``, so each worker
takes an equal share of the plan and of the rate; the concurrency cap is split between the
workers (their shares add up to it).  Nothing new starts after ``duration_s``, the deadline, or
once the target is gone; every socket operation is bounded by the deadline.

Workers are forked (a fresh interpreter would cost a third of a second per process) and then
cut loose from the parent's state: see :func:`_isolate`.  They send their
:class:`~afterclose.faults.base.FaultReport` back over a pipe and publish live counts in a
shared anonymous mapping, which the parent turns into :class:`StormProgress` snapshots for
whoever :func:`watch`-es (the command line's progress bar).  Whatever happens in the parent
(an exception, Ctrl-C, a worker stuck past the deadline), every worker is killed and reaped
before :func:`run_storm` returns or raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import mmap
import os
import signal
import threading
import time
import traceback
import typing
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing import connection as mpc
from typing import Any

from afterclose.faults.base import GONE_POLL_S, Endpoint, FaultReport
from afterclose.harness.client import native
from afterclose.harness.client.conn import Conn, DeadlineReached, Remote
from afterclose.harness.client.plan import Action, schedule_of
from afterclose.harness.errors import AftercloseError, ScenarioError
from afterclose.harness.oracle.evidence import UNDER_DELIVERED, Observation
from afterclose.harness.orphans import die_with_parent

try:  # imported before any fork, so that no child has to import it
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extras
    uvloop = None  # type: ignore[assignment]

LOOP_ENV = "AFTERCLOSE_STORM_LOOP"  # "asyncio" forces the standard loop even with uvloop
DEFAULT_PROCESSES = max(1, min(2, len(os.sched_getaffinity(0))))
PROGRESS_INTERVAL_S = 0.1
COUNTERS_INTERVAL_S = 0.05
READY_TIMEOUT_S = 10.0
WORKER_GRACE_S = 2.0  # past the deadline before a worker counts as stuck and is killed
SLEEP_SLICE_S = 0.05  # longest sleep between two looks at the stop flag
RATE_WINDOW_S = 1.0
# A storm that leaves more than this share of its plan unstarted, while the target took what it
# got and did not keep the client slots busy for most starts, under-delivered: its evidence
# is incomplete (the incomplete-evidence rule).  Half: a loaded machine delays starts by tens
# of percent without the storm losing what it is for; a harness that cannot keep up loses more.
SHORTFALL_ALLOWED = 0.5
# More than this share of the started connections refused, reset or timed out at connect: the
# shortfall is the target's doing, which the other rules judge.
REFUSED_SHARE = 0.10
# Shared counters: slot 0 is the stop flag, then these per worker.
_FIELDS = ("started", "done", "connections", "errors")


@dataclass(frozen=True)
class StormProgress:
    """A live snapshot of a storm, as :func:`watch` callbacks get it.

    ``rate_per_s`` is the rate of new connections over the last second; ``per_process`` the
    connections each worker has made so far.
    """

    fault: str
    planned: int
    started: int
    done: int
    connections: int
    errors: int
    elapsed_s: float
    rate_per_s: float
    target_rate_per_s: float
    duration_s: float
    processes: int
    pids: tuple[int, ...]
    per_process: tuple[int, ...]
    loop: str
    finished: bool = False


Listener = Callable[[StormProgress], None]
_listeners: list[Listener] = []
_listeners_lock = threading.Lock()


@contextlib.contextmanager
def watch(listener: Listener) -> Iterator[None]:
    """Call ``listener`` with a :class:`StormProgress` about every PROGRESS_INTERVAL_S while any
    storm runs (from the thread running it), and once more when it ends."""
    with _listeners_lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _listeners_lock:
            _listeners.remove(listener)


def _publish(progress: StormProgress) -> None:
    with _listeners_lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(progress)


def loop_name() -> str:
    """The event loop the workers will run: ``uvloop`` when importable, else ``asyncio``."""
    if uvloop is not None and os.environ.get(LOOP_ENV, "").lower() != "asyncio":
        return "uvloop"
    return "asyncio"


@dataclass(frozen=True)
class Job:
    """Everything a worker needs; inherited through fork, never pickled.  Without
    ``rate_per_s`` every connection may start at once (up to the cap); without ``duration_s``
    new ones start until the deadline.  ``engine`` (one of native.ENGINES) picks who performs
    the plan; ``native`` is the plan in the compiled engine's terms once it was chosen."""

    fault: str
    remote: Remote
    actions: Sequence[Action]
    processes: int
    concurrency: int
    rate_per_s: float | None
    duration_s: float | None
    deadline: float
    engine: str = "auto"
    native: native.NativePlan | None = None

    def caps(self) -> list[int]:
        """Each worker's share of the concurrency cap (they add up to it)."""
        share, extra = divmod(self.concurrency, self.processes)
        return [share + (w < extra) for w in range(self.processes)]


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    if loop_name() == "uvloop":
        return typing.cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)
    return asyncio.new_event_loop


def effective_processes(processes: int, concurrency: int, planned: int) -> int:
    """Workers actually started: a worker needs one connection slot and one connection."""
    return max(1, min(processes, concurrency, planned))


# --------------------------------------------------------------------------- in this process


def run_plan(
    fault: str,
    endpoint: Endpoint,
    actions: Sequence[Action],
    *,
    concurrency: int,
    deadline: float,
    rate_per_s: float | None = None,
    duration_s: float | None = None,
) -> FaultReport:
    """Perform ``actions[i]`` on connection ``i``, ``concurrency`` at a time, on a fresh event
    loop in this thread; the synchronous entry for callers that are not async.

    With ``rate_per_s``, connection ``i`` starts no earlier than ``i / rate_per_s`` after the
    start; nothing new starts after ``duration_s``, the deadline, or once the target is gone.
    """
    job = Job(
        fault=fault,
        remote=Remote.resolve(fault, endpoint),
        actions=actions,
        processes=1,
        concurrency=max(concurrency, 1),
        rate_per_s=rate_per_s,
        duration_s=duration_s,
        deadline=deadline,
    )
    counters = memoryview(bytearray(8 * (1 + len(_FIELDS)))).cast("q")
    start = time.monotonic()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        result, gone = runner.run(_in_process(job, endpoint, counters, start))
    report = FaultReport(fault, schedule=schedule_of(actions))
    report.merge(result)
    report.fault = fault
    report.elapsed_s = time.monotonic() - start
    if gone:
        report.count("stopped_target_gone")
    return report


async def _in_process(
    job: Job, endpoint: Endpoint, counters: memoryview, start: float
) -> tuple[FaultReport, bool]:
    """:func:`_work` with a watcher raising the stop flag once the target is gone."""
    if endpoint.gone is None:
        return await _work(job, 0, counters, start), False
    ask = endpoint.gone

    async def watch_gone() -> None:
        while not ask():
            await asyncio.sleep(GONE_POLL_S)
        counters[0] = 1

    watcher = asyncio.get_running_loop().create_task(watch_gone())
    try:
        report = await _work(job, 0, counters, start)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return report, bool(counters[0])


# --------------------------------------------------------------------------- the parent


@dataclass
class _Worker:
    index: int
    pid: int
    chan: mpc.Connection
    reaped: bool = False
    result: FaultReport | None = None


@dataclass
class _Rate:
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, now: float, count: int) -> float:
        self.samples.append((now, count))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()
        t0, c0 = self.samples[0]
        return (count - c0) / (now - t0) if now > t0 else 0.0


def run_storm(job: Job, endpoint: Endpoint, schedule: list[str]) -> FaultReport:
    """Perform ``job`` and return its merged report (``schedule`` is the plan's)."""
    report = FaultReport(job.fault, schedule=schedule)
    job = choose_engine(job)
    slots = 1 + len(_FIELDS) * job.processes
    shared = mmap.mmap(-1, 8 * slots)  # anonymous, MAP_SHARED: the children see our writes
    counters = memoryview(shared).cast("q")
    workers: list[_Worker] = []
    clean = False
    try:
        for w in range(job.processes):
            workers.append(_fork(job, w, counters))
        start = _start_all(job, workers)
        if start is None:  # the deadline passed before every worker was ready
            report.count("not_started", len(job.actions))
        else:
            _collect(job, endpoint, workers, counters, start, report)
        note_shortfall(report, len(job.actions))
        clean = True
    finally:
        _reap(workers, kill=not clean)
        counters.release()
        shared.close()
        for worker in workers:
            worker.chan.close()
    return report


def choose_engine(job: Job) -> Job:
    """``job`` with its plan in the compiled engine's terms when its ``engine`` allows and the
    plan can be (see :mod:`.native`); else as it is, for the asyncio workers.  ``native``
    that cannot be had is the user's to fix: a ScenarioError saying why."""
    if job.engine == "asyncio":
        return job
    plan = native.prepare(job.remote, job.actions)
    why = plan if isinstance(plan, str) else native.available()
    if why is None:
        assert not isinstance(plan, str)
        return replace(job, native=plan)
    if job.engine == "native":
        raise ScenarioError(
            f"the compiled storm engine cannot perform this plan: {why}",
            where=f"fault {job.fault}",
            hint="engine = 'auto' performs it on asyncio instead",
        )
    return job


def engine_name(job: Job) -> str:
    """Who performs ``job``: ``native`` (the compiled engine), else the asyncio loop's name."""
    return "native" if job.native is not None else loop_name()


def note_shortfall(report: FaultReport, planned: int) -> None:
    """Record an ``UNDER_DELIVERED`` observation when the harness could not deliver the plan:
    more than SHORTFALL_ALLOWED of it never started, though the target neither died nor
    refused (a refusing target is judged by the other rules, not excused)."""
    not_started = report.counts["not_started"]
    if not planned or not_started <= SHORTFALL_ALLOWED * planned:
        return
    if report.counts["stopped_target_gone"]:
        return
    started = planned - not_started
    if report.counts["waited_for_slot"] > started / 2:
        # Most starts found every slot busy with connections the target had not finished with:
        # the target's pace held the plan back, not the harness.
        return
    refused = sum(
        n
        for key, n in report.counts.items()
        if key.startswith("errors:connect_") or key == "errors:timeout_connect"
    )
    if started and refused > REFUSED_SHARE * started:
        return
    report.observe(
        Observation(
            kind=UNDER_DELIVERED,
            who=report.fault,
            detail=f"{report.fault} started {started} of its {planned} planned connections "
            f"({not_started} never started, more than {SHORTFALL_ALLOWED:.0%} of the plan) "
            "while the target accepted what it got and client slots were free: the harness "
            "could not keep up",
            values={
                "planned": planned,
                "started": started,
                "not_started": not_started,
                "allowed": SHORTFALL_ALLOWED,
            },
        )
    )


def _fork(job: Job, index: int, counters: memoryview) -> _Worker:
    parent_end, child_end = mpc.Pipe(duplex=True)
    with warnings.catch_warnings():
        # Python >= 3.12 warns about fork() in a process with threads; the child only runs
        # code that takes none of the locks another thread could hold (see _isolate).
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never return into the caller's stack
        code = 1
        try:
            code = _child(job, index, child_end, counters)
        finally:
            os._exit(code)
    child_end.close()
    return _Worker(index, pid, parent_end)


def _start_all(job: Job, workers: list[_Worker]) -> float | None:
    """Wait until every worker is ready, then give them one common start time."""
    waiting = {w.chan: w for w in workers}
    until = min(job.deadline, time.monotonic() + READY_TIMEOUT_S)
    while waiting:
        left = until - time.monotonic()
        if left <= 0:
            for worker in workers:
                with contextlib.suppress(OSError):
                    worker.chan.send(("stop",))
            return None
        for chan in mpc.wait(list(waiting), timeout=left):
            worker = waiting.pop(_as_conn(chan))
            _expect(worker, _receive(worker), "ready")
    # A common start a little ahead, so that connection 0 of every worker is on time.
    start = time.monotonic() + 0.002
    for worker in workers:
        worker.chan.send(("go", start))
    return start


def _as_conn(chan: object) -> mpc.Connection:
    assert isinstance(chan, mpc.Connection)
    return chan


def _receive(worker: _Worker) -> tuple[Any, ...]:
    try:
        message = worker.chan.recv()
    except (EOFError, OSError):
        return ("lost",)
    assert isinstance(message, tuple)
    return message


def _expect(worker: _Worker, message: tuple[Any, ...], kind: str) -> None:
    if message[0] == "error":
        if message[2] is not None:  # the harness's own trouble, e.g. EMFILE: as the worker said
            error_type, text, where, hint, details = message[2]
            raise error_type(text, where=where, hint=hint, details=details)
        raise RuntimeError(f"storm worker {worker.index} (pid {worker.pid}) failed:\n{message[1]}")
    if message[0] != kind:
        raise RuntimeError(f"storm worker {worker.index} (pid {worker.pid}) sent {message[0]!r}")


def _collect(
    job: Job,
    endpoint: Endpoint,
    workers: list[_Worker],
    counters: memoryview,
    start: float,
    report: FaultReport,
) -> None:
    pending = {w.chan: w for w in workers}
    rate = _Rate()
    gone = False
    asked_gone = 0.0
    give_up = job.deadline + WORKER_GRACE_S
    stuck = 0
    planned = len(job.actions)
    name = engine_name(job)

    def snapshot(finished: bool) -> StormProgress:
        now = time.monotonic()
        totals = [0] * len(_FIELDS)
        per_process = []
        for w in range(job.processes):
            base = 1 + len(_FIELDS) * w
            for k in range(len(_FIELDS)):
                totals[k] += counters[base + k]
            per_process.append(counters[base + 2])
        started, done, made, errors = totals
        return StormProgress(
            fault=job.fault,
            planned=planned,
            started=started,
            done=done,
            connections=made,
            errors=errors,
            elapsed_s=max(now - start, 0.0),
            rate_per_s=rate.add(now, made),
            target_rate_per_s=job.rate_per_s or 0.0,
            duration_s=job.duration_s or 0.0,
            processes=job.processes,
            pids=tuple(w.pid for w in workers),
            per_process=tuple(per_process),
            loop=name,
            finished=finished,
        )

    while pending:
        now = time.monotonic()
        if now >= give_up:
            stuck = len(pending)
            break
        ready = mpc.wait(list(pending), timeout=min(PROGRESS_INTERVAL_S, give_up - now))
        for chan in ready:
            worker = pending.pop(_as_conn(chan))
            message = _receive(worker)
            if message[0] == "lost":  # killed from outside (OOM killer, a stray signal)
                report.count("errors:storm_worker_lost")
                continue
            _expect(worker, message, "done")
            worker.result = message[1]
        now = time.monotonic()
        if endpoint.gone is not None and not gone and now - asked_gone >= GONE_POLL_S:
            gone, asked_gone = endpoint.gone(), now
            if gone:
                counters[0] = 1  # the workers start nothing new
        _publish(snapshot(False))
    last = snapshot(True)
    for worker in workers:
        if worker.result is not None:
            report.merge(worker.result)
    report.fault = job.fault
    report.elapsed_s = time.monotonic() - start
    report.count("storm_processes", job.processes)
    report.count("native_engine", int(job.native is not None))
    report.count("stuck_workers", stuck)
    if gone:
        report.count("stopped_target_gone")
    _publish(last)


def _reap(workers: list[_Worker], *, kill: bool) -> None:
    """Wait for every worker to exit; SIGKILL those that do not within a second (or at once
    with ``kill``: the parent is unwinding from an error or Ctrl-C)."""
    live = [w for w in workers if not w.reaped]
    if kill:
        for worker in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
    until = time.monotonic() + 1.0
    while live:
        for worker in list(live):
            try:
                pid, _ = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else's os.wait()
                pid = worker.pid
            if pid == worker.pid:
                worker.reaped = True
                live.remove(worker)
        if not live:
            break
        if time.monotonic() >= until:
            for worker in live:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
            for worker in live:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(worker.pid, 0)
                worker.reaped = True
            break
        time.sleep(0.005)


# --------------------------------------------------------------------------- the children


def _isolate(keep_fd: int) -> None:
    """Cut a freshly forked worker loose from its parent's state.

    * Ctrl-C reaches the whole foreground process group: the workers ignore SIGINT and the
      parent, which gets KeyboardInterrupt, kills them.  SIGTERM keeps its default action.
    * PR_SET_PDEATHSIG: if the parent dies without reaping us (SIGKILL), the kernel kills us.
    * Every inherited fd but stdio and our pipe is closed.  A socket is only shut down when
      its *last* fd is closed, so a worker holding copies of the parent's sockets (another
      fault running in parallel, a test's in-process server) would delay every FIN and RST
      the parent sends on them until the worker exits.
    * Objects inherited from the parent are frozen out of the cyclic GC: one of them (a
      socket whose fd we just closed) being finalised later would close whatever fd of ours
      has reused its number.  The signal wakeup fd is dropped for the same reason: Python
      would write a byte into it on every signal.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    gc.freeze()
    low = 3
    for fd in sorted({keep_fd}):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, max(os.sysconf("SC_OPEN_MAX"), 1024))


def _child(job: Job, index: int, chan: mpc.Connection, counters: memoryview) -> int:
    try:
        _isolate(chan.fileno())
        if job.native is not None:
            chan.send(("ready", os.getpid()))
            message = chan.recv()
            if message[0] != "go":
                return 0
            chan.send(("done", _perform_native(job, job.native, index, counters, message[1])))
            return 0
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.get_loop()  # made before "ready", so that it costs nothing after the start
            chan.send(("ready", os.getpid()))
            message = chan.recv()
            if message[0] != "go":
                return 0
            report = runner.run(_work(job, index, counters, float(message[1])))
        chan.send(("done", report))
        return 0
    except BaseException as exc:
        # An AftercloseError (the harness's own trouble, e.g. EMFILE) goes back as its parts:
        # pickling an exception keeps only its args, not where/hint/details.
        user = None
        if isinstance(exc, AftercloseError):
            user = (type(exc), exc.message, exc.where, exc.hint, exc.details)
        with contextlib.suppress(BaseException):
            chan.send(("error", traceback.format_exc(), user))
        return 1


def _perform_native(
    job: Job, plan: native.NativePlan, index: int, counters: memoryview, start: float
) -> FaultReport:
    """Worker ``index``'s share on the compiled engine (the same shares as :func:`_work`)."""
    stop = job.deadline if job.duration_s is None else min(job.deadline, start + job.duration_s)
    return native.perform(
        plan,
        job.remote,
        index=index,
        processes=job.processes,
        cap=job.caps()[index],
        planned=len(job.actions),
        start=start,
        stop=stop,
        deadline=job.deadline,
        rate_per_s=job.rate_per_s,
        counters=counters,
    )


async def _sleep_until(at: float, counters: memoryview) -> bool:
    """Sleep until ``at`` (monotonic); False if the stop flag went up meanwhile."""
    while True:
        left = at - time.monotonic()
        if left <= 0:
            return not counters[0]
        await asyncio.sleep(min(left, SLEEP_SLICE_S))
        if counters[0]:
            return False


async def _work(job: Job, index: int, counters: memoryview, start: float) -> FaultReport:
    """Worker ``index``'s share: connections ``index``, ``index + processes``, ..."""
    loop = asyncio.get_running_loop()
    report = FaultReport(job.fault)
    mine = range(index, len(job.actions), job.processes)
    stop = job.deadline if job.duration_s is None else min(job.deadline, start + job.duration_s)
    slots = asyncio.Semaphore(job.caps()[index])
    tasks: set[asyncio.Task[None]] = set()
    failures: list[BaseException] = []
    base = 1 + len(_FIELDS) * index
    tally = {"started": 0, "done": 0}

    def publish() -> None:
        counts = report.counts
        errors = sum(n for k, n in counts.items() if k.startswith("errors:"))
        values = (tally["started"], tally["done"], counts["connections"], errors)
        for k, value in enumerate(values):
            counters[base + k] = value

    async def publisher() -> None:
        while True:
            publish()
            await asyncio.sleep(COUNTERS_INTERVAL_S)

    async def one(i: int) -> None:
        conn = Conn(job.remote, i, report, job.deadline)
        try:
            await job.actions[i].perform(conn)
        except (DeadlineReached, asyncio.CancelledError):
            report.count("cut_by_deadline")
        except Exception as exc:  # a bug, or the harness's own trouble: stop, re-raised below
            failures.append(exc)
        finally:
            conn.close()
            slots.release()
            tally["done"] += 1

    ticker = loop.create_task(publisher())
    try:
        for i in mine:
            at = start + i / job.rate_per_s if job.rate_per_s else start
            if at >= stop or failures or not await _sleep_until(at, counters):
                break
            if slots.locked():
                report.count("waited_for_slot")
            await slots.acquire()
            if time.monotonic() >= stop or counters[0] or failures:
                slots.release()
                break
            tally["started"] += 1
            task = loop.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(set(tasks), timeout=max(job.deadline - time.monotonic(), 0) + 0.05)
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
    if failures:
        raise failures[0]
    report.count("not_started", len(mine) - tally["started"])
    publish()
    return report
