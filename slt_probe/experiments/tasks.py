"""The data of each bundled experiment: modular addition pairs and the MNIST 1,000-image set.

A task is train/test tensors plus what the loss needs (class labels, or one-hot targets for
MSE). The split is a function of the seed only, so runs with the same seed see the same data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .mnist import load_available_mnist
from .models import modadd_data


@dataclass(frozen=True)
class Task:
    x_train: Tensor
    y_train: Tensor  # class labels
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    def targets(self, labels: Tensor, loss: str) -> Tensor:
        """What the loss compares the output with: labels, or one-hot rows for MSE."""
        if loss == "mse":
            return torch.nn.functional.one_hot(labels, self.num_classes).float()
        return labels


def modadd_task(p: int, train_fraction: float, seed: int) -> Task:
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    x, y = modadd_data(p)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n = int(round(train_fraction * len(x)))
    train, test = order[:n], order[n:]
    return Task(x[train], y[train], x[test], y[test], num_classes=p)


def mnist_task(num_train: int, seed: int, directory=None) -> Task:
    """``num_train`` images for training, the rest held out, from the split that is present
    (the test split if both are)."""
    images, labels = load_available_mnist(directory)
    if not 0 < num_train < len(images):
        raise ValueError(f"num_train must be in (0, {len(images)}), got {num_train}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    train, test = order[:num_train], order[num_train:]
    x = images.reshape(len(images), -1)
    return Task(x[train], labels[train], x[test], labels[test], num_classes=10)
