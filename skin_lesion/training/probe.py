"""Linear probing: a logistic regression on a frozen pretrained backbone's embeddings, as a Keras model.

Fine-tuning distorts pretrained features and loses out of distribution, where a linear probe on the
frozen features holds up (Kumar et al., ICLR 2022); on dermoscopy from other clinics the probe beat
every fine-tuned recipe (docs/results.md). The probe is fitted exactly, not by gradient descent:
the backbone's embeddings are computed once per image set (cached under data/cache, keyed by the
backbone's weights and the images' bytes), then scikit-learn's multinomial logistic regression is
fitted in seconds and its coefficients become the weights of the model's softmax head. The result is
an ordinary classifier (backbone, dense head), so predict, serving, the review page and Grad-CAM take
it as they take a fine-tuned one. `interpolate_weights` is WiSE-FT (Wortsman et al., CVPR 2022): the
weight-space mix of the probe and the model fine-tuned from it (LP-FT).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from skin_lesion.files import atomic_file
from skin_lesion.model.network import OUTPUT_LAYER
from skin_lesion.model.prediction import predict_with_embeddings, with_embeddings
from skin_lesion.training.architectures import BACKBONE_NAME
from skin_lesion.training.batching import content_key, load_cached_images

log = logging.getLogger("skin_lesion.training.probe")


def backbone_key(model: keras.Model, mirror_average: bool) -> str:
    """A digest of what makes an embedding: the layers below the head (configs, dtypes, weights), mirroring.

    A pretrained model's weights below the head are its backbone's; a net trained from scratch
    (resnet_small) has its own layers there, which every training changes.
    """
    digest = hashlib.sha256(f"{mirror_average}\n".encode())
    below_head = model.layers[: [layer.name for layer in model.layers].index(OUTPUT_LAYER)]
    for layer in below_head:
        if layer.name == BACKBONE_NAME:  # its layers and weights, below: its config names them per process
            inner = [f"{part.__class__.__name__}:{part.dtype_policy.name}" for part in layer.layers]
            digest.update(json.dumps(inner).encode())
            continue
        # Keras numbers unnamed layers per process (dropout_3): the rest of the config is what counts.
        config = {key: value for key, value in layer.get_config().items() if key != "name"}
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for weight in (weight for layer in below_head for weight in layer.weights):
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()[:24]


def cached_embeddings(
    model: keras.Model,
    images: np.ndarray,
    images_key: str,
    cache_dir: Path,
    batch_size: int,
    mirror_average: bool,
) -> np.ndarray:
    """The embeddings the model's head sees for `images`, from the cache when this backbone saw them."""
    return EmbeddingCache(model, cache_dir, batch_size, mirror_average).embed(images, images_key)


