"""The pictures: confusion matrices, MRI slices with class probabilities, loss curves (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: runs on headless training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_confusion_matrix(confusion: Mapping, path: str | Path, title: str = "") -> Path:
    """Draw ``classification_metrics(...)["confusion_matrix"]`` (rows true, columns predicted + invalid)."""
    counts = np.asarray(confusion["counts"])
    figure, axes = plt.subplots(figsize=(1.6 + 1.1 * counts.shape[1], 1.4 + 1.0 * counts.shape[0]))
    axes.imshow(counts, cmap="Blues")
    axes.set_xticks(range(counts.shape[1]), confusion["columns"], rotation=30, ha="right")
    axes.set_yticks(range(counts.shape[0]), confusion["labels"])
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (row, column), value in np.ndenumerate(counts):
        axes.text(column, row, str(value), ha="center", va="center",
                  color="white" if value > counts.max() / 2 else "black")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def plot_volume_report(
    volume: np.ndarray, probabilities: Sequence[float], class_names: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Axial, coronal and sagittal middle slices of a (S, S, S) RAS volume, plus a probability bar chart."""
    volume = np.asarray(volume, dtype=np.float32)
    centre = [size // 2 for size in volume.shape]
    slices = {
        "sagittal": volume[centre[0], :, :].T,
        "coronal": volume[:, centre[1], :].T,
        "axial": volume[:, :, centre[2]].T,
    }
    figure, axes = plt.subplots(1, 4, figsize=(13, 3.4), gridspec_kw={"width_ratios": [1, 1, 1, 1.2]})
    for axis, (name, image) in zip(axes, slices.items()):
        axis.imshow(image, cmap="gray", origin="lower")
        axis.set_title(name)
        axis.axis("off")
    axes[3].barh(list(class_names), list(probabilities), color="tab:blue")
    axes[3].set_xlim(0, 1)
    axes[3].set_xlabel("probability")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)
