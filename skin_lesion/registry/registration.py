"""The MLflow Model Registry: versions, the `challenger` and `champion` aliases, and promotion."""

from __future__ import annotations

import base64
import io
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from PIL import Image

from skin_lesion.evaluation.metrics import headline
from skin_lesion.files import sha256_file
from skin_lesion.model.classifier import IMAGE_COLUMN, prediction_frame
from skin_lesion.params import EvaluateParams
from skin_lesion.registry.model_contents import ENTRY_FILE, MLFLOW_MODEL_NAME, model_code
from skin_lesion.tracking import DVC_DATA_TAG

log = logging.getLogger("skin_lesion.registry.registration")


CHAMPION_ALIAS = "champion"  # the registry alias of the version people rely on
SITE_TAG = "site"  # the site (site.name) a version learned from and set its threshold for
NEW_VERSION_ALIAS = "challenger"  # every newly registered version
TEST_SPLIT_TAG = "test_split"  # fingerprint of the test split a version was scored on
EXAMPLE_SKIN_TONE = (224, 172, 150)
FINGERPRINT_LENGTH = 16  # hex digits of the test split manifest's sha256 kept in that tag


def champion_alias(site: str = "") -> str:
    """The alias of the version people rely on: `champion`, or `champion-<site>` for a site's own."""
    return f"{CHAMPION_ALIAS}-{site}" if site else CHAMPION_ALIAS


def split_fingerprint(manifest: Path) -> str:
    """The fingerprint of a split manifest that versions scored on the same split share."""
    return sha256_file(manifest)[:FINGERPRINT_LENGTH]


def log_servable_model(
    keras_path: Path,
    classes: Sequence[str],
    image_size: int,
    melanoma_class: str,
    threshold: float,
    requirements: list[str],
    data_source: str,
    ood_path: Path | None = None,
    test_figures: dict[str, Any] | None = None,
    mirror_average: bool = False,
    temperature: float = 1.0,
) -> str:
    """Log the pyfunc that wraps the Keras model with its preprocessing and threshold; return its URI.

    It ships only the code that loading it needs (model_contents.model_code_files) and `requirements`, the
    pinned packages that code imports (model_contents.pip_requirements). `data_source` (download.source)
    travels with it: a model trained on synthetic shapes says so in every answer (`model_warning`)
    and in its metadata. `ood_path` is its OOD summary (.npz of skin_lesion/model/ood.py); `test_figures`
    are what its test split said (metrics.reference_figures), which the review page and
    `skin-lesion monitor` read from the registry. With `mirror_average`, every consumer averages each
    image with its mirror, as evaluate did. `temperature` (fitted on validation by evaluate) scales
    every answer's class probabilities before the threshold applies (model/classifier.py calibrated).
    """
    config = {
        "classes": list(classes),
        "image_size": image_size,
        "melanoma_class": melanoma_class,
        "melanoma_threshold": threshold,
        "data_source": data_source,
        "test_figures": test_figures or {},
        "mirror_average": mirror_average,
        "temperature": temperature,
    }
    example = pd.DataFrame({IMAGE_COLUMN: [example_image(image_size)]})
    output = example_output(classes, melanoma_class, threshold, data_source)
    artifacts = {"keras_model": str(keras_path)}
    if ood_path is not None:
        artifacts["ood"] = str(ood_path)
    with tempfile.TemporaryDirectory() as folder:
        info = mlflow.pyfunc.log_model(
            name=MLFLOW_MODEL_NAME,
            python_model=ENTRY_FILE,
            input_example=example,
            artifacts=artifacts,
            model_config=config,
            metadata={"data_source": data_source},
            code_paths=[str(model_code(Path(folder)))],
            # Outputs only: MLflow's own input check answers a bad request with the request's data in
            # the message; LesionClassifier checks the input itself and names only the row and problem.
            signature=ModelSignature(outputs=infer_signature(example, output).outputs),
            pip_requirements=requirements,
        )
    return info.model_uri


