"""Codec distortion / size / speed table on synthetic vectors and real hidden states (`agp bench codecs`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agp import argtypes
from agp.bench.timer import best_of
from agp.config import ConfigMixin
from agp.errors import AGPError
from agp.io import write_json
from agp.quant.codec import Codec, read_header
from agp.quant.registry import make_codec
from agp.quant.turboquant import mse_bound

CODECS = ("fp16", "q8_0", "tq8", "tq4", "tq4-dense", "tq4-qjl", "tq4-c", "tq3", "tq3-qjl", "tq2", "tq2-qjl", "tq2-c")


@dataclass
class BenchCodecsArgs(ConfigMixin):
    source: str = "all"              # real | synthetic | all
    dims: tuple = (640, 1536, 2048)  # synthetic vector lengths
    n: int = 1024                    # synthetic vectors per dim
    layers: tuple = (6, 12)          # layer boundaries whose hidden states are measured
    per_source: int = 8              # prompts per prompt-pack source (code, docs, chat)
    max_tokens: int = 96
    codecs: tuple = CODECS
    repeats: int = 3                 # timing: best of this many
    seed: int = 0
    out: str | None = None           # optional JSON of every row
    plot: str | None = None          # optional rate-distortion PNG
    extra: dict = field(default_factory=dict)


def one_packet_bytes(codec: Codec, x1: np.ndarray) -> int:
    """Size of a full AGP-PTP packet (all five sections) carrying one state `x1` [1, d]."""
    from agp.ptp.packet import encode_packet
    from agp.ptp.sections import Identity, Packet, Payload, Semantic, Trajectory, Vitality
    idn = Identity("00" * 32, "11" * 32, "q4_k_m", 1, 0, 1, 12, 1, "host-a", "host-b")
    pkt = Packet(idn, Payload(codec.encode(x1), hint=(0.99, 1.0)), Trajectory(), Vitality(),
                 Semantic([(2, 0.7), (5, 0.4)], [(1, 0.9)], [(7, 0.8)], 0.1))
    return len(encode_packet(pkt))


def measure(x: np.ndarray, name: str, seed: int = 0, repeats: int = 3) -> dict:
    """Distortion, size and time of one codec on rows x [N, d]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    codec = make_codec(name, d, seed, center=x[::2].mean(axis=0))  # -c: mean of half the rows, shared out of band
    codec.encode(x[:2])  # warm caches (codebook, rotation, QJL matrix) outside the timings
    t_enc, blob = best_of(lambda: codec.encode(x), repeats)
    t_dec, xh = best_of(lambda: np.asarray(codec.decode(blob), dtype=np.float32), repeats)
    t_enc1, blob1 = best_of(lambda: codec.encode(x[:1]), max(repeats, 20))
    t_dec1, _ = best_of(lambda: codec.decode(blob1), max(repeats, 20))
    nx = np.linalg.norm(x, axis=1)
    sq = np.sum((x - xh) ** 2, axis=1)
    rel_mse = float(np.mean(sq / nx**2))
    # Gemma's residual stream has one massive channel shared by every token: error relative to the
    # token-specific part (x minus the set mean) shows what the relative MSE hides
    dev = np.sum((x - x.mean(axis=0)) ** 2, axis=1)
    cos = np.sum(x * xh, axis=1) / (nx * np.linalg.norm(xh, axis=1) + 1e-30)
    # inner products with queries correlated with x (cos(q, x) ~ 0.7, like a retrieval hit): the MSE
    # quantizer's multiplicative shrink shows up as a negative relative bias, QJL removes it
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(x.shape).astype(np.float32)
    q = x / nx[:, None] + g / np.linalg.norm(g, axis=1, keepdims=True)
    true = np.sum(q * x, axis=1)
    diff = np.sum(q * xh, axis=1) - true
    err = diff / (nx * np.linalg.norm(q, axis=1))
    row = {"codec": name, "dim": d, "n": n, "bytes_per_vec": (len(blob) - _hdr(blob)) / n,
           "blob_one_vec": len(blob1), "packet_one_vec": one_packet_bytes(codec, x[:1]),
           "rel_mse": rel_mse, "centered_mse": float(np.mean(sq) / np.mean(dev)), "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
           "ip_bias": float(diff.mean() / true.mean()), "ip_std": float(err.std()),
           "enc_us_per_vec": t_enc / n * 1e6, "dec_us_per_vec": t_dec / n * 1e6,
           "enc_us_one": t_enc1 * 1e6, "dec_us_one": t_dec1 * 1e6}
    if name.startswith("tq"):
        row["paper_bound"] = mse_bound(int(name[2]))[1]
    return row


