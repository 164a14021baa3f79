"""Registration and `skin-lesion promote`: aliases move only between comparable versions."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from skin_lesion.app.promotion import promote
from skin_lesion.errors import PipelineError
from skin_lesion.evaluation.model_card import few_images_line
from skin_lesion.registry.registration import (
    CHAMPION_ALIAS,
    SITE_TAG,
    TEST_SPLIT_TAG,
    champion_alias,
    set_alias,
    split_fingerprint,
    version_description,
)
from tests.conftest import REPO, point_mlflow_at, run_skin_lesion

NAME = "skin-lesion-classifier"  # base.model_name in the committed params.yaml


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    """Versions 1 and 2 scored on test split `a`, 3 on split `b`, 4 and 5 on none recorded; 1 is champion."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    point_mlflow_at(uri, monkeypatch)
    registry = MlflowClient(uri, uri)
    registry.create_registered_model(NAME)
    for split in ("a", "a", "b", None, None):
        tags = {TEST_SPLIT_TAG: split} if split else {}
        registry.create_model_version(NAME, source=(tmp_path / "model").as_uri(), tags=tags)
    registry.set_registered_model_alias(NAME, CHAMPION_ALIAS, "1")
    return registry


def _champion(client: MlflowClient) -> str:
    return str(client.get_model_version_by_alias(NAME, CHAMPION_ALIAS).version)


def test_promote_moves_the_alias_to_a_version_on_the_same_test_split(client: MlflowClient) -> None:
    message = promote(client, NAME, "2", CHAMPION_ALIAS)
    assert _champion(client) == "2"
    assert message == f"{NAME} version 2 is now @champion (was version 1)"
    assert client.get_model_version(NAME, "2").tags["promotion"] == "set @champion by hand (was version 1)"


def test_promote_refuses_a_version_scored_on_another_test_split(client: MlflowClient) -> None:
    with pytest.raises(
        PipelineError, match=r"version 3 was not tested on the same known test split as @champion"
    ):
        promote(client, NAME, "3", CHAMPION_ALIAS)
    assert _champion(client) == "1"


def test_promote_refuses_between_versions_whose_test_split_is_unknown(client: MlflowClient) -> None:
    promote(client, NAME, "4", CHAMPION_ALIAS, force=True)
    with pytest.raises(PipelineError, match=r"version 5 was not tested on the same known test split"):
        promote(client, NAME, "5", CHAMPION_ALIAS)
    assert _champion(client) == "4"


def test_promote_with_force_moves_the_alias_and_records_the_override(client: MlflowClient) -> None:
    promote(client, NAME, "3", CHAMPION_ALIAS, force=True)
    assert _champion(client) == "3"
    tags = client.get_model_version(NAME, "3").tags
    assert (
        tags["promotion"]
        == "set @champion by hand with --force: tested on another test split (was version 1)"
    )


def test_rolling_back_a_forced_promotion_needs_no_force(client: MlflowClient) -> None:
    promote(client, NAME, "3", CHAMPION_ALIAS, force=True)
    promote(client, NAME, "1", CHAMPION_ALIAS)
    assert _champion(client) == "1"
    assert (
        client.get_model_version(NAME, "1").tags["promotion"]
        == "set @champion by hand, rolled back (was version 3)"
    )


def test_promote_names_a_version_that_does_not_exist(client: MlflowClient) -> None:
    with pytest.raises(PipelineError, match=rf"{NAME} has no version 9"):
        promote(client, NAME, "9", CHAMPION_ALIAS)


def test_promote_command_sets_the_alias_and_refuses_in_one_line(client: MlflowClient, tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text(encoding="utf-8"))

    moved = run_skin_lesion(tmp_path, "promote", "2")
    assert moved.returncode == 0, moved.stderr
    assert _champion(client) == "2"
    refused = run_skin_lesion(tmp_path, "promote", "3")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("ERROR skin_lesion: version 3 was not tested")
    assert "Traceback" not in refused.stderr


