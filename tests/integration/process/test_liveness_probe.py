"""The liveness probe on a real server that answers its first fresh request with 503 (a proxy
whose fetch from its backend hit a fault the harness injected): a run whose server calls the
harness perturbed asks again, and an unperturbed run reports the 503."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

from afterclose.harness.oracle.rules import liveness
from afterclose.harness.session import Harness, Settings

SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

first = [True]


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        status = 503 if first[0] else 200
        first[0] = False
        body = self.path.encode() + b"\\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
"""


def _harness(tmp_path: Path) -> Harness:
    (tmp_path / "server.py").write_text(SERVER)
    manifest = tmp_path / "first-503.toml"
    manifest.write_text(
        f"""
name = "first-503"
command = ["{sys.executable}", "server.py", "{{host}}", "{{port}}"]
echo_path = true
"""
    )
    settings = Settings(
        target=str(manifest), rootdir=tmp_path, run_id=uuid.uuid4().hex, tracer="off"
    )
    return Harness(settings)


def test_a_perturbed_run_asks_again_after_a_wrong_answer(tmp_path: Path) -> None:
    with _harness(tmp_path).start(tmp_path / "run", "perturbed") as run:
        assert liveness.check_liveness(run.server, perturbed=True) is None


def test_an_unperturbed_run_reports_the_wrong_answer(tmp_path: Path) -> None:
    with _harness(tmp_path).start(tmp_path / "run", "plain") as run:
        found = liveness.check_liveness(run.server)
    assert found is not None and "status 503, expected 200" in found.summary
