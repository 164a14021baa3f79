"""What a registered version's test figures mean in words, and whether what it sees in use has drifted.

The figures are `metrics.reference_figures`, which `evaluate` puts in the registered model's config;
the review page words the alert threshold with them, and `skin-lesion monitor` compares the
prediction log against them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from skin_lesion.evaluation.model_card import CHOSE_RECIPE

# Fewer predictions than this leave drift undecided: below 100, the 95 % interval of a 30 % rate is
# wider than +-0.09, so chance alone could move it past the default tolerance of 0.1.
MIN_PREDICTIONS = 100
# What the OOD flag was shown to catch, and not to catch (docs/results.md, "What the flag is worth").
OOD_FLAG_MEANING = (
    "a flag that catches photos that are not dermoscopic or are badly degraded; it does not predict the"
    " model's errors"
)


def threshold_in_words(figures: dict[str, Any], threshold: float) -> str:
    """What the melanoma threshold means, from the version's own test figures."""
    alert = f"Alert when P(melanoma) is at least {threshold:.3f}"
    if not figures:  # older versions, a `runs:/` URI or a folder
        return f"{alert}; this version's test figures are not recorded."
    sensitivity = figures.get("melanoma_sensitivity")
    if sensitivity is None:
        return f"{alert}; its test set had no melanoma to check it on."
    interval = figures.get("melanoma_sensitivity_ci")
    ci = f" (95 % CI {interval[0]:.0%} to {interval[1]:.0%})" if interval else ""
    melanomas = figures.get("melanomas")
    found = (
        f"{sensitivity:.0%} of the {melanomas} melanomas" if melanomas else f"{sensitivity:.0%} of melanomas"
    )
    benign = figures.get("alerts_per_100_benign")
    alerts = f", with {benign:.0f} alerts per 100 non-melanoma lesions" if benign is not None else ""
    elsewhere = [external_in_words(name, row) for name, row in (figures.get("external") or {}).items()]
    external = ""
    if elsewhere:
        external = f" On images from outside its training data it found {'; and '.join(elsewhere)}."
    return (
        f"Alert when P(melanoma) is at least {threshold:.3f}{site_in_words(figures.get('site'))}: at this"
        f" threshold the model found {found} in its test set{ci}{alerts}.{external}"
    )


def external_in_words(name: str, row: dict[str, Any]) -> str:
    """One external set's alert figures, as the object of 'it found' (no interval in older versions);
    marked when the set chose the recipe, as the model card marks it."""
    interval = row.get("sensitivity_ci")
    ci = f" (95 % CI {interval[0]:.0%} to {interval[1]:.0%})" if interval else ""
    chose = CHOSE_RECIPE if row.get("chose_recipe") else ""
    return (
        f"{row['sensitivity']:.0%} of the {row['melanomas']} melanomas of {name}{chose}{ci}, with"
        f" {100 * row['false_alert_rate']:.0f} alerts per 100 non-melanoma lesions"
    )


def alert_in_words(p_melanoma: float, threshold: float) -> str:
    """One image's P(melanoma) against the alert threshold."""
    side = "at or above" if p_melanoma >= threshold else "below"
    return f"P(melanoma) {p_melanoma:.3f}, {side} the alert threshold {threshold:.3f}"


def site_in_words(site: dict[str, Any] | None) -> str:
    """The site's cross-fitted figures, as a clause of the threshold's sentence ('' without a site)."""
    if not site or site.get("sensitivity") is None:
        return ""
    interval = site.get("sensitivity_ci")
    ci = f" (95 % CI {interval[0]:.0%} to {interval[1]:.0%})" if interval else ""
    chosen = "chosen on" if site["threshold_source"] == "site" else "checked on"
    return (
        f", {chosen} {site['images']} of site {site['name']}'s own images: on those it did not learn it"
        f" found {site['sensitivity']:.0%} of {site['melanomas']} melanomas{ci}, with"
        f" {100 * site['false_alert_rate']:.0f} alerts per 100 other lesions"
    )


