"""The team stack's start-up wait (scripts/team_stack.py) tolerates a server that is slow to answer."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from scripts.team_stack import wait_for_http


class _SlowFirstAnswer(BaseHTTPRequestHandler):
    """Answers its first request only after the poller's read timeout, later ones at once."""

    requests_seen = 0

    def do_GET(self) -> None:
        type(self).requests_seen += 1
        if type(self).requests_seen == 1:
            time.sleep(3)
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test's output clean."""


def test_a_server_that_times_out_a_first_request_is_waited_for(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowFirstAnswer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        wait_for_http(f"http://127.0.0.1:{server.server_port}/health", stand_in, tmp_path / "log")
    finally:
        stand_in.kill()
        server.shutdown()
    assert _SlowFirstAnswer.requests_seen >= 2
