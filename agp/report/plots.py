"""Plots for run reports (matplotlib, Agg backend, written atomically)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from agp import io  # noqa: E402


def save(fig, path) -> None:
    """Save a figure atomically as PNG and close it."""
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def sufficiency_plot(layers, kl, agree, margin, candidates, path) -> None:
    """Per-layer KL(final || lens) and top-1 agreement, candidate split layers marked."""
    fig, ax1 = plt.subplots(figsize=(7, 3.6))
    ax1.plot(layers, kl, "o-", color="tab:red", label="mean KL (nats)")
    ax1.set_xlabel("layer (hidden state after l blocks)")
    ax1.set_ylabel("KL(final ‖ logit lens)", color="tab:red")
    ax1.set_yscale("symlog", linthresh=0.1)
    ax2 = ax1.twinx()
    ax2.plot(layers, agree, "s-", color="tab:blue", label="top-1 agreement")
    ax2.plot(layers, margin, "^--", color="tab:green", alpha=0.6, label="lens margin")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("agreement / margin")
    for c in candidates:
        ax1.axvline(c, color="grey", ls=":", lw=1)
    fig.legend(loc="upper center", ncol=3, fontsize=8)
    ax1.set_title("Per-layer sufficiency (dotted: candidate split layers)", fontsize=9, pad=18)
    save(fig, path)


# --- stage 1: domain adapter ---------------------------------------------------------------------
def adapter_plots(m: dict, out) -> str:
    """Training loss, and per-layer lens KL / top-1 agreement on held-out rows before vs after
    the adapter; returns the PNG's file name (written into `out`)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    hist = m["train"]["history"]
    axes[0].plot([h["step"] for h in hist], [h["loss"] for h in hist], "o-", ms=3)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss (nats/token)")
    axes[0].set_title("adapter training")
    lens = m["lens"]
    if lens.get("base") and lens.get("tuned"):
        ax = axes[1]
        for key, style in (("base", "--"), ("tuned", "-")):
            L = lens[key]
            ax.plot(L["layers"], L["kl_mean"], style, color="tab:red", label=f"KL {key}")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xlabel("layer")
        ax.set_ylabel("KL(final ‖ lens)", color="tab:red")
        ax2 = ax.twinx()
        for key, style in (("base", "--"), ("tuned", "-")):
            L = lens[key]
            ax2.plot(L["layers"], L["top1_agree"], style, color="tab:blue", label=f"top-1 {key}")
        ax2.set_ylim(0, 1.02)
        ax2.set_ylabel("top-1 agreement", color="tab:blue")
        ax.set_title("held-out sufficiency: base (dashed) vs tuned")
    save(fig, out / "adapter.png")
    return "adapter.png"
