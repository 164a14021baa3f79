"""The model card: what the model is, how it was tested, and where it is known to fail."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from skin_lesion.model.classifier import trained_on_warning
from skin_lesion.params import BaseParams, DownloadParams, TrainParams

# Beside every figure of a set the recipe was chosen on: selection makes those figures optimistic.
CHOSE_RECIPE = " (chose the recipe)"


@dataclass(frozen=True)
class ModelCardFacts:
    """What the model card states: the params it names and the figures evaluate measured."""

    base: BaseParams
    download: DownloadParams
    model: str  # describe_model's line
    target_sensitivity: float
    metrics: dict[str, Any]  # the test split's (metrics.score_test_split), with `calibration`
    shift: dict[str, Any]  # by collection and under stress (stress.source_shift_report)
    data: dict[str, Any]  # the split stage's data.json
    external: dict[str, dict[str, Any]]  # each external set's figures, by name
    rule: str  # the threshold rule in use
    site: dict[str, Any] = field(default_factory=dict)  # sites.site_figures; {} without a site
    chose_recipe: tuple[str, ...] = ()  # the external sets the recipe and its settings were chosen on


def describe_source(download: DownloadParams) -> str:
    """The data source in one line, loudly marked when the images are generated."""
    line = f"`{download.source}` ({download.input})"
    if download.source == "synthetic":
        line += " - SYNTHETIC generated shapes, not skin lesions"
    return line


def describe_model(train: TrainParams, image_size: int, mirror_average: bool) -> str:
    """The architecture, its starting weights, recipe and training budget in one line."""
    epochs = f"at most {train.epochs} epoch{'s' if train.epochs != 1 else ''}"
    if train.weights == "none":
        how = f"`{train.arch}` trained from scratch, {epochs}"
    elif train.recipe == "linear_probe":
        how = (
            f"`{train.arch}` with frozen `{train.weights}` weights and a linear probe "
            f"(logistic regression, C = {train.probe_c:g})"
        )
    elif train.recipe == "lp_ft":
        how = (
            f"`{train.arch}` from `{train.weights}` weights: a linear probe (C = {train.probe_c:g}), "
            f"fine-tuned from it for {epochs}, interpolated at {train.interpolation:g} (WiSE-FT)"
        )
    else:
        how = f"`{train.arch}` fine-tuned from `{train.weights}` weights, {epochs}"
    mirror = "; predictions average each image with its mirror image" if mirror_average else ""
    return f"{how}, at {image_size}x{image_size} pixels, {train.precision}{mirror}."


def render_model_card(facts: ModelCardFacts) -> str:
    """The model card: data and provenance, split, metrics with intervals, threshold, use, limits;
    with a site, the site's cross-fitted figures and where its threshold came from."""
    base, metrics, external, chose = facts.base, facts.metrics, facts.external, facts.chose_recipe
    lines = [
        *header_lines(base.model_name, trained_on_warning(facts.download.source)),
        *data_lines(facts.data, facts.download, base.classes),
        *model_lines(facts.model, chose),
        *metric_lines(metrics),
        *alert_lines(metrics, facts.site, facts.target_sensitivity),
        *site_lines(facts.site),
        *external_lines(external, metrics, base.melanoma_class, chose),
        *class_recall_lines(metrics, external, base.classes, chose),
        *calibration_lines(metrics.get("calibration"), external, chose),
        *threshold_rule_lines(
            metrics["melanoma"]["threshold_rules"], external, facts.rule, facts.target_sensitivity, chose
        ),
        *_collection_lines(facts.shift["by_collection"]),
        *_stress_lines(facts.shift["stress"]),
        *limitation_lines(facts.data, base.classes, external, chose),
    ]
    return "\n".join(lines) + "\n"


