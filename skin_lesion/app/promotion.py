"""Promotion by hand and what the command line says of a version: the registry as people use it.

Registration and the automatic promotion decision run in `evaluate` (skin_lesion/registry/registration.py).
"""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from skin_lesion.errors import PipelineError
from skin_lesion.registry.registration import (
    CHAMPION_ALIAS,
    PROVENANCE_HEADING,
    SITE_TAG,
    TEST_SPLIT_TAG,
    champion_alias,
)
from skin_lesion.tracking import tracking_uri

REPLACED_TAG = "replaced_version"  # the version a forced promotion moved the alias away from
MODEL_CARD_ARTIFACT = "model_card.md"  # evaluate logs the whole card to the run it registers from


def resolve_default_model(name: str, site: str = "") -> str:
    """`models:/name@champion`, which must be set: with none, the newest version could be any
    experiment, and predict, serve and the review page would hand its answers on as the model's.

    With `site`, that site's own champion (`champion-<site>`), which must be set: another site's
    model, or one that never learned from this site, would quote figures that are not the site's.
    """
    client = MlflowClient()
    if site:
        alias = champion_alias(site)
        try:
            client.get_model_version_by_alias(name, alias)
        except MlflowException:
            raise PipelineError(
                f"--site {site}: {name} has no version aliased {alias!r} in {tracking_uri()} "
                f"(`skin-lesion promote VERSION --site {site}` sets it)"
            ) from None
        return f"models:/{name}@{alias}"
    try:
        client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise PipelineError(
                f"no registered model {name!r} in {tracking_uri()}: run the pipeline first"
            ) from None
        newest = max(int(version.version) for version in versions)
        raise PipelineError(
            f"{name} has no version aliased {CHAMPION_ALIAS!r} in {tracking_uri()}: promote one "
            f"(`skin-lesion promote {newest}` for the newest), or name the version to use with "
            f"--model models:/{name}/{newest}"
        ) from None
    return f"models:/{name}@{CHAMPION_ALIAS}"


def promotion_warning(version: dict[str, Any]) -> str:
    """What every screen showing a version says when nobody promoted it; '' for a champion."""
    if any(alias == CHAMPION_ALIAS or alias.startswith(f"{CHAMPION_ALIAS}-") for alias in version["aliases"]):
        return ""
    if not version["version"]:
        return f"NOT PROMOTED: {version['uri']} is not a registered version; it may be an experiment."
    number = version["version"]
    return (
        f"NOT PROMOTED: {version['name']} version {number} is not a champion; it may be an experiment"
        f" (`skin-lesion promote {number}` makes it the champion)."
    )


def promote(
    client: MlflowClient, name: str, version: str, alias: str, force: bool = False, site: str = ""
) -> str:
    """Point `alias` at `version` of `name`; refuse when their test splits differ or are unknown.

    `force` overrides that, and the version's `promotion` tag records the override and the version it
    replaced. Moving the alias back to that version (a rollback) needs no `force`. With `site`, the
    version must have learned from that site (its `site` tag), unless `force`.
    """
    try:
        candidate = client.get_model_version(name, version)
    except MlflowException:
        raise PipelineError(f"{name} has no version {version} in {tracking_uri()}") from None
    learned_from = candidate.tags.get(SITE_TAG, "")
    if site and learned_from != site and not force:
        raise PipelineError(
            f"version {version} did not learn from site {site} (site tag {learned_from!r}); "
            "--force promotes it anyway"
        )
    if learned_from and not site and not force:
        # Its threshold and figures are one clinic's: elsewhere they would mislead.
        raise PipelineError(
            f"version {version} learned from site {learned_from}: promote it with --site {learned_from} "
            "(--force makes it @" + alias + " anyway)"
        )
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    comparable = current is None or _same_test_split(candidate.tags, current.tags)
    rollback = current is not None and current.tags.get(REPLACED_TAG) == str(version)
    if not (comparable or rollback or force):
        raise PipelineError(
            f"version {version} was not tested on the same known test split as @{alias} (version"
            f" {current.version}), so their metrics do not compare; --force promotes it anyway"
        )
    client.set_registered_model_alias(name, alias, version)
    how = "by hand"
    if rollback:
        how = "by hand, rolled back"
    elif not comparable:
        how = "by hand with --force: tested on another test split"
        client.set_model_version_tag(name, version, REPLACED_TAG, str(current.version))
    client.set_model_version_tag(name, version, "promotion", f"set @{alias} {how}{_was(current)}")
    return f"{name} version {version} is now @{alias}{_was(current)}"


def _same_test_split(ours: dict[str, str], theirs: dict[str, str]) -> bool:
    # Two versions with no recorded split are not known to share one.
    return ours.get(TEST_SPLIT_TAG) is not None and ours.get(TEST_SPLIT_TAG) == theirs.get(TEST_SPLIT_TAG)


def _was(current: Any) -> str:
    return f" (was version {current.version})" if current is not None else ""


def describe_version(client: MlflowClient, model_uri: str) -> dict[str, Any]:
    """Name, version, aliases, registration time, run and model card of a `models:/` URI's version.

    The card is the whole one its run logged (`model_card.md`) with the description's provenance; the
    description alone (which may leave sections out for length) when the run has none.
    Other URIs (a run's model, a folder) are not registered versions: only the URI is known.
    """
    name, _, ref = model_uri.removeprefix("models:/").partition("@")
    if not model_uri.startswith("models:/"):
        return {
            "uri": model_uri,
            "name": "",
            "version": "",
            "aliases": [],
            "registered": "",
            "card": "",
            "card_is_whole": False,
        }
    if ref:
        version = client.get_model_version_by_alias(name, ref)
    else:
        name, _, number = name.partition("/")
        version = client.get_model_version(name, number)
    run = client.get_run(version.run_id)
    card = full_model_card(client, version.run_id)
    return {
        "uri": model_uri,
        "name": name,
        "version": str(version.version),
        "aliases": list(version.aliases),
        "registered": datetime.fromtimestamp(version.creation_timestamp / 1000, UTC).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "run_id": version.run_id,
        "experiment_id": run.info.experiment_id,
        "card": whole_card(card, version.description or ""),
        "card_is_whole": bool(card),
    }


def full_model_card(client: MlflowClient, run_id: str) -> str:
    """The whole model card that `evaluate` logged to the version's run; '' when the run has none."""
    if MODEL_CARD_ARTIFACT not in {artifact.path for artifact in client.list_artifacts(run_id)}:
        return ""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(client.download_artifacts(run_id, MODEL_CARD_ARTIFACT, folder))
        return path.read_text(encoding="utf-8")


def whole_card(card: str, description: str) -> str:
    """The whole card and the description's provenance section, or the description when there is no card."""
    if not card:
        return description
    _, heading, provenance = description.partition(f"\n{PROVENANCE_HEADING}\n")
    return card + heading + provenance
