"""What the kernel says about a target's processes and sockets: every ``/proc`` file the
harness reads (``stat``, ``status``, ``cgroup``, ``fd``, ``fdinfo``, the TCP tables) is
parsed here and nowhere else."""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from afterclose.harness import sockdiag

TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}


CGROUP_ROOT = Path("/sys/fs/cgroup")
# One epoll registration in /proc/PID/fdinfo/<epfd>: "tfd: N events: E data: D ..."
_TFD_RE = re.compile(
    r"^tfd:\s*(\d+)\s+events:\s*([0-9a-fA-F]+)\s+data:\s*([0-9a-fA-F]+).*?\bino:([0-9a-fA-F]+)"
)


# ------------------------------------------------------------------------------ processes


def read(path: str | Path) -> str | None:
    """A /proc (or /sys) file's text; None when it is gone (the process exited)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _split_stat(text: str) -> list[str]:
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` from field 3 (state) on: [0] state, [1] ppid, [2] pgid,
    [19] start time in clock ticks after boot; None if the process is gone."""
    text = read(f"/proc/{pid}/stat")
    return _split_stat(text) if text is not None else None


def parent_pid(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


def start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks after boot): with the pid, names one process even
    after its number is reused."""
    fields = stat_fields(pid)
    return fields[19] if fields else None


def alive(pid: int, started: str | None = None) -> bool:
    """``pid`` runs (not a zombie) and, if given, is the process that started at ``started``
    (see :func:`start_time`), not a later one that reused its number."""
    fields = stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return started is None or fields[19] == started


def owner_ids(pid: int) -> tuple[int, int] | None:
    """``pid``'s real user and group ids; None if it is gone."""
    text = read(f"/proc/{pid}/status")
    if text is None:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    try:
        return int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])
    except (KeyError, IndexError, ValueError):
        return None


def exists(pid: int) -> bool:
    """``pid`` has a /proc entry (a zombie too)."""
    return Path(f"/proc/{pid}").exists()


def exe(pid: int) -> str:
    """The program ``pid`` runs; "" if it is gone or not ours to look at."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def pid_namespace() -> str:
    """This process's PID namespace, as ``pid:[inode]``."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "unknown"


def boot_id() -> str:
    """Changes at every boot: a process recorded under another boot id is gone."""
    return (read("/proc/sys/kernel/random/boot_id") or "unknown").strip()


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants, plus anything still in its process group."""
    children: dict[int, list[int]] = {}
    in_group: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        text = read(entry / "stat")
        if text is None:
            continue
        fields = _split_stat(text)
        pid, ppid, pgid = int(entry.name), int(fields[1]), int(fields[2])
        children.setdefault(ppid, []).append(pid)
        if pgid == root and pid != root:
            in_group.append(pid)
    seen: list[int] = []
    stack = [root] if exists(root) else []
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.append(pid)
        stack.extend(children.get(pid, ()))
    seen.extend(p for p in in_group if p not in seen)
    return seen


def signal_dropped_by_init(pid: int, signum: int) -> bool:
    """Whether the kernel would discard ``signum`` sent to ``pid``, a PID namespace's init.

    Init only receives signals it handles or blocks (a signalfd loop blocks them); SIGKILL is
    forced through.  Read from the SigBlk, SigIgn and SigCgt masks of ``/proc/PID/status``."""
    text = read(f"/proc/{pid}/status")
    if text is None:
        return False
    masks: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("SigBlk", "SigIgn", "SigCgt"):
            masks[name] = int(value.strip(), 16)
    if len(masks) != 3:
        return False
    bit = 1 << (signum - 1)
    if masks["SigIgn"] & bit:
        return True
    return not (masks["SigBlk"] & bit or masks["SigCgt"] & bit)


def in_cgroup(pid: int, name: str) -> bool:
    """Whether a cgroup path of ``pid`` contains ``name`` (a container id)."""
    return name in (read(f"/proc/{pid}/cgroup") or "")


def cgroup_procs_file(pid: int, name: str) -> Path | None:
    """The ``cgroup.procs`` file of ``pid``'s cgroup whose path contains ``name`` (a
    container id): it lists every process in it, also those that are no descendants of
    ``pid`` (``docker exec``).  cgroup v2 lines read ``0::/path``; v1 lines name their
    controllers, mounted one folder each."""
    text = read(f"/proc/{pid}/cgroup")
    if text is None:
        return None
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if name not in rel:
            continue
        rel = rel.lstrip("/")
        if hierarchy == "0" and not controllers:
            candidates = [CGROUP_ROOT / rel, CGROUP_ROOT / "unified" / rel]
        else:
            names = [c.removeprefix("name=") for c in controllers.split(",")]
            candidates = [CGROUP_ROOT / controllers / rel, *(CGROUP_ROOT / n / rel for n in names)]
        for candidate in candidates:
            procs = candidate / "cgroup.procs"
            content = read(procs)
            if content is not None and str(pid) in content.split():
                return procs
    return None


def pids_in(procs_file: Path) -> list[int]:
    """The pids a ``cgroup.procs`` file lists (empty once the cgroup is gone)."""
    content = read(procs_file)
    return [int(p) for p in content.split()] if content is not None else []


def ephemeral_port_range() -> tuple[int, int] | None:
    """The kernel's range for ephemeral ports (net.ipv4.ip_local_port_range)."""
    text = read("/proc/sys/net/ipv4/ip_local_port_range")
    try:
        low, high = (text or "").split()
        return int(low), int(high)
    except ValueError:
        return None


