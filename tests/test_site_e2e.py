"""End to end: a site declared in params.yaml, learned from, cross-fitted, and served as its own champion.

The default recipe (the linear probe, collections removed) on a tiny random MobileNet, a synthetic
archive, and a site folder laid out as `skin-lesion export-feedback` writes it, DVC-tracked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scripts.team_stack import free_port
from skin_lesion.data.sources.synthetic import generate_synthetic
from skin_lesion.evaluation.sites import REVIEW_LOG, load_probe_inputs, site_fitter
from skin_lesion.training.linear_head import head_probabilities
from tests.conftest import repo_params, running_server, tiny_backbone_weights
from tests.isic_standin import serve
from tests.pipeline_project import (
    command_env,
    make_project,
    mlflow_client,
    model_name,
    run,
    sqlite_uri,
    synthetic_archive,
)

pytestmark = pytest.mark.slow

CLASSES = repo_params()["base"]["classes"]
WEIGHTS = "weights/tiny_mobilenet.weights.h5"
SITE = {"name": "clinic", "folds": 3, "min_melanomas": 3}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The pipeline with the default recipe and a DVC-tracked site, after a first `dvc repro`."""
    archive, manifest = synthetic_archive(tmp_path_factory.mktemp("synthetic"))
    with serve(archive) as api_url:
        root = make_project(
            tmp_path_factory.mktemp("project"),
            api_url,
            manifest,
            train={"recipe": "linear_probe", "arch": "mobilenet", "weights": WEIGHTS},
            evaluate={"stress": {}},
            site=SITE,
            site_curve={"sizes": [20], "repeats": 1},
        )
        tiny_backbone_weights(root / WEIGHTS, size=32)
        scratch = tmp_path_factory.mktemp("site")
        for path, label, *_ in generate_synthetic(scratch, CLASSES, images_per_class=6, size=32, seed=21):
            target = root / "data" / "sites" / "clinic" / "Train" / label / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(scratch / path, target)
        # What export-feedback writes beside the images: mostly alerted images got a diagnosis.
        log = {"logged_images": 400, "logged_alerts": 60, "diagnosed_images": 54, "diagnosed_alerts": 40}
        (root / "data" / "sites" / "clinic" / REVIEW_LOG).write_text(json.dumps(log))
        run(root, "dvc", "add", "-q", "data/sites/clinic")
        run(root, "git", "add", "-A")
        run(root, "git", "commit", "-q", "-m", "a site")
        run(root, "dvc", "repro")
        run(root, "git", "add", "-A")
        run(root, "git", "commit", "-q", "-m", "first run")
        yield root


def test_the_site_is_cross_fitted_between_train_and_evaluate(project: Path) -> None:
    scores = pd.read_csv(project / "metrics" / "site" / "scores.csv")
    assert len(scores) == 54
    assert sorted(scores["fold"].unique()) == [0, 1, 2]
    assert (scores.groupby("group")["fold"].nunique() == 1).all()  # a lesion's photos share a fold


def test_every_site_image_is_scored_by_a_probe_fitted_without_its_fold(project: Path) -> None:
    # Refit each fold's probe from what train saved, leaving the fold out: it reproduces the scores,
    # and it never saw the images it scores.
    scores = pd.read_csv(project / "metrics" / "site" / "scores.csv")
    inputs, _ = load_probe_inputs(project / "models" / "probe_inputs.npz")
    fit = site_fitter(inputs, len(CLASSES), repo_params()["train"]["probe_c"], "balanced", 42)
    melanoma = CLASSES.index("melanoma")
    for k in range(3):
        held = np.flatnonzero(scores["fold"] == k)
        kernel, bias = inputs.fit(fit, np.flatnonzero(scores["fold"] != k), weight=5.0)
        expected = head_probabilities(inputs.site_x[held], kernel, bias)[:, melanoma]
        np.testing.assert_allclose(scores["p_melanoma"].to_numpy()[held], expected, atol=1e-5)


