"""Figures of a protection report (matplotlib, Agg backend, PNG files).

- :func:`plot_wrong_key_histogram`: accuracies under random wrong keys, with
  the accuracy under the correct key, plain images and chance as lines.
- :func:`plot_examples`: plain images beside what the model sees.
"""

from __future__ import annotations

import os
from typing import Union

import torch

from .checkpoint import replacing

__all__ = ["plot_wrong_key_histogram", "plot_examples"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_wrong_key_histogram(report, path: Union[str, os.PathLike]) -> None:
    """Histogram of accuracies under wrong keys; vertical lines for the
    correct key, plain images and chance.

    Args:
        report: a :class:`~kp_plugin.evaluate.ProtectionReport`.
        path: the PNG to write.

    Example:
        >>> plot_wrong_key_histogram(report, "wrong_keys.png")   # doctest: +SKIP
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    try:
        values = [100 * v for v in report.wrong_key_accuracies]
        if values:
            ax.hist(values, bins=50, range=(0, 100), color="#8c8c8c",
                    edgecolor="white", label=f"{len(values)} wrong keys")
        ax.axvline(100 * report.key_accuracy, color="#1a7f37", lw=2, label="correct key")
        ax.axvline(100 * report.plain_accuracy, color="#cf222e", lw=1.5, ls="--", label="plain images")
        ax.axvline(100 * report.chance, color="black", lw=1, ls=":", label="chance")
        if report.unprotected_accuracy is not None:
            ax.axvline(100 * report.unprotected_accuracy, color="#0969da", lw=1, ls="-.", label="unprotected")
        ax.set_xlim(0, 100)
        ax.set_xlabel("test accuracy (%)")
        ax.set_ylabel("wrong keys")
        ax.set_title(f"{report.dataset}: {report.scheme}, M={report.block_size}")
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        with replacing(path) as tmp:  # a failed write leaves the previous picture whole
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def plot_examples(images: torch.Tensor, protected: torch.Tensor, path: Union[str, os.PathLike]) -> None:
    """Two rows: plain images (top), the same images under the key (bottom).

    Args:
        images: ``(N, C, H, W)`` in [0, 1].
        protected: the same images after the keyed transform, in [0, 1].
        path: the PNG to write.

    Example:
        >>> plot_examples(x, apply_transform(x, key), "examples.png")   # doctest: +SKIP
    """
    plt = _pyplot()
    n = images.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n + 0.6, 3.6), dpi=110, squeeze=False)
    try:
        for row, (batch, title) in enumerate(((images, "plain"), (protected, "protected"))):
            for col in range(n):
                ax = axes[row][col]
                img = batch[col].detach().float().clamp(0, 1).cpu()
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                else:
                    ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if col == 0:
                    ax.set_ylabel(title)
        fig.tight_layout()
        with replacing(path) as tmp:  # a failed write leaves the previous picture whole
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
