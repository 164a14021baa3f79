"""The model card as evaluate renders it: pinned text, and the marks of the sets that chose the recipe."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from skin_lesion.evaluation.metrics import reference_figures
from skin_lesion.evaluation.model_card import CHOSE_RECIPE, ModelCardFacts, render_model_card
from skin_lesion.params import EvaluateParams
from stages.evaluate import chose_recipe
from tests import model_card_inputs as inputs
from tests.conftest import as_params, small_params

GOLDEN = Path(__file__).parent / "golden"


def _facts(chose_recipe: tuple[str, ...] = ()) -> ModelCardFacts:
    base, download = inputs.card_params()
    return ModelCardFacts(
        base=base,
        download=download,
        model="A model.",
        target_sensitivity=0.9,
        metrics=inputs.metrics(),
        shift=inputs.shift(),
        data=inputs.data_report(),
        external=inputs.external(),
        rule="site",
        site=inputs.site(),
        chose_recipe=chose_recipe,
    )


def test_the_card_reads_as_it_did_before_it_was_split_into_sections() -> None:
    # tests/golden/model_card.md is what the 87-line render_model_card wrote for these figures.
    expected = (GOLDEN / "model_card.md").read_text(encoding="utf-8")
    assert render_model_card(_facts()) == expected


def test_a_card_without_site_external_sets_or_calibration_reads_as_it_did() -> None:
    params = as_params(small_params())
    facts = ModelCardFacts(
        base=params.base,
        download=params.download,
        model="A model.",
        target_sensitivity=0.8,
        metrics=inputs.bare_metrics(),
        shift={"by_collection": {}, "stress": {}},
        data=inputs.data_report() | {"provenance": {"warnings": []}},
        external={},
        rule="overall",
    )
    assert render_model_card(facts) == (GOLDEN / "model_card_bare.md").read_text(encoding="utf-8")


def test_the_card_names_the_sets_that_chose_the_recipe() -> None:
    card = render_model_card(_facts(chose_recipe=("isic2017",)))
    assert "The recipe and its settings were chosen on the external set(s) isic2017:" in card
    limitation = (
        "- isic2017 chose the recipe, so its figures are optimistic; independent external sets: clinic."
    )
    assert limitation in card


def test_every_figure_of_a_set_that_chose_the_recipe_is_marked() -> None:
    card = render_model_card(_facts(chose_recipe=("isic2017",)))
    mentions = [line for line in card.splitlines() if "isic2017" in line]
    # A row in the external and calibration tables, a column in the class and threshold-rule tables.
    tables = [line for line in mentions if line.startswith("|")]
    assert len(tables) == 4
    assert all(f"isic2017{CHOSE_RECIPE}" in line for line in tables)
    assert not any(f"clinic{CHOSE_RECIPE}" in line for line in card.splitlines())


def test_a_card_whose_only_external_set_chose_the_recipe_says_none_is_independent() -> None:
    facts = _facts(chose_recipe=("isic2017",))
    only = replace(facts, external={"isic2017": facts.external["isic2017"]})
    assert "no external set is independent." in render_model_card(only)


def _evaluate_params(chose: bool) -> EvaluateParams:
    labels = {"labels_csv": "", "label_map": {"melanoma": "melanoma"}}
    external = {"isic2017": {**labels, "chose_recipe": chose}, "clinic": labels}
    return as_params(small_params(evaluate={"external": external})).evaluate


def test_the_sets_that_chose_the_recipe_are_the_ones_params_flag() -> None:
    assert chose_recipe(_evaluate_params(chose=True)) == ("isic2017",)
    assert chose_recipe(_evaluate_params(chose=False)) == ()  # the flag defaults to false


def test_the_registered_figures_flag_the_sets_that_chose_the_recipe() -> None:
    params = as_params(small_params())
    external = inputs.external()
    external["isic2017"] |= {"chose_recipe": True}  # as external_report writes it from the params
    metrics = inputs.metrics() | {"external": external}
    y_test, p_test = np.array([0, 1, 2]), np.eye(3)
    melanoma = params.base.classes.index(params.base.melanoma_class)
    figures = reference_figures(
        metrics, y_test, p_test, np.zeros(3, bool), params.base.classes, melanoma, external
    )
    assert figures["external"]["isic2017"]["chose_recipe"] is True
    assert figures["external"]["clinic"]["chose_recipe"] is False