# ------------------------------------------------------------------------------ fd tables


def fd_links(pid: int) -> dict[int, tuple[str, int]] | None:
    """fd -> (readlink of /proc/PID/fd/N, inode) for one process; None if it is gone."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return None
    out: dict[int, tuple[str, int]] = {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            link = os.readlink(fd_dir / name)
            ino = os.stat(fd_dir / name).st_ino
        except OSError:
            continue  # closed while we looked
        out[int(name)] = (link, ino)
    return out


def epoll_items(pid: int, epfd: int) -> list[tuple[int, int, int, int]] | None:
    """(fd, events, data, inode) of each registration in epoll fd ``epfd`` of ``pid``, as
    ``/proc/PID/fdinfo/EPFD`` lists them; None if it is gone."""
    info = read(f"/proc/{pid}/fdinfo/{epfd}")
    if info is None:
        return None
    items: list[tuple[int, int, int, int]] = []
    for line in info.splitlines():
        m = _TFD_RE.match(line)
        if m is not None:
            items.append(
                (int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16), int(m.group(4), 16))
            )
    return items


# ---------------------------------------------------------------------------------- sockets


def socket_inodes(pid: int) -> dict[int, int]:
    """fd number -> socket inode for one process (empty if it is gone)."""
    result: dict[int, int] = {}
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = os.listdir(fd_dir)
    except OSError:
        return result
    for name in entries:
        try:
            link = os.readlink(fd_dir / name)
        except OSError:
            continue  # closed while we looked
        if link.startswith("socket:["):
            result[int(name)] = int(link[8:-1])
    return result


def socket_fd_count(pids: list[int]) -> int:
    return sum(len(socket_inodes(pid)) for pid in pids)


@dataclass(frozen=True)
class TcpSocket:
    local_port: int
    remote_port: int
    state: str
    inode: int
    local_addr: str = ""  # as the table spells it: hex, in the kernel's byte order
    remote_addr: str = ""

    def peer_key(self) -> tuple[str, int, str, int]:
        """How the other end of this connection appears in the same table."""
        return (self.remote_addr, self.remote_port, self.local_addr, self.local_port)

    def key(self) -> tuple[str, int, str, int]:
        return (self.local_addr, self.local_port, self.remote_addr, self.remote_port)


def tcp_sockets(pid: int, port: int | None = None) -> list[TcpSocket]:
    """TCP sockets of the network namespace ``pid`` lives in (IPv4 and IPv6); with ``port``,
    at least those with ``port`` at either end (perhaps only those)."""
    if port is not None and same_netns(pid):
        try:
            return [_from_diag(s) for s in sockdiag.port_sockets(port)]
        except OSError:
            pass  # no sock_diag (inet_diag not built, or refused): the /proc table
    out: list[TcpSocket] = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            local, remote, state, inode = fields[1], fields[2], int(fields[3], 16), int(fields[9])
            local_addr, local_port = local.rsplit(":", 1)
            remote_addr, remote_port = remote.rsplit(":", 1)
            out.append(
                TcpSocket(
                    local_port=int(local_port, 16),
                    remote_port=int(remote_port, 16),
                    state=TCP_STATES.get(state, str(state)),
                    inode=inode,
                    local_addr=local_addr,
                    remote_addr=remote_addr,
                )
            )
    return out


def _from_diag(s: sockdiag.DiagSocket) -> TcpSocket:
    return TcpSocket(
        local_port=s.local_port,
        remote_port=s.remote_port,
        state=TCP_STATES.get(s.state, str(s.state)),
        inode=s.inode,
        local_addr=s.proc_address(s.local_raw),
        remote_addr=s.proc_address(s.remote_raw),
    )


def same_netns(pid: int) -> bool:
    """Whether ``pid`` lives in the harness's own network namespace (False if it is gone)."""
    try:
        theirs = os.stat(f"/proc/{pid}/ns/net")
        ours = os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def port_owners(pids: Iterable[int], port: int) -> dict[int, int]:
    """pid -> how many sockets of ``port`` it holds (its listening socket and the connections
    accepted on it), for the processes of ``pids`` holding any.  The table is read from the
    first process's network namespace: all of a target's processes share it."""
    pids = list(pids)
    if not pids:
        return {}
    ours = {s.inode for s in tcp_sockets(pids[0], port) if s.local_port == port and s.inode}
    owners: dict[int, int] = {}
    for pid in pids:
        held = sum(ino in ours for ino in socket_inodes(pid).values())
        if held:
            owners[pid] = held
    return owners


