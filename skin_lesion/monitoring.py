"""What a registered version's test split said, and whether what it sees in use has drifted from it.

`reference_figures` runs in `evaluate` and travels in the registered model's config; the review page
words the alert threshold with it, and `skin-lesion monitor` compares the prediction log against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def reference_figures(
    metrics: dict[str, Any],
    y_test: np.ndarray,
    p_test: np.ndarray,
    unlike_training: np.ndarray,
    classes: Sequence[str],
    melanoma: int,
    external: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The test split's melanoma sensitivity (with its interval), alert, OOD and predicted-class rates,
    and the alert's sensitivity and false-alert rate on each external set."""
    point = metrics["melanoma"]["operating_point"]
    predicted = np.asarray(p_test).argmax(axis=1)
    specificity = point["specificity"]
    return {
        "images": len(y_test),
        "melanomas": int((np.asarray(y_test) == melanoma).sum()),
        "melanoma_sensitivity": point["sensitivity"],
        "melanoma_sensitivity_ci": metrics["confidence_intervals"].get("melanoma_sensitivity"),
        "alerts_per_100_benign": None if specificity is None else 100 * (1 - specificity),
        "alert_rate": point["alerts_per_100"] / 100,
        "ood_rate": float(np.mean(unlike_training)),
        "class_mix": {label: float(np.mean(predicted == k)) for k, label in enumerate(classes)},
        "external": {
            name: {
                "melanomas": result["alert"]["sensitivity_n"],
                "sensitivity": result["alert"]["sensitivity"],
                "false_alert_rate": result["alert"]["false_alert_rate"],
            }
            for name, result in (external or {}).items()
        },
    }


def threshold_in_words(figures: dict[str, Any], threshold: float) -> str:
    """What the melanoma threshold means, from the version's own test figures."""
    sensitivity = figures.get("melanoma_sensitivity")
    if sensitivity is None:
        return (
            f"Alert when P(melanoma) is at least {threshold:.3f};"
            " its test set had no melanoma to check it on."
        )
    interval = figures.get("melanoma_sensitivity_ci")
    ci = f" (95 % CI {interval[0]:.0%} to {interval[1]:.0%})" if interval else ""
    melanomas = figures.get("melanomas")
    found = (
        f"{sensitivity:.0%} of the {melanomas} melanomas" if melanomas else f"{sensitivity:.0%} of melanomas"
    )
    benign = figures.get("alerts_per_100_benign")
    alerts = f", with {benign:.0f} alerts per 100 non-melanoma lesions" if benign is not None else ""
    elsewhere = [
        f"{name}: {row['sensitivity']:.0%} of {row['melanomas']} melanomas, "
        f"{100 * row['false_alert_rate']:.0f} alerts per 100 non-melanoma lesions"
        for name, row in (figures.get("external") or {}).items()
    ]
    external = f" On images from outside its training data ({'; '.join(elsewhere)})." if elsewhere else ""
    return (
        f"Alert when P(melanoma) is at least {threshold:.3f}: at this threshold the model found"
        f" {found} in its test set{ci}{alerts}.{external}"
    )


def drift_report(
    log: pd.DataFrame, figures: dict[str, Any], classes: Sequence[str], tolerance: float
) -> dict[str, Any]:
    """Recent alert rate, OOD rate and class mix against the test split's; what drifted beyond `tolerance`.

    The class mix is compared by total variation distance (half the sum of absolute differences).
    """
    if log.empty:
        return {"images": 0, "drifted": []}
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
    drifted = [
        name
        for name, (recent, reference) in rows.items()
        if recent is not None and reference is not None and abs(recent - reference) > tolerance
    ]
    return {
        "images": len(log),
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
    drifted = report["drifted"]
    lines.append("DRIFT in " + ", ".join(drifted) if drifted else "no drift beyond tolerance")
    return "\n".join(lines)


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
