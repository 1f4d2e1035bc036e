"""Attention over chains × batch in one fused call: the outputs and gradients of the
per-chain calls, for every mask shape torch broadcasts, and nothing routed outside the
context."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from slt_probe.core.fused_attention import chains_join_the_batch

CHAINS, BATCH, HEADS, L, S, E = 3, 2, 4, 5, 6, 8


def _masks():
    g = torch.Generator().manual_seed(3)
    causal = torch.ones(L, S, dtype=torch.bool).tril()
    return {
        "none": (None, None),
        "bool (L, S)": (causal, None),
        "float (L, S)": (torch.randn(L, S, generator=g), None),
        "float (1, 1, L, S)": (torch.randn(1, 1, L, S, generator=g), None),
        "bool (batch, 1, L, S)": (torch.rand(BATCH, 1, L, S, generator=g) > 0.3, None),
        "float (heads, L, S)": (torch.randn(HEADS, L, S, generator=g), None),
        "per chain (chains, L, S)": (torch.randn(CHAINS, L, S, generator=g), 0),
        "per chain (batch, chains, heads, L, S)": (
            torch.randn(BATCH, CHAINS, HEADS, L, S, generator=g), 1),
    }


def _inputs(kv_heads=HEADS):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(CHAINS, BATCH, HEADS, L, E, generator=g, requires_grad=True)
    k = torch.randn(CHAINS, BATCH, kv_heads, S, E, generator=g, requires_grad=True)
    v = torch.randn(CHAINS, BATCH, kv_heads, S, E, generator=g, requires_grad=True)
    return q, k, v


def _per_chain(q, k, v, mask, mask_dim, **options):
    outs = []
    for c in range(CHAINS):
        m = mask if mask_dim is None else mask.select(mask_dim, c)
        m = m if m is None or m.dtype == torch.bool else m.detach()
        outs.append(F.scaled_dot_product_attention(q[c], k[c], v[c], attn_mask=m, **options))
    return torch.stack(outs)


@pytest.mark.parametrize("case", list(_masks()))
def test_the_merged_call_gives_each_chains_output_and_gradient(case):
    mask, mask_dim = _masks()[case]
    q, k, v = _inputs()
    expected = _per_chain(q, k, v, mask, mask_dim)
    expected_grads = torch.autograd.grad((expected ** 2).sum(), (q, k, v))
    with chains_join_the_batch() as routed:
        out = vmap(lambda a, b, c, m: F.scaled_dot_product_attention(a, b, c, attn_mask=m),
                   in_dims=(0, 0, 0, mask_dim))(q, k, v, mask)
    assert routed.count == 1
    grads = torch.autograd.grad((out ** 2).sum(), (q, k, v))
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_causal_grouped_query_and_unbatched_keys():
    q, k, v = _inputs(kv_heads=2)
    expected = _per_chain(q, k, v, None, None, is_causal=True, enable_gqa=True)
    with chains_join_the_batch() as routed:
        out = vmap(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True,
                                                                  enable_gqa=True))(q, k, v)
        # keys and values shared by every chain (not batched)
        shared = vmap(lambda a: F.scaled_dot_product_attention(a, k[0], v[0],
                                                                   enable_gqa=True))(q)
    assert routed.count == 2
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(shared, torch.stack([
        F.scaled_dot_product_attention(q[c], k[0], v[0], enable_gqa=True)
        for c in range(CHAINS)]))
    (gq,) = torch.autograd.grad(shared.sum(), (q,))
    (want,) = torch.autograd.grad(torch.stack([F.scaled_dot_product_attention(
        q[c], k[0], v[0], enable_gqa=True) for c in range(CHAINS)]).sum(), (q,))
    torch.testing.assert_close(gq, want)


def test_routing_ends_with_the_context_and_dropout_keeps_torchs_call():
    original = F.scaled_dot_product_attention
    q, k, v = _inputs()
    with chains_join_the_batch() as routed:
        assert F.scaled_dot_product_attention is not original
        # unbatched calls pass through the kernel and its gradient too
        out = F.scaled_dot_product_attention(q[0], k[0], v[0])
        (grad,) = torch.autograd.grad(out.sum(), (q,))
        torch.manual_seed(0)
        F.scaled_dot_product_attention(q[0], k[0], v[0], dropout_p=0.5)
    assert routed.count == 1 and F.scaled_dot_product_attention is original
    (want,) = torch.autograd.grad(original(q[0], k[0], v[0]).sum(), (q,))
    torch.testing.assert_close(grad, want)
    with pytest.raises(ZeroDivisionError), chains_join_the_batch():
        raise ZeroDivisionError
    assert F.scaled_dot_product_attention is original
