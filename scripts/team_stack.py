"""A team's tracking stack on one machine without Docker: PostgreSQL, an S3-compatible store, MLflow.

    python scripts/team_stack.py start [--dir .team-stack]   # prints what a client sets
    python scripts/team_stack.py stop [--dir .team-stack]

The topology of compose.yaml: MLflow's backend store is PostgreSQL (Debian's server binaries, a
throwaway cluster), and its artifacts go to an S3 bucket through the MLflow server (proxied
artifact access: clients need no object-store credentials). A second bucket is the DVC remote.
The object store is moto's server mode, which MLflow and DVC test against: it keeps everything in
memory and is for testing and trying things out; run MinIO (compose.yaml) for real work.
Everything listens on 127.0.0.1. `--dir` holds the logs and the state that `stop` reads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path


def _postgres_binaries() -> Path:
    # Debian installs each major version's server under /usr/lib/postgresql/<version>/bin.
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return installed[-1].parent if installed else Path("/usr/lib/postgresql/15/bin")


PG_BIN = Path(os.environ.get("PG_BIN") or _postgres_binaries())
DATABASE = "mlflow"
ARTIFACT_BUCKET = "mlflow-artifacts"
DVC_BUCKET = "dvc-remote"
S3_KEY, S3_SECRET = "testing", "testing"  # moto accepts any; MinIO's come from .env
START_TIMEOUT_S = 120
STATE_FILE = "stack.json"


@dataclass
class Stack:
    """Where the running stack's parts listen, their process ids, and the cluster's folder."""

    folder: str
    pgdata: str
    postgres_port: int
    s3_port: int
    mlflow_port: int
    postgres_password: str
    pids: dict[str, int]

    @property
    def tracking_uri(self) -> str:
        """What clients set as MLFLOW_TRACKING_URI."""
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def s3_endpoint(self) -> str:
        """The object store's endpoint URL."""
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def backend_store_uri(self) -> str:
        """The PostgreSQL URI MLflow's server uses (with its password; never shown to clients)."""
        return f"postgresql://{DATABASE}:{self.postgres_password}@127.0.0.1:{self.postgres_port}/{DATABASE}"


def start_stack(folder: Path) -> Stack:
    """Start PostgreSQL, the object store (with both buckets) and MLflow's server; return the stack."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / STATE_FILE).exists():
        raise SystemExit(f"{folder / STATE_FILE} exists: a stack is running there (stop it first)")
    # The cluster lives in its own folder that the postgres user can reach (a test's tmp_path may not).
    pgdata = Path(tempfile.mkdtemp(prefix="team-stack-pg-"))
    stack = Stack(str(folder), str(pgdata), free_port(), free_port(), free_port(), secrets.token_hex(12), {})
    try:
        start_postgres(stack)
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(stack.s3_port)]
        s3 = _spawn(command, folder / "s3.log")
        stack.pids["s3"] = s3.pid
        wait_for_http(stack.s3_endpoint, s3, folder / "s3.log")
        for bucket in (ARTIFACT_BUCKET, DVC_BUCKET):
            s3_client(stack.s3_endpoint).create_bucket(Bucket=bucket)
        stack.pids["mlflow"] = start_mlflow(stack)
    except BaseException:
        stop_stack(stack)
        raise
    (folder / STATE_FILE).write_text(json.dumps(asdict(stack), indent=2), encoding="utf-8")
    return stack


def start_postgres(stack: Stack) -> None:
    """initdb a cluster with a password-protected `mlflow` role and database, and start it on 127.0.0.1."""
    pgdata = Path(stack.pgdata)
    password_file = pgdata / "password"
    password_file.write_text(stack.postgres_password, encoding="utf-8")
    if os.geteuid() == 0:
        shutil.chown(pgdata, "postgres", "postgres")
        shutil.chown(password_file, "postgres", "postgres")
    cluster = pgdata / "cluster"
    _run_as_postgres(
        [PG_BIN / "initdb", "-D", cluster, "-U", DATABASE, "--pwfile", password_file, "--auth=scram-sha-256"]
    )
    options = f"-h 127.0.0.1 -p {stack.postgres_port} -k {pgdata}"
    _run_as_postgres(
        [PG_BIN / "pg_ctl", "-D", cluster, "-l", pgdata / "postgres.log", "-o", options, "-w", "start"]
    )
    env = {**os.environ, "PGPASSWORD": stack.postgres_password}
    subprocess.run(
        [PG_BIN / "createdb", "-h", "127.0.0.1", "-p", str(stack.postgres_port), "-U", DATABASE, DATABASE],
        check=True,
        env=env,
    )


def start_mlflow(stack: Stack, artifacts_destination: str = f"s3://{ARTIFACT_BUCKET}/mlflow") -> int:
    """Start `mlflow server` on PostgreSQL with proxied S3 artifacts; its process id once it answers."""
    env = {
        **os.environ,
        "MLFLOW_S3_ENDPOINT_URL": stack.s3_endpoint,
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
    }
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", stack.backend_store_uri,
        "--artifacts-destination", artifacts_destination,
        "--host", "127.0.0.1", "--port", str(stack.mlflow_port),
    ]  # fmt: skip
    log = Path(stack.folder) / "mlflow.log"
    server = _spawn(command, log, env)
    wait_for_http(f"{stack.tracking_uri}/health", server, log)
    return server.pid


def stop_server(stack: Stack, name: str) -> None:
    """Stop one of the stack's servers (`mlflow` or `s3`) if it runs."""
    pid = stack.pids.pop(name, None)
    if pid:
        _kill_group(pid)