def test_split_fingerprint_changes_with_the_split(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("path,label\nx.jpg,nevus\n")
    (tmp_path / "b.csv").write_text("path,label\ny.jpg,nevus\n")
    assert split_fingerprint(tmp_path / "a.csv") != split_fingerprint(tmp_path / "b.csv")
    assert len(split_fingerprint(tmp_path / "a.csv")) == 16


def test_a_long_model_card_fits_a_sql_stores_description_by_dropping_whole_sections() -> None:
    sections = {
        "Data": "d" * 900,
        "Model": "m" * 300,
        "By collection": "c" * 1500,
        "Acquisition stress test": "s" * 2000,
        "Limitations": "l" * 400,
    }
    card = "# Model card: x\n" + "".join(f"\n## {name}\n\n{body}\n" for name, body in sections.items())
    note = "\n## Provenance\n\n- git commit: `abc`\n"
    described = version_description(card, note, limit=5000)
    assert len(described) <= 5000
    assert "## By collection" in described  # dropping the stress test was enough
    assert "## Acquisition stress test" not in described
    assert "## Limitations" in described
    assert (
        "Left out here for length: acquisition stress test; the full card is the evaluate run's" in described
    )
    assert described.endswith(note)
    assert version_description("# short card\n", note) == "# short card\n" + note


def test_a_card_too_long_even_without_those_sections_keeps_whole_sections_only() -> None:
    card = "# Model card: x\n\n## Model\n\n" + "m" * 3000 + "\n\n## Limitations\n\n" + "l" * 3000 + "\n"
    note = "\n## Provenance\n\n- git commit: `abc`\n"
    described = version_description(card, note, limit=5000)
    assert len(described) <= 5000
    assert "m" * 3000 + "\n" in described
    assert "## Limitations" not in described  # left out whole, not cut mid-way
    assert "Cut short for length after the sections above" in described
    assert described.endswith(note)


def test_the_cards_limitation_names_its_rarest_classes_without_pointing_at_the_class_table() -> None:
    # The class table is in the Data section, which a version's description may leave out for length.
    counts = {
        "train": {"melanoma": 40, "nevus": 300, "dermatofibroma": 9},
        "test": {"melanoma": 8, "nevus": 60, "dermatofibroma": 2},
    }
    line = few_images_line(counts, ["melanoma", "nevus", "dermatofibroma"])
    assert line.endswith(
        "the fewest (train / test): dermatofibroma (9 / 2), melanoma (40 / 8), nevus (300 / 60)."
    )
    assert "table" not in line


def test_a_sites_version_becomes_that_sites_champion_only(client: MlflowClient) -> None:
    client.set_model_version_tag(NAME, "2", SITE_TAG, "clinic")
    with pytest.raises(PipelineError, match=r"^version 2 learned from site clinic: promote it with --site"):
        promote(client, NAME, "2", CHAMPION_ALIAS)
    assert _champion(client) == "1"
    with pytest.raises(PipelineError, match=r"^version 1 did not learn from site clinic"):
        promote(client, NAME, "1", champion_alias("clinic"), site="clinic")
    promote(client, NAME, "2", champion_alias("clinic"), site="clinic")
    assert str(client.get_model_version_by_alias(NAME, "champion-clinic").version) == "2"
    assert _champion(client) == "1"


class _RacingClient:
    """A registry client whose first alias write loses a race with another process's."""

    def __init__(self, error: str) -> None:
        self.error, self.set = error, []

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        if not self.set and self.error:
            self.set.append(None)
            raise MlflowException(self.error)
        self.set.append((name, alias, version))


def test_an_alias_set_at_the_same_moment_elsewhere_is_set_again() -> None:
    duplicate = 'duplicate key value violates unique constraint "registered_model_alias_pk"'
    client = _RacingClient(f"BAD_REQUEST: (psycopg.errors.UniqueViolation) {duplicate}")
    set_alias(client, "lesions", "challenger", "3")
    assert client.set[-1] == ("lesions", "challenger", "3")


def test_any_other_alias_failure_is_raised() -> None:
    client = _RacingClient("RESOURCE_DOES_NOT_EXIST: Registered Model with name=lesions not found")
    with pytest.raises(MlflowException, match="not found"):
        set_alias(client, "lesions", "challenger", "3")
