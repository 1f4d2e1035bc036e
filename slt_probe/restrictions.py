"""Weight restrictions by name: the masks of every attention head and every layer, and a
preview of what a restriction samples.

A restriction is what ``restrict_to`` takes: a dict from parameter name to a boolean mask
of that parameter's shape. The weight-refined λ̂ of a head samples only that head's
weights (the rest stay at w*). Attention implementations fuse the heads into shared
matrices, so a head is a slice, found here for:

- a module with a fused ``qkv`` projection (query, key and value stacked by rows), an
  ``attn_out`` projection and ``num_heads``, as the bundled ``ModAddTransformer``: ``qkv``
  rows of the head and ``attn_out`` columns;
- ``torch.nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``,
  ``DecoderLayer`` and ``Transformer``): ``in_proj_weight``/``in_proj_bias`` rows, or the
  separate ``q/k/v_proj_weight`` when key and value dimensions differ, and ``out_proj``
  columns (its bias is shared by all heads and belongs to none);
- Hugging Face GPT-2 attention (``c_attn``/``c_proj``, ``Conv1D`` weights stored
  input × output): ``c_attn`` columns and bias entries, ``c_proj`` rows;
- Llama-style attention (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``): ``q_proj`` rows,
  the rows of the key/value head the query head reads (shared by a group of query heads
  under grouped-query attention, so those masks overlap) and ``o_proj`` columns.

Layers are groups of parameters by module prefix (``layers(model)``). Not here: sampling
(the restriction is a ``restrict_to`` like any other).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

Restriction = dict[str, Tensor]


def attention_heads(model: nn.Module) -> dict[str, Restriction]:
    """One restriction per attention head, keyed ``"<module>.head<h>"`` (the bundled
    transformer's module is its root: ``"head<h>"``).

    Raises:
        ValueError: the model has no attention module this function knows.

    Examples:
        >>> heads = attention_heads(nn.MultiheadAttention(8, 2))
        >>> sorted(heads), int(heads["head0"]["in_proj_weight"].sum())
        (['head0', 'head1'], 96)
    """
    heads: dict[str, Restriction] = {}
    for prefix, module in model.named_modules():
        found = _module_heads(module)
        if found is None:
            continue
        where = f"{prefix}." if prefix else ""
        for h, masks in enumerate(found):
            heads[f"{where}head{h}"] = {f"{where}{name}": mask for name, mask in masks.items()}
    if not heads:
        raise ValueError(f"no attention module found in {type(model).__name__}: attention_heads "
                         "knows the bundled transformer, nn.MultiheadAttention, and Hugging "
                         "Face GPT-2 and Llama-style attention")
    return heads


def layers(model: nn.Module, prefixes: list[str] | None = None) -> dict[str, list[str]]:
    """Parameter names grouped by layer: by ``prefixes`` when given (each a module name),
    else the model's repeated blocks (the children of its ``nn.ModuleList``s) and every
    other top-level child. Values are ``restrict_to`` lists of names.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> layers(net)
        {'0': ['0.weight', '0.bias'], '2': ['2.weight', '2.bias']}
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    explicit = prefixes is not None
    if prefixes is None:
        prefixes = []
        for prefix, module in model.named_modules():
            if isinstance(module, nn.ModuleList):
                prefixes += [f"{prefix}.{i}" if prefix else str(i) for i in range(len(module))]
        blocks = tuple(prefixes)
        for child, _ in model.named_children():
            if not any(b == child or b.startswith(child + ".") for b in blocks):
                prefixes.append(child)
        loose = [n for n in names if "." not in n]  # parameters of the root module itself
        prefixes += loose
    groups = {}
    for prefix in prefixes:
        members = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not members and not explicit:
            continue  # a layer without weights (an activation, a dropout)
        if not members:
            raise ValueError(f"layer {prefix!r} has no trainable parameters; parameters "
                             f"are {names}")
        groups[prefix] = members
    return groups


def preview(model: nn.Module, restriction) -> list[dict]:
    """Per parameter a restriction touches: its name, shape, and how many of its weights
    are sampled; a last row ``"total"`` with the count and the share of all weights.

    Examples:
        >>> rows = preview(nn.Linear(3, 2), ["weight"])
        >>> rows[0]["sampled"], rows[-1]["sampled"], round(rows[-1]["fraction"], 3)
        (6, 6, 0.75)
    """
    params = dict(model.named_parameters())
    if isinstance(restriction, Mapping):
        counts = {name: int(torch.as_tensor(mask).bool().sum()) for name, mask in restriction.items()}
    else:
        counts = {}
        for prefix in restriction:
            hits = [n for n in params if n == prefix or n.startswith(prefix + ".")]
            if not hits:
                raise ValueError(f"restriction names unknown parameter {prefix!r}")
            counts.update({n: params[n].numel() for n in hits})
    unknown = [n for n in counts if n not in params]
    if unknown:
        raise ValueError(f"restriction names unknown parameters {unknown}")
    rows = [{"name": n, "shape": tuple(params[n].shape), "sampled": c, "of": params[n].numel()}
            for n, c in counts.items()]
    total = sum(p.numel() for p in params.values())
    sampled = sum(counts.values())
    rows.append({"name": "total", "shape": None, "sampled": sampled, "of": total,
                 "fraction": sampled / total})
    return rows


def _rows(shape, index) -> Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[index] = True
    return mask


def _columns(shape, index) -> Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[:, index] = True
    return mask


def _module_heads(module: nn.Module) -> list[dict[str, Tensor]] | None:
    if all(hasattr(module, a) for a in ("qkv", "attn_out", "num_heads")):
        return _fused_heads(module.num_heads, module.qkv.weight.shape[1], "qkv.weight", None,
                            module.qkv.weight.shape, rows=True,
                            out=("attn_out.weight", module.attn_out.weight.shape, False))
    if isinstance(module, nn.MultiheadAttention):
        return _multihead_heads(module)
    if all(hasattr(module, a) for a in ("c_attn", "c_proj", "num_heads", "split_size")):
        d = module.split_size
        return _fused_heads(module.num_heads, d, "c_attn.weight",
                            "c_attn.bias" if getattr(module.c_attn, "bias", None) is not None
                            else None, module.c_attn.weight.shape, rows=False,
                            out=("c_proj.weight", module.c_proj.weight.shape, True))
    if all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return _llama_heads(module)
    return None


def _fused_heads(num_heads: int, d: int, weight: str, bias: str | None, shape,
                 *, rows: bool, out: tuple[str, tuple, bool]) -> list[dict[str, Tensor]]:
    """Heads of a fused query-key-value matrix whose 3d outputs are [q | k | v], each
    head-major, and an output projection whose d inputs are head-major."""
    head_dim = d // num_heads
    out_name, out_shape, out_rows = out
    heads = []
    for h in range(num_heads):
        index = torch.cat([torch.arange(part * d + h * head_dim, part * d + (h + 1) * head_dim)
                           for part in range(3)])
        inputs = torch.arange(h * head_dim, (h + 1) * head_dim)
        masks = {weight: _rows(shape, index) if rows else _columns(shape, index),
                 out_name: _rows(out_shape, inputs) if out_rows else _columns(out_shape, inputs)}
        if bias is not None:
            masks[bias] = _rows((3 * d,), index)
        heads.append(masks)
    return heads


def _multihead_heads(module: nn.MultiheadAttention) -> list[dict[str, Tensor]]:
    d, num_heads = module.embed_dim, module.num_heads
    head_dim = d // num_heads
    heads = []
    for h in range(num_heads):
        inputs = torch.arange(h * head_dim, (h + 1) * head_dim)
        masks = {"out_proj.weight": _columns(module.out_proj.weight.shape, inputs)}
        if module.in_proj_weight is not None:
            index = torch.cat([inputs + part * d for part in range(3)])
            masks["in_proj_weight"] = _rows(module.in_proj_weight.shape, index)
        else:
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                masks[name] = _rows(getattr(module, name).shape, inputs)
        if module.in_proj_bias is not None:
            masks["in_proj_bias"] = _rows(module.in_proj_bias.shape,
                                          torch.cat([inputs + part * d for part in range(3)]))
        heads.append(masks)
    return heads


def _llama_heads(module: nn.Module) -> list[dict[str, Tensor]]:
    config = getattr(module, "config", None)
    num_heads = getattr(config, "num_attention_heads", None) or module.num_heads
    num_kv = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(module, "head_dim", None) or module.q_proj.weight.shape[0] // num_heads
    group = num_heads // num_kv
    heads = []
    for h in range(num_heads):
        query = torch.arange(h * head_dim, (h + 1) * head_dim)
        shared = torch.arange((h // group) * head_dim, (h // group + 1) * head_dim)
        masks = {"q_proj.weight": _rows(module.q_proj.weight.shape, query),
                 "k_proj.weight": _rows(module.k_proj.weight.shape, shared),
                 "v_proj.weight": _rows(module.v_proj.weight.shape, shared),
                 "o_proj.weight": _columns(module.o_proj.weight.shape, query)}
        for name, index in (("q_proj", query), ("k_proj", shared), ("v_proj", shared)):
            if getattr(getattr(module, name), "bias", None) is not None:
                masks[f"{name}.bias"] = _rows(getattr(module, name).bias.shape, index)
        heads.append(masks)
    return heads
