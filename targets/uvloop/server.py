"""The afterclose target ``uvloop``: the ``asyncio`` target's server on uvloop's event loop.

The HTTP code is ``targets/asyncio/server.py`` itself (loaded by path: this folder is not a
package, and a plain ``import server`` would find this file again); only the loop differs, so
any difference between the two targets' verdicts is uvloop's (libuv's) doing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

# The manifest names the file in the environment (so that a container image gets it too).
SHARED = Path(
    os.environ.get("AFTERCLOSE_ASYNCIO_SERVER")
    or Path(__file__).resolve().parent.parent / "asyncio" / "server.py"
)


def main() -> int:
    try:
        import uvloop
    except ImportError:
        print(
            f"afterclose target 'uvloop': the uvloop package is not installed for {sys.executable}"
            "\nhint: pip install uvloop (it is in afterclose's `test` extra), or run pytest from"
            " the virtual environment that has it (the target runs `python3` from PATH)",
            file=sys.stderr,
        )
        return 2
    spec = importlib.util.spec_from_file_location("afterclose_target_asyncio_server", SHARED)
    if spec is None or spec.loader is None:
        print(f"afterclose target 'uvloop': cannot load {SHARED}", file=sys.stderr)
        return 2
    shared = importlib.util.module_from_spec(spec)
    # dataclasses looks a class's module up in sys.modules while it builds the class.
    sys.modules[spec.name] = shared
    spec.loader.exec_module(shared)
    version = importlib.metadata.version("uvloop")
    result: int = shared.main(
        loop_factory=uvloop.new_event_loop,
        loop_name=f"uvloop {version}",
        name="afterclose-uvloop",
    )
    return result


if __name__ == "__main__":
    sys.exit(main())