def mapped_files(pid: int) -> set[str] | None:
    """The paths of the files mapped into ``pid`` (its program and libraries); None when its
    maps cannot be read (gone, or another user's)."""
    text = read(f"/proc/{pid}/maps")
    if text is None:
        return None
    out = set()
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5].startswith("/"):
            out.add(fields[5])
    return out


@dataclass(frozen=True)
class SocketCensus:
    """The target's open socket fds and the states of its TCP connections on its port."""

    socket_fds: int
    states: Counter[str]
    # ESTABLISHED on the target's side while the client's side is gone or closing: see
    # ``census``.  Part of the ESTABLISHED count in ``states``.
    stranded: int = 0

    @property
    def close_wait(self) -> int:
        return self.states.get("CLOSE_WAIT", 0)

    def without_clients(self) -> SocketCensus:
        """This census less the connections on the port: the server's own sockets, as when
        no client is connected (a socket two processes share is one connection, two fds: the
        count stays on the high side)."""
        return SocketCensus(
            socket_fds=max(self.socket_fds - sum(self.states.values()), 0), states=Counter()
        )

    def describe(self) -> str:
        states = ", ".join(f"{k} {v}" for k, v in sorted(self.states.items())) or "none"
        if self.stranded:
            states += f" ({self.stranded} ESTABLISHED with the client's end gone)"
        return f"{self.socket_fds} socket fds; connections on the port: {states}"


def settled_census(
    pids: Callable[[], list[int]], port: int, quiet_s: float = 0.25, cap_s: float = 3.0
) -> SocketCensus:
    """The census once the target's processes and socket fds stopped changing: for
    ``quiet_s``, or sooner, for two looks in a row in which no thread ran at all.

    A server that is ready may still be settling: nginx's workers pass channel fds between
    each other for a moment after the first one answers.  A baseline taken then is wrong.
    Passing an fd wakes its receiver at once, so while one is on its way some thread is
    runnable or has run since the last look (its schedstat run time grew): two looks 20 ms
    apart with every thread asleep and no run time added mean nothing is on its way.
    """
    deadline = time.monotonic() + cap_s
    last: tuple[tuple[int, ...], int] | None = None
    last_activity: dict[tuple[int, int], tuple[str, int]] | None = None
    since = time.monotonic()
    while True:
        now_pids = pids()
        state = (tuple(sorted(now_pids)), socket_fd_count(now_pids))
        activity = thread_activity(now_pids)
        now = time.monotonic()
        if state != last:
            last, since = state, now
        else:
            idle = activity is not None and activity == last_activity and asleep(activity)
            if idle or now - since >= quiet_s or now >= deadline:
                return census(now_pids, port)
        last_activity = activity
        time.sleep(0.02)


