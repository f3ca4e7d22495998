"""The pictures: confusion matrices, MRI slices with class probabilities, reliability diagrams, loss curves
(matplotlib).
``draw_*`` functions draw into given axes (to compose reports); ``plot_*`` functions write a PNG.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
# Figure objects, not pyplot: files only, no GUI backend, and no process-wide backend switch.
from matplotlib.figure import Figure


def draw_confusion_matrix(axes, confusion: Mapping, title: str = "") -> None:
    """``classification_metrics(...)["confusion_matrix"]``: rows true, columns predicted + invalid."""
    counts = np.asarray(confusion["counts"])
    axes.imshow(counts, cmap="Blues")
    axes.set_xticks(range(counts.shape[1]), confusion["columns"], rotation=30, ha="right")
    axes.set_yticks(range(counts.shape[0]), confusion["labels"])
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (row, column), value in np.ndenumerate(counts):
        axes.text(column, row, str(value), ha="center", va="center",
                  color="white" if value > counts.max() / 2 else "black")
    axes.set_title(title, fontsize=9)


def draw_slices(axes_triplet: Sequence, volume: np.ndarray, label: str = "", overlay: np.ndarray | None = None) -> None:
    """Sagittal, coronal and axial middle slices of a (S, S, S) RAS volume.

    With ``overlay`` (a non-negative map on the same grid, e.g. a relevance map) the slices go through its
    maximum instead, and it is drawn on them in a heat colormap, transparent where it is below 5% of its maximum.
    """
    volume = np.asarray(volume, dtype=np.float32)
    x, y, z = (size // 2 for size in volume.shape)
    if overlay is not None:
        overlay = np.asarray(overlay, dtype=np.float32)
        x, y, z = np.unravel_index(int(np.argmax(overlay)), overlay.shape)
        overlay = np.ma.masked_less(overlay, 0.05 * max(float(overlay.max()), 1e-12))
    for axes, (name, index) in zip(axes_triplet, (("sagittal", (x, slice(None), slice(None))),
                                                  ("coronal", (slice(None), y, slice(None))),
                                                  ("axial", (slice(None), slice(None), z)))):
        axes.imshow(volume[index].T, cmap="gray", origin="lower")
        if overlay is not None:
            axes.imshow(overlay[index].T, cmap="hot", origin="lower", alpha=0.6, vmin=0.0, vmax=float(overlay.max()))
        axes.set_title(f"{label} {name}".strip(), fontsize=9)
        axes.axis("off")


def draw_probabilities(axes, probabilities: Sequence[float], class_names: Sequence[str], title: str = "") -> None:
    """One horizontal bar per class (``probabilities[i]`` for ``class_names[i]``) on a 0–1 axis."""
    axes.barh(list(class_names), list(probabilities), color="tab:blue")
    axes.set_xlim(0, 1)
    axes.set_xlabel("probability")
    axes.set_title(title, fontsize=9)


def draw_loss_curves(axes, curves: Mapping[str, Sequence[float]], ylabel: str = "loss") -> None:
    """One moving-averaged curve per name (window: 1/20 of the run)."""
    for name, values in curves.items():
        values = np.asarray(values, dtype=float)
        window = max(1, len(values) // 20)
        axes.plot(np.convolve(values, np.ones(window) / window, mode="valid"), label=name)
    axes.set_xlabel("step")
    axes.set_ylabel(f"{ylabel} (moving average)")
    axes.legend(fontsize=8)


def draw_reliability_diagram(axes, probs: Sequence[Sequence[float]] | np.ndarray, labels: Sequence[int],
                             title: str = "", n_bins: int = 10) -> float:
    """Per-bin accuracy against confidence (top-label, equal-width bins), the diagonal, and the ECE in the title.

    ``probs`` (N, classes) are the probabilities shown to a user, ``labels`` the true class indices;
    returns the ECE. A bar under the diagonal is over-confidence; the bars' shade grows with their count.
    """
    from lavis_medblip.tasks.metrics import reliability_bins  # lazy: the tasks package imports this module

    bins = reliability_bins(probs, labels, n_bins)
    width = 1.0 / n_bins
    filled = bins.counts > 0
    shade = 0.25 + 0.75 * bins.counts[filled] / max(bins.counts.max(), 1)
    axes.bar(bins.edges[:-1][filled], bins.accuracy[filled], width=width, align="edge", edgecolor="black",
             color=[(0.12, 0.47, 0.71, alpha) for alpha in shade], label="accuracy")
    axes.plot(bins.confidence[filled], bins.accuracy[filled], "o", color="tab:red", markersize=3,
              label="mean confidence")
    axes.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence (top probability)")
    axes.set_ylabel("accuracy")
    axes.legend(fontsize=7, loc="upper left")
    ece = bins.expected_calibration_error
    axes.set_title(f"{title}{': ' if title else ''}ECE {ece:.3f} (n={int(bins.counts.sum())})", fontsize=9)
    return ece


def plot_reliability_diagram(probs: Sequence[Sequence[float]] | np.ndarray, labels: Sequence[int], path: str | Path,
                             title: str = "") -> Path:
    """:func:`draw_reliability_diagram` into a PNG at ``path``; returns ``path``."""
    figure = Figure(figsize=(4.2, 4.0))
    draw_reliability_diagram(figure.subplots(), probs, labels, title)
    return _save(figure, path)


def plot_confusion_matrix(confusion: Mapping, path: str | Path, title: str = "") -> Path:
    """:func:`draw_confusion_matrix` into a PNG at ``path``; returns ``path``."""
    counts = np.asarray(confusion["counts"])
    figure = Figure(figsize=(1.6 + 1.1 * counts.shape[1], 1.4 + 1.0 * counts.shape[0]))
    axes = figure.subplots()
    draw_confusion_matrix(axes, confusion, title)
    return _save(figure, path)


def plot_volume_report(
    volume: np.ndarray, probabilities: Sequence[float], class_names: Sequence[str], path: str | Path, title: str = "",
    overlay: np.ndarray | None = None,
) -> Path:
    """Three orthogonal slices (with ``overlay``, through its maximum and with it drawn on them, see
    :func:`draw_slices`) and the class probabilities, in one PNG."""
    figure = Figure(figsize=(13, 3.4))
    axes = figure.subplots(1, 4, gridspec_kw={"width_ratios": [1, 1, 1, 1.2]})
    draw_slices(axes[:3], volume, "relevance," if overlay is not None else "", overlay)
    draw_probabilities(axes[3], probabilities, class_names)
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def _save(figure: Figure, path: str | Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return Path(path)
