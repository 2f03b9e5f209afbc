"""Datasets as in-memory tensors.

``load_dataset(name, ...)`` returns a :class:`DataSplits` with train / (optional) validation /
test tensors. Batches are sliced from these tensors on the fly: the datasets are small.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DataSplits:
    """Train, validation and test tensors of one dataset (inputs float, labels int64)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    x_val: Tensor | None = None
    y_val: Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _split_indices(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Stratified split: returns (kept, held_out) index tensors, `fraction` of each class held out."""
    g = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = int(round(fraction * len(idx)))
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return torch.sort(torch.cat(kept)).values, torch.sort(torch.cat(held)).values


def load_digits(*, seed: int = 0, val_fraction: float = 0.0, test_fraction: float = 0.2) -> DataSplits:
    """scikit-learn's 8x8 digits (1797 images, 10 classes), shape (N, 1, 8, 8).

    scikit-learn ships no test split, so a fixed stratified 20% is held out for testing
    (split seed 0, independent of ``seed``, so every run is scored on the same images).
    ``seed`` only drives the optional validation split taken from the training part.
    Pixels (0..16) are standardised with the training set's mean and standard deviation.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    train_idx, test_idx = _split_indices(y, test_fraction, seed=0)
    x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    x_val = y_val = None
    if val_fraction > 0:
        keep, val = _split_indices(y_train, val_fraction, seed=seed)
        x_val, y_val = x_train[val], y_train[val]
        x_train, y_train = x_train[keep], y_train[keep]
    mean, std = x_train.mean(), x_train.std()
    norm = lambda t: None if t is None else (t - mean) / std  # noqa: E731
    return DataSplits("digits", norm(x_train), y_train, norm(x_test), y_test, 10, norm(x_val), y_val)


_LOADERS = {"digits": load_digits}


def load_dataset(name: str, **kwargs) -> DataSplits:
    """Load a dataset by name. Known names: see ``DATASETS``."""
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(_LOADERS)}")
    return _LOADERS[name](**kwargs)


DATASETS = tuple(_LOADERS)
