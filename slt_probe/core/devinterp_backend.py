"""Run an slt_probe estimate through devinterp 1.3's sampler, as the reference implementation.

The configuration (sampler, ε, γ, nβ, chains, draws, burn-in, batch size, estimator,
weight restriction) is translated one to one; devinterp advances chains one after
another, each on its own deep copy. devinterp seeds the global torch RNG per chain, so
the global RNG state is saved and restored around it.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .estimator import DrawRecord
from .samplers import SGLD, SGNHT, RMSPropSGLD


def _sampling_method(sampler, nbeta: float):
    # devinterp is imported only when its backend runs: it pulls in much that a native
    # estimate never needs.
    from devinterp.optim import SGMCMC

    if isinstance(sampler, RMSPropSGLD):
        if sampler.adapt != "always":
            raise ValueError("devinterp's RMSProp-SGLD adapts its preconditioner throughout; "
                             "use RMSPropSGLD(adapt='always') with backend='devinterp'")
        return SGMCMC.rmsprop_sgld, dict(lr=sampler.lr, localization=sampler.localization,
                                         nbeta=nbeta, alpha=sampler.alpha, eps=sampler.eps)
    if isinstance(sampler, SGNHT):
        if sampler.localization:
            raise ValueError("devinterp's SGNHT has no localization; use localization=0.0 "
                             "with backend='devinterp'")
        return SGMCMC.sgnht, dict(lr=sampler.lr, diffusion_factor=sampler.diffusion_factor,
                                  nbeta=nbeta)
    if isinstance(sampler, SGLD):
        return SGMCMC.sgld, dict(lr=sampler.lr, localization=sampler.localization, nbeta=nbeta)
    raise TypeError(f"backend='devinterp' does not support {type(sampler).__name__}")


class _Recorder:
    """devinterp callback: per (chain, draw) loss and its reference loss."""

    def __init__(self, batched, x, y, star_losses, settings, shape):
        self.batched, self.x, self.y = batched, x, y
        self.star_losses = star_losses
        self.init_loss = float(star_losses.mean())
        self.settings = settings
        self.loss = np.full(shape, np.nan)
        self.reference = np.full(shape, np.nan)

    def __call__(self, chain, draw, loss, data, model, **_):
        if self.settings.loss_on == "full":
            with torch.no_grad():
                value = float(self.batched.loss.batch(model(self.x), self.y))
            reference = self.init_loss
        else:
            value = float(loss)
            if self.settings.estimator == "control_variate":
                reference = float(self.star_losses[data[2]].mean())
            else:
                reference = self.init_loss
        self.loss[chain, draw] = value
        self.reference[chain, draw] = reference


def run_devinterp(batched, w_star, x, y, settings, nbeta, star_losses, mask,
                  accumulator, *, verbose: bool):
    from devinterp.slt.sampler import sample

    method, kwargs = _sampling_method(settings.sampler, nbeta)
    chain_model = copy.deepcopy(batched.module)
    views = batched.views(w_star)
    with torch.no_grad():
        for name, param in chain_model.named_parameters():
            if name in views:
                param.copy_(views[name])
                param.requires_grad_(True)
    restriction = None
    if mask is not None:
        mask_views = batched.views(mask)
        restriction = {name: (mask_views[name] > 0) if name in mask_views
                       else torch.zeros_like(p, dtype=torch.bool)
                       for name, p in chain_model.named_parameters()}
    loss = batched.loss
    generator = torch.Generator().manual_seed(settings.seed)
    indices = torch.arange(len(x), device=x.device)
    loader = DataLoader(TensorDataset(x, y, indices), batch_size=settings.batch_size,
                        shuffle=True, generator=generator)
    shape = (settings.num_chains, settings.num_draws)
    recorder = _Recorder(batched, x, y, star_losses, settings, shape)

    def evaluate(net, batch):
        return loss.batch(net(batch[0]), batch[1])

    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sample(chain_model, loader, callbacks=[recorder], evaluate=evaluate,
                   sampling_method=method, optimizer_kwargs=kwargs,
                   num_draws=settings.num_draws, num_chains=settings.num_chains,
                   num_burnin_steps=settings.num_burnin, init_loss=accumulator.init_loss,
                   seed=settings.seed, device=batched.device, verbose=verbose,
                   optimize_over_per_model_param=restriction)
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)

    bad = ~np.isfinite(recorder.loss)
    diverged = bad.any(axis=1)
    diverged_at = [int(np.argmax(row)) + settings.num_burnin if row.any() else None
                   for row in bad]
    for draw in range(settings.num_draws):
        accumulator.update(DrawRecord(step=settings.num_burnin + draw,
                                      loss=recorder.loss[:, draw],
                                      reference=recorder.reference[:, draw],
                                      alive=~diverged))
    return diverged, diverged_at
