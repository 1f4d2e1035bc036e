"""How many chains to compute at once, and how many examples per evaluation pass, so that
sampling fits a memory budget.

Memory of a batched step = what every chain holds for the whole run (its weights, its flat
gradient and autograd's per-parameter one, noise, the sampler's new position, the position
a MALA check keeps, and their temporaries: ``STATE_VECTORS`` flat vectors of d numbers) +
what one forward and backward pass keeps per example for each chain computed together (the
tensors autograd saves, measured on the model's first examples at one and two examples, so
the part that does not grow with the batch is separated) + the evaluated copy of the model
and the point's float64 vectors (``MODEL_COPIES`` model sizes). The
budget is ``max_memory`` or a fraction of what is free now (the device's free memory on a
GPU, the system's available memory on a CPU).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass

import torch

# measured: peak RSS grew by 9.0 flat vectors per chain (17.1 M-parameter MLP, 4 vs 8 chains)
STATE_VECTORS = 9
MODEL_COPIES = 3
# of free memory a default budget takes: the rest is for the allocator's fragmentation,
# kernels' workspaces and whatever else runs
DEFAULT_FRACTION = {"cuda": 0.7, "cpu": 0.5}
# what a backward pass needs beyond the saved activations (gradients of the activations,
# transposed weights in flight), as a multiple of the saved activations
BACKWARD_OVERHEAD = 1.0
# of the memory left free after what is held, the share the chains computed at once may
# plan on: under a 1 GB budget a transformer language model's run peaked 17–25 % above its
# prediction (3 chains at once, fused attention), so a fifth is kept back
STEP_HEADROOM = 0.8
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


class MemoryBudgetError(RuntimeError):
    """Not even one chain fits the memory budget."""


def parse_bytes(value) -> int:
    """Bytes from an int or a string with a unit.

    Examples:
        >>> parse_bytes("8GB"), parse_bytes("512 MiB"), parse_bytes(1024)
        (8000000000, 536870912, 1024)
    """
    if isinstance(value, bool):
        raise ValueError(f"max_memory must be a number of bytes or a size like '8GB', "
                         f"got {value!r}")
    if isinstance(value, (int, float)) and value > 0:
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"max_memory must be a number of bytes or a size like '8GB' or "
                         f"'512MiB', got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def free_memory(device: torch.device) -> int:
    """Bytes free now: the GPU's free memory, or the system's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def budget(max_memory, device: torch.device) -> tuple[int, str]:
    """The budget in bytes and where it came from."""
    if max_memory is not None:
        return parse_bytes(max_memory), f"max_memory={max_memory!r}"
    fraction = DEFAULT_FRACTION.get(device.type, DEFAULT_FRACTION["cpu"])
    free = free_memory(device)
    return int(fraction * free), (f"{fraction:.0%} of the {_size(free)} free on "
                                  f"{'the GPU' if device.type == 'cuda' else 'the system'}")


def _size(num_bytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.3g} {unit}"
    return f"{num_bytes:.0f} B"


class SavedBytes:
    """Bytes of the tensors autograd saves inside the context, each storage counted once,
    leaving out storages that exist anyway (``known``: weights, buffers, data)."""

    def __init__(self, known=()):
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.seen: set[int] = set()
        self.total = 0

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self.known and pointer not in self.seen:
            self.seen.add(pointer)
            self.total += storage.nbytes()
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


@dataclass(frozen=True)
class MemoryPlan:
    """The numbers behind ``chain_batch`` (all in bytes)."""

    budget: int
    budget_source: str
    model: int  # the evaluated copy: parameters and buffers
    state_per_chain: int  # STATE_VECTORS flat vectors of one chain
    activations_per_example: float  # one example of one chain, forward + backward
    activations_per_call: float  # one chain's pass, whatever its batch
    num_chains: int
    batch_size: int
    chain_batch: int  # chains computed at once

    @property
    def per_chain_step(self) -> float:
        """Activations of one chain's gradient on one minibatch."""
        return self.pass_bytes(self.batch_size, 1, 1 + BACKWARD_OVERHEAD)

    @property
    def held(self) -> int:
        """What the run holds whatever the grouping."""
        return MODEL_COPIES * self.model + self.num_chains * self.state_per_chain

    def predicted_peak(self, largest_pass: float = 0.0) -> float:
        """What is held plus the larger of a sampling step and the largest evaluation
        pass (``largest_pass`` bytes of activations)."""
        return self.held + max(self.chain_batch * self.per_chain_step, largest_pass)

    def pass_bytes(self, examples: int, chains: int, passes: float) -> float:
        """Activations of an evaluation pass of ``examples`` per chain."""
        return passes * chains * (self.activations_per_call
                                  + examples * self.activations_per_example)

    def examples_per_pass(self, chains: int, passes: float, cap: int) -> int:
        """Examples per chain in one evaluation pass over ``chains`` chains (at most
        ``cap``); ``passes`` is what the pass keeps per example in units of a forward pass
        (1 forward only: the largest activations, the logits, are as large as any; 2 with a
        gradient; 4 with a Hessian product)."""
        # half of what is free: a pass's activations are freed to the allocator's cache,
        # not to the system, and sampling's own peak comes on top of them
        free = 0.5 * (self.budget - self.held)
        per = passes * self.activations_per_example * chains
        fits = int((free - passes * chains * self.activations_per_call) // max(per, 1.0))
        return max(1, min(cap, fits))

    def to_dict(self, largest_pass: float = 0.0) -> dict:
        return {**asdict(self), "per_chain_step": self.per_chain_step,
                "largest_evaluation_pass": largest_pass,
                "predicted_peak": self.predicted_peak(largest_pass)}


def plan(*, budget_bytes: int, budget_source: str, model_bytes: int, dim: int,
         bytes_per_number: int, activations_per_example: float, activations_per_call: float,
         num_chains: int, batch_size: int, requested: int | None = None) -> MemoryPlan:
    """The most chains at once (at most ``num_chains``, or ``requested``) that fit."""
    state = STATE_VECTORS * dim * bytes_per_number
    draft = MemoryPlan(budget_bytes, budget_source, model_bytes, state,
                       activations_per_example, activations_per_call, num_chains,
                       batch_size, 1)
    free = budget_bytes - draft.held
    fits = math.floor(free / draft.per_chain_step) if draft.per_chain_step > 0 else num_chains
    if requested is None and fits < 1:
        raise MemoryBudgetError(
            f"sampling does not fit the memory budget even one chain at a time: "
            f"{_size(budget_bytes)} "
            f"({budget_source}); the model and the point take {_size(MODEL_COPIES * model_bytes)},"
            f" {num_chains} chains' weights, gradients and noise {_size(num_chains * state)}, "
            "and one chain's "
            f"forward and backward pass at batch size {batch_size} needs about "
            f"{_size(draft.per_chain_step)}. Lower batch_size (or num_chains), or raise "
            "max_memory")
    with_headroom = (math.floor(STEP_HEADROOM * free / draft.per_chain_step)
                     if draft.per_chain_step > 0 else num_chains)
    chosen = requested if requested is not None else max(1, min(num_chains, with_headroom))
    return MemoryPlan(budget_bytes, budget_source, model_bytes, state, activations_per_example,
                      activations_per_call, num_chains, batch_size, chosen)
