"""MLflow plumbing: where runs go, and one tagged run per stage execution."""

from __future__ import annotations

import base64
import logging
import math
import os
import re
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from skin_lesion.errors import PipelineError
from skin_lesion.files import process_alive, repo_root
from skin_lesion.params import BaseParams

# Embedded default: a SQLite store and an artifact folder at the repository root, no server needed.
DEFAULT_DB_NAME = "mlflow.db"


DEFAULT_ARTIFACTS_NAME = "mlartifacts"


log = logging.getLogger("skin_lesion.tracking")

# MLflow 3's UI opens an experiment of this kind on its runs (not the GenAI traces view).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
HOST_TAG = "host"  # where a stage ran, and its process: a run left RUNNING by a dead one was killed
PID_TAG = "pid"
MODEL_TRAINING_KIND = "custom_model_development"
URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")
HTTP_SCHEMES = ("http://", "https://")


SERVER_SCHEMES = (*HTTP_SCHEMES, "databricks")
PROBE_TIMEOUT_S = 30.0


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (a team's server), else the SQLite file at the repo root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / DEFAULT_DB_NAME}"


def check_tracking_server(timeout_s: float | None = None) -> None:
    """Fail at once, naming the URI, when MLFLOW_TRACKING_URI is a server that does not answer."""
    uri = tracking_uri()
    if not uri.startswith(HTTP_SCHEMES):
        return
    try:
        with urllib.request.urlopen(probe_request(uri), timeout=timeout_s or probe_timeout_s()):
            pass
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise PipelineError(
                f"MLFLOW_TRACKING_URI={redact(uri)}: the tracking server refused the credentials"
                f" (HTTP {err.code}); check MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN"
            ) from None
        cause = " (the server failed: is its database or artifact store up?)" if err.code >= 500 else ""
        raise PipelineError(
            f"MLFLOW_TRACKING_URI={redact(uri)}: tracking server answered HTTP {err.code}{cause}"
        ) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise PipelineError(
            f"MLFLOW_TRACKING_URI={redact(uri)}: tracking server not reachable ({redact(str(reason))})"
        ) from None


def probe_timeout_s() -> float:
    """How long the pre-flight waits: MLflow's own MLFLOW_HTTP_REQUEST_TIMEOUT when set, else 30 s.

    Not a few seconds: a server's first request creates its store (migrations, a pool of database
    connections), which takes several seconds on a busy machine. A refused connection fails at once
    whatever the timeout; only a host that swallows packets waits this long.
    """
    setting = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "").strip()
    if not setting:
        return PROBE_TIMEOUT_S
    try:
        seconds = float(setting)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise PipelineError(f"MLFLOW_HTTP_REQUEST_TIMEOUT={setting!r} is not a positive number of seconds")
    return seconds


def probe_request(uri: str) -> urllib.request.Request:
    """A one-experiment search on the server, with the credentials MLflow itself would send.

    A search, not /health: an auth-enabled server answers /health to anyone, so only a call that
    needs the credentials shows whether they are accepted.

    Those are a user and password in the URI, else MLFLOW_TRACKING_USERNAME and _PASSWORD (basic
    auth), else MLFLOW_TRACKING_TOKEN (bearer); urllib does not take credentials from a URI itself.
    """
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    path = parts.path.rstrip("/") + "/api/2.0/mlflow/experiments/search"
    url = urllib.parse.urlunsplit(parts._replace(netloc=netloc, path=path, query="max_results=1"))
    request = urllib.request.Request(url)
    username = urllib.parse.unquote(parts.username or "") or os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = urllib.parse.unquote(parts.password or "") or os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if username and password:
        basic = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        request.add_header("Authorization", f"Basic {basic}")
    elif token:
        request.add_header("Authorization", f"Bearer {token}")
    return request


def redact(text: str) -> str:
    """The text with the password of any URL in it replaced by ***, fit for messages and logs."""
    return URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", text)


def configure_mlflow() -> None:
    """Point MLflow at the tracking store (and the registry, which lives in the same store)."""
    uri = tracking_uri()
    if redact(uri) != uri:
        # MLflow prints each run's link with the URI's password in it; stage_run logs it redacted.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