def stop_stack(stack: Stack) -> None:
    """Stop MLflow, the object store and PostgreSQL, and remove the throwaway cluster."""
    for name in ("mlflow", "s3"):
        stop_server(stack, name)
    cluster = Path(stack.pgdata) / "cluster"
    if (cluster / "postmaster.pid").exists():
        _run_as_postgres([PG_BIN / "pg_ctl", "-D", cluster, "-m", "fast", "-w", "stop"])
    shutil.rmtree(stack.pgdata, ignore_errors=True)
    (Path(stack.folder) / STATE_FILE).unlink(missing_ok=True)


def load_stack(folder: Path) -> Stack:
    """The stack started in `folder`."""
    state = folder.resolve() / STATE_FILE
    if not state.exists():
        raise SystemExit(f"{state}: no stack was started in {folder}")
    return Stack(**json.loads(state.read_text(encoding="utf-8")))


@contextmanager
def running_stack(folder: Path) -> Iterator[Stack]:
    """A started stack, stopped when the block ends."""
    stack = start_stack(folder)
    try:
        yield stack
    finally:
        stop_stack(stack)


def s3_client(endpoint: str) -> object:
    """A boto3 S3 client of the object store."""
    import boto3  # noqa: PLC0415 - only the stack needs boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
    )


def client_settings(stack: Stack) -> str:
    """The shell lines a client runs to use the stack: MLflow, and the DVC remote."""
    return "\n".join(
        [
            f"export MLFLOW_TRACKING_URI={stack.tracking_uri}",
            f"export AWS_ACCESS_KEY_ID={S3_KEY} AWS_SECRET_ACCESS_KEY={S3_SECRET}",
            f"dvc remote modify --local team url s3://{DVC_BUCKET}/cache",
            f"dvc remote modify --local team endpointurl {stack.s3_endpoint}",
        ]
    )


def _run_as_postgres(command: list[object]) -> None:
    # PostgreSQL refuses to run as root; Debian's `postgres` user runs it then.
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*prefix, *map(str, command)], check=True, stdout=subprocess.DEVNULL)


def _spawn(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("ab") as output:
        return subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env or dict(os.environ),
        )


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        # A leader started by this process stays a zombie until reaped; one started by another
        # process (`start`, then `stop`) is not ours to reap.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(
    url: str, process: subprocess.Popen, log: Path | None = None, timeout_s: float = START_TIMEOUT_S
) -> None:
    """Wait until `url` answers; stop with the log's last line if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url}: the server exited{_last_words(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:  # refused, reset, or a read timeout while the server is still starting
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout_s} s{_last_words(log)}")


def _last_words(log: Path | None) -> str:
    if log is None:
        return ""
    last = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
    return f" ({log}: {' '.join(last)})"


def main() -> None:
    """`start` or `stop` the stack in --dir."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, default=Path(".team-stack"), help="default: %(default)s")
    args = parser.parse_args()
    if args.action == "start":
        stack = start_stack(args.dir)
        sys.stdout.write(f"stack running (logs in {args.dir}); a client sets:\n{client_settings(stack)}\n")
    else:
        stop_stack(load_stack(args.dir))
        sys.stdout.write("stack stopped\n")


if __name__ == "__main__":
    main()
