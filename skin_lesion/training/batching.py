"""Training data: decoded images cached as uint8 arrays, shuffled batches, CutMix."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from skin_lesion.files import atomic_file
from skin_lesion.images import load_images

log = logging.getLogger("skin_lesion.training.batching")


CACHE_KEY_LENGTH = 24  # hex digits of the content hash that names a decoded-image cache file


def load_cached_images(paths: Sequence[str], size: int, cache_dir: Path) -> tuple[np.ndarray, str]:
    """Decoded (n, size, size, 3) uint8 images (from the cache if these files were seen) and their key."""
    key = content_key(paths, size)
    cache_file = cache_dir / f"decoded-{size}px-{key}.npy"
    if cache_file.is_file():
        log.info("reusing decoded images from %s", cache_file)
        return np.load(cache_file), key
    images = load_images(paths, size)
    with atomic_file(cache_file, suffix=".npy") as tmp:
        np.save(tmp, images)
    log.info("decoded %d images into %s", len(images), cache_file)
    return images, key


def content_key(paths: Sequence[str], size: int) -> str:
    """The key of image files decoded at `size`: a digest of their paths and bytes, not their pixels."""
    # Hashing the files' bytes is cheap next to decoding them, and it is what the cache depends on.
    digest = hashlib.sha256(f"{size}\n".encode())
    for path in paths:
        digest.update(path.encode() + b"\0")
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()[:CACHE_KEY_LENGTH]


class ShuffledBatches(keras.utils.PyDataset):
    """Endless batches of the decoded images, reshuffled every epoch from the seed; Keras prefetches them.

    Endless, with fit's steps_per_epoch, so that Keras keeps one iterator for the whole fit: given
    arrays, fit makes a new TensorFlow iterator every epoch, and on a 2-core CPU that stalled about one
    epoch in two for 4.7 s before its first batch.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        seed: int,
        sample_weight: np.ndarray | None = None,
        cutmix: float = 0.0,
        first_epoch: int = 0,
    ) -> None:
        # workers=1: Keras makes each batch on demand, counting from index 0 in every new iterator
        # (TensorFlow's tf.data prefetches them in the background). With workers > 1 its enqueuer
        # threads keep counting across iterators, so the batch that a distribution strategy takes
        # to build the model is skipped, and training no longer matches single-device training.
        super().__init__(workers=1, use_multiprocessing=False)
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.batch_size, self.seed, self.first_epoch = batch_size, seed, first_epoch
        self.cutmix = cutmix
        self.batches_per_epoch = math.ceil(len(x) / batch_size)
        self._epoch_order: tuple[int, np.ndarray] = (-1, np.arange(0))

    @property
    def num_batches(self) -> None:
        """None: endless (Keras's marker for an infinite dataset)."""
        return None

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        """Batch `index`, counted across epochs from the start of the fit (at `first_epoch`)."""
        epoch, position = divmod(index, self.batches_per_epoch)
        epoch += self.first_epoch
        picked = self._order(epoch)[position * self.batch_size : (position + 1) * self.batch_size]
        x, y = self.x[picked], self.y[picked]
        if self.cutmix:
            x, y = cut_and_mix(x, y, self.cutmix, np.random.default_rng([self.seed, epoch, position]))
        if self.sample_weight is None:
            return x, y
        return x, y, self.sample_weight[picked]

    def _order(self, epoch: int) -> np.ndarray:
        # Derived from (seed, epoch) alone, so any batch can be made in any order, deterministically.
        # Kept for the epoch's other batches: the permutation of 5,900 images takes about as long as
        # gathering a batch of 32 (0.1 ms), which a GPU's short steps would feel.
        cached_epoch, order = self._epoch_order
        if cached_epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.x))
            self._epoch_order = (epoch, order)  # one assignment, so a reader never sees a mixed pair
        return order


def cut_and_mix(
    images: np.ndarray, labels: np.ndarray, alpha: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """CutMix: a random box of another image of the batch pasted into each; labels mixed by area.

    Hand-written because keras.layers.CutMix draws from a stateful seed generator, so a batch could
    not be remade from its index alone (which resuming relies on). The box's share of the image is
    1 - Beta(alpha, alpha), as in Yun et al. 2019; pixels stay uint8.
    """
    count, height, width = images.shape[:3]
    partners = rng.permutation(count)
    box_side = np.sqrt(1 - rng.beta(alpha, alpha, size=count))
    box_heights = np.round(box_side * height).astype(int)
    box_widths = np.round(box_side * width).astype(int)
    tops = rng.integers(0, height - box_heights + 1)
    lefts = rng.integers(0, width - box_widths + 1)
    mixed = images.copy()
    for i, (partner, top, left, box_height, box_width) in enumerate(
        zip(partners, tops, lefts, box_heights, box_widths, strict=True)
    ):
        box = (slice(top, top + box_height), slice(left, left + box_width))
        mixed[i][box] = images[partner][box]
    pasted = (box_heights * box_widths / (height * width))[:, None]
    return mixed, (1 - pasted) * labels + pasted * labels[partners]