def example_output(
    classes: Sequence[str], melanoma_class: str, threshold: float, data_source: str
) -> pd.DataFrame:
    """The answer to one image of uniform probabilities: the output signature MLflow stores."""
    return prediction_frame(
        np.full((1, len(classes)), 1 / len(classes)),
        classes,
        melanoma_class,
        threshold,
        data_source,
        ood_scores=np.zeros(1),
        ood_threshold=1.0,
    )


def example_image(size: int) -> str:
    """A plain skin-toned PNG, base64-encoded: the input example MLflow stores and checks the model with."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), EXAMPLE_SKIN_TONE).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def version_tags(
    train_run_id: str,
    evaluate_run_id: str,
    test_split: str,
    metrics: dict[str, Any],
    data_source: str,
    data_hashes: dict[str, str] | None = None,
) -> dict[str, str]:
    """What a registered version carries: its runs, data (source and DVC hashes), test split, metrics."""
    threshold = metrics["melanoma"]["operating_point"]["threshold"]
    return {
        "data_source": data_source,
        "train_run_id": train_run_id,
        "evaluate_run_id": evaluate_run_id,
        TEST_SPLIT_TAG: test_split,
        "melanoma_threshold": f"{threshold:.6f}",
        **{f"test_{key}": str(value) for key, value in headline(metrics).items()},
        **external_tags(metrics.get("external", {})),
        **site_tags(metrics.get("site") or {}),
        **{f"{DVC_DATA_TAG}{path}": value for path, value in (data_hashes or {}).items()},
    }


def external_tags(external: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each external set's melanoma AUC and the alert's sensitivity and false-alert rate, as tags."""
    tags = {}
    for name, result in external.items():
        figures = {
            "melanoma_auc": result["melanoma_auc"],
            "alert_sensitivity": result["alert"]["sensitivity"],
            "false_alert_rate": result["alert"]["false_alert_rate"],
        }
        tags |= {f"external_{name}_{key}": str(value) for key, value in figures.items() if value is not None}
    return tags


def site_tags(site: dict[str, Any]) -> dict[str, str]:
    """The site a version learned from and its cross-fitted figures, as tags ({} without a site)."""
    if not site:
        return {}
    figures = {
        "melanoma_auc": site["melanoma_auc"],
        "alert_sensitivity": site["alert"]["sensitivity"],
        "false_alert_rate": site["alert"]["false_alert_rate"],
        "threshold_source": site["threshold_source"],
        "images": site["images"],
    }
    return {SITE_TAG: site["site"]} | {f"site_{key}": str(v) for key, v in figures.items() if v is not None}


PROVENANCE_HEADING = "## Provenance"  # the section of a version's description that the card lacks


def provenance_note(tags: dict[str, str], commit: str | None, experiment: str | None) -> str:
    """Markdown that ends a version's description: the git commit, DVC experiment, data and runs."""
    lines = ["", PROVENANCE_HEADING, ""]
    lines.append(f"- git commit: `{commit or 'none (not a git repository)'}`")
    if experiment:
        lines.append(f"- DVC experiment: `{experiment}` (`dvc exp apply {experiment}` restores it)")
    data = {
        key.removeprefix(DVC_DATA_TAG): value for key, value in tags.items() if key.startswith(DVC_DATA_TAG)
    }
    lines += [
        f"- data `{path}`: DVC hash `{value}` (`dvc pull` at that commit)" for path, value in data.items()
    ]
    lines.append(f"- MLflow runs: train `{tags['train_run_id']}`, evaluate `{tags['evaluate_run_id']}`")
    return "\n".join(lines) + "\n"


# MLflow's SQL stores (PostgreSQL, MySQL) hold a version's description in 5,000 characters; SQLite
# does not check, so a longer one registers locally and fails on a team's server.
MAX_DESCRIPTION = 5000
# The model card's sections that a version's description drops first when the card is too long.
SECTIONS_DROPPED_FIRST = ("## Acquisition stress test", "## By collection", "## Threshold rules", "## Data")


