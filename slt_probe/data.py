"""Turn the user's data into tensors and stream per-chain minibatch indices.

Every chain gets its own shuffled pass over the data (epochs without replacement), drawn
from the estimator's private ``torch.Generator``: the user's DataLoader, its sampler and
the global RNG are never touched. Not here: models, losses, sampling.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate


def as_tensors(data) -> tuple[Tensor, Tensor]:
    """Accept a DataLoader, a map-style Dataset, or a tuple ``(x, y)``; return ``(x, y)``.

    A DataLoader is read through its dataset in order (not its sampler or iterator), so
    reading it never draws from the global RNG.
    """
    if isinstance(data, DataLoader):
        return _from_dataset(data.dataset, collate_fn=data.collate_fn)
    if isinstance(data, Dataset):
        return _from_dataset(data, collate_fn=None)
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        if len(data) != 2:
            raise ValueError(f"data as a tuple must be (x, y); got {len(data)} elements")
        x, y = data
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError("data as a tuple must hold two tensors (x, y); got "
                            f"({type(x).__name__}, {type(y).__name__})")
        return _checked(x, y)
    raise TypeError("data must be a torch DataLoader, a Dataset or a tuple of tensors (x, y); "
                    f"got {type(data).__name__}")


def _from_dataset(dataset, collate_fn) -> tuple[Tensor, Tensor]:
    try:
        size = len(dataset)
    except TypeError as err:
        raise TypeError("data must be a map-style dataset with a length; iterable datasets "
                        "cannot be revisited by every chain") from err
    if size == 0:
        raise ValueError("data is empty: the dataset has no examples")
    # Not through a DataLoader: creating its iterator draws a seed from the global RNG.
    collate = collate_fn if collate_fn is not None else default_collate
    xs, ys = [], []
    for start in range(0, size, 4096):
        batch = collate([dataset[i] for i in range(start, min(size, start + 4096))])
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("each batch of data must be a pair (inputs, targets)")
        xs.append(batch[0])
        ys.append(batch[1])
    return _checked(torch.cat(xs), torch.cat(ys))


def _checked(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.dim() == 0 or y.dim() == 0:
        raise ValueError("data tensors need a leading example dimension; got a scalar")
    if len(x) == 0:
        raise ValueError("data is empty: x has no examples")
    if len(x) != len(y):
        raise ValueError(f"x and y have different numbers of examples: {len(x)} vs {len(y)}")
    return x, y


class MinibatchStream:
    """Yields index tensors of shape (chains, batch_size), one shuffled epoch per chain at
    a time. With ``drop_last`` (the default, which keeps the batched computation's shape
    fixed) an epoch's last ``n mod batch_size`` examples are skipped and the next epoch
    reshuffles; without it the last batch of each epoch is shorter, so every epoch covers
    every example."""

    def __init__(self, num_examples: int, num_chains: int, batch_size: int,
                 generator: torch.Generator, device: torch.device, *, drop_last: bool = True):
        self.num_examples = num_examples
        self.num_chains = num_chains
        self.batch_size = min(batch_size, num_examples)
        self.generator = generator
        self.device = device
        self._order: Tensor | None = None
        self._cursor = num_examples
        self._full = self.batch_size == num_examples
        self.drop_last = drop_last

    def next(self) -> Tensor:
        if self._full:
            if self._order is None:
                self._order = torch.arange(self.num_examples, device=self.device).expand(
                    self.num_chains, -1)
            return self._order
        end = self._cursor + (self.batch_size if self.drop_last else 1)
        if end > self.num_examples:
            keys = torch.rand(self.num_chains, self.num_examples, generator=self.generator,
                              device=self.device)
            self._order = keys.argsort(dim=1)
            self._cursor = 0
        idx = self._order[:, self._cursor:self._cursor + self.batch_size]
        self._cursor += self.batch_size
        return idx
