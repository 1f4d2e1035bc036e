"""The user's data as a source of per-chain minibatches and of whole passes over it.

Three kinds of source, one interface (``batches``, ``chunks``, ``n``):

- ``TensorSource``: tensors in memory (a tuple ``(x, y)``, or any dataset read into
  memory): every chain gets its own shuffled pass over the data (epochs without
  replacement), indices drawn from the estimator's private ``torch.Generator``;
- ``MapSource``: a map-style ``Dataset`` (or a DataLoader over one) streamed without
  reading it all: the same index stream, examples fetched by index and collated;
- ``IterableSource``: an ``IterableDataset`` (or a DataLoader over one): chains take its
  batches in turn, and a new pass starts when it ends.

Inputs may be a tensor or a dict of tensors (keyword inputs, as Hugging Face models take);
a dataset of dicts gives its ``"labels"`` (or ``label_key``) as the targets. Nothing here
touches the user's DataLoader, its sampler or the global RNG. Not here: models, losses.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

_READ_CHUNK = 4096
LABEL_KEYS = ("labels", "label")


def _split(batch, label_key: str | None):
    """(inputs, targets) from a collated batch: a pair, or a dict holding the labels."""
    if isinstance(batch, Mapping):
        keys = (label_key,) if label_key else LABEL_KEYS
        key = next((k for k in keys if k in batch), None)
        if key is None:
            raise ValueError(f"a batch of data is a dict without labels (keys {list(batch)}); "
                             f"name the target field with label_key=")
        inputs = {k: v for k, v in batch.items() if k != key}
        return inputs, batch[key]
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError("each batch of data must be a pair (inputs, targets) or a dict with "
                         "'labels'")
    return batch[0], batch[1]


def _cat(parts):
    if isinstance(parts[0], Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def _stack(parts):
    if isinstance(parts[0], Mapping):
        return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
    return torch.stack(parts)


def num_examples(x) -> int:
    """The examples in ``x``, a tensor or a dict of tensors (keyword inputs)."""
    return len(next(iter(x.values()))) if isinstance(x, Mapping) else len(x)


def take(x, index):
    """``x[index]`` for a tensor or a dict of tensors (keyword inputs)."""
    if isinstance(x, Mapping):
        return {k: v[index] for k, v in x.items()}
    return x[index]


def _checked(x, y: Tensor):
    first = next(iter(x.values()), None) if isinstance(x, Mapping) else x
    if not isinstance(first, Tensor) or not isinstance(y, Tensor):
        raise TypeError("data must hold tensors (x, y); got "
                        f"({type(first).__name__}, {type(y).__name__})")
    if first.dim() == 0 or y.dim() == 0:
        raise ValueError("data tensors need a leading example dimension; got a scalar")
    n = num_examples(x)
    if n == 0:
        raise ValueError("data is empty: x has no examples")
    if isinstance(x, Mapping) and any(len(v) != n for v in x.values()):
        raise ValueError("the input tensors of data have different numbers of examples")
    if n != len(y):
        raise ValueError(f"x and y have different numbers of examples: {n} vs {len(y)}")
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


class TensorSource:
    """Data in memory: ``x`` (a tensor or a dict of tensors) and targets ``y``."""

    in_memory = True

    def __init__(self, x, y: Tensor):
        self.x, self.y = _checked(x, y)
        self.n = num_examples(self.x)

    def to(self, device) -> "TensorSource":
        move = (lambda v: v.to(device))  # noqa: E731
        x = {k: move(v) for k, v in self.x.items()} if isinstance(self.x, Mapping) else move(self.x)
        return TensorSource(x, move(self.y))

    def drawn_batch_size(self, requested: int) -> int:
        """The examples per chain and step that ``batches(…, requested, …)`` yields."""
        return min(requested, self.n)

    def batches(self, chains: int, batch_size: int, generator: torch.Generator,
                device) -> Iterator[tuple]:
        """Endless (x, y, index) with shapes (chains, batch, …)."""
        stream = MinibatchStream(self.n, chains, batch_size, generator, device)
        while True:
            idx = stream.next()
            yield take(self.x, idx), self.y[idx], idx

    def chunks(self, size: int = _READ_CHUNK) -> Iterator[tuple]:
        for start in range(0, self.n, size):
            part = slice(start, start + size)
            yield take(self.x, part), self.y[part]


class MapSource:
    """A map-style dataset streamed by index, never read whole."""

    in_memory = False

    def __init__(self, dataset: Dataset, collate=None, label_key: str | None = None):
        try:
            self.n = len(dataset)
        except TypeError as err:
            raise TypeError("a map-style dataset needs a length") from err
        if self.n == 0:
            raise ValueError("data is empty: the dataset has no examples")
        self.dataset = dataset
        self.collate = collate or default_collate
        self.label_key = label_key

    def drawn_batch_size(self, requested: int) -> int:
        """The examples per chain and step that ``batches(…, requested, …)`` yields."""
        return min(requested, self.n)

    def _fetch(self, indices) -> tuple:
        return _split(self.collate([self.dataset[int(i)] for i in indices]), self.label_key)

    def batches(self, chains: int, batch_size: int, generator: torch.Generator,
                device) -> Iterator[tuple]:
        stream = MinibatchStream(self.n, chains, batch_size, generator, torch.device("cpu"))
        while True:
            idx = stream.next()
            parts = [self._fetch(row) for row in idx]
            yield _stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), idx

    def chunks(self, size: int = _READ_CHUNK) -> Iterator[tuple]:
        for start in range(0, self.n, size):
            yield self._fetch(range(start, min(self.n, start + size)))


class IterableSource:
    """An iterable dataset (or a DataLoader over one): the chains take its batches in
    turn, the order of turns rotating every step so that each chain meets every batch
    even when the data comes in the same order every pass; a new pass starts when one
    ends. Batches must all have one size (a shorter last batch is skipped)."""

    in_memory = False

    def __init__(self, loader, label_key: str | None = None):
        self.loader = loader
        self.label_key = label_key
        sizes = [len(y) for _, y in self.chunks()]
        self.n = sum(sizes)
        if self.n == 0:
            raise ValueError("data is empty: the iterable yielded no examples")
        self._batch_size = sizes[0]

    def drawn_batch_size(self, requested: int) -> int:
        """The examples per chain and step: the data's own batch size (its first batch's;
        ``requested`` does not apply to data that comes in batches)."""
        return self._batch_size

    def _iterate(self):
        # a DataLoader's iterator draws its seed from the global RNG: give it a copy
        with torch.random.fork_rng(devices=[]):
            for batch in self.loader:
                yield _split(batch, self.label_key)

    def chunks(self, size: int = _READ_CHUNK) -> Iterator[tuple]:
        yield from self._iterate()

    def batches(self, chains: int, batch_size: int, generator: torch.Generator,
                device) -> Iterator[tuple]:
        size, step = None, 0
        while True:
            row = []
            for x, y in self._iterate():
                size = size or len(y)
                if len(y) != size:
                    continue
                row.append((x, y))
                if len(row) == chains:
                    turn = step % chains
                    row = row[turn:] + row[:turn]
                    yield _stack([r[0] for r in row]), torch.stack([r[1] for r in row]), None
                    row, step = [], step + 1


def as_source(data, *, stream: bool | None = None, label_key: str | None = None):
    """The data source for ``data``: a tuple ``(x, y)``, a Dataset, a DataLoader or an
    IterableDataset. ``stream=None`` streams only what cannot be indexed (iterable data)
    and reads map-style datasets into memory; ``stream=True`` streams them too;
    ``stream=False`` refuses iterable data."""
    if isinstance(data, (TensorSource, MapSource, IterableSource)):
        return data
    if isinstance(data, DataLoader):
        dataset = data.dataset
        if isinstance(dataset, IterableDataset):
            return _iterable(data, stream, label_key)
        return _map(dataset, data.collate_fn, stream, label_key)
    if isinstance(data, IterableDataset):
        return _iterable(DataLoader(data, batch_size=None), stream, label_key)
    if isinstance(data, Dataset):
        return _map(data, None, stream, label_key)
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        if len(data) != 2:
            raise ValueError(f"data as a tuple must be (x, y); got {len(data)} elements")
        return TensorSource(*data)
    raise TypeError("data must be a torch DataLoader, a Dataset, an IterableDataset or a "
                    f"tuple of tensors (x, y); got {type(data).__name__}")


def _iterable(loader, stream, label_key):
    if stream is False:
        raise TypeError("an iterable dataset cannot be read into memory by index; pass "
                        "stream=True (or leave it at None) to stream it")
    return IterableSource(loader, label_key)


def _map(dataset, collate, stream, label_key):
    source = MapSource(dataset, collate, label_key)
    if stream:
        return source
    # Read in order through the dataset itself (not a DataLoader, whose iterator draws a
    # seed from the global RNG).
    parts = list(source.chunks())
    return TensorSource(_cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