def test_the_sites_figures_are_written_with_intervals_and_counts(project: Path) -> None:
    site = json.loads((project / "metrics" / "site.json").read_text())
    assert site["site"] == "clinic"
    assert site["images"] == 54
    assert site["melanomas"] == 6
    assert 0 <= site["melanoma_auc"] <= 1
    for key in ("sensitivity", "false_alert_rate"):
        assert len(site["alert"][f"{key}_ci"]) == 2
    assert site["alert"]["sensitivity_n"] == 6
    assert site["threshold_source"] == "site"
    assert site["verification"]["biased"]
    shown = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert shown["site_mel_auc"] == round(site["melanoma_auc"], 3)  # `dvc exp show` has it
    # The site's threshold is chosen on uncalibrated cross-fitted scores: no temperature with a site.
    details = json.loads((project / "metrics" / "evaluate_details.json").read_text())
    assert details["calibration"]["temperature"] == 1.0
    card = (project / "metrics" / "model_card.md").read_text()
    assert "## At site clinic (cross-fitted)" in card
    assert "differs beyond chance" in card
    curve = pd.read_csv(project / "metrics" / "site_curve" / "curve.csv")
    assert curve["site_images"].tolist() == [20]
    assert (project / "metrics" / "site_curve" / "curve.png").stat().st_size > 0


def test_the_default_recipes_charts_all_load(project: Path) -> None:
    output = run(project, "dvc", "plots", "show", "--json")
    assert "failed to load" not in output, output[-3000:]  # DVC's warning for a missing series
    shown = json.loads(output)
    assert not shown.get("errors"), shown["errors"]
    # The probe is fitted once: its training charts hold that one step.
    loss = shown["data"]["Training loss"][0]["content"]["data"]["values"]
    assert {"loss", "val_loss"} <= {key for row in loss for key in row}


def test_the_version_carries_the_site_and_its_threshold(project: Path) -> None:
    client = mlflow_client(sqlite_uri(project))
    version = client.get_model_version_by_alias(model_name(), "challenger")
    site = json.loads((project / "metrics" / "site.json").read_text())
    assert version.tags["site"] == "clinic"
    assert float(version.tags["melanoma_threshold"]) == pytest.approx(site["threshold"], abs=1e-6)
    assert version.tags["site_threshold_source"] == "site"


def test_too_few_melanomas_keep_the_validation_threshold(project: Path) -> None:
    output = run(project, "dvc", "exp", "run", "-S", "site.min_melanomas=50")
    assert "Running stage 'train'" not in output  # the threshold rule needs no refit
    site = json.loads((project / "metrics" / "site.json").read_text())
    assert site["threshold_source"] == "validation"
    assert site["threshold_reason"].startswith("site.min_melanomas=50: the site has 6 melanomas")
    assert site["threshold"] == site["alert_at_validation_threshold"]["threshold"]
    run(project, "git", "checkout", "--", "params.yaml")


def test_a_missing_site_folder_fails_in_one_line_naming_the_parameter(project: Path) -> None:
    before = (project / "metrics" / "site.json").read_text()
    result = subprocess.run(
        ["dvc", "exp", "run", "-S", "site.name=nowhere"],
        cwd=project,
        env=command_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    message = (
        "site.name=nowhere: data/sites/nowhere/ does not exist "
        "(skin-lesion export-feedback data/sites/nowhere, then dvc add data/sites/nowhere)"
    )
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if "site.name=nowhere" in line]
    assert len(errors) == 1
    assert errors[0].startswith("ERROR")
    assert errors[0].endswith(message)
    assert (project / "metrics" / "site.json").read_text() == before
    run(project, "git", "checkout", "--", "params.yaml")


def test_the_review_page_serves_the_sites_champion_and_quotes_its_figures(project: Path) -> None:
    env = {**command_env(), "MLFLOW_TRACKING_URI": sqlite_uri(project)}
    client = mlflow_client(sqlite_uri(project))
    version = client.get_model_version_by_alias(model_name(), "challenger").version
    run(project, "skin-lesion", "promote", str(version), "--site", "clinic", env=env)
    assert client.get_model_version_by_alias(model_name(), "champion-clinic").version == version
    port = free_port()
    command = ["skin-lesion", "review", "--site", "clinic", "--port", str(port)]
    with running_server(command, f"http://127.0.0.1:{port}/health", env=env, cwd=project):
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
    assert "of site clinic&#39;s own images" in page or "of site clinic's own images" in page