@contextmanager
def stage_run(stage: str, base: BaseParams, section: BaseModel) -> Iterator[mlflow.ActiveRun]:
    """Start an MLflow run for `stage`, tagged with the DVC experiment and git commit, params logged."""
    configure_mlflow()
    experiment_id = _experiment_id(base.experiment_name)
    mark_killed_runs(experiment_id, stage)
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=_run_tags(stage)) as run:
        if tracking_uri().startswith(HTTP_SCHEMES):
            server = redact(tracking_uri()).rstrip("/")
            log.info("MLflow run: %s/#/experiments/%s/runs/%s", server, experiment_id, run.info.run_id)
        mlflow.log_params(flatten_params({"base": base.model_dump(), stage: section.model_dump()}))
        yield run


def mark_killed_runs(experiment_id: str, stage: str) -> None:
    """Mark KILLED the runs of `stage` left RUNNING on this machine by a process that no longer exists.

    A killed stage never ends its MLflow run; without this it would show as running for ever.
    """
    host = socket.gethostname()
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [experiment_id],
        f"tags.stage = '{stage}' and attributes.status = 'RUNNING' and tags.{HOST_TAG} = '{host}'",
    )
    for run in runs:
        pid = int(run.data.tags.get(PID_TAG, "0"))
        if pid and not process_alive(pid):
            client.set_terminated(run.info.run_id, status="KILLED")
            log.warning(
                "MLflow run %s of stage %s was left running by a killed process: marked KILLED",
                run.info.run_id,
                stage,
            )


def flatten_params(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys, as `dvc exp run -S` spells them."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _experiment_id(name: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
            mlflow.MlflowClient().set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
            )
        return experiment.experiment_id
    artifact_location = None
    if not tracking_uri().startswith(SERVER_SCHEMES):
        # A server picks its own artifact store. A local store would put artifacts under the current
        # folder, which is a throw-away copy of the repo when DVC runs a queued experiment.
        artifact_location = (repo_root() / DEFAULT_ARTIFACTS_NAME).as_uri()
    try:
        return mlflow.create_experiment(
            name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
        )
    except MlflowException:
        # Another stage running in parallel may have created it in the meantime.
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


GIT_COMMIT_TAG = "mlflow.source.git.commit"
DVC_DATA_TAG = "dvc.data."  # + an output's path: its DVC content hash, e.g. dvc.data.data/split


def upstream_data_hashes(stage: str, workspace: Path) -> dict[str, str]:
    """The DVC content hashes (dvc.lock) of the outputs of the stages before `stage`: its data inputs.

    DVC runs the stages in order and records each one's outputs in dvc.lock as it finishes, so when
    `stage` starts, the entries of the stages before it describe exactly the data it reads.
    """
    pipeline, lock = workspace / "dvc.yaml", workspace / "dvc.lock"
    if not (pipeline.is_file() and lock.is_file()):
        return {}
    order = list(yaml.safe_load(pipeline.read_text(encoding="utf-8")).get("stages", {}))
    if stage not in order:
        return {}
    locked = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    hashes = {}
    for earlier in order[: order.index(stage)]:
        for out in locked.get(earlier, {}).get("outs", []):
            hashes[out["path"]] = str(out.get(out.get("hash", "md5"), ""))
    return hashes


def _run_tags(stage: str) -> dict[str, str]:
    tags = {"stage": stage, HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    data = upstream_data_hashes(stage, Path.cwd())
    tags.update({f"{DVC_DATA_TAG}{path}": value for path, value in data.items()})
    for variable in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        if os.environ.get(variable):
            tags[variable] = os.environ[variable]
    commit = _git_commit()
    if commit:
        tags[GIT_COMMIT_TAG] = commit
    return tags


def _git_commit() -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    # A repository without commits has no HEAD yet; the run is still worth recording.
    return result.stdout.strip() if result.returncode == 0 else None


def loggable_metrics(nested: dict[str, Any]) -> dict[str, float]:
    """The numbers of a nested report as MLflow metrics, named by their path (`melanoma.auc`)."""
    flat = flatten_params(nested)
    # MLflow allows letters, digits, _ - . / and spaces in metric names; collection names may hold more.
    # A flag (an external set's chose_recipe) is a fact about the run, not a number to chart.
    return {
        re.sub(r"[^\w\-. /]", "_", key): value
        for key, value in flat.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
