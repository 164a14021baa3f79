"""A real MLflow tracking server on 127.0.0.1, and what happens when it cannot be reached."""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import pytest
import yaml

from skin_lesion.errors import PipelineError
from skin_lesion.tracking import check_tracking_server, probe_timeout_s, redact, stage_run
from tests.conftest import as_params, free_port, mlflow_server, run_stage, small_params


def test_unreachable_server_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(
        PipelineError, match=r"MLFLOW_TRACKING_URI=http://127.0.0.1:\d+: tracking server not reachable"
    ):
        check_tracking_server(timeout_s=2)


def test_passwords_are_redacted_from_messages() -> None:
    assert redact("https://ana:s3cret@mlflow.example:8443/") == "https://ana:***@mlflow.example:8443/"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_stage_stops_before_any_work_when_server_is_down(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(small_params()), encoding="utf-8")
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_stage(
        tmp_path, "download", "--out", "data/raw", "--cache", "data/cache/isic", MLFLOW_TRACKING_URI=uri
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"ERROR skin_lesion: MLFLOW_TRACKING_URI={uri}: tracking")
    )
    assert time.monotonic() - started < 30
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_stage_runs_land_on_a_real_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with mlflow_server(tmp_path) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "never-logged-secret")
        monkeypatch.setenv("DVC_EXP_NAME", "on-server")
        check_tracking_server()
        params = as_params(small_params())
        with stage_run("split", params.base, params.split) as run:
            mlflow.log_metric("images_in", 3)
        logged = mlflow.MlflowClient(uri).get_run(run.info.run_id)
        assert logged.data.tags["stage"] == "split"
        assert logged.data.tags["DVC_EXP_NAME"] == "on-server"
        assert logged.data.metrics["images_in"] == 3
        everything = str(logged.data.params) + str(logged.data.tags)
        assert "never-logged-secret" not in everything


ADMIN_PASSWORD = "s3cret-Passw0rd-for-tests"


@pytest.mark.slow
def test_credentials_in_the_uri_work_and_are_never_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    config = tmp_path / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = admin\n"
        f"admin_password = {ADMIN_PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        encoding="utf-8",
    )
    auth = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": "tests-only-secret"}
    with mlflow_server(tmp_path, "--app-name", "basic-auth", env=auth) as plain:
        with_password = plain.replace("http://", f"http://admin:{ADMIN_PASSWORD}@")
        # A wrong password is one line naming the URI, without the password.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", plain.replace("http://", "http://admin:wrong@"))
        with pytest.raises(PipelineError, match=r"admin:\*\*\*@127.0.0.1:\d+: the tracking server refused"):
            check_tracking_server()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", with_password)
        check_tracking_server()
        params = as_params(small_params())
        with stage_run("split", params.base, params.split) as run:
            mlflow.log_metric("images_in", 3)
        # The same credentials as environment variables, as MLflow documents them.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", plain)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        check_tracking_server()
        logged = mlflow.MlflowClient(with_password).get_run(run.info.run_id)
    assert logged.data.metrics["images_in"] == 3
    recorded = " ".join([*logged.data.tags.values(), *logged.data.params.values()])
    printed = capfd.readouterr()
    assert ADMIN_PASSWORD not in recorded
    assert ADMIN_PASSWORD not in printed.out + printed.err


def test_the_pre_flight_waits_as_long_as_mlflow_would(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    assert probe_timeout_s() == 30.0
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "12.5")
    assert probe_timeout_s() == 12.5


@pytest.mark.parametrize("setting", ["soon", "0", "-3", "nan", "inf"])
def test_a_timeout_that_is_no_duration_is_one_line(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", setting)
    with pytest.raises(PipelineError, match=r"^MLFLOW_HTTP_REQUEST_TIMEOUT=.* is not a positive number"):
        probe_timeout_s()
