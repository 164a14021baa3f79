"""Promotion by hand and what the command line says of a version: the registry as people use it.

Registration and the automatic promotion decision run in `evaluate` (skin_lesion/registry.py).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from skin_lesion.errors import PipelineError
from skin_lesion.registry import CHAMPION_ALIAS, SITE_TAG, TEST_SPLIT_TAG, champion_alias
from skin_lesion.tracking import tracking_uri

log = logging.getLogger("skin_lesion.app.promotion")

REPLACED_TAG = "replaced_version"  # the version a forced promotion moved the alias away from


def resolve_default_model(name: str, site: str = "") -> str:
    """`models:/name@champion`, or the newest version with a warning when no champion is set.

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
        log.warning(
            "no %r alias on %s yet; using its newest version %d (`skin-lesion promote %d` sets it)",
            CHAMPION_ALIAS,
            name,
            newest,
            newest,
        )
        return f"models:/{name}/{newest}"
    return f"models:/{name}@{CHAMPION_ALIAS}"


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

    Other URIs (a run's model, a folder) are not registered versions: only the URI is known.
    """
    name, _, ref = model_uri.removeprefix("models:/").partition("@")
    if not model_uri.startswith("models:/"):
        return {"uri": model_uri, "name": "", "version": "", "aliases": [], "registered": "", "card": ""}
    if ref:
        version = client.get_model_version_by_alias(name, ref)
    else:
        name, _, number = name.partition("/")
        version = client.get_model_version(name, number)
    run = client.get_run(version.run_id)
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
        "card": version.description or "",
    }