def header_lines(model_name: str, warning: str) -> list[str]:
    """The title, the synthetic-data warning (if any) and what the model is not."""
    return [
        f"# Model card: {model_name}",
        "",
        *([f"**{warning}.** It was trained and tested on generated images.", ""] if warning else []),
        "**Not a diagnostic device.** A research tool that gives a second opinion on dermoscopic images;",
        "a clinician decides. It has not been validated prospectively or on other populations.",
        "",
    ]


def data_lines(data: dict[str, Any], download: DownloadParams, classes: Sequence[str]) -> list[str]:
    """Where the images came from, what was removed, and each class's images per split."""
    counts = data["class_counts"]
    return [
        "## Data",
        "",
        f"- Source: {describe_source(download)}",
        f"- Images in: {data['images_in']}; rejected: {data['images_rejected']}; removed as duplicates, "
        f"label conflicts or test leakage: {data['images_removed'] - data['images_rejected']} "
        f"({data['label_conflicts']} label conflicts, {data['conflicts_settled_by_diagnosis']} "
        f"settled by diagnosis, {data['leakage_removed']} leakage removals).",
        f"- Split: train {sum(counts['train'].values())}, val {sum(counts['val'].values())}, "
        f"test {sum(counts['test'].values())} images; photos of one lesion never straddle splits.",
        "",
        "| class | train | val | test |",
        "| --- | --- | --- | --- |",
        *[
            f"| {label} | {counts['train'][label]} | {counts['val'][label]} | {counts['test'][label]} |"
            for label in classes
        ],
        "",
    ]


def model_lines(model: str, chose_recipe: Sequence[str]) -> list[str]:
    """The model in one line, and the external sets its recipe was chosen on."""
    lines = ["## Model", "", model, ""]
    if chose_recipe:
        lines += [
            f"The recipe and its settings were chosen on the external set(s) {_names(chose_recipe)}: their",
            f"figures here were used for selection and flatter the model; each is marked{CHOSE_RECIPE}.",
            "",
        ]
    return lines


def metric_lines(metrics: dict[str, Any]) -> list[str]:
    """The test split's headline figures, with their bootstrap intervals where there are some."""
    intervals = metrics["confidence_intervals"]
    melanoma = metrics["melanoma"]
    return [
        "## Test metrics",
        "",
        "- Balanced multiclass accuracy: "
        + _with_interval(metrics["balanced_accuracy"], intervals.get("balanced_accuracy")),
        f"- Accuracy: {metrics['accuracy']:.3f}; macro one-vs-rest AUC: {_shown(metrics['macro_auc'])}",
        f"- Melanoma AUC: {_with_interval(melanoma['auc'], intervals.get('melanoma_auc'))}; "
        f"AUC above 80 % sensitivity: {_shown(melanoma['auc_sens_80'])}",
        f"- Expected calibration error: {metrics['calibration_error']:.3f}",
        "",
    ]


def alert_lines(metrics: dict[str, Any], site: dict[str, Any], target_sensitivity: float) -> list[str]:
    """The melanoma alert's threshold, where it was chosen, and what it does on the test split."""
    point = metrics["melanoma"]["operating_point"]
    sensitivity = _with_interval(
        point["sensitivity"], metrics["confidence_intervals"].get("melanoma_sensitivity")
    )
    chosen_on = (
        f"site {site['site']}'s cross-fitted melanomas"
        if site and site["threshold_source"] == "site"
        else "the validation split"
    )
    return [
        "## Melanoma alert",
        "",
        f"An alert is raised when P(melanoma) >= {point['threshold']:.4f}, chosen on {chosen_on}",
        f"to reach {target_sensitivity:.0%} sensitivity there. On the test split:",
        f"sensitivity {sensitivity}, "
        f"specificity {_shown(point['specificity'])}, {point['alerts_per_100']:.1f} alerts per 100 images.",
        "",
    ]


