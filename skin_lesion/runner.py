"""How a stage runs from the command line: logging set up, the tracking server checked, errors as one line."""

from __future__ import annotations

import logging
from collections.abc import Callable

from mlflow.exceptions import MlflowException

from skin_lesion.errors import PipelineError
from skin_lesion.tracking import check_tracking_server, redact, tracking_uri

log = logging.getLogger("skin_lesion")
ARTIFACTS_ENDPOINT = "/api/2.0/mlflow-artifacts/"  # the server's proxy to its artifact store


def run_cli(main: Callable[[], None]) -> int:
    """Run a stage's main(), turning a PipelineError into one line on stderr and exit code 1.

    A tracking server that does not answer stops the stage before it does any work. One that goes
    away during the stage (MLflow gives up after its HTTP retries) ends it with one line too, naming
    the tracking URI; what was logged before stays logged, and rerunning the stage completes it.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # TensorFlow gives its logger a handler of its own when it is imported before logging is set up,
    # as every stage imports it, and each of its warnings came out twice.
    logging.getLogger("tensorflow").handlers.clear()
    try:
        check_tracking_server()
        main()
    except PipelineError as err:
        log.error("%s", err)
        return 1
    except MlflowException as err:
        cause = first_mlflow_failure(err)
        log.error("MLflow at %s failed: %s", redact(tracking_uri()), redact(mlflow_failure(cause)))
        return 1
    return 0


def first_mlflow_failure(err: MlflowException) -> MlflowException:
    """The MLflow failure that started it all: ending the failed run can fail too (a server that broke
    off the connection), and that second error, raised while handling the first, hides the cause.
    Requests' own errors may stand between the two in the chain of exceptions."""
    first, seen, current = err, set(), err.__context__
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MlflowException):
            first = current
        current = current.__context__
    return first


def mlflow_failure(err: MlflowException) -> str:
    """The first line of MLflow's message, and what failed when it was the server's artifact store.

    A server with proxied artifacts answers 500 when its object store refuses a write (a missing
    bucket, a full disk, revoked credentials); MLflow's message names only the endpoint.
    """
    message = str(err.message).strip()
    first_line = message.splitlines()[0] if message else type(err).__name__
    if ARTIFACTS_ENDPOINT in first_line:
        first_line += " (the server could not store an artifact: is its object store up, with its bucket?)"
    return first_line
