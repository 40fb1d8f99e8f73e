"""Multiply-accumulate counts per token: what early exit can and cannot save."""
from __future__ import annotations

import mlx.nn as nn


def linear_macs(module: nn.Module) -> int:
    """Sum of in x out over every Linear inside `module` (LoRA factors included)."""
    total = 0
    for _, m in module.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            out_dim, packed = m.weight.shape
            total += out_dim * packed * 32 // m.bits
        elif isinstance(m, nn.Linear):
            total += int(m.weight.shape[0] * m.weight.shape[1])
        for name in ("lora_a", "lora_b"):
            w = getattr(m, name, None) if not isinstance(m, (nn.Linear,)) else None
            if w is not None and hasattr(w, "shape"):
                total += int(w.shape[0] * w.shape[1])
    return total


def layer_macs(model, context: int = 0) -> list[int]:
    """Per-layer MACs per token: projections plus QK^T and AV over `context` past tokens."""
    out = []
    for layer in model.model.layers:
        att = layer.self_attn
        heads = getattr(att, "n_heads", 0)
        head_dim = getattr(att, "head_dim", 0)
        window = getattr(att, "is_sliding", False) and getattr(model.args, "sliding_window", None)
        span = min(context, window) if window else context
        out.append(linear_macs(layer) + 2 * heads * head_dim * span)
    return out


def summary(bb, context: int = 0) -> dict:
    """MACs per token for embed, each layer and the head, with the head's share."""
    layers = layer_macs(bb.model, context)
    head = bb.head_macs()
    total = sum(layers) + head
    return {"embed": 0, "layers": layers, "head": head, "total": total, "context": context,
            "head_share": head / total, "layers_share": sum(layers) / total}
