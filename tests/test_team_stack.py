"""The team stack: Docker's files checked without an engine, and scripts/team_stack.py's start-up wait."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from scripts.team_stack import wait_for_http
from skin_lesion.registry.model_contents import locked_versions
from tests.conftest import REPO

CHECK_JSONSCHEMA = str(Path(sys.executable).with_name("check-jsonschema"))


def _compose_check(path: Path) -> subprocess.CompletedProcess:
    command = [CHECK_JSONSCHEMA, "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def test_the_compose_file_follows_the_compose_spec(tmp_path: Path) -> None:
    result = _compose_check(REPO / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    broken = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))
    broken["services"]["mlflow"]["depends_on"] = 3
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(broken), encoding="utf-8")
    assert _compose_check(tmp_path / "compose.yaml").returncode != 0  # the check does bite


def test_every_image_is_pinned_and_the_server_gets_the_locks_versions() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))
    dockerfile = (REPO / "docker" / "mlflow" / "Dockerfile").read_text(encoding="utf-8")
    images = [service["image"] for service in compose["services"].values() if "image" in service]
    images += [line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert all(":" in image and not image.endswith(":latest") for image in images), images
    locked = locked_versions((REPO / "requirements.lock").read_text(encoding="utf-8"))
    for package in ("psycopg[binary]", "boto3"):
        assert f'"{package}=={locked[package.split("[")[0]]}"' in dockerfile
    settings = dict(
        line.split("=", 1)
        for line in (REPO / ".env.example").read_text(encoding="utf-8").splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert settings["MLFLOW_VERSION"] == locked["mlflow"]


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