def thread_activity(pids: Iterable[int]) -> dict[tuple[int, int], tuple[str, int]] | None:
    """(pid, tid) -> (state letter, ns spent on a CPU so far) of every thread of ``pids``;
    None when the kernel keeps no schedstats."""
    out: dict[tuple[int, int], tuple[str, int]] = {}
    for pid, tid in threads(pids):
        stat = read(f"/proc/{pid}/task/{tid}/stat")
        sched = read(f"/proc/{pid}/task/{tid}/schedstat")
        if stat is None or sched is None:
            if os.path.exists(f"/proc/{pid}/task/{tid}"):
                return None
            continue  # the thread exited
        fields = sched.split()
        if not fields:
            return None
        out[(pid, tid)] = (_split_stat(stat)[0], int(fields[0]))
    return out


def thread_states(pids: Iterable[int]) -> dict[tuple[int, int], str]:
    """(pid, tid) -> state letter (``R`` runs or wants to, ``S`` sleeps...) of every thread
    of ``pids``; a thread that exited is left out."""
    out: dict[tuple[int, int], str] = {}
    for pid, tid in threads(pids):
        stat = read(f"/proc/{pid}/task/{tid}/stat")
        if stat is not None:
            out[(pid, tid)] = _split_stat(stat)[0]
    return out


def threads(pids: Iterable[int]) -> Iterator[tuple[int, int]]:
    """(pid, tid) of every thread of ``pids``; a process that is gone has none."""
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            yield pid, int(tid)


def asleep(activity: dict[tuple[int, int], tuple[str, int]]) -> bool:
    """Whether every thread of a :func:`thread_activity` look was sleeping (``S``: waiting
    for an event; ``R`` runs or wants to, ``D`` is inside an uninterruptible call)."""
    return all(state in ("S", "I") for state, _ in activity.values())


def census(pids: list[int], port: int) -> SocketCensus:
    inodes: set[int] = set()
    fds = 0
    for pid in pids:
        owned = socket_inodes(pid)
        fds += len(owned)
        inodes.update(owned.values())
    # Only the target's own sockets count: the table also holds every client's.
    states: Counter[str] = Counter()
    stranded = 0
    if pids:
        table = tcp_sockets(pids[0], port)
        established = {s.key() for s in table if s.state == "ESTABLISHED"}
        for sock in table:
            if sock.inode not in inodes or sock.local_port != port or sock.state == "LISTEN":
                continue
            states[sock.state] += 1
            # A connection stays ESTABLISHED on the server's side until a FIN or an RST from
            # the client arrives.  When the network lost or reordered those (netem, forged
            # packets; an RST behind delayed data meets RFC 5961's challenge ACK, and that can
            # be lost too), the client's end is gone while the server was never told: no
            # server can close what its kernel still calls live.  Loopback clients appear in
            # this same table, so the peer is checked, not assumed.
            if (
                sock.state == "ESTABLISHED"
                and _loopback(sock.remote_addr)
                and sock.peer_key() not in established
            ):
                stranded += 1
    return SocketCensus(socket_fds=fds, states=states, stranded=stranded)


def listening_addresses(pids: list[int]) -> list[str]:
    """``host:port`` of every TCP socket ``pids`` listen on, sorted."""
    inodes = {inode for pid in pids for inode in socket_inodes(pid).values()}
    found: set[str] = set()
    for sock in tcp_sockets(pids[0]) if pids else ():
        if sock.state == "LISTEN" and sock.inode in inodes:
            found.add(f"{_address(sock.local_addr)}:{sock.local_port}")
    return sorted(found)


