import os
from pathlib import Path

import numpy as np
import pytest
import torch

from slt_probe.ground_truth import problems as known_models

# The MNIST tests read the official files through SLT_PROBE_MNIST_DIR; when it is unset and
# the shared data sits beside the checkout (as in CI), they read it from there.
_SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
if not os.environ.get("SLT_PROBE_MNIST_DIR") and _SHARED_MNIST.is_dir():
    os.environ["SLT_PROBE_MNIST_DIR"] = str(_SHARED_MNIST)

# Under pytest-xdist each worker process takes one core: one thread each, not one per core
# per worker (oversubscribing the cores costs far more than it gains).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def regular_problem():
    """Regular linear regression (λ = d/2 = 5) at its least-squares minimum."""
    return known_models.regular(d_in=10, d_out=1, n=5_000, seed=0).settle()


@pytest.fixture
def tiny_classifier():
    torch.manual_seed(123)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(300, 4)
    y = torch.randint(0, 3, (300,))
    return model, x, y


@pytest.fixture
def assert_drawn():
    """Checks that a PNG decodes to an image with drawn content (not blank, not one colour
    filling most of it) of at least the given size."""
    from matplotlib.image import imread

    def check(path, min_width: int = 300, min_height: int = 200) -> None:
        image = imread(path)
        height, width = image.shape[:2]
        assert width >= min_width and height >= min_height, (width, height)
        pixels = image[..., :3].reshape(-1, 3)
        background = (pixels > 0.98).all(axis=1).mean()
        assert 0.02 < 1 - background, f"{path} is blank"
        assert len(np.unique(pixels.round(2), axis=0)) > 10, f"{path} has almost no colours"

    return check
