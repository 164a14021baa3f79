"""End to end: `dvc repro` in a temporary git repo from a stand-in ISIC Archive, then experiments.

The stand-in serves the synthetic image set (learnable shapes) under ISIC ids, so the default
`download.source: isic` runs as it would against the real archive.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from playwright.sync_api import Route, sync_playwright

from skin_lesion.data.sources.synthetic import generate_synthetic
from skin_lesion.files import sha256_file
from skin_lesion.training.recipes import detect_device
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, repo_params
from tests.isic_standin import serve
from tests.pipeline_project import (
    STAGES,
    command_env,
    make_project,
    mlflow_client,
    mlflow_runs,
    model_name,
    readme_comparison,
    run,
    sqlite_uri,
    synthetic_archive,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, pd.DataFrame]]:
    """A stand-in ISIC Archive serving 20 synthetic images per class; yields its URL and a manifest."""
    archive, manifest = synthetic_archive(tmp_path_factory.mktemp("synthetic"))
    with serve(archive) as api_url:
        yield api_url, manifest


CLASSES = repo_params()["base"]["classes"]
# The external set's folders, named as another clinic names them, mapped onto the classes.
EXTERNAL_MAP = {f"clinic {label}": label for label in CLASSES}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, standin: tuple) -> Path:
    """A git + DVC repo holding this project's pipeline, set to a small run against the stand-in,
    with an external validation set that holds copies of some of the archive's images."""
    api_url, manifest = standin
    external = {"clinic": {"labels_csv": "", "label_map": EXTERNAL_MAP}}
    # Its 6 epochs learn the shapes at 0.002; at the default 0.001 they learned too little.
    root = make_project(
        tmp_path_factory.mktemp("project"),
        api_url,
        manifest,
        train={"learning_rate": 0.002},
        evaluate={"external": external},
    )
    scratch = tmp_path_factory.mktemp("external")
    for row in generate_synthetic(scratch / "new", CLASSES, images_per_class=4, size=32, seed=11):
        target = root / "data" / "external" / "clinic" / f"clinic {row[1]}" / Path(row[0]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(scratch / "new" / row[0], target)
    # The archive's first melanomas again (the same seed draws the same images), under other names.
    archive = generate_synthetic(scratch / "archive", CLASSES, images_per_class=20, size=32, seed=3)
    for index, row in enumerate(r for r in archive if r[1] == "melanoma"):
        if index < 5:
            shutil.copy(
                scratch / "archive" / row[0],
                root / "data" / "external" / "clinic" / "clinic melanoma" / f"copy_{index}.png",
            )
    return root


@pytest.fixture(scope="module")
def first_repro(project: Path) -> str:
    """Output of the first full `dvc repro`."""
    output = run(project, "dvc", "repro")
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-q", "-m", "first run")
    return output


def test_repro_runs_every_stage_in_order(first_repro: str) -> None:
    positions = [first_repro.index(f"Running stage '{stage}'") for stage in STAGES]
    assert positions == sorted(positions)


def test_stage_logs_hold_no_third_party_noise(first_repro: str) -> None:
    noise = [
        "failed call to cuInit",  # TensorFlow probing for CUDA on a machine without it
        "NodeDef mentions attribute",  # tf.data rewritten under TensorFlow's op determinism
        "This TensorFlow binary is optimized",  # TensorFlow's start-up banner
        "oneDNN custom operations are on",  # ... and the lines it logs before absl is initialised
        "absl::InitializeLog",
        "E0000",  # any error TensorFlow logs at start-up
        "Creating initial MLflow database tables",  # MLflow's INFO lines
        "CloudPickle",  # MLflow's warning about pickled models
        "input example was not provided",
        "Downloading artifacts",  # MLflow's progress bar
    ]
    assert [line for line in noise if line in first_repro] == []


def test_repro_writes_metrics_that_beat_chance(project: Path, first_repro: str) -> None:
    headline = json.loads((project / "metrics" / "evaluate.json").read_text())
    metrics = json.loads((project / "metrics" / "evaluate_details.json").read_text())
    chance = 1 / len(repo_params()["base"]["classes"])
    assert metrics["accuracy"] > 4 * chance
    assert metrics["balanced_accuracy"] > 4 * chance
    assert {"sensitivity", "specificity", "auc"} <= metrics["melanoma"].keys()
    assert metrics["model_version"] == 1
    assert headline["bal_acc"] == round(metrics["balanced_accuracy"], 3)  # a table for reading
    assert headline["version"] == 1
    # Temperature scaling fitted on val: the served model carries it, and ECE is reported both ways.
    calibration = metrics["calibration"]
    assert calibration["val"]["nll_after"] <= calibration["val"]["nll_before"] + 1e-9
    assert headline["ece"] == round(calibration["test"]["ece_after"], 3)
    mlflow_client(sqlite_uri(project))
    model = mlflow.pyfunc.load_model(f"models:/{model_name()}@challenger")
    assert model.model_config["temperature"] == pytest.approx(calibration["temperature"])
    data = json.loads((project / "metrics" / "data.json").read_text())
    assert data["images_in"] == 9 * 20
    train = json.loads((project / "metrics" / "train_details.json").read_text())
    assert train["device"] == detect_device()  # whichever this machine trains on
    assert json.loads((project / "metrics" / "train.json").read_text()).keys() == {"best_epoch", "seconds"}
    assert (project / "data" / "raw" / "attribution.txt").is_file()


def test_dvc_knows_the_metrics_and_plots(project: Path, first_repro: str) -> None:
    metrics = json.loads(run(project, "dvc", "metrics", "show", "--json"))
    assert set(metrics[""]["data"]) == {"metrics/evaluate.json", "metrics/train.json"}
    details = json.loads(run(project, "dvc", "metrics", "show", "--json", "metrics/evaluate_details.json"))
    assert "per_class" in details[""]["data"]["metrics/evaluate_details.json"]["data"]
    plots = json.loads(run(project, "dvc", "plots", "show", "--json"))["data"]
    charts = {
        "Training loss",
        "Training accuracy",
        "ROC, one curve per class (test split)",
        "Melanoma precision-recall (test split)",
        "Confusion matrix (test split)",
        "Reliability (test split)",
    }
    # Every interactive chart has a PNG twin: DVC's charts load Vega from the internet.
    twins = ("roc", "pr_melanoma", "confusion", "confusion_normalized", "reliability", "worst_misclassified")
    images = {f"metrics/evaluate/{name}.png" for name in twins}
    images |= {"metrics/train/curves.png", "metrics/class_counts/class_counts.png"}
    assert charts | images <= plots.keys()
    roc = plots["ROC, one curve per class (test split)"][0]["content"]
    assert roc["encoding"]["color"]["field"] == "class"
    assert {row["class"] for row in roc["data"]["values"]} == set(repo_params()["base"]["classes"])
    loss = plots["Training loss"][0]["content"]["data"]["values"]
    assert {"loss", "val_loss"} <= {key for row in loss for key in row}


def test_plots_page_reads_without_internet(project: Path, first_repro: str, tmp_path: Path) -> None:
    run(project, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    refused: list[str] = []

    def offline(route: Route) -> None:
        refused.append(route.request.url)
        route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(offline=True)
        context.route("http*://**/*", offline)
        page = context.new_page()
        page.goto((tmp_path / "plots" / "index.html").as_uri(), wait_until="load")
        widths = page.eval_on_selector_all("img", "images => images.map(image => image.naturalWidth)")
        page.screenshot(path=str(tmp_path / "plots.png"), full_page=True)
        browser.close()
    # Every figure is an image that shows without the Vega scripts the page would fetch from a CDN.
    assert len(widths) >= 7
    assert all(width >= 600 for width in widths), widths  # readable, not thumbnails
    assert refused, "the page fetched nothing from the network: is the offline check still testing it?"


def test_every_stage_logged_an_mlflow_run(project: Path, first_repro: str) -> None:
    runs = mlflow_runs(sqlite_uri(project))
    assert sorted(runs["tags.stage"]) == sorted(STAGES)
    assert (runs["status"] == "FINISHED").all()
    commit = run(project, "git", "rev-parse", "HEAD~1").strip()
    assert set(runs["tags.mlflow.source.git.commit"]) == {commit}
    train = runs[runs["tags.stage"] == "train"].iloc[0]
    assert train["params.train.epochs"] == "6"
    assert train["metrics.val_accuracy"] > 0
    rebalance = runs[runs["tags.stage"] == "rebalance"].iloc[0]
    per_class = pd.read_csv(project / "data" / "split" / "train.csv")["label"].value_counts()
    minimum = yaml.safe_load((project / "params.yaml").read_text())["rebalance"]["min_source_images"]
    assert rebalance["metrics.sparse_classes"] == (per_class < minimum).sum() > 0


def test_model_is_registered_as_challenger(project: Path, first_repro: str) -> None:
    client = mlflow_client(sqlite_uri(project))
    version = client.get_model_version_by_alias(model_name(), "challenger")
    assert str(version.version) == "1"
    assert version.description.startswith(f"# Model card: {model_name()}")
    assert float(version.tags["melanoma_threshold"]) > 0
    assert "manual" in version.tags["promotion"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    split_hash = next(out["md5"] for out in lock["split"]["outs"] if out["path"] == "data/split")
    assert version.tags["dvc.data.data/split"] == split_hash  # names exactly the data it came from
    assert f"data `data/split`: DVC hash `{split_hash}`" in version.description
    model = mlflow.pyfunc.load_model(f"models:/{model_name()}@challenger")
    image = next((project / "data" / "raw" / "train" / "melanoma").iterdir())
    encoded = base64.b64encode(image.read_bytes()).decode()
    predictions = model.predict(pd.DataFrame({"image": [encoded, encoded]}))
    assert len(predictions) == 2
    assert {"predicted_label", "p_melanoma", "melanoma_alert"} <= set(predictions.columns)
    assert predictions["ood_score"].notna().all()  # evaluate fitted the OOD summary it travels with
    figures = model.model_config["test_figures"]
    assert figures["images"] == len(pd.read_csv(project / "data" / "split" / "test.csv"))
    assert sum(figures["class_mix"].values()) == pytest.approx(1.0)
    assert (project / "metrics" / "model_card.md").read_text().startswith("# Model card")


def test_second_repro_runs_nothing(project: Path, first_repro: str) -> None:
    output = run(project, "dvc", "repro")
    assert "Running stage" not in output
    assert "Data and pipelines are up to date." in output


def test_editing_what_only_people_run_leaves_every_stage_up_to_date(project: Path, first_repro: str) -> None:
    # `promote`, an upload limit of `serve`: code in skin_lesion/app/, which no stage imports.
    app = project / "skin_lesion" / "app"
    edits = {
        app / "promotion.py": ("def promote(", "def promote(  "),
        app / "server.py": ("MAX_IMAGES_PER_REQUEST = ", "MAX_IMAGES_PER_REQUEST = 2 * "),
    }
    originals = {path: path.read_text(encoding="utf-8") for path in edits}
    try:
        for path, (old, new) in edits.items():
            assert old in originals[path], path
            path.write_text(originals[path].replace(old, new, 1), encoding="utf-8")
        assert "Data and pipelines are up to date." in run(project, "dvc", "status")
    finally:
        for path, text in originals.items():
            path.write_text(text, encoding="utf-8")


def test_a_bad_value_fails_in_one_line_and_keeps_the_committed_metrics(
    project: Path, first_repro: str
) -> None:
    committed = [project / "metrics" / name for name in ("train.json", "train_details.json", "evaluate.json")]
    before = {path: path.read_bytes() for path in committed}
    params = (project / "params.yaml").read_text(encoding="utf-8")
    command, env = ["dvc", "exp", "run", "-S", "train.epochs=zero"], command_env()
    try:
        result = subprocess.run(command, check=False, cwd=project, env=env, capture_output=True, text=True)
    finally:
        (project / "params.yaml").write_text(params, encoding="utf-8")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "ERROR skin_lesion: params.yaml: train.epochs: Input should be a valid integer" in output, output
    assert {path: path.read_bytes() for path in committed if path.exists()} == before


def test_changing_train_params_reruns_only_train_and_evaluate(project: Path, first_repro: str) -> None:
    output = run(project, "dvc", "exp", "run", "-S", "train.epochs=2", "--name", "two-epochs")
    ran = [stage for stage in STAGES if f"Running stage '{stage}'" in output]
    assert ran == ["train", "evaluate"]
    shown = json.loads(run(project, "dvc", "exp", "show", "--json"))
    experiments = [exp for entry in shown for exp in entry.get("experiments") or []]
    names = {exp["name"]: exp for exp in experiments}
    assert "two-epochs" in names
    revision = names["two-epochs"]["revs"][0]["data"]
    assert revision["params"]["params.yaml"]["data"]["train"]["epochs"] == 2
    assert "bal_acc" in revision["metrics"]["metrics/evaluate.json"]["data"]
    # `dvc exp show` spreads every metric into a column: a dozen headline numbers, not hundreds.
    shown_metrics = [
        name for data in revision["metrics"].values() for name in data["data"] if not isinstance(name, dict)
    ]
    assert set(revision["metrics"]) == {"metrics/evaluate.json", "metrics/train.json"}
    assert len(shown_metrics) <= 12, shown_metrics  # with the external sets' mean melanoma AUC


def test_the_readmes_comparison_fits_120_columns(project: Path, first_repro: str) -> None:
    if "two-epochs" not in run(project, "dvc", "exp", "list", "--name-only"):  # the test above runs it
        run(project, "dvc", "exp", "run", "-S", "train.epochs=2", "--name", "two-epochs")
    output = readme_comparison(project)
    assert "two-epochs" in output
    assert "train.epochs" in output  # the knob that changed


def test_a_new_weights_file_makes_train_stale(project: Path, first_repro: str) -> None:
    # train depends on the weights/ folder, so new or changed backbone weights retrain the model.
    weights = project / "weights" / "backbone.weights.h5"
    weights.write_bytes(b"new weights")
    try:
        status = json.loads(run(project, "dvc", "status", "--json"))
    finally:
        weights.unlink()
    assert "train" in status
    assert not {"download", "split", "rebalance"} & set(status)
    assert status["train"][0]["changed deps"] == {"weights": "modified"}


def test_evaluate_reports_collections_and_the_stress_test(project: Path, first_repro: str) -> None:
    # The stand-in archive attributes its images to several hospitals: each is a collection.
    shift = json.loads((project / "metrics" / "source_shift.json").read_text())
    assert len(shift["by_collection"]) > 1
    assert all(row["images"] > 0 for row in shift["by_collection"].values())
    assert sorted(shift["stress"]) == sorted(repo_params()["evaluate"]["stress"])
    card = (project / "metrics" / "model_card.md").read_text()
    assert "## By collection" in card
    assert "## Acquisition stress test" in card
    assert "## Where the images come from" in (project / "metrics" / "data_report.md").read_text()
    assert (project / "metrics" / "evaluate" / "stress.png").stat().st_size > 0


def test_evaluate_validates_on_the_external_set(project: Path, first_repro: str) -> None:
    external = json.loads((project / "metrics" / "external.json").read_text())["clinic"]
    seen = pd.concat(pd.read_csv(project / "data" / "split" / f"{name}.csv") for name in ("train", "val"))
    copies = project / "data" / "external" / "clinic" / "clinic melanoma"
    expected = sum(sha256_file(path) in set(seen["sha256"]) for path in copies.glob("copy_*.png"))
    assert expected > 0
    assert external["copies_of_training"] == expected
    assert external["chose_recipe"] is False  # the e2e params do not mark it
    assert external["images"] == 4 * len(CLASSES) + 5 - expected
    assert external["melanoma_auc"] > 0.5
    assert 0 <= external["alert"]["sensitivity"] <= 1
    assert set(external["alert_by_rule"]) == {"overall", "worst_collection"}
    card = (project / "metrics" / "model_card.md").read_text()
    assert "## External validation" in card
    assert "| clinic |" in card
    assert "## Threshold rules" in card
    version = mlflow_client(sqlite_uri(project)).get_model_version_by_alias(model_name(), "challenger")
    assert float(version.tags["external_clinic_melanoma_auc"]) == pytest.approx(external["melanoma_auc"])
    headline = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert headline["ext_mel_auc"] == round(external["melanoma_auc"], 3)
    model = mlflow.pyfunc.load_model(f"models:/{model_name()}@challenger")
    assert set(model.model_config["test_figures"]["external"]) == {"clinic"}
    # Each class the clinic set has carries its recall, for the review page and predict.
    recall = model.model_config["test_figures"]["external"]["clinic"]["class_recall"]
    assert {label: row["recall"] for label, row in recall.items()} == external["recall"]
    assert "calibration" in external
    assert "## Class figures" in card
    assert "## Calibration" in card
