"""The container's output, demultiplexed from the engine's log stream into two files."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any


class LogPump(threading.Thread):
    """Copies a container's stdout and stderr into two files as they are written.

    One follow-mode request to the engine's logs endpoint carries both streams, framed as
    the Engine API documents for a container without a TTY: an 8-byte header (stream type,
    three zero bytes, big-endian payload size), then the payload.  Reading it here saves the
    two container inspections docker-py's ``logs()`` makes per call.  The request is sent
    before the thread starts, so nothing is lost; it ends once the container has stopped."""

    STREAMS = {1: 0, 2: 1}  # stream type -> index in ``paths`` (stdout, stderr)

    def __init__(self, api: Any, container_id: str, paths: tuple[Path, Path]) -> None:
        super().__init__(name=f"afterclose-logs-{container_id[:12]}", daemon=True)
        self.paths = paths
        url = f"{api.base_url}/v{api.api_version}/containers/{container_id}/logs"
        params = {"stdout": 1, "stderr": 1, "follow": 1}
        # No read timeout: a quiet target may write nothing for minutes.
        self._response = api.get(url, params=params, stream=True, timeout=None)
        self._response.raise_for_status()
        self.error: BaseException | None = None

    def _read_exactly(self, size: int) -> bytes:
        raw = self._response.raw
        data = b""
        while len(data) < size:
            chunk = raw.read(size - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def run(self) -> None:
        try:
            with self.paths[0].open("ab") as out, self.paths[1].open("ab") as err:
                files = (out, err)
                while len(header := self._read_exactly(8)) == 8:
                    payload = self._read_exactly(int.from_bytes(header[4:8], "big"))
                    sink = files[self.STREAMS.get(header[0], 1)]
                    sink.write(payload)
                    sink.flush()
        except Exception as exc:  # the engine went away, or close() below
            self.error = exc
        finally:
            self._response.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._response.close()
