"""Where each trainable parameter sits in the flat vector the samplers move, and which
coordinates a user asked to sample.

Not here: evaluating the model (``batched_model``).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and offsets of the trainable parameters in one flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, model: nn.Module) -> "ParameterLayout":
        """The layout of ``model``'s parameters with ``requires_grad`` (checked finite)."""
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("model has no trainable parameters (none with requires_grad=True)")
        for name, p in trainable:
            if not torch.isfinite(p.detach()).all():
                raise ValueError(f"model parameter {name!r} contains NaN or inf")
        sizes = [p.numel() for _, p in trainable]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        return cls(names=tuple(n for n, _ in trainable), shapes=tuple(p.shape for _, p in trainable),
                   offsets=tuple(offsets), device=trainable[0][1].device,
                   dtype=trainable[0][1].dtype)

    @property
    def dim(self) -> int:
        return self.offsets[-1]

    def views(self, w: Tensor) -> dict[str, Tensor]:
        """Per-parameter views of ``w`` (d,) or (chains, d); no copies. One split, not a
        slice per parameter: a slice's backward writes a zero tensor of w's whole size, so
        differentiating through P slices costs P × d (75 s for GPT-2's 148 tensors), the
        split's backward one concatenation."""
        lead = w.shape[:-1]
        sizes = [b - a for a, b in zip(self.offsets[:-1], self.offsets[1:])]
        return {n: part.view(torch.Size((*lead, *shape))) for n, shape, part in
                zip(self.names, self.shapes, torch.split(w, sizes, dim=-1))}

    def flatten(self, model: nn.Module) -> Tensor:
        """Flat copy of the trainable parameters of ``model``."""
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(f"model lacks parameters {missing} of the sampled architecture")
        return torch.cat([params[n].detach().reshape(-1).to(self.dtype) for n in self.names])

    def flatten_state(self, state: Mapping[str, Tensor]) -> Tensor:
        """Flat parameter vector from a state_dict with this architecture."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"state_dict lacks parameters {missing}")
        for n, shape in zip(self.names, self.shapes):
            if state[n].shape != shape:
                raise ValueError(f"state_dict[{n!r}] has shape {tuple(state[n].shape)}, "
                                 f"expected {tuple(shape)}")
        return torch.cat([state[n].detach().reshape(-1).to(self.device, self.dtype)
                          for n in self.names])

    def mask(self, restrict_to) -> Tensor | None:
        """Flat 0/1 mask of the coordinates to sample; ``None`` means all of them.

        ``restrict_to`` is an iterable of parameter names (a name also selects every
        parameter under it, e.g. ``"layers.0"``) or a dict name → boolean tensor.
        """
        if restrict_to is None:
            return None
        mask = torch.zeros(self.dim, device=self.device, dtype=self.dtype)
        views = self.views(mask)
        if isinstance(restrict_to, Mapping):
            for name, sub in restrict_to.items():
                if name not in views:
                    raise ValueError(f"restrict_to names unknown parameter {name!r}; "
                                     f"trainable parameters are {list(self.names)}")
                sub = torch.as_tensor(sub, device=self.device)
                if sub.shape != views[name].shape:
                    raise ValueError(f"restrict_to[{name!r}] has shape {tuple(sub.shape)}, "
                                     f"expected {tuple(views[name].shape)}")
                views[name].copy_(sub.to(self.dtype))
        elif isinstance(restrict_to, Iterable) and not isinstance(restrict_to, (str, bytes)):
            for prefix in restrict_to:
                hits = [n for n in self.names if n == prefix or n.startswith(prefix + ".")]
                if not hits:
                    raise ValueError(f"restrict_to names unknown parameter {prefix!r}; "
                                     f"trainable parameters are {list(self.names)}")
                for n in hits:
                    views[n].fill_(1.0)
        else:
            raise TypeError("restrict_to must be a list of parameter names or a dict "
                            f"name -> boolean mask; got {type(restrict_to).__name__}")
        if mask.sum() == 0:
            raise ValueError("restrict_to selects no parameters")
        return mask