def _address(addr_hex: str) -> str:
    """An address as /proc/net/tcp{,6} spells it (32-bit words in host byte order), printed."""
    raw = b"".join(
        int(addr_hex[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(addr_hex), 8)
    )
    address = ipaddress.ip_address(raw)
    return str(address) if address.version == 4 else f"[{address}]"


def _loopback(addr_hex: str) -> bool:
    """``addr_hex`` as /proc/net/tcp{,6} spells it: 127.0.0.0/8, ::1 or ::ffff:127.x."""
    if len(addr_hex) == 8:  # IPv4, little-endian on x86: the first octet is the last byte
        return addr_hex[6:8] == "7F"
    if len(addr_hex) == 32:
        if addr_hex == "00000000000000000000000001000000":
            return True
        return addr_hex[:24] == "0" * 16 + "FFFF0000" and addr_hex[30:32] == "7F"
    return False


# --------------------------------------------------------------------------- what faults read

CLK_TCK = os.sysconf("SC_CLK_TCK")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path | str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _stat_after_comm(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` from field 3 (state) on; None if the process is gone.  The command
    name (field 2) may hold spaces and parentheses: split after its last ``)``."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of ``pids`` (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_after_comm(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / CLK_TCK


def cpu_demand(pids: Iterable[int]) -> float | None:
    """Time the threads of ``pids`` spent running *or runnable, waiting for a CPU*, in
    seconds (``/proc/PID/task/TID/schedstat``); None if the kernel keeps no schedstats.

    On a loaded machine a spinning thread gets only its share of a CPU, but it is runnable
    all the time: its demand stays near 100% of the window however many others compete."""
    per_thread = thread_demands(pids)
    return None if per_thread is None else sum(per_thread.values())


def thread_demands(pids: Iterable[int]) -> dict[tuple[int, int], float] | None:
    """:func:`cpu_demand` of each thread, keyed ``(pid, tid)``; None without schedstats."""
    out: dict[tuple[int, int], float] = {}
    for pid, tid in threads(pids):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        except FileNotFoundError:
            continue  # the thread exited
        except OSError:
            return None
        if len(fields) < 2:
            return None
        out[(pid, tid)] = (int(fields[0]) + int(fields[1])) / 1e9
    return out


def thread_name(pid: int, tid: int) -> str:
    """The thread's command name (``/proc/PID/task/TID/comm``); empty if it is gone."""
    return _read(f"/proc/{pid}/task/{tid}/comm").strip()


def open_fds(pid: int) -> list[int]:
    """The fd numbers ``pid`` has open, sorted (empty if it is gone)."""
    try:
        return sorted(int(name) for name in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return []


def task_state(pid: int) -> str:
    """The state letter of ``pid`` (``R``, ``S``, ``T`` stopped, ...); ``X`` if it is gone."""
    fields = _stat_after_comm(pid)
    return fields[0] if fields else "X"


def task_count(pids: Iterable[int]) -> int:
    """Threads of ``pids``, all together."""
    return sum(1 for _ in threads(pids))


def namespace_pids(host_pids: Iterable[int]) -> dict[int, int]:
    """PID inside its PID namespace -> host PID, for the processes where the two differ (a
    container's); ``NSpid`` of ``/proc/PID/status`` lists the PID in each nested namespace."""
    found: dict[int, int] = {}
    for pid in host_pids:
        for line in _read(f"/proc/{pid}/status").splitlines():
            if line.startswith("NSpid:"):
                ids = [int(x) for x in line.split()[1:]]
                if len(ids) > 1 and ids[-1] != pid:
                    found[ids[-1]] = pid
    return found


def cgroup_dir(pid: int, controller: str) -> tuple[Path, int] | None:
    """The folder of ``pid``'s cgroup holding ``controller``'s files, and the cgroup version
    (1: a v1 hierarchy of that controller; 2: the unified hierarchy)."""
    lines = _read(f"/proc/{pid}/cgroup").splitlines()
    if not lines:
        return None
    unified: str | None = None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hierarchy == "0" and not controllers:
            unified = rel
        elif controller in controllers.split(","):
            folder = CGROUP_ROOT / controllers / rel.lstrip("/")
            if folder.is_dir():
                return folder, 1
    if unified is not None:
        for base in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
            folder = base / unified.lstrip("/")
            # cgroup.controllers: the controllers the parent enabled for this cgroup.
            if controller in _read(folder / "cgroup.controllers").split():
                return folder, 2
    return None


def cgroup_value(pid: int, controller: str, v1_name: str, v2_name: str) -> str | None:
    """One cgroup file of ``pid`` (``v1_name`` or ``v2_name`` by version), stripped."""
    found = cgroup_dir(pid, controller)
    if found is None:
        return None
    folder, version = found
    text = _read(folder / (v1_name if version == 1 else v2_name))
    return text.strip() or None


def cgroup_number(pid: int, controller: str, v1_name: str, v2_name: str) -> int | None:
    """A cgroup file of ``pid`` that holds one number (``pids.current``, ``memory.max``)."""
    text = cgroup_value(pid, controller, v1_name, v2_name)
    return int(text) if text and text.isdigit() else None


def cgroup_key(pid: int, controller: str, v1_name: str, v2_name: str, key: str) -> int | None:
    """A ``key value`` line of a flat-keyed cgroup file (``pids.events``, ``memory.events``)."""
    text = cgroup_value(pid, controller, v1_name, v2_name)
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None
