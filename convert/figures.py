"""The report's figures (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion(cm: list[list[int]], classes: list[str], title: str, path: Path) -> None:
    plt = _plt()
    a = np.array(cm)
    fig, ax = plt.subplots(figsize=(4.4, 3.8))
    ax.imshow(a, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title, fontsize=10)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(a[i, j]), ha="center", va="center", color="white" if a[i, j] > a.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mrmr_k(table: list[dict], C: float, k: int, best: float, se: float, path: Path) -> None:
    plt = _plt()
    rows = sorted((r for r in table if r["C"] == C), key=lambda r: r["k"])
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.errorbar([r["k"] for r in rows], [r["val_accuracy"] for r in rows], yerr=[r["se"] for r in rows], marker="o",
                label=f"validation accuracy (C = {C})")
    ax.axhline(best - se, color="tab:red", ls=":", label="best - 1 SE")
    ax.axvline(k, color="tab:green", ls="--", label=f"chosen k = {k}")
    ax.axvline(521, color="grey", ls="--", label="paper: 521")
    ax.set_xlabel("features kept by mRMR"), ax.set_ylabel("accuracy"), ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reliability(bins: list[dict], ece: float, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.8, 3.6))
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o")
    for b in bins:
        ax.annotate(str(b["n"]), (b["confidence"], b["accuracy"]), fontsize=7, xytext=(3, -9),
                    textcoords="offset points")
    ax.set_xlabel("confidence (top class)"), ax.set_ylabel("accuracy")
    ax.set_title(f"test split, ECE {100 * ece:.1f}%", fontsize=10)
    ax.set_xlim(0, 1.02), ax.set_ylim(0, 1.02), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def shifts(rows: list[dict], direct: float, path: Path) -> None:
    """Accuracy per shift family and strength (the worst direction of each family)."""
    plt = _plt()
    fams = list(dict.fromkeys(r["family"] + (" (calibrated)" if r["mode"] == "calibrated" else "") for r in rows))
    strengths = ("mild", "moderate", "strong")
    fig, ax = plt.subplots(figsize=(8, 3.6))
    w = 0.27
    for j, st in enumerate(strengths):
        vals = []
        for f in fams:
            cal = f.endswith("(calibrated)")
            fam = f.replace(" (calibrated)", "")
            sel = [r["accuracy"]["rate"] for r in rows if r["family"] == fam and r["strength"] == st
                   and (r["mode"] == "calibrated") == cal]
            vals.append(min(sel) if sel else np.nan)
        ax.bar(np.arange(len(fams)) + (j - 1) * w, vals, w, label=st)
    ax.axhline(direct, color="black", lw=1, label="unshifted")
    ax.axhline(0.95, color="tab:red", ls=":", lw=1, label="95%")
    ax.set_xticks(range(len(fams)), fams, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("4-class accuracy (worst direction)"), ax.set_ylim(0, 1.0), ax.legend(fontsize=7, ncol=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves(history: list[dict], path: Path) -> None:
    plt = _plt()
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(ep, [h["train_loss"] for h in history], marker="o")
    a.set_xlabel("epoch"), a.set_ylabel("training loss"), a.grid(alpha=0.3)
    b.plot(ep, [h["train_acc"] for h in history], marker="o", label="train (augmented)")
    b.plot(ep, [h["val_acc"] for h in history], marker="s", label="validation split")
    b.set_xlabel("epoch"), b.set_ylabel("accuracy"), b.grid(alpha=0.3), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