def limitation_lines(
    data: dict[str, Any], classes: Sequence[str], external: dict[str, Any], chose_recipe: Sequence[str]
) -> list[str]:
    """What the figures cannot say: small test set, rare classes, other populations, provenance."""
    lines = [
        "## Limitations",
        "",
        "- The test set is small; the intervals above show how uncertain these numbers are.",
        few_images_line(data["class_counts"], classes),
        "- Dermoscopic images of mostly light skin from a few clinics; performance elsewhere is unknown"
        + (" beyond the external sets above." if external else ": no external set was scored."),
    ]
    if chose_recipe:
        independent = [name for name in external if name not in chose_recipe]
        lines.append(
            f"- {_names(chose_recipe)} chose the recipe, so its figures are optimistic; "
            + (
                f"independent external sets: {_names(independent)}."
                if independent
                else "no external set is independent."
            )
        )
    return [*lines, *[f"- Provenance: {warning}." for warning in data["provenance"]["warnings"]]]


RAREST_CLASSES = 3  # the classes the limitation names, fewest training images first


def few_images_line(counts: dict[str, dict[str, int]], classes: Sequence[str]) -> str:
    """The limitation of the rarest classes, with their counts: the class table may be left out for length."""
    rarest = sorted(classes, key=lambda label: counts["train"][label])[:RAREST_CLASSES]
    named = ", ".join(f"{label} ({counts['train'][label]} / {counts['test'][label]})" for label in rarest)
    return f"- Classes with few images are learned and measured poorly; the fewest (train / test): {named}."


def site_lines(site: dict[str, Any]) -> list[str]:
    """The site's cross-fitted figures: what the model does on images of the site it did not learn."""
    if not site:
        return []

    def alert(figures: dict[str, Any]) -> str:
        return (
            f"sensitivity {_with_bounds(figures['sensitivity'], figures['sensitivity_ci'])} of "
            f"{figures['sensitivity_n']} melanomas, false alerts "
            f"{_with_bounds(figures['false_alert_rate'], figures['false_alert_rate_ci'])} of "
            f"{figures['false_alert_rate_n']} other lesions"
        )

    left_out = site.get("left_out") or {}
    lines = [
        f"## At site {site['site']} (cross-fitted)",
        "",
        f"The model also learned from {site['images']} of the site's own images ({site['melanomas']} "
        f"melanomas, each weighing {site['weight']:g} training images; "
        f"{left_out.get('copies_of_training', 0)} copies of training images left out). Every figure here",
        f"is on images scored by a model fitted without them ({site['folds']} folds, photos of one lesion",
        "in one fold); the shipped model learned from all of them.",
        "",
        f"- Melanoma AUC: {_with_bounds(site['melanoma_auc'], site['melanoma_auc_ci'])}",
        f"- Threshold {site['threshold']:.4f} ({site['threshold_source']}: {site['threshold_reason']})",
        (
            "- The alert, each fold at a threshold chosen on the other folds: "
            if site["threshold_source"] == "site"
            else "- The alert: "
        )
        + alert(site["alert"]),
        f"- On the images that chose the threshold (the target, by construction): "
        f"{alert(site['alert_on_the_images_that_chose_it'])}",
        f"- At the validation threshold: {alert(site['alert_at_validation_threshold'])}",
    ]
    verification = site.get("verification")
    if verification:
        lines.append(verification_line(verification))
    else:
        lines.append("- Verification bias: unknown (the set came without the review page's prediction log).")
    return [*lines, ""]


def verification_line(verification: dict[str, Any]) -> str:
    """Which share of the logged images got a diagnosis, and whether alerted ones got one more often."""
    line = (
        f"- Diagnoses were recorded for {verification['diagnosed_images']} of the "
        f"{verification['logged_images']} images logged at the site; alert rate among them "
        f"{_shown(verification['alert_rate_diagnosed'])}, among all logged "
        f"{_shown(verification['alert_rate_logged'])}"
    )
    if verification["biased"]:
        return (
            line + f" (**differs beyond chance**, p = {verification['p_value']:.3g}: the site's figures "
            "describe the images clinicians chose to record, not the clinic's stream)."
        )
    return line + "."


