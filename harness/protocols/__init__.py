"""The protocols a target may speak, chosen by the manifest's ``protocol`` key."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from afterclose.harness.errors import ManifestError
from afterclose.harness.protocols.base import Protocol

# name -> (module, class, what it is); modules are imported on first use.
BUILTIN: dict[str, tuple[str, str, str]] = {
    "http": ("http", "Http", "HTTP/1.1 GETs whose path is the tag"),
    "line": ("line", "Line", "newline-terminated echo: the reply is the line sent"),
    "resp": ("resp", "Resp", "Redis serialization protocol: SET/GET of a per-connection key"),
    "memcached": ("memcached", "Memcached", "memcached text protocol: set/get per connection"),
    "mqtt": ("mqtt", "Mqtt", "MQTT 3.1.1: PUBLISH to the connection's own subscribed topic"),
    "raw": ("raw", "Raw", "bytes only: connection-level faults, no replies judged"),
}


def builtin(name: str) -> Protocol:
    module, cls, _ = BUILTIN[name]
    loaded = importlib.import_module(f"afterclose.harness.protocols.{module}")
    # No isinstance() check: pytester's in-process runs drop the modules a run imported
    # first, and a later run's copy of base.Protocol is another class than this module's.
    made: Protocol = getattr(loaded, cls)()
    return made


def resolve(spec: str, folder: Path, where: Path | None = None) -> Protocol:
    """The protocol named ``spec``: a built-in name, or ``module:Class`` with ``module.py`` in
    ``folder`` (the manifest's), its class a subclass of :class:`Protocol` made without
    arguments."""
    if spec in BUILTIN:
        return builtin(spec)
    module, colon, cls = spec.partition(":")
    hint = (
        f"built-in protocols: {', '.join(BUILTIN)}; or module:Class with module.py beside "
        "the manifest"
    )
    if not colon or not module.isidentifier() or not cls.isidentifier():
        raise ManifestError(f"key 'protocol': unknown protocol {spec!r}", where=where, hint=hint)
    path = folder / f"{module}.py"
    if not path.is_file():
        raise ManifestError(f"key 'protocol': no file {path}", where=where, hint=hint)
    qualified = f"afterclose_user_protocol_{module}_{abs(hash(str(path))):x}"
    loaded = sys.modules.get(qualified)
    if loaded is None:
        import_spec = importlib.util.spec_from_file_location(qualified, path)
        assert import_spec is not None and import_spec.loader is not None
        loaded = importlib.util.module_from_spec(import_spec)
        sys.modules[qualified] = loaded
        try:
            import_spec.loader.exec_module(loaded)
        except Exception as exc:
            del sys.modules[qualified]
            raise ManifestError(
                f"key 'protocol': importing {path} failed: {type(exc).__name__}: {exc}",
                where=where,
            ) from exc
    made = getattr(loaded, cls, None)
    if not isinstance(made, type) or not issubclass(made, Protocol):
        raise ManifestError(
            f"key 'protocol': {cls!r} in {path} is not a Protocol subclass",
            where=where,
            hint="subclass afterclose.harness.protocols.base.Protocol (see docs/protocols.md)",
        )
    try:
        return made()
    except TypeError as exc:
        raise ManifestError(
            f"key 'protocol': {cls}() failed: {exc}",
            where=where,
            hint="its class must be abstract-free and take no arguments",
        ) from exc
