"""The chain driver: burn-in, draws, minibatches and the noise stream for all chains at once.

It owns the only random stream (a private ``torch.Generator``), resolves nothing about
the estimator except which reference loss each draw is compared with, and yields one
``DrawRecord`` per kept draw. Divergent chains (NaN/inf, or an energy far beyond any
possible λ) are parked at w* and reported. Not here: the LLC arithmetic.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .batched_model import BatchedModel
from .estimator import DrawRecord
from .samplers import Sampler
from .target import Point

# λ ≤ d/2 always; a single draw whose nβ·(L − L*) exceeds this many times d is a blow-up.
DIVERGENCE_FACTOR = 1000.0
# MALA acceptance is computed on this many draws per estimate: each costs an extra forward
# pass and a few passes over chains × d (about one sampler step), so not on every draw.
MALA_SAMPLES = 10


@dataclass(frozen=True)
class ChainGroup:
    """Chains of one restriction in a run shared with others: its point (and mask), whether
    its gradient is corrected, and its own random stream (minibatches and noise), so it
    draws exactly what a run of its own at the same seed would."""

    point: Point
    corrected: bool
    generator: torch.Generator


def check_groupable(sampler: Sampler, noise_substeps: int | None = None) -> None:
    """Chains of several restrictions share a run only where nothing couples them."""
    if sampler.name == "sgnht" or noise_substeps is not None:
        raise ValueError("chains of several restrictions share a run only with SGLD or "
                         "RMSProp-SGLD and independent noise (SGNHT's thermostat couples a "
                         "run's chains)")


class ChainDriver:
    """Chains at one sampler over ``source`` (a ``data`` source) around ``point``.

    The control variate's L_b(w*) is read from the point's per-example losses for data in
    memory, and computed beside the chains (w* evaluated on each chain's batch in one
    batched call) for streamed data. ``corrected`` samples L(w) − g·(w − w*).

    ``groups`` (instead of ``point``, ``corrected`` and ``generator``): several weight
    restrictions at one w*, ``num_chains`` chains each, advanced in one batched
    computation; group k's chains are rows k·num_chains … (k + 1)·num_chains − 1, each
    group with its own mask, correction and random stream.
    """

    def __init__(self, model: BatchedModel, source, *, sampler: Sampler, nbeta: float,
                 point: Point | None = None, num_chains: int, batch_size: int,
                 estimator: str, loss_on: str, generator: torch.Generator | None = None,
                 corrected: bool = False, noise_substeps: int | None = None,
                 groups: Sequence[ChainGroup] | None = None):
        if groups is None:
            groups = [ChainGroup(point, corrected, generator)]
        else:
            check_groupable(sampler, noise_substeps)
        self.groups = list(groups)
        self.per_group = num_chains
        num_chains = num_chains * len(self.groups)
        point, generator = self.groups[0].point, self.groups[0].generator
        self.model = model
        self.source = source
        self.sampler = sampler
        self.nbeta = nbeta
        self.num_chains = num_chains
        self.w_star = point.w_star.unsqueeze(0).expand(num_chains, -1)
        self.star_losses = point.star_losses
        self.init_loss = point.init_loss
        self.mask = mask = self._stacked([g.point.mask for g in self.groups])
        self.batch_size = min(batch_size, source.n)
        self.estimator = estimator
        self.loss_on = loss_on
        self.generator = generator
        # Coupled noise (``noise_substeps``): the injected noise comes from its own stream,
        # each step the normalised sum of k draws, so a run at 2ε with k = 2 sees the same
        # Brownian path as a run at ε with k = 1 over the same Langevin time.
        self.noise_substeps = noise_substeps
        self.noise_generator = generator
        if noise_substeps is not None:
            self.noise_generator = torch.Generator(device=model.device).manual_seed(
                generator.initial_seed() + 1)
        # g = ∇L_n(w*) when the first-order correction is on: chains then sample
        # L(w) − g·(w − w*), whose gradient is ∇L(w) − g.
        self.gradient = None
        if any(g.corrected for g in self.groups):
            zero = torch.zeros(model.dim, device=model.device, dtype=model.dtype)
            self.gradient = self._stacked([
                g.point.gradient.to(model.device, model.dtype) if g.corrected else zero
                for g in self.groups])
            if mask is not None:
                self.gradient = self.gradient * mask
        active = (mask.sum(dim=-1) if mask is not None
                  else torch.full((num_chains,), float(model.dim), device=model.device))
        self.divergence_threshold = DIVERGENCE_FACTOR * active.clamp_min(1).double()
        self.diverged = np.zeros(num_chains, dtype=bool)
        self.diverged_at: list[int | None] = [None] * num_chains

    def _stacked(self, rows: list[Tensor | None]) -> Tensor | None:
        """Per-group vectors (d,) as per-chain rows (chains, d); one group's stays (d,)."""
        if all(r is None for r in rows):
            return None
        if len(rows) == 1:
            return rows[0]
        ones = torch.ones(self.model.dim, device=self.model.device, dtype=self.model.dtype)
        full = [ones if r is None else r.to(self.model.device, self.model.dtype) for r in rows]
        return torch.stack(full).repeat_interleave(self.per_group, dim=0)

    def _batches(self, device) -> Iterator[tuple]:
        streams = [self.source.batches(self.per_group, self.batch_size, g.generator, device)
                   for g in self.groups]
        if len(streams) == 1:
            yield from streams[0]
            return
        while True:
            parts = [next(stream) for stream in streams]
            x = parts[0][0]
            xs = [p[0] for p in parts]
            joined = ({k: torch.cat([v[k] for v in xs]) for k in x} if isinstance(x, dict)
                      else torch.cat(xs))
            yield joined, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])

    def run(self, num_draws: int, num_burnin: int = 0, *, num_warmup: int = 0,
            warmup_sampler: Sampler | None = None, start: Tensor | None = None,
            verbose: bool = True, desc: str = "LLC",
            mala_samples: int = MALA_SAMPLES) -> Iterator[DrawRecord]:
        """Warm-up (``num_warmup`` steps of ``warmup_sampler``), burn-in, then draws.

        A warm-up at a coarser step covers more Langevin time per step, so chains spread
        along slow, flat directions sooner; the burn-in at the sampler's own step then lets
        the fast directions settle to it. ``start`` (chains × d) replaces w* as the first
        position. ``self.positions`` always holds the chains' current positions.
        """
        chains, device = self.num_chains, self.model.device
        if num_warmup and warmup_sampler is None:
            raise ValueError("num_warmup > 0 needs a warmup_sampler")
        batches = self._batches(device)
        first = self.w_star.contiguous() if start is None else start.clone()
        if first.shape != self.w_star.shape:
            raise ValueError(f"start must have shape {tuple(self.w_star.shape)} (chains × d), "
                             f"got {tuple(first.shape)}")
        state = self.sampler.init(first, self.generator, self.mask)
        self.positions = state.w
        noise = torch.empty_like(state.w)
        num_burnin = num_warmup + num_burnin
        total = num_burnin + num_draws
        track_mala = self.sampler.has_proposal_density
        mala_every = max(1, num_draws // max(mala_samples, 1))
        pending = None  # (w_t, ‖ξ_t‖²) of a step whose proposal is judged at the next step
        with tqdm(total=total, desc=f"{desc} ({chains} chains)", disable=not verbose,
                  leave=False, unit="step") as bar:
            for step in range(total):
                xb, yb, idx = next(batches)
                xb, yb = self.model.inputs(xb), yb.to(device)
                losses, grads = self.model.loss_and_grad(state.w, xb, yb)
                losses = losses.detach()
                if self.mask is not None:
                    grads.mul_(self.mask)
                if self.gradient is not None:
                    grads.sub_(self.gradient)
                if self.estimator != "control_variate":
                    reference = torch.full_like(losses, self.init_loss, dtype=torch.float64)
                elif self.star_losses is not None:
                    reference = self.star_losses[idx.to(self.star_losses.device)].mean(dim=1)
                else:
                    reference = self.model.losses(self.w_star, xb, yb).double()
                recorded = losses
                if self.loss_on == "full" and step >= num_burnin:
                    recorded = self._full_losses(state.w)
                    reference = torch.full_like(recorded, self.init_loss)
                self._catch_divergence(step, losses, grads, reference, state)
                if self.diverged.all():
                    return  # nothing left to sample; the estimator reports it
                acceptance = None
                if pending is not None:
                    acceptance = self._mala_acceptance(pending, state.w, losses, grads, xb, yb)
                    pending = None
                if step >= num_burnin:
                    yield DrawRecord(step=step, loss=recorded.double().cpu().numpy(),
                                     reference=reference.double().cpu().numpy(),
                                     alive=~self.diverged.copy(), acceptance=acceptance,
                                     correction=self._linear_term(state.w))
                self._draw_noise(noise)
                if self.mask is not None:
                    noise.mul_(self.mask)
                if track_mala and step >= num_burnin and (step - num_burnin) % mala_every == 0:
                    pending = (state.w, torch.linalg.vecdot(noise, noise, dim=1).double())
                if step == num_burnin:
                    state = self.sampler.begin_draws(state)
                kernel = warmup_sampler if step < num_warmup else self.sampler
                state = kernel.step(state, grads, noise, w_star=self.w_star, nbeta=self.nbeta)
                self.positions = state.w
                bar.update(1)

    def _draw_noise(self, noise: Tensor) -> None:
        if len(self.groups) > 1:
            for k, group in enumerate(self.groups):
                rows = noise[k * self.per_group:(k + 1) * self.per_group]
                rows.copy_(torch.randn(rows.shape, generator=group.generator,
                                       device=rows.device, dtype=rows.dtype))
            return
        torch.randn(noise.shape, generator=self.noise_generator, out=noise)
        substeps = self.noise_substeps or 1
        for _ in range(substeps - 1):
            noise.add_(torch.randn(noise.shape, generator=self.noise_generator,
                                   device=noise.device, dtype=noise.dtype))
        if substeps > 1:
            noise.div_(substeps ** 0.5)

    def _full_losses(self, w: Tensor) -> Tensor:
        total = torch.zeros(len(w), dtype=torch.float64, device=w.device)
        for xb, yb in self.source.chunks():
            total += self.model.full_losses(w, self.model.inputs(xb),
                                            yb.to(w.device)) * len(yb)
        return total / self.source.n

    def _linear_term(self, w: Tensor) -> np.ndarray | None:
        """g·(w − w*) per chain (None without the gradient correction)."""
        if self.gradient is None:
            return None
        return _rowwise_dot(w - self.w_star, self.gradient).double().cpu().numpy()

    def _mala_acceptance(self, pending, w_new: Tensor, losses: Tensor, grads: Tensor,
                         xb: Tensor, yb: Tensor) -> np.ndarray:
        """Metropolis–Hastings acceptance probability of the proposal w_t → w_{t+1},
        computed by the sampler from its own proposal density, never used to reject.

        Both energies are read on the same minibatch (one extra forward at w_t), so the
        batch-to-batch noise of L does not masquerade as a rejection.
        """
        w_old, noise_sq = pending
        loss_change = losses.double() - self.model.losses(w_old, xb, yb).double()
        if self.gradient is not None:  # the corrected potential is what the chains sample
            loss_change -= _rowwise_dot(w_new - w_old, self.gradient).double()
        log_alpha = self.sampler.log_acceptance(w_old, w_new, noise_sq, grads, loss_change,
                                                w_star=self.w_star, nbeta=self.nbeta)
        accept = torch.exp(torch.clamp(log_alpha, max=0.0)).cpu().numpy()
        return np.where(self.diverged, np.nan, accept)

    def _catch_divergence(self, step, losses, grads, reference, state) -> None:
        # Only the losses are checked: a non-finite gradient makes w non-finite, which the
        # next step's loss reveals, and scanning chains × d gradients costs ~10 % of a step.
        energy = self.nbeta * (losses.double() - reference.double())
        bad = ~torch.isfinite(energy) | (energy > self.divergence_threshold)
        bad_np = bad.cpu().numpy() & ~self.diverged
        if not bad_np.any():
            return
        for c in np.flatnonzero(bad_np):
            self.diverged[c] = True
            self.diverged_at[c] = step
        dead = torch.as_tensor(self.diverged, device=grads.device)
        # Park dead chains at w* with zero force so they stay finite and cheap.
        state.w[dead] = self.w_star[dead]
        grads[dead] = 0.0
        for value in state.aux.values():
            if value.dim() >= 1 and value.shape[0] == self.num_chains and value.dtype.is_floating_point:
                value[dead] = 0.0


def _rowwise_dot(rows: Tensor, vectors: Tensor) -> Tensor:
    """Per-chain dot products with one vector (d,) or one vector per chain (chains, d)."""
    return rows @ vectors if vectors.dim() == 1 else (rows * vectors).sum(dim=1)