def _hdr(blob: bytes) -> int:
    return read_header(blob)[3]


def synthetic(d: int, n: int, seed: int) -> np.ndarray:
    """Gaussian rows with a few heavy outlier channels (the shape of residual-stream states)."""
    rng = np.random.default_rng([seed, d])
    x = rng.standard_normal((n, d)).astype(np.float32)
    ch = rng.choice(d, 4, replace=False)
    x[:, ch] *= 20
    return x


def real_hidden_states(args: BenchCodecsArgs) -> dict[int, np.ndarray]:
    """Hidden states [T_total, 640] of the embedded Gemma 3 270M on the prompt pack, per layer boundary."""
    import mlx.core as mx
    from tqdm import tqdm

    from agp.backbone import load
    from agp.data.prompt_pack import PromptPackArgs, build_prompt_pack

    bb = load()
    prompts = build_prompt_pack(PromptPackArgs(per_source=args.per_source, seed=args.seed))
    out: dict[int, list] = {layer: [] for layer in args.layers}
    for rec in tqdm(prompts, desc="hidden states", unit="prompt", leave=False):
        toks = mx.array([bb.encode(rec["text"])[: args.max_tokens]])  # first max_tokens tokens
        _, _, _, states = bb.states(toks, args.layers)
        mx.eval(states)
        for layer in args.layers:
            out[layer].append(np.array(states[layer][0, 1:].astype(mx.float32)))  # skip BOS: its state is an outlier
    return {layer: np.concatenate(v) for layer, v in out.items()}


COLUMNS = [("codec", "{:10s}", "codec"), ("bytes/vec", "{:>9.1f}", "bytes_per_vec"),
           ("pkt B(1)", "{:>8d}", "packet_one_vec"), ("rel MSE", "{:>9.2e}", "rel_mse"),
           ("bound", "{:>8s}", "bound_str"), ("MSE/dev", "{:>8.2e}", "centered_mse"), ("cos mean", "{:>9.5f}", "cos_mean"), ("cos min", "{:>8.4f}", "cos_min"),
           ("IP bias", "{:>9.1e}", "ip_bias"), ("IP std", "{:>8.1e}", "ip_std"),
           ("enc µs/v", "{:>8.2f}", "enc_us_per_vec"), ("dec µs/v", "{:>8.2f}", "dec_us_per_vec"),
           ("enc µs(1)", "{:>9.1f}", "enc_us_one"), ("dec µs(1)", "{:>9.1f}", "dec_us_one")]


def format_table(title: str, rows: list[dict]) -> str:
    head = " ".join(h.rjust(w) for h, w in zip([c[0] for c in COLUMNS], (10, 9, 8, 9, 8, 8, 9, 8, 9, 8, 8, 8, 9, 9)))
    lines = [title, head]
    for r in rows:
        r = dict(r, bound_str=f"{r['paper_bound']:.2e}" if "paper_bound" in r else "-")
        lines.append(" ".join(f.format(r[k]) for _, f, k in COLUMNS))
    return "\n".join(lines)


def run_bench(args: BenchCodecsArgs) -> list[dict]:
    """Every (source, codec) row; prints each table as it completes."""
    if args.source not in ("real", "synthetic", "all"):
        raise AGPError(f"--source must be real, synthetic or all, got {args.source!r}")
    for c in args.codecs:
        make_codec(c, 640)  # fail fast on a bad name
    sets: list[tuple[str, np.ndarray]] = []
    if args.source in ("real", "all"):
        for layer, h in real_hidden_states(args).items():
            sets.append((f"Gemma 3 270M hidden states after layer {layer} ({len(h)} tokens, d=640)", h))
    if args.source in ("synthetic", "all"):
        for d in args.dims:
            sets.append((f"synthetic Gaussian + outlier channels (n={args.n}, d={d})", synthetic(int(d), args.n, args.seed)))
    rows = []
    for title, x in sets:
        table = [measure(x, c, args.seed, args.repeats) | {"source": title} for c in args.codecs]
        print(format_table(title, table), flush=True)
        print()
        rows += table
    if args.out:
        write_json(args.out, {"args": args.to_dict(), "rows": rows})
    if args.plot:
        rate_distortion_plot(rows, args.plot)
    return rows


