"""Pictures: training curves (and, as the toolkit grows, confusion matrices and filters)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt

from toolkit.fileio import atomic_path


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_training_curves(
    history: Sequence[dict[str, Any]], path: str | Path, title: str = "training"
) -> Path:
    """Loss and accuracy per epoch, train and test side by side, as the notebooks plot them."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "o-"), ("test", "s--")):
        loss_ax.plot(epochs, [h[f"{split}_loss"] for h in history], style, label=split)
        acc_ax.plot(epochs, [100 * h[f"{split}_acc"] for h in history], style, label=split)
    loss_ax.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    acc_ax.set(title="accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return save_figure(fig, path)
