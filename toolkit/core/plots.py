"""Pictures: training curves, confusion matrices, digit grids, filters, feature maps, comparisons."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt

from toolkit.core.fileio import atomic_path


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


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str | Path, title: str) -> Path:
    """Annotated heatmap, rows = true class, columns = predicted."""
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n, 0.75 * n))
    shown = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(shown, ax=ax, label="images")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    threshold = matrix.max() / 2
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if matrix[i, j] > threshold else "black")
    return save_figure(fig, path)


def plot_digit_grid(
    images: np.ndarray, titles: Sequence[str], path: str | Path, title: str, columns: int = 8
) -> Path:
    """A grid of 28x28 images with a title each (e.g. misclassified digits)."""
    count = max(1, len(images))
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 2.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, titles, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(caption, fontsize=8)
    if len(images) == 0:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_filters(weights: np.ndarray, path: str | Path, title: str) -> Path:
    """First-layer kernels [out, in, k, k] as a grid, each normalized to its own range."""
    kernels = weights.reshape(-1, *weights.shape[-2:])
    columns = min(8, len(kernels))
    rows = -(-len(kernels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for index, (ax, kernel) in enumerate(zip(axes.flat, kernels, strict=False)):
        span = kernel.max() - kernel.min()
        ax.imshow((kernel - kernel.min()) / (span if span > 0 else 1), cmap="gray", vmin=0, vmax=1)
        ax.set_title(str(index), fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_feature_maps(digits: np.ndarray, maps: np.ndarray, labels: Sequence[str], path: str | Path,
                      title: str) -> Path:
    """One row per digit: the input, then each channel's activation map."""
    channels = min(maps.shape[1], 16)
    fig, axes = plt.subplots(len(digits), channels + 1, figsize=(1.0 * (channels + 1), 1.05 * len(digits)),
                             squeeze=False)
    for row, (digit, fmap, label) in enumerate(zip(digits, maps, labels, strict=True)):
        axes[row, 0].imshow(digit, cmap="gray", vmin=0, vmax=1)
        axes[row, 0].set_ylabel(label, rotation=0, ha="right", va="center", labelpad=6)  # long names fit
        for c in range(channels):
            axes[row, c + 1].imshow(fmap[c], cmap="viridis")
            if row == 0:
                axes[row, c + 1].set_title(f"ch {c}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_comparison(histories: dict[str, Sequence[dict[str, Any]]], path: str | Path) -> Path:
    """Test accuracy and loss curves of several runs overlaid."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, history in histories.items():
        epochs = [h["epoch"] for h in history]
        acc_ax.plot(epochs, [100 * h["test_acc"] for h in history], "o-", label=name)
        loss_ax.plot(epochs, [h["test_loss"] for h in history], "o-", label=name)
    acc_ax.set(title="test accuracy", xlabel="epoch", ylabel="accuracy (%)")
    loss_ax.set(title="test loss", xlabel="epoch", ylabel="cross-entropy")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)
