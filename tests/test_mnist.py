import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from slt_probe.experiments.mnist import ENV_VAR, load_mnist, read_idx
from slt_probe.experiments.tasks import mnist_task


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(raw)
    else:
        path.write_bytes(raw)


@pytest.mark.parametrize("gz", [False, True])
def test_reads_idx_files_it_wrote(tmp_path, gz):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    labels = np.array([4, 0, 9])
    _write_idx(tmp_path / "train-images-idx3-ubyte", images, gz)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels, gz)
    x, y = load_mnist("train", tmp_path)
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), images / 255.0, rtol=1e-6)
    assert y.tolist() == [4, 0, 9]


def test_missing_file_is_named_with_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.*" + ENV_VAR):
        load_mnist("test", tmp_path)


def test_missing_directory_setting_is_explained(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match=ENV_VAR) as error:
        load_mnist("test")
    assert "--mnist-dir" in str(error.value) and "data_dir" not in str(error.value)


def test_a_folder_without_either_split_names_the_test_files_that_suffice(tmp_path):

    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte") as error:
        mnist_task(1000, seed=0, directory=tmp_path)
    assert "train split" in str(error.value)


def test_bad_magic_is_rejected(tmp_path):
    (tmp_path / "f").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "f")


@pytest.mark.skipif(not os.environ.get(ENV_VAR), reason=f"set {ENV_VAR} to the folder with the "
                    "MNIST IDX files (found automatically at ../shared/data/mnist)")
def test_reads_the_real_mnist_test_split():
    x, y = load_mnist("test")
    assert x.shape == (10_000, 28, 28)
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(y.numpy()).tolist()[:2] == [980, 1135]