def rate_distortion_plot(rows: list[dict], path) -> None:
    """Packet bytes for one state vs error on the token-specific part (MSE/dev), per vector set of the first width."""
    import matplotlib.pyplot as plt

    from agp.report.plots import save

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    dim0 = rows[0]["dim"]  # one width per plot (packet sizes of different widths do not compare)
    sources = [s for s in dict.fromkeys(r["source"] for r in rows) if all(r["dim"] == dim0 for r in rows if r["source"] == s)]
    for src, color in zip(sources, ("tab:red", "tab:blue", "tab:green", "tab:purple")):
        pts = [r for r in rows if r["source"] == src]
        for r in pts:
            marker = "s" if r["codec"].endswith("-c") else "^" if "qjl" in r["codec"] else "o"
            ax.scatter(r["packet_one_vec"], max(r["centered_mse"], 1e-9), color=color, marker=marker, s=28)
            ax.annotate(r["codec"], (r["packet_one_vec"], max(r["centered_mse"], 1e-9)), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
        ax.plot([], [], "o", color=color, label=src.split(" (")[0])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"AGP-PTP packet bytes for one {dim0}-d state (all sections)")
    ax.set_ylabel("MSE / token-specific variance")
    ax.set_title("Rate vs distortion (o plain, ^ QJL, ■ centered on a shared mean)", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, path)


def add_arguments(p) -> None:
    p.description = ("Measure every codec (fp16, q8_0, TurboQuant 2/3/4/8 bits, with the QJL residual and the dense "
                     "reference rotation) on real Gemma hidden states and synthetic vectors: relative MSE (with the "
                     "TurboQuant paper's upper bound sqrt(3)*pi/2*4^-b), cosine, inner-product relative bias "
                     "(mean error / mean <q,x>, queries with cos(q,x)~0.7) and error std (normalised by |q||x|), payload bytes per vector, full AGP-PTP packet bytes for one state, encode/decode time.")
    p.add_argument("--source", default="all", choices=["real", "synthetic", "all"], help="which vectors to measure")
    p.add_argument("--dims", type=argtypes.int_list_text(2, 1 << 16), default="640,1536,2048", help="synthetic vector lengths (comma separated)")
    p.add_argument("--n", type=argtypes.positive_int(), default=BenchCodecsArgs.n, help="synthetic vectors per dim")
    p.add_argument("--layers", type=argtypes.int_list_text(0), default="6,12", help="layer boundaries of the real hidden states")
    p.add_argument("--per-source", type=argtypes.positive_int(), default=BenchCodecsArgs.per_source, help="prompts per prompt-pack source")
    p.add_argument("--max-tokens", type=argtypes.positive_int(), default=BenchCodecsArgs.max_tokens, help="tokens per prompt")
    p.add_argument("--codecs", default=",".join(CODECS), help="codecs to compare")
    p.add_argument("--repeats", type=argtypes.positive_int(), default=3, help="timing repeats (best is reported)")
    p.add_argument("--out", default=None, help="also write every row to this JSON file")
    p.add_argument("--plot", default=None, help="also draw packet bytes vs distortion (PNG) for the sets of the first width")


def _ints(s: str) -> tuple:
    try:
        return tuple(int(v) for v in str(s).split(",") if v.strip())
    except ValueError:
        raise AGPError(f"expected comma-separated integers, got {s!r}") from None


def main(args) -> int:
    run_bench(BenchCodecsArgs(source=args.source, dims=_ints(args.dims), n=args.n, layers=_ints(args.layers),
                              per_source=args.per_source, max_tokens=args.max_tokens,
                              codecs=tuple(c.strip() for c in args.codecs.split(",") if c.strip()),
                              repeats=args.repeats, out=args.out, plot=args.plot))
    return 0
