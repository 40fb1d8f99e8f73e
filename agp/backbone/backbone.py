"""`Backbone`: an mlx-lm model plus the segmented-forward primitive every stage uses."""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from agp.backbone import segments
from agp.errors import AGPError


@dataclass
class BackboneArgs:
    model: str | None = None      # mlx-lm directory or hub id; None = embedded Gemma 3 270M
    adapter: str | None = None    # mlx-lm adapter directory (adapter_config.json + adapters.safetensors)


class Backbone:
    """A loaded model with the segmented forward (start / states / head / capture) and MAC counts."""

    def __init__(self, model, tokenizer, path: Path, adapter: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.path = Path(path)
        self.adapter = adapter
        self.arch = model.model_type
        segments.require_supported(self.arch, f"model at {path}")
        args = model.args
        self.n_layers = len(model.model.layers)
        self.hidden_size = args.hidden_size
        self.vocab_size = args.vocab_size
        self.config = json.loads((self.path / "config.json").read_text())

    # --- identity -------------------------------------------------------------------------
    @functools.cached_property
    def fingerprint(self) -> str:
        """Weights fingerprint: sha256 over config, file sizes and head/tail bytes of each weight file."""
        return weights_fingerprint(self.path, self.adapter)

    @functools.cached_property
    def tokenizer_fingerprint(self) -> str:
        """sha256 of tokenizer.json (or of the tokenizer files present)."""
        h = hashlib.sha256()
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
            p = self.path / name
            if p.exists():
                h.update(name.encode() + p.read_bytes())
        return h.hexdigest()

    # --- text -----------------------------------------------------------------------------
    @functools.cached_property
    def bos_id(self) -> int | None:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return self.config.get("bos_token_id", bos) if bos is None else bos

    def encode(self, text: str, max_tokens: int | None = None, truncate: bool = False) -> list[int]:
        """Token ids with BOS first (Gemma degrades without it). Over `max_tokens` (default: the
        model's context) it is an error, or with `truncate=True` the first `max_tokens` ids."""
        if not isinstance(text, str):
            raise AGPError(f"prompt must be text, got {type(text).__name__}")
        if not text.strip():
            raise AGPError("empty prompt; give at least one non-space character")
        ids = self.tokenizer.encode(text)
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        limit = max_tokens or self.config.get("max_position_embeddings", 32768)
        if len(ids) > limit and truncate:
            return ids[:limit]
        if len(ids) > limit:
            raise AGPError(f"prompt is {len(ids)} tokens, over the limit of {limit}; shorten it or raise --max-tokens")
        return ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    # --- segmented forward ----------------------------------------------------------------
    def make_cache(self):
        return self.model.make_cache()

    def start(self, tokens: mx.array, cache=None) -> segments.Pass:
        """Begin a forward step: embeds tokens and fixes masks; run segments with `.run`."""
        return segments.Pass(self.model, _as_batch(tokens), cache)

    def states(self, tokens: mx.array, layers, cache=None, what: str = "capture"):
        """The segmented pass up to the deepest of `layers` and no further: (pass, its last hidden
        state, the layer that state follows, {l: hidden after the first l layers} for l in `layers`).
        Continue the same step with `pass.run(h, at, b)`."""
        want = sorted(set(int(x) for x in layers))
        if want and (want[0] < 0 or want[-1] > self.n_layers):
            raise AGPError(f"{what} layers must be within 0..{self.n_layers}, got {want}")
        p = self.start(tokens, cache)
        h, at, got = p.h0, 0, {}
        if 0 in want:
            got[0] = h
        for stop in [x for x in want if x > 0]:
            h = p.run(h, at, stop)
            at = stop
            got[stop] = h
        return p, h, at, got

    def run_layers(self, h: mx.array, a: int, b: int, cache=None, ctx: segments.Pass | None = None) -> mx.array:
        """Layers [a, b) on `h` (the runtime's drafts, verifications and catch-ups). Pass `ctx` (from
        `start`) when segments of one step share it; without it, masks are derived from `h` and the
        cache (Gemma 3 only)."""
        if ctx is None:
            if self.arch != "gemma3_text":
                raise AGPError(f"{self.arch} needs the step context: use bb.start(tokens, cache).run(h, a, b)")
            ctx = _mask_only_pass(self.model, h, cache)
        return ctx.run(h, a, b)

    def fill_kv(self, h: mx.array, a: int, b: int, cache) -> None:
        """Fill layers [a, b)'s KV from the exited state `h` (CALM state propagation; Gemma 3)."""
        segments.fill_kv(self.model, h, a, b, cache)

    def head(self, h: mx.array) -> mx.array:
        """Final norm + LM head."""
        return segments.head(self.model, h)

    def forward(self, tokens: mx.array, cache=None) -> mx.array:
        """Full forward through the segmented path (equals `model(tokens, cache)`)."""
        p = self.start(tokens, cache)
        return self.head(p.run(p.h0, 0, self.n_layers))

    def capture(self, tokens: mx.array, layers, cache=None):
        """One pass; returns (logits, {l: hidden after the first l layers}) for l in `layers`."""
        p, h, at, got = self.states(tokens, layers, cache)
        return self.head(p.run(h, at, self.n_layers)), got

    # --- cost -----------------------------------------------------------------------------
    def layer_macs(self, context: int = 0) -> list[int]:
        """Multiply-accumulates per token for each layer (weights, plus attention over `context`)."""
        from agp.backbone.macs import layer_macs
        return layer_macs(self.model, context)

    def head_macs(self) -> int:
        """MACs per token of the LM head (vocab x hidden)."""
        return self.vocab_size * self.hidden_size


def _as_batch(tokens) -> mx.array:
    t = tokens if isinstance(tokens, mx.array) else mx.array(tokens)
    return t[None] if t.ndim == 1 else t


def _mask_only_pass(model, h, cache) -> segments.Pass:
    """A step context for layers run outside `start` (Gemma 3): the masks mlx-lm would build."""
    from mlx_lm.models.base import create_attention_mask

    ctx = segments.Pass.__new__(segments.Pass)
    inner = model.model
    n = len(inner.layers)
    ctx.model, ctx.arch, ctx.per_layer = model, model.model_type, [None] * n
    ctx.cache = list(cache) if cache is not None else [None] * n
    pattern = inner.sliding_window_pattern
    # each layer's own cache still holds the offset before this step, so masks match mlx-lm's
    ctx.masks = [create_attention_mask(h, ctx.cache[i],
                                       window_size=None if i % pattern == pattern - 1 else inner.window_size)
                 for i in range(n)]
    return ctx


def weights_fingerprint(path: Path, adapter: str | None = None) -> str:
    """Cheap, stable identity of a model directory (and adapter)."""
    h = hashlib.sha256()
    files = [Path(path) / "config.json"] + sorted(Path(path).glob("*.safetensors"))
    if adapter:
        files += sorted(Path(adapter).glob("*.safetensors")) + [Path(adapter) / "adapter_config.json"]
    for f in files:
        if not f.exists():
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(4 << 20))
            if size > 8 << 20:
                fh.seek(-(4 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()


@functools.lru_cache(maxsize=4)
def load(model: str | None = None, adapter: str | None = None) -> Backbone:
    """Load a backbone: None = the embedded Gemma 3 270M (converted once into the cache)."""
    import mlx_lm
    from mlx_lm.utils import load_config

    if model is None:
        from agp.backbone import embedded
        path = embedded.model_dir()
    else:
        path = Path(model).expanduser()
        if not path.exists():
            if Path(model).is_absolute() or model.startswith((".", "~")) or model.count("/") != 1:
                raise AGPError(f"model path {model} does not exist; give an mlx-lm model directory or a hub id "
                               f"like mlx-community/gemma-3-270m-it-bf16")
            try:
                from mlx_lm.utils import _download
                path = Path(_download(model))
            except Exception as e:  # noqa: BLE001 - hub errors vary by version
                raise AGPError(f"could not fetch model '{model}' from the hub ({type(e).__name__}); "
                               f"download it on a machine with network and pass its directory") from e
        if not (path / "config.json").exists():
            raise AGPError(f"{path} is not an mlx-lm model directory (no config.json); "
                           f"convert it with `mlx_lm.convert` or pass the embedded default")
        try:
            config = load_config(path)
        except (OSError, ValueError) as e:   # ValueError covers bad JSON and bad UTF-8
            raise AGPError(f"{path / 'config.json'} is not readable JSON ({type(e).__name__}); "
                           f"re-convert the model with `mlx_lm.convert`") from None
        segments.require_supported(config.get("model_type") if isinstance(config, dict) else None,
                                   f"model at {path}")
    if adapter is not None:
        from agp.backbone.adapters import check_base
        check_base(adapter, weights_fingerprint(path), path)
    try:
        m, tok = mlx_lm.load(str(path), adapter_path=adapter)
    except (OSError, ValueError, KeyError) as e:   # missing/partial weights, a config mlx-lm cannot build
        first = (str(e).splitlines() or [""])[0][:200]
        raise AGPError(f"mlx-lm could not load the model at {path} ({type(e).__name__}: {first}); "
                       f"check the directory holds a complete converted model") from None
    return Backbone(m, tok, path, adapter)
