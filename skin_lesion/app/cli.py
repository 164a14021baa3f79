"""The `skin-lesion` command: what users run by hand.

    skin-lesion predict PATH... [--model URI | --site NAME] [--output preds.csv] [--explain DIR]
    skin-lesion serve [--model URI | --site NAME] [--host 127.0.0.1] [--port 5001]
    skin-lesion promote VERSION [--alias champion | --site NAME] [--force]
    skin-lesion review [--model URI | --site NAME] [--host 127.0.0.1] [--port 5002] [--db feedback/review.db]
    skin-lesion export-feedback OUT [--db feedback/review.db] [--base DATASET]
    skin-lesion monitor [--model URI] [--db feedback/review.db] [--days 30] [--tolerance 0.1]

`predict`: PATH is an image file or a folder (searched recursively). The default model is
`models:/<base.model_name>@champion`; with none set, predict, serve, review and monitor refuse (the
newest version may be any experiment) and name `promote` and `--model`. A file that
cannot be read, or is no regular file (a FIFO, a device: never opened), gets an error row; the others
are still predicted. With no readable image at all the CSV and summary are still written, and the
command fails (exit 1). --explain writes a Grad-CAM overlay per alerted image, showing which regions
drove P(melanoma). `--site NAME` (predict, serve, review, monitor) uses that site's own champion,
`champion-NAME`, which `promote --site NAME` sets.

`serve`: the model over HTTP in MLflow's request format, with an answer row for every image of a
batch (skin_lesion/app/server.py says how it differs from `mlflow models serve`).

`promote`: point an alias (champion by default) at a registered version, refusing a version that was
tested on another test split than the one the alias holds now (their metrics do not compare).

`review`: the clinician's web page (skin_lesion/app/review.py). Beyond 127.0.0.1 it needs a token in
SKIN_LESION_REVIEW_TOKEN. `export-feedback`: the diagnoses recorded there, as a dataset folder for
`download.source: local`. `monitor`: the logged predictions' alert rate, OOD rate and class mix
against the model's test split, and a figure of them; it exits 3 on drift, 4 when the figure could not
be written (the report was printed) and 5 for both.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import uvicorn
from mlflow import MlflowClient

from skin_lesion.app.feedback import FeedbackStore, export_feedback
from skin_lesion.app.gradcam import explain_alerts
from skin_lesion.app.monitoring import (
    MIN_PREDICTIONS,
    drift_figure,
    drift_report,
    render_drift,
    threshold_in_words,
)
from skin_lesion.app.predict import (
    BATCH_SIZE,
    collect_images,
    predict_files,
    render_summary,
    require_a_readable_image,
)
from skin_lesion.app.promotion import describe_version, promote, resolve_default_model
from skin_lesion.app.review import create_review_app
from skin_lesion.app.server import create_app
from skin_lesion.errors import PipelineError
from skin_lesion.files import atomic_file, write_csv_atomic
from skin_lesion.params import load_params
from skin_lesion.registry.registration import CHAMPION_ALIAS, champion_alias
from skin_lesion.runner import run_cli
from skin_lesion.tracking import configure_mlflow, redact, tracking_uri

DEFAULT_DB = Path("feedback/review.db")
# `skin-lesion monitor`'s exit codes beyond 0 (no drift) and 1 (the command failed): a cron job can act on
# drift, and tell a figure that could not be written (the report was printed) from a failed command.
DRIFT_EXIT_CODE = 3
FIGURE_FAILED_EXIT_CODE = 4  # no drift, but the figure could not be written
DRIFT_FIGURE_FAILED_EXIT_CODE = 5  # drift, and the figure could not be written
LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_VARIABLE = "SKIN_LESION_REVIEW_TOKEN"
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves the default SQLite store

log = logging.getLogger("skin_lesion.app.cli")


def main() -> int:
    """Parse the command line and run the subcommand; errors are one line and exit code 1."""
    args = _parser().parse_args()
    return run_cli(lambda: args.command(args))


def predict_command(args: argparse.Namespace) -> None:
    """Predict the given images and report probabilities and alerts."""
    configure_mlflow()
    uri = args.model or resolve_default_model(load_params().base.model_name, args.site or "")
    log.info("model %s", uri)
    model = mlflow.pyfunc.load_model(uri)
    predictions = predict_files(model, collect_images(args.paths), args.batch_size)
    if args.output:
        write_csv_atomic(args.output, predictions)
    sys.stdout.write(render_summary(predictions) + "\n")
    if predictions.get("melanoma_alert", pd.Series(dtype=bool)).fillna(False).astype(bool).any():
        config = model.model_config or {}
        if "melanoma_threshold" in config:  # what an alert means, from the version's own figures
            figures = config.get("test_figures") or {}
            sys.stdout.write(threshold_in_words(figures, config["melanoma_threshold"]) + "\n")
    require_a_readable_image(predictions)
    if args.explain:
        explain_alerts(model, predictions, args.explain)


def serve_command(args: argparse.Namespace) -> None:
    """Serve the model over HTTP until interrupted."""
    configure_mlflow()
    uri = args.model or resolve_default_model(load_params().base.model_name, args.site or "")
    version = describe_version(MlflowClient(), uri)["version"]
    # An alias moves; what is served is the version it pointed at when the server started.
    served = f"{uri} (version {version})" if version else uri
    log.info("serving %s on http://%s:%d (POST /invocations, GET /health)", served, args.host, args.port)
    uvicorn.run(
        create_app(mlflow.pyfunc.load_model(uri), served), host=args.host, port=args.port, log_level="warning"
    )


def review_command(args: argparse.Namespace) -> None:
    """Serve the review page until interrupted."""
    token = os.environ.get(TOKEN_VARIABLE) or None
    if args.host not in LOOPBACK and token is None:
        raise PipelineError(
            f"--host {args.host} opens the page to other machines: set {TOKEN_VARIABLE} to an access token"
        )
    configure_mlflow()
    uri = args.model or resolve_default_model(load_params().base.model_name, args.site or "")
    version = describe_version(MlflowClient(), uri)
    server = tracking_uri() if tracking_uri().startswith("http") else DEFAULT_MLFLOW_UI
    ui = args.mlflow_ui or redact(server)
    app = create_review_app(mlflow.pyfunc.load_model(uri), version, FeedbackStore(args.db), ui, token)
    address = f"http://{args.host}:{args.port}/" + ("?token=<the token>" if token else "")
    log.info("review page for %s on %s (diagnoses in %s)", uri, address, args.db)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def export_feedback_command(args: argparse.Namespace) -> None:
    """Write the recorded diagnoses as a dataset folder for download.source: local."""
    store = FeedbackStore(args.db, create=False)
    params = load_params()
    table = export_feedback(store, args.out, params.base.classes, params.download.local, args.base)
    counts = ", ".join(
        f"{label} {count}" for label, count in table["confirmed_diagnosis"].value_counts().items()
    )
    base = f" with the images of {args.base}" if args.base else ""
    images = f"{len(table)} diagnosed image" + ("s" if len(table) != 1 else "")
    log.info("wrote %s (%s) to %s%s", images, counts, args.out, base)
    log.info("train on them: dvc exp run -S download.source=local -S download.local.path=%s", args.out)


def monitor_command(args: argparse.Namespace) -> None:
    """Compare the logged predictions of a model with its test split; print and plot it."""
    store = FeedbackStore(args.db, create=False)  # a mistyped --db stops before the model is loaded
    configure_mlflow()
    uri = args.model or resolve_default_model(load_params().base.model_name, args.site or "")
    version = describe_version(MlflowClient(), uri)
    config = mlflow.pyfunc.load_model(uri).model_config
    logged = store.predictions(since=datetime.now(UTC) - timedelta(days=args.days))
    if version["version"]:
        log_table = logged[logged["model_version"] == version["version"]]
    else:
        log_table = logged[logged["model"] == uri]
    figures = config.get("test_figures") or {}
    report = drift_report(log_table, figures, config["classes"], args.tolerance, args.min_predictions)
    model = f"{version['name']} version {version['version']}" if version["version"] else uri
    sys.stdout.write(render_drift(report, model) + "\n")
    if log_table.empty and not logged.empty:  # the page served another version meanwhile
        counts = logged["model_version"].fillna("").replace("", "unregistered").value_counts()
        others = ", ".join(f"version {name}: {count}" for name, count in counts.sort_index().items())
        sys.stdout.write(
            f"predictions logged in this period by other versions ({others}); --model picks one\n"
        )
    figure = args.plot or args.db.with_name("monitor.png")
    plotted = _write_figure(report, model, figure) if report["images"] else True
    if report["drifted"]:
        sys.exit(DRIFT_EXIT_CODE if plotted else DRIFT_FIGURE_FAILED_EXIT_CODE)
    if not plotted:
        sys.exit(FIGURE_FAILED_EXIT_CODE)


def _write_figure(report: dict[str, Any], model: str, path: Path) -> bool:
    # A figure that cannot be written (a read-only folder, a full disk) costs the figure, not the report.
    try:
        with atomic_file(path, suffix=".png") as tmp:
            drift_figure(report, model).savefig(tmp, dpi=100)
    except OSError as err:
        log.error("%s: cannot write the figure (%s); the report above stands", path, err.strerror or err)
        return False
    log.info("figure: %s", path)
    return True


def promote_command(args: argparse.Namespace) -> None:
    """Point an alias at a registered version."""
    configure_mlflow()
    name = load_params().base.model_name
    alias = champion_alias(args.site) if args.site else args.alias
    log.info("%s", promote(MlflowClient(), name, args.version, alias, args.force, args.site or ""))


def _path(text: str) -> Path:
    # Path("") is the current folder: an unset shell variable would, say, score every image below it.
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?)")
    return Path(text)


def _site(text: str) -> str:
    # The same names params.yaml's site.name takes: they name an alias, champion-<site>.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a site name (letters, digits, _ and -)")
    return text


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skin-lesion", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    predict = commands.add_parser("predict", help="class probabilities and melanoma alerts for images")
    predict.add_argument("paths", nargs="+", type=_path, help="image files or folders")
    predict_model = predict.add_mutually_exclusive_group()
    predict_model.add_argument("--model", help="MLflow model URI (default: the registered champion)")
    predict_model.add_argument("--site", type=_site, help="use this site's champion (site.name)")
    predict.add_argument("--output", type=_path, help="CSV file to write")
    predict.add_argument("--explain", type=_path, help="folder for Grad-CAM overlays of alerted images")
    predict.add_argument("--batch-size", type=_positive, default=BATCH_SIZE, help="default: %(default)s")
    predict.set_defaults(command=predict_command)
    serve = commands.add_parser("serve", help="the model over HTTP, a row per image, errors per row")
    serve_model = serve.add_mutually_exclusive_group()
    serve_model.add_argument("--model", help="MLflow model URI or folder (default: the registered champion)")
    serve_model.add_argument("--site", type=_site, help="serve this site's champion (site.name)")
    serve.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    serve.add_argument("--port", type=_positive, default=5001, help="default: %(default)s")
    serve.set_defaults(command=serve_command)
    promote_parser = commands.add_parser("promote", help="point an alias at a registered version")
    promote_parser.add_argument("version", help="the registered version, e.g. 3")
    promote_alias = promote_parser.add_mutually_exclusive_group()
    promote_alias.add_argument("--alias", default=CHAMPION_ALIAS, help="default: %(default)s")
    promote_alias.add_argument("--site", type=_site, help="set this site's champion-NAME")
    promote_parser.add_argument("--force", action="store_true", help="even if tested on another test split")
    promote_parser.set_defaults(command=promote_command)
    review = commands.add_parser("review", help="the clinician's review page in a browser")
    review_model = review.add_mutually_exclusive_group()
    review_model.add_argument("--model", help="MLflow model URI (default: the registered champion)")
    review_model.add_argument("--site", type=_site, help="serve this site's champion (site.name)")
    review.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    review.add_argument("--port", type=_positive, default=5002, help="default: %(default)s")
    review.add_argument("--db", type=_path, default=DEFAULT_DB, help="diagnoses and prediction log")
    review.add_argument("--mlflow-ui", help=f"for run links (default: server or {DEFAULT_MLFLOW_UI})")
    review.set_defaults(command=review_command)
    export = commands.add_parser("export-feedback", help="recorded diagnoses as a dataset folder")
    export.add_argument("out", type=_path, help="folder to write (<out>/Train/<class>/*, <out>/index.csv)")
    export.add_argument("--db", type=_path, default=DEFAULT_DB, help="default: %(default)s")
    export.add_argument("--base", type=_path, help="dataset folder to copy in too (e.g. the training data)")
    export.set_defaults(command=export_feedback_command)
    monitor = commands.add_parser("monitor", help="recent predictions against the model's test split")
    monitor_model = monitor.add_mutually_exclusive_group()
    monitor_model.add_argument("--model", help="MLflow model URI (default: the registered champion)")
    monitor_model.add_argument("--site", type=_site, help="this site's champion (site.name)")
    monitor.add_argument("--db", type=_path, default=DEFAULT_DB, help="default: %(default)s")
    monitor.add_argument("--days", type=_positive, default=30, help="default: %(default)s")
    monitor.add_argument("--tolerance", type=float, default=0.1, help="largest change not flagged as drift")
    monitor.add_argument("--plot", type=_path, help="figure to write (default: monitor.png beside --db)")
    monitor.add_argument(
        "--min-predictions", type=_positive, default=MIN_PREDICTIONS, help="fewer: no verdict (%(default)s)"
    )
    monitor.set_defaults(command=monitor_command)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
