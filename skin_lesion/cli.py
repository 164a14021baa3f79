"""The `skin-lesion` command: what users run by hand.

    skin-lesion predict PATH... [--model URI] [--output preds.csv] [--explain DIR]
    skin-lesion serve [--model URI] [--host 127.0.0.1] [--port 5001]
    skin-lesion promote VERSION [--alias champion] [--force]

`predict`: PATH is an image file or a folder (searched recursively). The default model is
`models:/<base.model_name>@champion`, or the newest version when no champion is set yet. A file that
cannot be read gets an error row; the others are still predicted. --explain writes a Grad-CAM overlay
per alerted image, showing which regions drove P(melanoma).

`serve`: the model over HTTP in MLflow's request format, with an answer row for every image of a
batch (skin_lesion/server.py says how it differs from `mlflow models serve`).

`promote`: point an alias (champion by default) at a registered version, refusing a version that was
tested on another test split than the one the alias holds now (their metrics do not compare).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import mlflow
import uvicorn
from mlflow import MlflowClient

from skin_lesion.files import write_csv_atomic
from skin_lesion.gradcam import explain_alerts
from skin_lesion.params import load_params
from skin_lesion.predict import BATCH_SIZE, collect_images, predict_files, render_summary
from skin_lesion.registry import CHAMPION_ALIAS, promote, resolve_default_model
from skin_lesion.runner import run_cli
from skin_lesion.server import create_app
from skin_lesion.tracking import configure_mlflow

log = logging.getLogger("skin_lesion.cli")


def main() -> int:
    """Parse the command line and run the subcommand; errors are one line and exit code 1."""
    args = _parser().parse_args()
    return run_cli(lambda: args.command(args))


def predict_command(args: argparse.Namespace) -> None:
    """Predict the given images and report probabilities and alerts."""
    configure_mlflow()
    uri = args.model or resolve_default_model(load_params().base.model_name)
    log.info("model %s", uri)
    model = mlflow.pyfunc.load_model(uri)
    predictions = predict_files(model, collect_images(args.paths), args.batch_size)
    if args.output:
        write_csv_atomic(args.output, predictions)
    sys.stdout.write(render_summary(predictions) + "\n")
    if args.explain:
        explain_alerts(model, predictions, args.explain)


def serve_command(args: argparse.Namespace) -> None:
    """Serve the model over HTTP until interrupted."""
    configure_mlflow()
    uri = args.model or resolve_default_model(load_params().base.model_name)
    log.info("serving %s on http://%s:%d (POST /invocations, GET /health)", uri, args.host, args.port)
    uvicorn.run(
        create_app(mlflow.pyfunc.load_model(uri), uri), host=args.host, port=args.port, log_level="warning"
    )


def promote_command(args: argparse.Namespace) -> None:
    """Point an alias at a registered version."""
    configure_mlflow()
    name = load_params().base.model_name
    log.info("%s", promote(MlflowClient(), name, args.version, args.alias, args.force))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skin-lesion", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    predict = commands.add_parser("predict", help="class probabilities and melanoma alerts for images")
    predict.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    predict.add_argument("--model", help="MLflow model URI (default: the registered champion)")
    predict.add_argument("--output", type=Path, help="CSV file to write")
    predict.add_argument("--explain", type=Path, help="folder for Grad-CAM overlays of alerted images")
    predict.add_argument("--batch-size", type=_positive, default=BATCH_SIZE, help="default: %(default)s")
    predict.set_defaults(command=predict_command)
    serve = commands.add_parser("serve", help="the model over HTTP, a row per image, errors per row")
    serve.add_argument("--model", help="MLflow model URI or folder (default: the registered champion)")
    serve.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    serve.add_argument("--port", type=_positive, default=5001, help="default: %(default)s")
    serve.set_defaults(command=serve_command)
    promote_parser = commands.add_parser("promote", help="point an alias at a registered version")
    promote_parser.add_argument("version", help="the registered version, e.g. 3")
    promote_parser.add_argument("--alias", default=CHAMPION_ALIAS, help="default: %(default)s")
    promote_parser.add_argument("--force", action="store_true", help="even if tested on another test split")
    promote_parser.set_defaults(command=promote_command)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
