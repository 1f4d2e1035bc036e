"""``preserved_state``: what an estimate during training must leave exactly as it found
it, restored on exit: the global RNG streams (torch on every device, numpy, Python) and the
model's parameters, gradients and train/eval modes. Not here: the estimate.
"""
from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn


@contextmanager
def preserved_state(model: nn.Module):
    """Restore global RNG streams (torch on every device, numpy, Python), the model's
    parameters, gradients and train/eval modes on exit."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    py_state = random.getstate()
    np_state = np.random.get_state()
    modes = [m.training for m in model.modules()]
    params = [(p, p.detach().clone(), None if p.grad is None else p.grad.clone())
              for p in model.parameters()]
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            for module, mode in zip(model.modules(), modes):
                module.training = mode
            with torch.no_grad():
                for p, value, grad in params:
                    if not torch.equal(p, value):
                        p.copy_(value)
                    if grad is None:
                        p.grad = None
                    elif p.grad is None or not torch.equal(p.grad, grad):
                        p.grad = grad