def drift_report(
    log: pd.DataFrame,
    figures: dict[str, Any],
    classes: Sequence[str],
    tolerance: float,
    min_predictions: int = MIN_PREDICTIONS,
) -> dict[str, Any]:
    """Recent alert rate, OOD rate and class mix against the test split's; what drifted beyond `tolerance`.

    The class mix is compared by total variation distance (half the sum of absolute differences).
    `status` says whether there was anything to judge: no predictions, fewer than `min_predictions`
    (a rate of a handful of images moves by more than any tolerance by chance), or a version that
    carries no test figures (older versions, a `runs:/` URI, a folder) leave the verdict open.
    """
    if log.empty:
        return {"images": 0, "status": "no predictions", "drifted": []}
    recent_mix = log["predicted_label"].value_counts(normalize=True)
    mix = {label: float(recent_mix.get(label, 0.0)) for label in classes}
    reference_mix = figures.get("class_mix", {})
    rows = {
        "alert_rate": (float(log["melanoma_alert"].mean()), figures.get("alert_rate")),
        "ood_rate": (float(log["unlike_training"].mean()), figures.get("ood_rate")),
        "class_mix_distance": (
            0.5 * sum(abs(mix[label] - reference_mix.get(label, 0.0)) for label in classes)
            if reference_mix
            else None,
            0.0 if reference_mix else None,
        ),
    }
    compared = {name: pair for name, pair in rows.items() if None not in pair}
    if not compared:
        status = "no test figures"
    elif len(log) < min_predictions:
        status = "too few predictions"
    else:
        status = "compared"
    drifted = []
    if status == "compared":
        drifted = [name for name, (recent, old) in compared.items() if abs(recent - old) > tolerance]
    return {
        "images": len(log),
        "status": status,
        "min_predictions": min_predictions,
        "figures": {name: {"recent": new, "test": old} for name, (new, old) in rows.items()},
        "class_mix": {"recent": mix, "test": {label: reference_mix.get(label) for label in classes}},
        "tolerance": tolerance,
        "drifted": drifted,
    }


def render_drift(report: dict[str, Any], model: str) -> str:
    """The drift report as lines for the terminal."""
    if not report["images"]:
        return f"no predictions logged for {model} in this period"
    tolerance = report["tolerance"]
    lines = [f"{report['images']} predictions by {model}, against its test split (tolerance {tolerance}):"]
    for name, values in report["figures"].items():
        test = "n/a" if values["test"] is None else f"{values['test']:.3f}"
        recent = "n/a" if values["recent"] is None else f"{values['recent']:.3f}"
        flag = "  DRIFT" if name in report["drifted"] else ""
        lines.append(f"  {name:<20} recent {recent}  test {test}{flag}")
    lines.append("  predicted class mix (recent / test):")
    for label, recent in report["class_mix"]["recent"].items():
        test = report["class_mix"]["test"][label]
        lines.append(f"    {label:<28} {recent:6.1%} / {'n/a' if test is None else f'{test:.1%}'}")
    lines.append(_verdict(report))
    return "\n".join(lines)


def _verdict(report: dict[str, Any]) -> str:
    if report["status"] == "no test figures":
        return "no verdict: this version carries no test figures to compare with"
    if report["status"] == "too few predictions":
        return f"no verdict: fewer than {report['min_predictions']} predictions, too few to judge drift"
    if report["drifted"]:
        return "DRIFT in " + ", ".join(report["drifted"])
    return "no drift beyond tolerance"


def drift_figure(report: dict[str, Any], model: str) -> Figure:
    """Bars of the recent and test rates, and of the predicted class mix."""
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    rates, mix = figure.subplots(1, 2, width_ratios=[1, 3])
    names = ["alert_rate", "ood_rate"]
    x = np.arange(len(names))
    for offset, key in ((-0.2, "recent"), (0.2, "test")):
        values = [report["figures"][name][key] or 0.0 for name in names]
        rates.bar(x + offset, values, width=0.4, label=key)
    rates.set_xticks(x, ["alert rate", "OOD rate"])
    rates.legend()
    labels = list(report["class_mix"]["recent"])
    x = np.arange(len(labels))
    for offset, key in ((-0.2, "recent"), (0.2, "test")):
        values = [report["class_mix"][key][label] or 0.0 for label in labels]
        mix.bar(x + offset, values, width=0.4, label=key)
    mix.set_xticks(x, labels, rotation=30, ha="right")
    mix.set_ylabel("share of predictions")
    mix.legend()
    drifted = ", ".join(report["drifted"]) or "none"
    figure.suptitle(f"{model}: {report['images']} recent predictions; drift: {drifted}")
    return figure
