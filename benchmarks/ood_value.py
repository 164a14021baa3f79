"""What the "unlike the training data" flag is worth on real images from another clinic.

Scores, through a registered pyfunc, the carved test split of a pipeline workspace and one of its
external validation sets (evaluate.external), and prints for each: the share flagged, how well the
OOD score tells the external images from the test split (AUROC), and how well it picks out the
model's own mistakes (AUROC of the score for a wrong predicted class, on images of the nine classes),
beside the same for the simplest alternative, one minus the top class probability.

    python benchmarks/ood_value.py --model models:/skin-lesion-classifier/2 --workspace <clone> \\
        --external isic2017
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow
import pandas as pd
from sklearn.metrics import roc_auc_score

from skin_lesion.evaluation.external import list_set
from skin_lesion.images import load_images
from skin_lesion.model.classifier import probability_column
from skin_lesion.params import load_params
from skin_lesion.tracking import configure_mlflow


def main() -> None:
    """Print the flag's rates and AUROCs on the test split and the external set."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="MLflow model URI")
    parser.add_argument("--workspace", type=Path, required=True, help="pipeline folder (params.yaml, data/)")
    parser.add_argument("--external", required=True, help="a set named in evaluate.external")
    args = parser.parse_args()
    configure_mlflow()
    classifier = mlflow.pyfunc.load_model(args.model).unwrap_python_model()
    classes, size = list(classifier.config["classes"]), int(classifier.config["image_size"])
    test = pd.read_csv(args.workspace / "data" / "split" / "test.csv")
    test = test.assign(path=[str(args.workspace / path) for path in test["path"]], target=test["label"])
    settings = load_params(args.workspace / "params.yaml").evaluate.external[args.external]
    external = list_set(
        args.workspace / "data" / "external" / args.external,
        f"evaluate.external.{args.external}",
        settings.labels_csv,
        settings.label_map,
    )
    scored = {
        name: rows.reset_index(drop=True).join(classifier.score(load_images(rows["path"].tolist(), size)))
        for name, rows in (("test split", test), (args.external, external))
    }
    sys.stdout.write(f"{args.model}: OOD threshold {classifier.ood.threshold:.1f}\n")
    for name, frame in scored.items():
        known = frame[frame["target"].isin(classes)]
        wrong = (known["predicted_label"] != known["target"]).to_numpy()
        top = known[[probability_column(label) for label in classes]].max(axis=1)
        sys.stdout.write(
            f"{name:<12} n={len(frame):4d}  flagged {frame['unlike_training'].mean():6.1%}"
            f"  errors {wrong.mean():5.1%} of {len(known)}"
            f"  error AUROC: OOD score {roc_auc_score(wrong, known['ood_score']):.3f},"
            f" 1 - top probability {roc_auc_score(wrong, 1 - top):.3f}\n"
        )
    both = pd.concat(scored.values(), keys=list(scored), names=["set"]).reset_index(level=0)
    from_outside = (both["set"] == args.external).to_numpy()
    sys.stdout.write(
        f"external vs test AUROC: OOD score {roc_auc_score(from_outside, both['ood_score']):.3f}\n"
    )


if __name__ == "__main__":
    main()
