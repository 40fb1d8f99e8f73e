"""Segmented forward per architecture: embed, run layers [a, b), head — reproducing mlx-lm.

A `Pass` holds what one forward step shares across segments: the attention masks (computed
once, before any layer updates its cache, exactly as mlx-lm does), Gemma 4's per-layer input
embeddings, and Gemma 4's shared K/V from earlier layers. Run segments in order within one
Pass; a new step (a new token) gets a new Pass.
"""
from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.base import create_attention_mask

from agp.errors import AGPError

SUPPORTED = ("gemma3_text", "gemma4_text")


def require_supported(arch: str | None, where: str = "the model") -> None:
    """The one architecture check: AGP's segmented forward exists for SUPPORTED only."""
    if arch not in SUPPORTED:
        raise AGPError(f"{where} has architecture '{arch}', which AGP does not support yet; "
                       f"supported: {', '.join(SUPPORTED)}")


class Pass:
    """One forward step over `tokens` [B, T] with an optional KV cache."""

    def __init__(self, model, tokens: mx.array, cache=None):
        self.model = model
        self.arch = model.model_type
        require_supported(self.arch)
        inner = model.model
        self.tokens = tokens
        n = len(inner.layers)
        self.cache = list(cache) + [None] * (n - len(cache)) if cache is not None else [None] * n
        if self.arch == "gemma3_text":
            self.h0 = embed(model, tokens)
            p = inner.sliding_window_pattern
            glob = create_attention_mask(self.h0, self.cache[p - 1])
            slide = create_attention_mask(self.h0, self.cache[0], window_size=inner.window_size) if p > 1 else None
            self.masks = [glob if i % p == p - 1 else slide for i in range(n)]
            self.per_layer = [None] * n
        else:
            emb = inner.embed_tokens(tokens)
            self.h0 = emb * inner.embed_scale
            if inner.hidden_size_per_layer_input:
                pli = inner._project_per_layer_inputs(self.h0, inner._get_per_layer_inputs(tokens, emb))
                self.per_layer = [pli[:, :, i, :] for i in range(n)]
            else:
                self.per_layer = [None] * n
            self.masks = inner._make_masks(self.h0, self.cache)
            self.intermediates = [(None, None)] * n

    def run(self, h: mx.array, a: int, b: int) -> mx.array:
        """Apply layers [a, b) to `h` (updating their caches)."""
        layers = self.model.model.layers
        if not 0 <= a <= b <= len(layers):
            raise AGPError(f"layer segment [{a}, {b}) is outside the model's 0..{len(layers)} layers")
        for i in range(a, b):
            if self.arch == "gemma3_text":
                h = layers[i](h, self.masks[i], self.cache[i])
            else:
                kvs, offset = self.intermediates[self.model.model.previous_kvs[i]]
                h, kvs, offset = layers[i](h, self.masks[i], self.cache[i], per_layer_input=self.per_layer[i],
                                           shared_kv=kvs, offset=offset)
                self.intermediates[i] = (kvs, offset)
        return h


def fill_kv(model, h: mx.array, a: int, b: int, cache) -> None:
    """CALM-style state propagation (Gemma 3): write into the caches of layers [a, b) the keys and
    values each layer would compute if its input were `h`, the state a token exited with, without
    running attention or the MLP. The K/V path is the layer's own (input norm, k/v projections,
    k-norm, RoPE at the cache's offset), so only the input is approximate."""
    if model.model_type != "gemma3_text":
        raise AGPError(f"state propagation supports gemma3_text only (this model is {model.model_type})")
    layers = model.model.layers
    if not 0 <= a <= b <= len(layers):
        raise AGPError(f"layer segment [{a}, {b}) is outside the model's 0..{len(layers)} layers")
    batch, length, _ = h.shape
    for i in range(a, b):
        att = layers[i].self_attn
        x = layers[i].input_layernorm(h)
        keys = att.k_proj(x).reshape(batch, length, att.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = att.v_proj(x).reshape(batch, length, att.n_kv_heads, -1).transpose(0, 2, 1, 3)
        keys = att.rope(att.k_norm(keys), offset=cache[i].offset)
        cache[i].update_and_fetch(keys, values)


def embed(model, tokens: mx.array) -> mx.array:
    """Gemma 3's scaled input embedding of `tokens` (the state before layer 0)."""
    inner = model.model
    emb = inner.embed_tokens(tokens)
    return emb * mx.array(inner.args.hidden_size ** 0.5, mx.bfloat16).astype(emb.dtype)


def head(model, h: mx.array) -> mx.array:
    """Final norm + LM head (tied or not, with Gemma 4's soft-capping) on hidden states."""
    out = model.model.norm(h)
    return project(model, out)


def project(model, normed: mx.array) -> mx.array:
    """LM-head projection of already-normalised states."""
    if getattr(model, "tie_word_embeddings", False) or "lm_head" not in model:
        out = model.model.embed_tokens.as_linear(normed)
    else:
        out = model.lm_head(normed)
    cap = getattr(model, "final_logit_softcapping", None)
    if cap is not None:
        out = mx.tanh(out / cap) * cap
    return out
