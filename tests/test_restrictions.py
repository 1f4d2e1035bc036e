"""Head and layer restrictions: the exact index sets of every head in every attention
implementation known, a partition of the fused matrices, and an estimate restricted to
one head samples exactly its weights."""
import pytest
import torch
from torch import nn

from slt_probe import SGLD, estimate_llc
from slt_probe.experiments.models import ModAddTransformer
from slt_probe.restrictions import attention_heads, layers, preview


def _indices(mask, dim):
    """The rows (dim 0) or columns (dim 1) a mask selects whole, as a sorted list."""
    full = mask.all(dim=1 - dim)
    assert torch.equal(mask.any(dim=1 - dim), full), "a partly selected row or column"
    return torch.nonzero(full).flatten().tolist()


def _fused(h, head_dim, d):
    return [part * d + h * head_dim + j for part in range(3) for j in range(head_dim)]


def test_bundled_transformer_heads_are_qkv_rows_and_output_columns():
    model = ModAddTransformer(p=7, d_model=8, num_heads=2, d_mlp=16)
    heads = attention_heads(model)
    assert sorted(heads) == ["head0", "head1"]
    for h in range(2):
        masks = heads[f"head{h}"]
        assert set(masks) == {"qkv.weight", "attn_out.weight"}
        assert _indices(masks["qkv.weight"], 0) == _fused(h, 4, 8)
        assert _indices(masks["attn_out.weight"], 1) == list(range(4 * h, 4 * h + 4))
    # the heads partition the fused matrix
    total = sum(heads[f"head{h}"]["qkv.weight"].int() for h in range(2))
    assert torch.equal(total, torch.ones_like(total))


def test_multihead_attention_fused_and_separate_projections():
    heads = attention_heads(nn.MultiheadAttention(8, 2, bias=True))
    for h in range(2):
        masks = heads[f"head{h}"]
        assert _indices(masks["in_proj_weight"], 0) == _fused(h, 4, 8)
        assert torch.nonzero(masks["in_proj_bias"]).flatten().tolist() == _fused(h, 4, 8)
        assert _indices(masks["out_proj.weight"], 1) == list(range(4 * h, 4 * h + 4))
        assert "out_proj.bias" not in masks  # shared by every head
    separate = attention_heads(nn.MultiheadAttention(8, 2, kdim=6, vdim=5))["head1"]
    for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        assert _indices(separate[name], 0) == [4, 5, 6, 7]


def test_heads_inside_torch_transformer_layers_are_named_by_module():
    net = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16,
                                                           batch_first=True), num_layers=2)
    heads = attention_heads(net)
    assert sorted(heads) == [f"layers.{i}.self_attn.head{h}" for i in range(2) for h in range(2)]
    assert "layers.1.self_attn.in_proj_weight" in heads["layers.1.self_attn.head0"]


def test_gpt2_heads_are_conv1d_columns_and_projection_rows():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=11,
                                     n_positions=8)
    heads = attention_heads(transformers.GPT2LMHeadModel(config))
    assert len(heads) == 4
    masks = heads["transformer.h.1.attn.head1"]
    assert _indices(masks["transformer.h.1.attn.c_attn.weight"], 1) == _fused(1, 4, 8)
    assert torch.nonzero(masks["transformer.h.1.attn.c_attn.bias"]).flatten().tolist() == \
        _fused(1, 4, 8)
    assert _indices(masks["transformer.h.1.attn.c_proj.weight"], 0) == [4, 5, 6, 7]


def test_llama_heads_share_their_key_value_head_under_grouped_query_attention():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=11)
    heads = attention_heads(transformers.LlamaForCausalLM(config))
    prefix = "model.layers.0.self_attn."
    for h in range(4):
        masks = heads[f"{prefix}head{h}"]
        assert _indices(masks[prefix + "q_proj.weight"], 0) == [2 * h, 2 * h + 1]
        kv = h // 2
        for name in ("k_proj.weight", "v_proj.weight"):
            assert _indices(masks[prefix + name], 0) == [2 * kv, 2 * kv + 1]
        assert _indices(masks[prefix + "o_proj.weight"], 1) == [2 * h, 2 * h + 1]


def test_layers_and_preview():
    model = ModAddTransformer(p=7, d_model=8, num_heads=2, d_mlp=16)
    groups = layers(model)
    assert set(groups) == {"embed", "qkv", "attn_out", "mlp_in", "mlp_out", "unembed",
                           "pos_embed"}
    assert groups["mlp_in"] == ["mlp_in.weight", "mlp_in.bias"]
    net = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16),
                                num_layers=2)
    assert list(layers(net)) == ["layers.0", "layers.1"]
    rows = preview(model, attention_heads(model)["head0"])
    by_name = {r["name"]: r for r in rows}
    assert by_name["qkv.weight"]["sampled"] == 3 * 4 * 8
    assert by_name["attn_out.weight"]["sampled"] == 8 * 4
    assert by_name["total"]["sampled"] == 3 * 4 * 8 + 8 * 4
    with pytest.raises(ValueError, match="unknown parameter"):
        preview(model, ["nope"])
    with pytest.raises(ValueError, match="no attention module"):
        attention_heads(nn.Linear(2, 2))


def test_an_estimate_restricted_to_a_head_moves_only_that_heads_weights():
    torch.manual_seed(0)
    model = ModAddTransformer(p=7, d_model=8, num_heads=2, d_mlp=16)
    x = torch.randint(0, 7, (64, 2))
    y = (x[:, 0] + x[:, 1]) % 7
    head = attention_heads(model)["head1"]
    result = estimate_llc(model, (x, y), sampler=SGLD(lr=1e-4, localization=100.0),
                          num_chains=2, num_draws=20, restrict_to=head, verbose=False)
    assert result.config["num_sampled_params"] == preview(model, head)[-1]["sampled"]
    assert result.config["restrict_to"] == {"attn_out.weight": 32, "qkv.weight": 96}
