"""Every key a target manifest may hold: its expected value, default and meaning, once.

The parser (``manifest.py``) takes each key's description and default from here, the README's
manifest table and ``afterclose manifest --explain`` are printed from here, and a test checks
that the parser reads exactly these keys.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Key:
    """``name`` is dotted for keys in a table (``ready.log``); ``value`` says what it takes."""

    name: str
    value: str
    default: object
    meaning: str
    required: bool = False

    @property
    def default_text(self) -> str:
        if self.required:
            return "required"
        if self.default is None or self.default in ((), {}, ""):
            return "none"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, str):
            return f'"{self.default}"'
        return str(self.default)


# What the commonest kinds of key take, as the tables show it.
SECONDS = "seconds (> 0)"
SWITCH = "true or false"
HTTP_PATH = "an HTTP path"
STRINGS = "a list of strings"

KEYS: dict[str, Key] = {
    k.name: k
    for k in (
        Key("name", "a target name", "", "the target's name in test ids and reports", True),
        Key(
            "command",
            STRINGS,
            (),
            "the server's command line, run in the manifest's folder: a program path with a "
            "slash is relative to that folder, a bare name is found on PATH; placeholders "
            "{host} {port} {build} {workdir} {manifest_dir} {python} {tls_cert} {tls_key}",
            True,
        ),
        Key("description", "a string", "", "one line for `afterclose targets`"),
        Key(
            "build",
            "a list of strings (a command)",
            None,
            "run once per test run in the manifest's folder before the first start",
        ),
        Key("env", "a table of strings", {}, "environment of the server (placeholders apply)"),
        Key(
            "files",
            "a table of file name = template text",
            {},
            "files written into the test's work folder before each start (placeholders apply)",
        ),
        Key(
            "echo_path",
            SWITCH,
            False,
            "the server's 2xx bodies contain the request path: cross-talk is also checked by body",
        ),
        Key("liveness_path", HTTP_PATH, "/", "what the liveness check asks for"),
        Key("liveness_status", "an HTTP status", 200, "the status a live server answers it with"),
        Key(
            "fd_grace_s",
            SECONDS,
            2.0,
            "how long after its last client left the server may take to close its sockets",
        ),
        Key("stop_signal", "a signal", "SIGTERM", "the signal that stops the server"),
        Key("stop_timeout_s", SECONDS, 5.0, "how long to wait after it before SIGKILL"),
        Key(
            "tracer",
            "a tracer mode",
            "auto",
            "the tracer this target needs (auto, preload, ebpf, off)",
        ),
        Key(
            "restart_keeps",
            "HTTP paths",
            (),
            "paths answered the same after the `kill` fault restarts the server",
        ),
        Key(
            "protocol",
            "a protocol name, or module:Class",
            "http",
            "what clients speak: http, line, resp, memcached, mqtt, raw (`afterclose "
            "protocols`), or a Protocol subclass in module.py beside the manifest",
        ),
        Key(
            "tls",
            SWITCH,
            False,
            "clients speak the protocol over TLS; the server gets the certificate the harness "
            "makes, through {tls_cert} and {tls_key}",
        ),
        Key(
            "request_headers",
            "a table of header name = value",
            {},
            'extra headers sent with every request, e.g. { Host = "example.org" }',
        ),
        Key(
            "large_path",
            HTTP_PATH,
            None,
            "a path whose answer is large (hundreds of KiB): the mid-response faults ask for "
            "it, so that a reset meets a response the server is still writing",
        ),
        Key(
            "idle_timeout_s",
            SECONDS,
            None,
            "the server's idle timeout: the suite then holds connections idle past it while "
            "new connections reuse fd numbers (test_idle_timeout)",
        ),
        Key("compile.sources", "a list of source files", (), "C sources the harness builds", True),
        Key("compile.cflags", STRINGS, (), "extra compiler flags"),
        Key("compile.ldflags", STRINGS, (), "extra linker flags"),
        Key("ready.log", "a string to wait for in the output", None, "ready once it is printed"),
        Key(
            "ready.port",
            SWITCH,
            False,
            "ready once the port accepts a connection; the strategy when none is given",
        ),
        Key(
            "ready.http",
            HTTP_PATH,
            None,
            "ready once a GET of it is answered with a status below 500",
        ),
        Key(
            "ready.protocol",
            SWITCH,
            False,
            "ready once a request of the manifest's protocol is answered (raw: a connection "
            "is accepted and kept)",
        ),
        Key("ready.timeout_s", SECONDS, 10.0, "how long the server may take to be ready"),
        Key("docker.image", "an image name", None, "the image the Docker runner runs"),
        Key("docker.dockerfile", "a path to a Dockerfile", None, "or: the image is built from it"),
        Key("docker.context", "a build context folder", None, "the Dockerfile's build context"),
        Key("docker.run_args", STRINGS, (), "extra `docker run` options (a few)"),
        Key("docker.libc", "a libc", "glibc", "the image's libc, for the shim (glibc, musl, none)"),
        Key(
            "docker.unsupported",
            "a reason",
            None,
            "the target cannot run in a container: `--runner=docker` stops with this reason "
            "before any test runs",
        ),
        Key(
            "docker.cap_add",
            "a list of capability names",
            (),
            "the only capabilities the container keeps (all others are dropped), e.g. "
            '["NET_BIND_SERVICE"]; they take effect for a root user (`docker.user = "root"`)',
        ),
        Key(
            "docker.user",
            '"root", a user name or UID[:GID]',
            None,
            "the container's user; by default a non-root one (65534, or the harness's own "
            "user when it is not root), who is given the work folders",
        ),
    )
}


def markdown_table() -> str:
    """The README's manifest table."""
    lines = ["| key | value | default | meaning |", "| --- | --- | --- | --- |"]
    for key in KEYS.values():
        lines.append(f"| `{key.name}` | {key.value} | {key.default_text} | {key.meaning} |")
    return "\n".join(lines) + "\n"


def explain() -> str:
    """The same, as plain text for the terminal."""
    width = max(len(k.name) for k in KEYS.values())
    lines = []
    for key in KEYS.values():
        lines.append(f"{key.name:<{width}}  {key.value} (default: {key.default_text})")
        lines.append(f"{'':<{width}}  {key.meaning}")
    return "\n".join(lines)
