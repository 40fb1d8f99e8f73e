"""KV caches that roll back exactly, past the sliding window.

mlx-lm's Gemma 3 cache keeps sliding-window layers in a `RotatingKVCache` of `window` slots.
Once it wraps, a new token overwrites the oldest slot and `trim` cannot bring that slot back;
`trim_prompt_cache` then trims nothing at all (upstream mlx-lm #1914). A speculative round
that drafts k tokens and rejects some would leave their keys in the cache, or lose keys the
next token still needs. `WindowKVCache` keeps the last `window + slack` keys in a linear
buffer instead, so `trim(n)` for any n <= slack is exact, and it hands attention the same key
set (and, for multi-token steps, the same order) as `RotatingKVCache`.
"""
from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache, _BaseCache

from agp.errors import AGPError


class WindowKVCache(_BaseCache):
    """Sliding-window KV cache with exact `trim` of up to `slack` tokens."""

    step = 256

    def __init__(self, window: int, slack: int = 64):
        self.window, self.slack = int(window), int(slack)
        self.keys = self.values = None
        self.offset = 0      # tokens seen (RoPE position of the next token)
        self._start = 0      # buffer index of the oldest kept token
        self._end = 0        # buffer index one past the newest token

    def _ensure_room(self, keys, values, S: int) -> None:
        if self.keys is not None and self._end + S <= self.keys.shape[2]:
            return
        keep = min(self._end - self._start, self.window + self.slack)
        old_k = self.keys[..., self._end - keep:self._end, :] if self.keys is not None else None
        old_v = self.values[..., self._end - keep:self._end, :] if self.values is not None else None
        cap = ((keep + S + self.step - 1) // self.step + 1) * self.step
        B, H, _, Dk = keys.shape
        new_k = mx.zeros((B, H, cap, Dk), keys.dtype)
        new_v = mx.zeros((B, H, cap, values.shape[3]), values.dtype)
        if keep:
            new_k[..., :keep, :] = old_k
            new_v[..., :keep, :] = old_v
        self.keys, self.values, self._start, self._end = new_k, new_v, 0, keep

    def update_and_fetch(self, keys, values):
        S = keys.shape[2]
        self._ensure_room(keys, values, S)
        self.keys[..., self._end:self._end + S, :] = keys
        self.values[..., self._end:self._end + S, :] = values
        self._end += S
        self.offset += S
        # what RotatingKVCache attends to: the last `window` keys for one token, the last
        # window-1 old keys plus the S new ones for a multi-token step (masked per query)
        span = self.window if S == 1 else self.window - 1 + S
        lo = max(self._start, self._end - span)
        self._start = max(self._start, self._end - (self.window + self.slack))
        return self.keys[..., lo:self._end, :], self.values[..., lo:self._end, :]

    def make_mask(self, N: int, window_size=None, return_array: bool = False):
        if N == 1:
            return None
        window_size = window_size or self.window
        offset = min(self.window - 1, self.offset)
        if offset + N > window_size or return_array:
            return create_causal_mask(N, offset, window_size=window_size)
        return "causal"

    def size(self):
        return min(self.offset, self.window)

    @property
    def state(self):
        if self.keys is None:
            return []
        return self.keys, self.values

    def is_trimmable(self):
        return True

    def trim(self, n: int) -> int:
        """Drop the newest n tokens; exact while n <= slack (else an error, never a silent miss)."""
        n = min(self.offset, n)
        if self._end - n - self._start < min(self.offset - n, self.window - 1):
            raise AGPError(f"cannot roll back {n} tokens: this window cache keeps only {self.slack} "
                           f"beyond its window; raise the slack")
        self._end -= n
        self.offset -= n
        return n

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def make_rollback_cache(model, slack: int = 64) -> list:
    """The model's cache layout with every sliding-window layer as a `WindowKVCache`."""
    out = []
    for c in model.make_cache():
        if isinstance(c, RotatingKVCache):
            if c.keep:
                raise AGPError("rotating caches that keep leading tokens are not supported for rollback")
            out.append(WindowKVCache(c.max_size, slack))
        elif isinstance(c, KVCache):
            out.append(KVCache())
        else:
            raise AGPError(f"cache type {type(c).__name__} cannot roll back; speculative decoding needs "
                           f"KVCache or RotatingKVCache layers")
    return out


def rollback(cache: list, n: int, layers=None) -> None:
    """Remove the newest n tokens from the caches of `layers` (default all); exact or an error."""
    if n <= 0:
        return
    for i in (range(len(cache)) if layers is None else layers):
        got = cache[i].trim(n)
        if got != n:
            raise AGPError(f"layer {i} cache rolled back {got} of {n} tokens")