def external_lines(
    external: dict[str, dict[str, Any]],
    metrics: dict[str, Any],
    melanoma_class: str,
    chose_recipe: Sequence[str] = (),
) -> list[str]:
    """The external-validation table: each set's melanoma AUC and the alert, beside the test split's."""
    if not external:
        return []
    point, melanoma = metrics["melanoma"]["operating_point"], metrics["melanoma"]
    melanomas = metrics["per_class"][melanoma_class]["support"]
    false_alerts = None if point["specificity"] is None else 1 - point["specificity"]
    intervals = metrics["confidence_intervals"]
    lines = [
        "## External validation",
        "",
        "Labelled sets from outside the training data, which say more than the test split about how the",
        "alert will do at another clinic. Copies of training or validation images were left out.",
        "The alert at the same threshold (exact 95 % intervals):",
        "",
        "| set | images (copies left out) | melanomas | melanoma AUC (95 % CI) | alert sensitivity | "
        "false alerts (share of non-melanoma lesions) | balanced accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| carved test split | {metrics['test_images']} | {melanomas} | "
        f"{_with_bounds(melanoma['auc'], intervals.get('melanoma_auc'))} | "
        f"{_with_bounds(point['sensitivity'], intervals.get('melanoma_sensitivity'))} | "
        f"{_shown(false_alerts)} | {_shown(metrics['balanced_accuracy'])} |",
    ]
    for name, row in external.items():
        alert = row["alert"]
        lines.append(
            f"| {_set_name(name, chose_recipe)} | {row['images']} ({row['copies_of_training']}) | "
            f"{alert['sensitivity_n']} | "
            f"{_with_bounds(row['melanoma_auc'], row['melanoma_auc_ci'])} | "
            f"{_with_bounds(alert['sensitivity'], alert['sensitivity_ci'])} | "
            f"{_with_bounds(alert['false_alert_rate'], alert['false_alert_rate_ci'])} | "
            f"{_shown(row['balanced_accuracy'])} |"
        )
    return [*lines, ""]


