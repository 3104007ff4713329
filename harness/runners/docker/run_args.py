"""``[docker] run_args``: the few ``docker run`` flags a manifest may give its container."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from afterclose.harness.errors import ManifestError
from afterclose.harness.manifest import Manifest

ULIMIT_NAMES = (
    "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile", "nproc",
    "rss", "rtprio", "rttime", "sigpending", "stack",
)  # fmt: skip
SUPPORTED_RUN_ARGS = (
    "--ulimit NAME=SOFT[:HARD]",
    "--pids-limit N",
    "--memory/-m SIZE",
    "--cap-add CAP",
    "--cap-drop CAP",
    "--user/-u USER[:GROUP]",
    "--cpus N",
    "--shm-size SIZE",
    "--security-opt OPT",
)
_ALIASES = {"-m": "--memory", "-u": "--user"}
_FLAGS = frozenset(option.split()[0].split("/")[0] for option in SUPPORTED_RUN_ARGS)
_SIZE = re.compile(r"^[0-9]+[bkmg]?$", re.IGNORECASE)


def parse_run_args(args: Sequence[str], manifest: Manifest) -> dict[str, Any]:
    """``[docker] run_args`` (docker run flags) as docker-py ``containers.create`` keywords.
    Network, mounts, env and init are the harness's to set; other flags are rejected."""
    import docker.types

    where = manifest.path
    key = "docker.run_args"

    def fail(message: str) -> ManifestError:
        return ManifestError(
            f"key {key!r}: {message}",
            where=where,
            hint=f"supported: {', '.join(SUPPORTED_RUN_ARGS)}; put anything else in the image "
            "(a Dockerfile)",
        )

    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        flag = _ALIASES.get(flag, flag)
        if not flag.startswith("--"):
            raise fail(f"expected an option, got {arg!r}")
        if flag not in _FLAGS:
            raise fail(f"unsupported option {flag!r}")
        if not eq:
            if i + 1 >= len(args):
                raise fail(f"{flag} needs a value")
            i += 1
            value = args[i]
        i += 1
        if flag == "--ulimit":
            name, _, limits = value.partition("=")
            soft, _, hard = limits.partition(":")
            if name not in ULIMIT_NAMES or not re.fullmatch(r"-?[0-9]+", soft or "x"):
                raise fail(f"bad --ulimit {value!r}: write NAME=SOFT[:HARD], e.g. nofile=1024:4096")
            if hard and not re.fullmatch(r"-?[0-9]+", hard):
                raise fail(f"bad --ulimit {value!r}: the hard limit is not a number")
            out.setdefault("ulimits", []).append(
                docker.types.Ulimit(name=name, soft=int(soft), hard=int(hard or soft))
            )
        elif flag == "--pids-limit":
            if not re.fullmatch(r"-?[0-9]+", value):
                raise fail(f"bad --pids-limit {value!r}: a whole number")
            out["pids_limit"] = int(value)
        elif flag in ("--memory", "--shm-size"):
            if not _SIZE.match(value):
                raise fail(f"bad {flag} {value!r}: a size such as 512m or 2g")
            out["mem_limit" if flag == "--memory" else "shm_size"] = value
        elif flag in ("--cap-add", "--cap-drop"):
            out.setdefault(flag[2:].replace("-", "_"), []).append(value)
        elif flag == "--user":
            out["user"] = value
        elif flag == "--cpus":
            try:
                cpus = float(value)
            except ValueError:
                cpus = -1.0
            if cpus <= 0:
                raise fail(f"bad --cpus {value!r}: a number > 0")
            out["nano_cpus"] = int(cpus * 1e9)
        else:  # --security-opt
            out.setdefault("security_opt", []).append(value)
    return out
