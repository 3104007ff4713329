"""Least privilege for a target's container: no capability it did not declare, no new
privileges, and a non-root user who owns the folders it writes.

Docker's default set (NET_RAW among them, on the host's network here) is dropped whole
(``cap_drop=ALL``); the manifest's ``docker.cap_add`` names what comes back.  Docker gives
added capabilities to a root user only: a non-root process keeps them in its bounding set but
not its effective one, so a server that binds a low port or drops privileges itself runs with
``docker.user = "root"`` and, e.g., ``cap_add = ["NET_BIND_SERVICE", "SETUID", "SETGID"]``.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afterclose.harness.manifest import Manifest

NOBODY = "65534:65534"
NO_NEW_PRIVILEGES = "no-new-privileges:true"


@dataclass(frozen=True)
class Privileges:
    user: str
    cap_add: tuple[str, ...]
    cap_drop: tuple[str, ...]
    security_opt: tuple[str, ...]

    @property
    def root(self) -> bool:
        return self.user.split(":")[0] in ("root", "0")

    def host_config(self) -> dict[str, Any]:
        """The ``create_host_config`` keywords."""
        return {
            "cap_add": list(self.cap_add) or None,
            "cap_drop": list(self.cap_drop),
            "security_opt": list(self.security_opt),
        }


def default_user() -> str:
    """Nobody when the harness is root (it hands the folders over); else the harness's own
    user, who owns them already."""
    if os.geteuid() == 0:
        return NOBODY
    return f"{os.geteuid()}:{os.getegid()}"


def privileges(manifest: Manifest, run_args: Mapping[str, Any]) -> Privileges:
    """What the container runs with: the manifest's ``docker.user`` and ``docker.cap_add``
    (``run_args``' ``--user``, ``--cap-add`` and ``--security-opt`` still count)."""
    spec = manifest.docker
    user = (spec.user if spec else None) or run_args.get("user") or default_user()
    added = (*(spec.cap_add if spec else ()), *run_args.get("cap_add", ()))
    dropped = ("ALL", *run_args.get("cap_drop", ()))
    options = (*run_args.get("security_opt", ()), NO_NEW_PRIVILEGES)
    return Privileges(
        user=str(user),
        cap_add=tuple(dict.fromkeys(c.upper().removeprefix("CAP_") for c in added)),
        cap_drop=tuple(dict.fromkeys(c.upper() for c in dropped)),
        security_opt=tuple(dict.fromkeys(options)),
    )


def hand_over(folders: Iterable[Path | None], user: str) -> None:
    """Give the folders the container writes (workdir, trace folder) to its user, with what
    the harness already put in them (the manifest's `files`, which a launcher may append to)."""
    if user.split(":")[0] in ("root", "0") or os.geteuid() != 0:
        return  # root owns them already; a non-root harness runs the container as itself
    owner = _ids(user)
    for folder in folders:
        if folder is None:
            continue
        if owner is None:
            # A user name the host does not know: only the image knows its number.
            folder.chmod(0o1777)
        else:
            os.chown(folder, *owner)
            for path in folder.rglob("*"):
                os.chown(path, *owner, follow_symlinks=False)


def _ids(user: str) -> tuple[int, int] | None:
    name, _, group = user.partition(":")
    if name.isdigit():
        uid = int(name)
        return uid, int(group) if group.isdigit() else uid
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return entry.pw_uid, int(group) if group.isdigit() else entry.pw_gid
