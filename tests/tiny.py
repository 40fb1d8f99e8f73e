"""Tiny random-initialised mlx-lm model directories for fast tests (configs in fixtures/models/).

Weights come from a fixed seed; the tokenizer is a byte-level tokenizer (256 byte tokens after
4 specials), so any text encodes and the vocabulary fits the tiny configs.
"""
from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from agp import io

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def byte_tokenizer(dest: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json for a byte-level tokenizer with <bos> prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", 2)])
    tok.save(str(dest / "tokenizer.json"))
    io.write_json(dest / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "unk_token": "<unk>", "pad_token": "<pad>"})


def make_tiny_model(arch: str, dest: str | Path, seed: int = 0) -> Path:
    """Create a random tiny model directory of architecture `arch` at `dest`."""
    from mlx_lm.utils import _get_classes

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((FIXTURES / f"{arch}.json").read_text())
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    weights = {k: v for k, v in tree_flatten(model.parameters()) if not k.startswith("lm_head")}
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    io.write_json(dest / "config.json", config)
    byte_tokenizer(dest)
    return dest