def class_recall_lines(
    metrics: dict[str, Any],
    external: dict[str, dict[str, Any]],
    classes: Sequence[str],
    chose_recipe: Sequence[str] = (),
) -> list[str]:
    """Each class's recall on the test split and on each external set: which class figures hold."""
    names = list(external)
    lines = [
        "## Class figures",
        "",
        "How often the predicted class was right, per true class. The review page and `predict` show",
        "only the external recall beside a class; a class no external set has is marked unmeasured.",
        "",
        "| class | carved test split | " + _columns(names, chose_recipe),
        "| --- | --- |" + " --- |" * len(names),
    ]
    for label in classes:
        cells = [_shown(metrics["per_class"][label]["sensitivity"])]
        for name in names:
            recall = external[name]["recall"].get(label)
            cells.append(
                "unmeasured" if recall is None else f"{recall:.3f} of {external[name]['class_counts'][label]}"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def calibration_lines(
    calibration: dict[str, Any] | None, external: dict[str, dict[str, Any]], chose_recipe: Sequence[str] = ()
) -> list[str]:
    """The temperature and the expected calibration error (and NLL) before and after it, per set."""
    if not calibration:
        return []
    rows = {"validation (fitted on)": calibration["val"], "carved test split": calibration["test"]}
    rows |= {
        _set_name(name, chose_recipe): result["calibration"]
        for name, result in external.items()
        if "calibration" in result
    }
    lines = [
        "## Calibration",
        "",
        "The class probabilities are divided, as logits, by a temperature of "
        f"{calibration['temperature']:.3f}, fitted on the validation split (lowest negative",
        "log-likelihood); the alert threshold was chosen on the calibrated probabilities, which the",
        "served model answers.",
        "",
        "| set | images | ECE before | ECE after | NLL before | NLL after |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        figures = [row[key] for key in ("ece_before", "ece_after", "nll_before", "nll_after")]
        lines.append(f"| {name} | {row['images']} | " + " | ".join(map(_shown, figures)) + " |")
    return [*lines, ""]


RULES_IN_WORDS = {
    "overall": "over all validation melanomas",
    "worst_collection": "in every validation collection with 5 or more melanomas",
    "site": "over the site's cross-fitted melanomas",
}


def threshold_rule_lines(
    rules: dict[str, dict[str, Any]],
    external: dict[str, dict[str, Any]],
    used: str,
    target: float,
    chose_recipe: Sequence[str] = (),
) -> list[str]:
    """What each threshold rule gives on the test split and the external sets: the cost of a floor."""
    names = list(external)
    lines = [
        "## Threshold rules",
        "",
        f"Each rule sets the threshold on the validation split to reach {target:.0%} sensitivity; "
        f"this model uses `{used}`.",
        "Sensitivity / false alerts (share of non-melanoma lesions) at each rule's threshold:",
        "",
        "| rule | threshold | carved test split | " + _columns(names, chose_recipe),
        "| --- | --- | --- |" + " --- |" * len(names),
    ]
    for rule, point in rules.items():
        false_test = None if point["specificity"] is None else 1 - point["specificity"]
        cells = [f"{_shown(point['sensitivity'])} / {_shown(false_test)}"]
        for name in names:
            at_rule = external[name]["alert_by_rule"][rule]
            cells.append(f"{_shown(at_rule['sensitivity'])} / {_shown(at_rule['false_alert_rate'])}")
        lines.append(
            f"| `{rule}` ({RULES_IN_WORDS[rule]}) | {point['threshold']:.4f} | " + " | ".join(cells) + " |"
        )
    return [*lines, ""]


def _with_interval(value: float | None, bounds: list[float] | None) -> str:
    return _shown(value) + (f" (95 % CI {bounds[0]:.3f} to {bounds[1]:.3f})" if bounds else "")


def _set_name(name: str, chose_recipe: Sequence[str]) -> str:
    return name + CHOSE_RECIPE if name in chose_recipe else name


def _columns(names: Sequence[str], chose_recipe: Sequence[str]) -> str:
    """The external sets' column headers, ending the row ('' without sets, as cards always had)."""
    return " | ".join(_set_name(name, chose_recipe) for name in names) + (" |" if names else "")


def _names(names: Sequence[str]) -> str:
    return ", ".join(names)


def _with_bounds(value: float | None, bounds: list[float] | None) -> str:
    return _shown(value) + (f" ({bounds[0]:.2f} to {bounds[1]:.2f})" if bounds and value is not None else "")


def _collection_lines(by_collection: dict[str, dict[str, Any]]) -> list[str]:
    if not by_collection:
        return []
    lines = [
        "## By collection",
        "",
        "Where the model is strong, and where it may only recognise a collection:",
        "",
        "| collection | images | melanomas | balanced accuracy | melanoma AUC | alert sens. | alert spec. |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in by_collection.items():
        figures = [
            row[key]
            for key in ("balanced_accuracy", "melanoma_auc", "alert_sensitivity", "alert_specificity")
        ]
        lines.append(
            f"| {name} | {row['images']} | {row['melanomas']} | " + " | ".join(map(_shown, figures)) + " |"
        )
    return [*lines, ""]


def _stress_lines(stress: dict[str, dict[str, dict[str, float | None]]]) -> list[str]:
    if not stress:
        return []
    lines = [
        "## Acquisition stress test",
        "",
        "The test split as other devices might show it (drop from the clean images in brackets):",
        "",
        "| change | strength | balanced accuracy | melanoma AUC |",
        "| --- | --- | --- | --- |",
    ]
    for name, rows in stress.items():
        for strength, row in rows.items():
            lines.append(
                f"| {name} | {strength} | {_shown(row['balanced_accuracy'])} "
                f"({_shown(row['balanced_accuracy_drop'])}) | {_shown(row['melanoma_auc'])} "
                f"({_shown(row['melanoma_auc_drop'])}) |"
            )
    return [*lines, ""]


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
