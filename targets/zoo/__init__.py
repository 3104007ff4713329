"""The zoo: real-world fd-lifecycle bugs, each re-created as a small target with its fixed
twin (``<name>-fixed``).  :data:`ZOO` says, per buggy target, the traced rule that names its
mechanism and the built-in scenarios that find it within seconds; the CI test
(tests/integration/process/test_zoo.py) and bench/zoo.py read it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ZooEntry:
    name: str
    rule: str  # the traced rule that names the mechanism
    scenarios: str  # -k expression: the scenarios that find it within seconds
    # False: found in most runs on a quiet machine (docs/zoo.md), but not reliably under CI's
    # load, where a miss would make CI red by chance: bench/zoo.py measures it instead.
    in_ci: bool = True


ZOO: tuple[ZooEntry, ...] = (
    ZooEntry(
        "h2o-1427",
        "use-after-close",
        "test_keepalive_requests or test_half_close or mid-response or after-half-close",
    ),
    ZooEntry("libuv-968", "use-after-close", "test_connection_storm or test_reset_peer"),
    ZooEntry("go-59545", "wrong-incarnation", "test_connection_storm"),
    ZooEntry("envoy-20438", "use-after-close", "test_keepalive_requests"),
    ZooEntry("haproxy-1807", "use-after-close", "test_keepalive_requests"),
    ZooEntry("httpzig-216", "freed-while-registered", "test_keepalive_requests"),
    ZooEntry("redis-333", "stale-batch-event", "test_connection_storm"),
    ZooEntry("libuv-1148", "event-after-close", "test_half_close"),
    ZooEntry("ds389-7846", "concurrent-oneshot", "test_half_close or test_reset_peer"),
    ZooEntry("netty-42577", "busy-loop", "after-half-close"),
)
