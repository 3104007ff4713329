"""``afterclose protocols``: the protocols a manifest can name, and the keys that choose them."""

from __future__ import annotations

import argparse

KEYS_TEXT = """\
manifest keys:
  protocol = "NAME"            one of the names above (default "http")
  protocol = "module:Class"    a Protocol subclass in module.py beside target.toml
                               (docs/protocols.md)
  tls = true                   the same protocol over TLS; the server gets the harness's
                               certificate through {tls_cert} and {tls_key}
  [ready] protocol = true      ready once a request in the protocol is answered
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("protocols", help="list the protocols a target may speak")
    p.add_argument("--markdown", action="store_true", help="print a markdown table instead")
    p.set_defaults(func=list_protocols)


def describe(markdown: bool) -> str:
    from afterclose.harness import protocols

    rows = []
    for name, (_, _, meaning) in protocols.BUILTIN.items():
        speaks = protocols.builtin(name)
        replies = "judged" if speaks.has_replies else "not read: connection-level checks only"
        rows.append((f'protocol = "{name}"', meaning, replies))
    if markdown:
        lines = ["| manifest key | what the clients send and expect | replies |"]
        lines.append("| --- | --- | --- |")
        lines.extend(f"| `{key}` | {meaning} | {replies} |" for key, meaning, replies in rows)
        return "\n".join(lines) + "\n"
    width = max(len(key) for key, _, _ in rows)
    lines = [f"{key:<{width}}  {meaning}" for key, meaning, _ in rows]
    return "\n".join(lines) + "\n\n" + KEYS_TEXT


def list_protocols(args: argparse.Namespace) -> int:
    print(describe(args.markdown), end="")
    return 0