def version_description(card: str, note: str, limit: int = MAX_DESCRIPTION) -> str:
    """The model card and provenance note within `limit` characters, dropping whole card sections.

    The whole card is always the evaluate run's artifact `model_card.md`; what was dropped is named.
    """
    dropped = []
    for heading in SECTIONS_DROPPED_FIRST:
        pointer = (
            f"\n*Left out here for length: {', '.join(dropped)}; the full card is the evaluate run's "
            "artifact `model_card.md`.*\n"
            if dropped
            else ""
        )
        if len(card) + len(pointer) + len(note) <= limit:
            return card + pointer + note
        start = card.find(f"\n{heading}\n")
        if start >= 0:
            end = card.find("\n## ", start + 1)
            card = card[:start] + (card[end:] if end >= 0 else "\n")
            dropped.append(heading.removeprefix("## ").lower())
    pointer = (
        "\n*Cut short for length after the sections above: the full card is the evaluate run's artifact "
        "`model_card.md`.*\n"
    )
    room = limit - len(pointer) - len(note)
    # Whole sections up to the last heading that fits: a section cut mid-table reads as a whole one.
    end = card.rfind("\n## ", 0, room)
    return card[: end + 1 if end > 0 else room] + pointer + note


def register_and_promote(
    model_uri: str,
    name: str,
    card: str,
    tags: dict[str, str],
    metrics: dict[str, Any],
    settings: EvaluateParams,
) -> tuple[str, str]:
    """Register a new version (@challenger), decide `champion` by evaluate.promote; version and why."""
    version = register_version(model_uri, name=name, tags=tags, description=card)
    client = MlflowClient()
    alias = champion_alias(tags.get(SITE_TAG, ""))
    promoted, reason = decide_promotion(client, name, version, metrics, tags[TEST_SPLIT_TAG], settings, alias)
    if promoted:
        set_alias(client, name, alias, version)
    client.set_model_version_tag(name, version, "promotion", reason)
    mlflow.set_tags({"registered_version": version, "promotion": reason})
    return version, reason


def register_version(model_uri: str, name: str, tags: dict[str, str], description: str = "") -> str:
    """Register `model_uri` as a new version of `name`, tagged and described; alias it `challenger`."""
    version = str(mlflow.register_model(model_uri, name, tags=tags).version)
    client = MlflowClient()
    if description:
        client.update_model_version(name, version, description=description)
    set_alias(client, name, NEW_VERSION_ALIAS, version)
    return version


def set_alias(client: MlflowClient, name: str, alias: str, version: str, attempts: int = 3) -> None:
    """Point `alias` at `version`, again when another process set the same alias at the same moment.

    MLflow's SQL store inserts an alias it did not find: two queued experiments registering at once
    both insert `challenger`, and PostgreSQL refuses the second with a unique-key violation. Setting it
    again then updates the row that is there now.
    """
    for attempt in range(1, attempts + 1):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as error:
            message = str(error).lower()
            if attempt == attempts or "alias" not in message or "unique" not in message:
                raise
            log.info("alias %s was being set by another process; setting it again", alias)


def decide_promotion(
    client: MlflowClient,
    name: str,
    version: str,
    metrics: dict[str, Any],
    test_split: str,
    settings: EvaluateParams,
    alias: str = CHAMPION_ALIAS,
) -> tuple[bool, str]:
    """Whether `version` becomes `alias` (the champion, or a site's) under evaluate.promote, and why."""
    if settings.promote == "manual":
        return False, "evaluate.promote=manual: a person sets the champion alias"
    metric = settings.promote_metric
    ours = headline(metrics)[metric]
    try:
        champion = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return True, f"no {alias} yet; version {version} has {metric} {ours:.4f}"
    if champion.tags.get(TEST_SPLIT_TAG) != test_split:
        return False, f"champion version {champion.version} was tested on another test split; not compared"
    if f"test_{metric}" not in champion.tags:
        return False, f"champion version {champion.version} has no {metric}; not compared"
    theirs = float(champion.tags[f"test_{metric}"])
    beats = ours > theirs + settings.promote_margin
    verdict = "beats" if beats else "does not beat"
    comparison = f"champion version {champion.version} ({theirs:.4f}) by more than {settings.promote_margin}"
    return beats, f"{metric} {ours:.4f} {verdict} {comparison}"
