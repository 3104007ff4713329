"""Exploration shared between workers: Hypothesis' example database on Redis.

Workers that explore the same target with the same space (``afterclose explore`` or ``soak``
with the same ``--db``) save every failing example in one Redis store
(:class:`hypothesis.extra.redis.RedisExampleDatabase`) and replay the saved ones before
generating their own, so a failure one worker found is tried first by every worker that starts
after it.  A found scenario is written out by one worker only: the first to set its Redis key
(``SET NX``, one key per scenario digest); the others say who wrote it.  Nothing else is
shared and nothing else coordinates the workers.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from hypothesis.database import ExampleDatabase

from afterclose.harness.errors import CampaignError

Log = Callable[[str], None]

DB_EXAMPLE = "redis://127.0.0.1:6379/0"
DB_HELP = (
    "share the search with other workers through this Redis store (Hypothesis' example "
    f"database), e.g. --db={DB_EXAMPLE}"
)
CLAIM_TTL_S = 30 * 86400  # as long as a campaign's examples are kept (Hypothesis: 8 days)


def parse_db_url(text: str, option: str = "--db") -> str:
    """``text`` if it is a usable ``redis://host:port/N`` address."""
    hint = f"redis://HOST:PORT/N, e.g. {option}={DB_EXAMPLE}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise CampaignError(f"{option}={text!r} is not a Redis address: {exc}", hint=hint) from None
    if parts.scheme != "redis":
        raise CampaignError(
            f"{option}={text!r}: the scheme is {parts.scheme or 'missing'!s}, not redis://",
            hint=hint,
        )
    if not parts.hostname:
        raise CampaignError(f"{option}={text!r} names no host", hint=hint)
    if port is None:
        raise CampaignError(f"{option}={text!r} names no port", hint=hint)
    number = parts.path.lstrip("/")
    if not number.isdigit():
        raise CampaignError(
            f"{option}={text!r}: the database number (after the last /) is "
            f"{number or 'missing'!s}, not a number",
            hint=hint,
        )
    if parts.query or parts.fragment:
        raise CampaignError(f"{option}={text!r} has a query or fragment", hint=hint)
    return text


def add_db_argument(parser: argparse.ArgumentParser) -> None:
    """``--db`` for ``afterclose explore`` and ``soak``."""
    parser.add_argument("--db", default=None, metavar="redis://HOST:PORT/N", help=DB_HELP)


def search_space(kind: str, target: str, fault_names: Iterable[str]) -> str:
    """The namespace of a search: examples replay only into the same strategy."""
    return f"{kind}:{target}:{','.join(sorted(fault_names))}"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _ReplayFirst(ExampleDatabase):
    """The Redis database, saying how many examples other workers saved when Hypothesis
    fetches its corpus (which it replays before generating anything)."""

    def __init__(self, inner: ExampleDatabase, url: str, log: Log) -> None:
        super().__init__()
        self.inner = inner
        self.url = url
        self.log = log
        self.primary: bytes | None = None
        self.replayed = 0  # examples of the primary corpus, replayed before generating
        self.fetched = 0  # values fetched in all

    def fetch(self, key: bytes) -> Iterable[bytes]:
        values = list(self.inner.fetch(key))
        self.fetched += len(values)
        # Hypothesis fetches its primary corpus first, then maybe the secondary one.
        if self.primary is None:
            self.primary = key
            self.replayed = len(values)
            if values:
                self.log(
                    f"shared store {self.url}: replaying {len(values)} shared example(s) "
                    "saved by workers before generating new ones"
                )
        return values

    def save(self, key: bytes, value: bytes) -> None:
        self.inner.save(key, value)

    def delete(self, key: bytes, value: bytes) -> None:
        self.inner.delete(key, value)

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        self.inner.move(src, dest, value)


class SharedExamples:
    """One worker's handle on the shared store: Hypothesis' database and the write claims.

    ``namespace`` separates searches that must not share examples: a saved example is a
    sequence of choices, meaningful only to the same strategy (target, faults, bounds).
    """

    def __init__(self, url: str, namespace: str, log: Log = print) -> None:
        import redis
        from hypothesis.extra.redis import RedisExampleDatabase

        self.url = parse_db_url(url)
        self._sent = 0
        shared = self

        class _Counting(redis.Connection):
            # One packed send is one round trip: a pipeline sends all its commands at once.
            def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                shared._sent += 1
                super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]

        self.client: Any = redis.Redis.from_url(
            url, connection_class=_Counting, socket_connect_timeout=5, socket_timeout=60
        )
        try:
            self.client.ping()
        except redis.RedisError as exc:
            self.client.close()
            raise CampaignError(
                f"cannot reach the shared store {url}: {exc}",
                where="--db",
                hint="start it first (redis-server --port PORT --bind ADDRESS), "
                "and check the address and database number",
            ) from None
        self.prefix = f"afterclose:{namespace}:"
        self.database = _ReplayFirst(
            RedisExampleDatabase(self.client, key_prefix=(self.prefix + "examples:").encode()),
            url,
            log,
        )

    @property
    def round_trips(self) -> int:
        return self._sent

    @property
    def replayed(self) -> int:
        return self.database.replayed

    def claim(self, scenario_key: str, where: str) -> str | None:
        """Claim the writing of the scenario whose canonical text is ``scenario_key``: None
        if this worker writes it, else what the worker that claimed it first recorded."""
        key = self.prefix + "written:" + digest(scenario_key)
        mine = f"{worker_name()} {where}"
        if self.client.set(key, mine, nx=True, ex=CLAIM_TTL_S):
            return None
        owner = self.client.get(key)
        return owner.decode() if isinstance(owner, bytes) else str(owner)

    def close(self) -> None:
        self.client.close()