class EmbeddingCache:
    """A model's embeddings of image sets, kept in `cache_dir` by backbone and images.

    The head is the only part of the model that a probe's refit (another C, a site's images, a
    threshold rule) changes: with the backbone's embeddings of every set cached, evaluate scores the
    test split, its stressed copies and the external sets in seconds, not minutes.
    """

    def __init__(self, model: keras.Model, cache_dir: Path, batch_size: int, mirror_average: bool) -> None:
        self.network = with_embeddings(model)  # one network: a new one per call is traced anew
        self.head = model.get_layer(OUTPUT_LAYER)
        self.key = backbone_key(model, mirror_average)
        self.cache_dir, self.batch_size, self.mirror_average = cache_dir, batch_size, mirror_average

    def embed(self, images: np.ndarray, images_key: str | None = None) -> np.ndarray:
        """The embeddings of `images`; `images_key` names their bytes (default: a digest of the array)."""
        images_key = images_key or array_key(images)
        cached = self.cached(images_key)
        if cached is not None:
            return cached
        cache_file = self._file(images_key)
        started = time.perf_counter()
        _, embeddings = predict_with_embeddings(self.network, images, self.batch_size, self.mirror_average)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        with atomic_file(cache_file, suffix=".npy") as tmp:
            np.save(tmp, embeddings)
        log.info(
            "embedded %d images in %.0f s into %s", len(images), time.perf_counter() - started, cache_file
        )
        return embeddings

    def embed_files(self, paths: Sequence[str], size: int, image_cache: Path) -> np.ndarray:
        """The embeddings of image files decoded at `size`, which are decoded (through the decoded-image
        cache `image_cache`) only when these embeddings are not cached yet."""
        cached = self.cached(content_key(paths, size))
        return cached if cached is not None else self.embed(*load_cached_images(paths, size, image_cache))

    def cached(self, images_key: str) -> np.ndarray | None:
        """The cached embeddings of the images `images_key` names; None when there are none."""
        cache_file = self._file(images_key)
        if not cache_file.is_file():
            return None
        log.info("reusing embeddings from %s", cache_file)
        return np.load(cache_file)

    def _file(self, images_key: str) -> Path:
        return self.cache_dir / f"embeddings-{self.key}-{images_key}.npy"

    def predict(self, images: np.ndarray, images_key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (the head on the embeddings, as served) and embeddings of `images`."""
        embeddings = self.embed(images, images_key)
        probabilities = keras.ops.convert_to_numpy(self.head(embeddings))
        return np.asarray(probabilities, dtype=np.float32), embeddings


def array_key(images: np.ndarray) -> str:
    """A digest of an image array's shape and bytes, for images that are no files (stressed copies)."""
    digest = hashlib.sha256(f"{images.shape}{images.dtype}".encode())
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()[:24]


MIN_COLLECTION_IMAGES = 5  # a class's images from one collection needed to estimate its shift


def collection_projection(embeddings: np.ndarray, labels: np.ndarray, collections: np.ndarray) -> np.ndarray:
    """The projection that removes, from embeddings, the directions along which a class's collections differ.

    Where one class comes from several collections (melanomas from two ISIC archive eras, say), the
    difference between its collections' mean embeddings is the look of a collection, not of a
    lesion; a probe that may use it learns "images like this collection's are melanomas" and fails
    where that collection's look comes with other lesions. Those directions (one fewer than the
    collections of each class with MIN_COLLECTION_IMAGES images or more) are projected out, as in
    nullspace projection (Ravfogel et al., ACL 2020). Returns the symmetric (features, features)
    matrix I - U U^T; the identity where no class has two such collections.
    """
    shifts = []
    for label in np.unique(labels):
        groups = [
            embeddings[(labels == label) & (collections == collection)]
            for collection in np.unique(collections[labels == label])
        ]
        means = np.array([group.mean(axis=0) for group in groups if len(group) >= MIN_COLLECTION_IMAGES])
        if len(means) >= 2:
            shifts += list(means - means.mean(axis=0))
    identity = np.eye(embeddings.shape[1], dtype=np.float64)
    if not shifts:
        return identity.astype(np.float32)
    _, singular, rows = np.linalg.svd(np.array(shifts, dtype=np.float64), full_matrices=False)
    basis = rows[singular > 1e-6 * singular.max()].T
    return (identity - basis @ basis.T).astype(np.float32)


def set_head(model: keras.Model, kernel: np.ndarray, bias: np.ndarray) -> None:
    """Write a probe's kernel and bias into the model's softmax head."""
    model.get_layer(OUTPUT_LAYER).set_weights([kernel, bias])


def interpolate_weights(probe: list[np.ndarray], tuned: keras.Model, interpolation: float) -> keras.Model:
    """WiSE-FT: `tuned` with each weight set to (1 - interpolation) * the probe's (its weights, as
    get_weights gives them, before fine-tuning) + interpolation * its own."""
    mixed = [
        (1 - interpolation) * start + interpolation * end if np.issubdtype(end.dtype, np.floating) else end
        for start, end in zip(probe, tuned.get_weights(), strict=True)
    ]
    tuned.set_weights(mixed)
    return tuned
