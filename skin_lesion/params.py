"""Typed schema of params.yaml: a wrong key, type or range stops a stage before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator

from skin_lesion.errors import PipelineError

# Strict numbers: `epochs: true` or `epochs: 2.5` is refused, not read as 1 or 2 (YAML has no other
# way to say a number is not one). A whole number still counts as a float.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]


class _Section(BaseModel):
    # No .inf or .nan anywhere: they pass every range check and break the run later.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BaseParams(_Section):
    seed: Int = Field(ge=0)
    image_size: Int = Field(ge=8, le=1024)
    model_name: str = Field(min_length=1)
    experiment_name: str = Field(min_length=1)
    melanoma_class: str
    classes: tuple[str, ...] = Field(min_length=2)
    # Every prediction (evaluate, predict, serve, review) and the linear probe's training embeddings
    # average the embeddings of the image and its left-right mirror.
    mirror_average: bool

    @model_validator(mode="after")
    def _check_classes(self) -> BaseParams:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("base.classes has repeated names")
        if self.melanoma_class not in self.classes:
            raise ValueError(f"base.melanoma_class {self.melanoma_class!r} is not in base.classes")
        return self


COLLECTION_FROM_ID = "isic_id_range"


class IsicParams(_Section):
    mode: Literal["manifest", "query"]
    api_url: str = Field(pattern=r"^https?://")
    manifest: str = Field(min_length=1)
    queries: dict[str, str]
    max_per_class: Int = Field(ge=1)
    workers: Int = Field(ge=1, le=64)
    max_side: Int = Field(ge=0)
    retries: Int = Field(ge=1, le=50)
    backoff_s: Float = Field(ge=0)
    max_backoff_s: Float = Field(ge=0)
    connect_timeout_s: Float = Field(gt=0)
    read_timeout_s: Float = Field(gt=0)


class LocalParams(_Section):
    path: str = Field(min_length=1)
    metadata: str
    lesion_column: str = Field(min_length=1)
    diagnosis_column: str
    # isic_id_range: each image's collection from its ISIC id; else a column of the metadata CSV
    collection: str = Field(min_length=1)
    max_extract_mb: Int = Field(ge=1)

    @model_validator(mode="after")
    def _check_collection(self) -> LocalParams:
        if self.collection != COLLECTION_FROM_ID and not self.metadata:
            raise ValueError(
                f"download.local.collection={self.collection}: a metadata column needs a metadata CSV"
            )
        return self


class SyntheticParams(_Section):
    images_per_class: Int = Field(ge=2, le=10_000)


class DownloadParams(_Section):
    source: Literal["isic", "local", "synthetic"]
    isic: IsicParams
    local: LocalParams
    synthetic: SyntheticParams

    @property
    def input(self) -> str:
        """What the chosen source reads, in words: the manifest, the folder, or nothing."""
        if self.source == "local":
            return self.local.path
        if self.source == "isic":
            return (
                self.isic.manifest
                if self.isic.mode == "manifest"
                else f"archive search at {self.isic.api_url}"
            )
        return "generated images"


class SplitParams(_Section):
    val_fraction: Float = Field(gt=0, lt=0.5)
    test_fraction: Float = Field(gt=0, lt=0.5)
    on_bad_image: Literal["skip", "error"]
    max_pixels: Int = Field(ge=1)
    min_side: Int = Field(ge=1)
    near_duplicate_distance: Int = Field(ge=-1, le=32)
    group_distance: Int = Field(ge=-1, le=32)
    conflicts: Literal["diagnosis", "drop", "majority", "error"]
    diagnosis_classes: dict[str, list[str]]


class RebalanceParams(_Section):
    samples_per_class: Int = Field(ge=0)
    jpeg_quality: Int = Field(ge=1, le=100)
    min_source_images: Int = Field(ge=0)
    operations: dict[str, dict[str, Any]]


class AugmentParams(_Section):
    flip: bool
    rotation: Float = Field(ge=0, le=0.5)
    zoom: Float = Field(ge=0, lt=1)
    contrast: Float = Field(ge=0, le=1)
    brightness: Float = Field(ge=0, le=1)


PRETRAINABLE_ARCHS = ("mobilenet", "efficientnet_b0", "mobilenet_v3_small")


WEIGHTS_FILE_SUFFIX = ".h5"  # Keras's weights files: name.weights.h5 (Keras 3) or legacy name.h5


class TrainParams(_Section):
    # fine_tune: warm-up then fine-tuning | linear_probe: a logistic regression on frozen embeddings |
    # lp_ft: the probe, then fine-tuning from it, interpolated with it at `interpolation` (WiSE-FT)
    recipe: Literal["fine_tune", "linear_probe", "lp_ft"]
    probe_c: Float = Field(gt=0)  # the probe's inverse L2 strength (scikit-learn's C)
    # Project out the directions along which a class's collections differ before fitting the probe
    probe_remove_collections: bool
    interpolation: Float = Field(ge=0, le=1)  # lp_ft: 0 keeps the probe, 1 the fine-tuned model
    arch: Literal["baseline_cnn", "resnet_small", "mobilenet", "efficientnet_b0", "mobilenet_v3_small"]
    # none | imagenet (Keras downloads them) | the path of a Keras weights file for the backbone
    weights: str = Field(min_length=1)
    epochs: Int = Field(ge=1)
    # Pretrained backbones only: epochs of warm-up with the backbone frozen, then fine-tuning of its
    # top `unfreeze` layers (all: the whole backbone) at fine_tune_learning_rate.
    freeze_epochs: Int = Field(ge=0)
    unfreeze: Literal["all"] | Annotated[Int, Field(ge=0)]
    fine_tune_learning_rate: Float = Field(gt=0)
    batch_size: Int = Field(ge=1)
    learning_rate: Float = Field(gt=0)
    schedule: Literal["constant", "cosine"]
    weight_decay: Float = Field(ge=0, lt=1)
    label_smoothing: Float = Field(ge=0, lt=1)
    class_weight: Literal["none", "balanced"]
    use_rebalanced: bool
    early_stopping_patience: Int = Field(ge=0)
    val_class_cap: Int = Field(ge=1)
    dropout: Float = Field(ge=0, lt=1)
    shades_of_gray: Float = Field(ge=0)
    cutmix: Float = Field(ge=0)
    augment: AugmentParams
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16"]
    distribution: Literal["none", "data_parallel"]
    deterministic: bool
    resume: bool

    @property
    def pretrained(self) -> bool:
        """Whether the backbone starts from pretrained weights (and so is warmed up, then fine-tuned)."""
        return self.weights != "none"

    @model_validator(mode="after")
    def _check_weights(self) -> TrainParams:
        if self.pretrained and self.arch not in PRETRAINABLE_ARCHS:
            raise ValueError(
                f"train.weights={self.weights} needs train.arch in {', '.join(PRETRAINABLE_ARCHS)}"
            )
        if self.weights not in ("none", "imagenet") and not self.weights.endswith(WEIGHTS_FILE_SUFFIX):
            raise ValueError(
                f"train.weights={self.weights}: not none, imagenet or a Keras weights file (*.weights.h5)"
            )
        if self.recipe != "fine_tune" and not self.pretrained:
            raise ValueError(f"train.recipe={self.recipe} needs a pretrained backbone (train.weights)")
        if self.pretrained and self.recipe == "fine_tune" and self.freeze_epochs > self.epochs:
            raise ValueError(
                f"train.freeze_epochs={self.freeze_epochs} is more than train.epochs={self.epochs}"
            )
        return self


OTHER_LABEL = "other"  # an external set's label that is none of base.classes


class ExternalSetParams(_Section):
    # A CSV inside the set with `isic_id` (the file's stem), `label` and optional `lesion_id` columns;
    # empty: the folder names
    labels_csv: str
    # Each label of the set onto one of base.classes or `other` (e.g. `atypical nevus: nevus`)
    label_map: dict[str, str] = Field(min_length=1)
    # True for a set whose figures chose train's recipe and settings (docs/results.md): the model card
    # and the review page mark its figures as used for selection, not as an independent check.
    chose_recipe: bool = False


class EvaluateParams(_Section):
    batch_size: Int = Field(ge=1)
    target_sensitivity: Float = Field(gt=0, le=1)
    # overall: the target over all val melanomas | worst_collection: in every val collection
    threshold_rule: Literal["overall", "worst_collection"]
    bootstrap: Int = Field(ge=0)
    calibration_bins: Int = Field(ge=2, le=100)
    worst_examples: Int = Field(ge=0, le=64)
    promote: Literal["manual", "auto"]
    promote_metric: Literal[
        "balanced_accuracy",
        "accuracy",
        "macro_auc",
        "melanoma_auc",
        "melanoma_auc_sens_80",
        "external_melanoma_auc",
        "site_melanoma_auc",
    ]
    promote_margin: Float = Field(ge=0)
    ood_quantile: Float = Field(gt=0, lt=1)
    stress: dict[Literal["colour_cast", "darken", "blur", "jpeg_quality", "resolution"], list[Float]]
    # Labelled sets from outside the training data, each a folder or .zip under data/external/
    external: dict[str, ExternalSetParams]

    @model_validator(mode="after")
    def _check_stress(self) -> EvaluateParams:
        # Each transform's strengths must be ones it can apply: a factor, a radius or a quality.
        ranges = {
            "colour_cast": (0, 1),
            "darken": (0, 1),
            "blur": (0, 50),
            "jpeg_quality": (1, 95),
            "resolution": (0, 1),
        }
        for name, strengths in self.stress.items():
            low, high = ranges[name]
            for strength in strengths:
                if not (low < strength < high or (name == "jpeg_quality" and low <= strength <= high)):
                    raise ValueError(f"evaluate.stress.{name}: {strength} is outside ({low}, {high})")
        return self


SITE_THRESHOLD_RULES = ("site", "validation")


class SiteParams(_Section):
    # '' (no site) or the name of a labelled set under data/sites/ that training also learns from
    # (letters, digits, _ and -: it names a folder and the registry alias champion-<name>)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$|^$")
    # As an external set: a CSV with isic_id and label columns, or '' for the folder names
    labels_csv: str
    # Each label onto a class or `other`; {}: the labels are class names (what export-feedback writes)
    label_map: dict[str, str]
    weight: Float = Field(gt=0)  # of a site image in the probe's fit, against 1 for a training image
    folds: Int = Field(ge=2, le=20)  # cross-fitting: each site image scored by a model without its fold
    # site: the alert threshold chosen on the site's cross-fitted scores | validation: on the val split
    threshold: Literal["site", "validation"]
    min_melanomas: Int = Field(ge=1)  # fewer site melanomas: the validation threshold stays


class SiteCurveParams(_Section):
    sizes: list[Annotated[Int, Field(ge=2)]]  # site images learned per point of the learning curve
    repeats: Int = Field(ge=0)  # random subsamples per size; 0: no learning curve


class Params(_Section):
    base: BaseParams
    download: DownloadParams
    split: SplitParams
    rebalance: RebalanceParams
    train: TrainParams
    evaluate: EvaluateParams
    site: SiteParams
    site_curve: SiteCurveParams

    @model_validator(mode="after")
    def _check_site(self) -> Params:
        if not self.site.name:
            return self
        if self.train.recipe != "linear_probe":
            raise ValueError(
                f"site.name={self.site.name}: only train.recipe=linear_probe learns from a site's images "
                f"(train.recipe is {self.train.recipe})"
            )
        allowed = {*self.base.classes, OTHER_LABEL}
        for label, target in self.site.label_map.items():
            if target not in allowed:
                raise ValueError(
                    f"site.label_map: {label!r} maps to {target!r}, "
                    f"which is neither in base.classes nor {OTHER_LABEL!r}"
                )
        return self

    @model_validator(mode="after")
    def _check_diagnosis_classes(self) -> Params:
        for diagnosis, labels in self.split.diagnosis_classes.items():
            unknown = sorted(set(labels) - set(self.base.classes))
            if unknown:
                raise ValueError(
                    f"split.diagnosis_classes[{diagnosis!r}] has {unknown[0]!r}, which is not in base.classes"
                )
        return self

    @model_validator(mode="after")
    def _check_label_maps(self) -> Params:
        allowed = {*self.base.classes, OTHER_LABEL}
        for name, external in self.evaluate.external.items():
            for label, target in external.label_map.items():
                if target not in allowed:
                    raise ValueError(
                        f"evaluate.external.{name}.label_map: {label!r} maps to {target!r}, "
                        f"which is neither in base.classes nor {OTHER_LABEL!r}"
                    )
        if self.evaluate.promote_metric == "external_melanoma_auc" and not self.evaluate.external:
            raise ValueError("evaluate.promote_metric=external_melanoma_auc needs evaluate.external sets")
        if self.evaluate.promote_metric == "site_melanoma_auc" and not self.site.name:
            raise ValueError("evaluate.promote_metric=site_melanoma_auc needs a site (site.name)")
        return self

    @model_validator(mode="after")
    def _check_queries(self) -> Params:
        isic = self.download.isic
        if self.download.source != "isic" or isic.mode != "query":
            return self
        unknown = sorted(set(isic.queries) - set(self.base.classes))
        if unknown:
            raise ValueError(f"download.isic.queries has {unknown[0]!r}, which is not in base.classes")
        missing = sorted(set(self.base.classes) - set(isic.queries))
        if missing:
            raise ValueError(f"download.isic.queries has no query for class {missing[0]!r}")
        return self


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml, raising one clear line on the first problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise PipelineError(f"{path}: file not found") from err
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML ({_one_line(str(err))})") from err
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise PipelineError(f"{path}: {key}: {first['msg']}") from err


def _one_line(text: str) -> str:
    return " ".join(text.split())
