"""MNIST from the standard IDX files (gzipped or not) in a directory the user names.

The directory comes from an argument or the ``SLT_PROBE_MNIST_DIR`` environment variable;
nothing is downloaded. Either split may be missing, but at least one must be present.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

ENV_VAR = "SLT_PROBE_MNIST_DIR"
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str | Path) -> np.ndarray:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} values")
    return data.reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).exists():
            return directory / name
    return None


def mnist_dir(directory: str | Path | None = None) -> Path:
    directory = directory or os.environ.get(ENV_VAR)
    if not directory:
        raise FileNotFoundError(f"no MNIST folder given: set {ENV_VAR} (or pass --mnist-dir on "
                                "the command line, directory= in Python) to a folder holding "
                                "the IDX files")
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"MNIST directory {path} does not exist")
    return path


def load_mnist(split: str = "test", directory: str | Path | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 in [0, 1] of shape (n, 28, 28) and int64 labels."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = mnist_dir(directory)
    files = [_find(path, stem) for stem in SPLITS[split]]
    for stem, found in zip(SPLITS[split], files):
        if found is None:
            raise FileNotFoundError(
                f"{path} has no {stem} (or {stem}.gz), the {split} split; the bundled "
                f"experiments need one split: t10k-images-idx3-ubyte and "
                f"t10k-labels-idx1-ubyte (the 10,000-image test split) or the train split's "
                f"two files, gzipped or not, in the folder {ENV_VAR} or --mnist-dir names")
    images, labels = (read_idx(f) for f in files)
    if len(images) != len(labels):
        raise ValueError(f"{files[0].name} has {len(images)} images but {files[1].name} has "
                         f"{len(labels)} labels")
    return (torch.from_numpy(images.astype(np.float32) / 255.0),
            torch.from_numpy(labels.astype(np.int64)))


def load_available_mnist(directory: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split if present (it is the one the bundled experiments are set up for),
    else the train split; the error for neither names the test split's files, which
    suffice."""
    try:
        return load_mnist("test", directory)
    except FileNotFoundError as missing_test:
        try:
            return load_mnist("train", directory)
        except FileNotFoundError:
            raise missing_test from None
