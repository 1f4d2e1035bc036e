"""Attention for many chains at once through torch's fused kernel.

Under ``vmap`` over chains, ``scaled_dot_product_attention`` has no batching rule for its
fused (flash / memory-efficient) kernels: torch either loops over the chains or, with the
math kernel, materialises every chain's (batch × heads × L × S) attention weights. The
attention itself has no weights, so the chains can simply join the batch: while
``chains_join_the_batch()`` is active, every call of ``F.scaled_dot_product_attention``
made under ``vmap`` merges the chain dimension into the leading batch dimension and runs
one fused call (whose own backward autograd records), then splits the chains again. The
numbers are those of the per-chain calls.

The routing replaces the module attribute ``torch.nn.functional.scaled_dot_product_attention``
for the duration of the context, because that is where ``nn.MultiheadAttention`` (through
``F.multi_head_attention_forward``), the ``nn.Transformer*`` layers and Hugging Face's
``attn_implementation="sdpa"`` look it up at call time; a torch-function mode cannot see
calls nested inside other overridable functions.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

_KERNEL = torch._C._nn.scaled_dot_product_attention
_LOCK = threading.RLock()  # nested contexts restore in order


def _chains_first(x: Tensor, dim: int | None, chains: int) -> Tensor:
    return x.expand(chains, *x.shape) if dim is None else x.movedim(dim, 0)


def _mask_for_merged(mask: Tensor | None, dim: int | None, chains: int, lead: int,
                     query_dims: int) -> Tensor | None:
    """The mask of (chains × lead) merged queries: broadcast as the per-chain mask was."""
    if mask is None:
        return None
    logical_dims = mask.dim() - (dim is not None)
    if dim is None and (logical_dims < query_dims or mask.shape[0] == 1):
        return mask  # broadcasts over the merged leading dimension unchanged
    mask = _chains_first(mask, dim, chains)
    mask = mask.reshape(chains, *[1] * (query_dims - logical_dims), *mask.shape[1:])
    return mask.expand(chains, lead, *mask.shape[2:]).reshape(chains * lead, *mask.shape[2:])


class _ChainsAsBatch(torch.autograd.Function):
    """The fused kernel; under ``vmap`` the chains join the batch (``vmap`` below)."""

    @staticmethod
    def forward(query, key, value, mask, is_causal, scale, enable_gqa):
        return _KERNEL(query, key, value, attn_mask=mask, is_causal=is_causal, scale=scale,
                       enable_gqa=enable_gqa)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])
        ctx.options = inputs[4:]

    @staticmethod
    def backward(ctx, grad_output):
        # reached only when no input is batched: recompute through the kernel's own backward
        query, key, value, mask = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in (query, key, value)]
        is_causal, scale, enable_gqa = ctx.options
        with torch.enable_grad():
            out = _KERNEL(*leaves, attn_mask=mask, is_causal=is_causal, scale=scale,
                          enable_gqa=enable_gqa)
            wanted = [t for t in leaves if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_output) if wanted else ())
        return (*(next(grads) if t.requires_grad else None for t in leaves),
                None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, query, key, value, mask, is_causal, scale, enable_gqa):
        chains = info.batch_size
        query, key, value = (_chains_first(t, d, chains)
                             for t, d in zip((query, key, value), in_dims[:3]))
        query_dims = query.dim() - 1
        if query_dims < 3:  # (L, E) per chain: the chains are the batch already
            if mask is not None and in_dims[3] is not None:
                mask = _chains_first(mask, in_dims[3], chains)
            return _KERNEL(query, key, value, attn_mask=mask, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa), 0
        lead = query.shape[1]
        merged = [t.reshape(chains * t.shape[1], *t.shape[2:]) for t in (query, key, value)]
        out = _KERNEL(*merged, attn_mask=_mask_for_merged(mask, in_dims[3], chains, lead,
                                                          query_dims),
                      is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        return out.view(chains, lead, *out.shape[1:]), 0


class RoutedCalls:
    """How many attention calls a ``chains_join_the_batch`` context routed."""

    def __init__(self) -> None:
        self.count = 0


@contextlib.contextmanager
def chains_join_the_batch():
    """Route ``F.scaled_dot_product_attention`` through one fused call over chains × batch
    (see the module's docstring); yields a ``RoutedCalls`` counter. Dropout inside
    attention (training mode only) keeps torch's own call."""
    calls = RoutedCalls()

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                  scale=None, enable_gqa=False):
        if dropout_p:
            return _KERNEL(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                           is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        calls.count += 1
        return _ChainsAsBatch.apply(query, key, value, attn_mask, is_causal, scale,
                                    enable_gqa)

    with _LOCK:
        previous = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = attention
        try:
            yield calls
        finally:
            F.scaled_dot_product_attention = previous
