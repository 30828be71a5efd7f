"""Figures of an evaluation (matplotlib): per-class AP, precision-recall curves, confusion matrix,
target vs predicted heatmaps.

Each function returns a ``matplotlib.figure.Figure`` built without pyplot (no backend, no display,
nothing to close); the caller saves it (``figure.savefig``) or logs it (``mlflow.log_figure``). Inputs come from
:class:`centernet_ray.evaluation.CocoEvaluation` and :func:`centernet_ray.evaluation.confusion_matrix`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from centernet_ray.evaluation.coco import CocoEvaluation

MAX_LEGEND_CLASSES = 20  # more classes than this: per-class curves without a legend
MAX_ANNOTATED_CLASSES = 30  # more classes than this: the confusion matrix without numbers in its cells


def class_ap_figure(evaluation: CocoEvaluation, class_names: Sequence[str]) -> Figure:
    """Horizontal bars of AP (IoU .50:.95) and AP50 per class, best class on top."""
    ap, ap50 = evaluation.class_ap(), evaluation.class_ap(0.5)
    order = np.argsort(np.nan_to_num(ap, nan=-1.0))
    height = max(3.0, 0.28 * len(class_names) + 1.2)
    figure = Figure(figsize=(7.5, height), layout="constrained")
    axes = figure.subplots()
    rows = np.arange(len(order))
    axes.barh(rows + 0.2, np.nan_to_num(ap50[order]), height=0.4, label="AP50", color="#9ecae1")
    axes.barh(rows - 0.2, np.nan_to_num(ap[order]), height=0.4, label="AP (IoU .50:.95)", color="#3182bd")
    axes.set_yticks(rows, [class_names[i] + (" (no objects)" if np.isnan(ap[i]) else "") for i in order])
    axes.set_xlim(0, 1)
    axes.set_xlabel("average precision")
    axes.set_title(f"AP per class (mean: AP {np.nanmean(ap):.3f}, AP50 {np.nanmean(ap50):.3f})")
    axes.legend(loc="lower right")
    axes.grid(axis="x", alpha=0.3)
    return figure


def pr_curves_figure(evaluation: CocoEvaluation, class_names: Sequence[str]) -> Figure:
    """Left: the mean precision-recall curve over classes at IoU 0.5, 0.75 and averaged over .50:.95.
    Right: one curve per class at IoU 0.5. Precision is COCOeval's interpolated precision at its 101
    recall points (the curves whose areas are the AP numbers)."""
    recall = evaluation.recall_points
    figure = Figure(figsize=(13, 5.5), layout="constrained")
    overall, per_class = figure.subplots(1, 2)
    for iou, style in ((0.5, "-"), (0.75, "--")):
        curve = np.nanmean(evaluation.pr_curves(iou), axis=1)
        overall.plot(recall, curve, style, label=f"IoU {iou:.2f} (AP {np.nanmean(evaluation.class_ap(iou)):.3f})")
    averaged = np.where(evaluation.precision > -1, evaluation.precision, np.nan)
    overall.plot(recall, np.nanmean(averaged, axis=(0, 2)), ":", label=f"IoU .50:.95 (AP {evaluation.stats['AP']:.3f})")
    overall.set_title("all classes")
    curves = evaluation.pr_curves(0.5)
    colors = colormaps["tab10" if len(class_names) <= 10 else "tab20"]
    for k, name in enumerate(class_names):
        if not np.all(np.isnan(curves[:, k])):
            per_class.plot(recall, curves[:, k], color=colors(k % colors.N), linewidth=1.2,
                           label=f"{name} ({np.nanmean(curves[:, k]):.3f})")
    per_class.set_title("per class, IoU 0.50")
    for axes in (overall, per_class):
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.02)
        axes.set_xlabel("recall")
        axes.set_ylabel("precision")
        axes.grid(alpha=0.3)
    overall.legend(loc="lower left")
    if len(class_names) <= MAX_LEGEND_CLASSES:
        per_class.legend(loc="lower left", fontsize="small")
    return figure


def confusion_matrix_figure(matrix: np.ndarray, class_names: Sequence[str], iou_threshold: float = 0.5,
                            score_threshold: float = 0.3) -> Figure:
    """The [K + 1, K + 1] matrix of :func:`~centernet_ray.evaluation.confusion_matrix`, each row
    normalised to the share of that true class, counts written in the cells (up to 30 classes)."""
    names = [*class_names, "background"]
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=np.float64), where=rows > 0)
    size = max(5.0, 0.45 * len(names) + 2.5)
    figure = Figure(figsize=(size + 1.2, size), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true class's row")
    ticks = np.arange(len(names))
    axes.set_xticks(ticks, [*class_names, "missed"], rotation=90)
    axes.set_yticks(ticks, names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"confusion matrix (IoU >= {iou_threshold:.2f}, score >= {score_threshold:.2f})")
    if len(names) <= MAX_ANNOTATED_CLASSES + 1:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                axes.text(j, i, str(count), ha="center", va="center", fontsize="small",
                          color="white" if shares[i, j] > 0.5 else "black")
    return figure


def heatmap_figure(images: Sequence[torch.Tensor], true_heatmaps: Sequence[torch.Tensor],
                   predicted_heatmaps: Sequence[torch.Tensor], columns: int = 2) -> Figure:
    """For each image, its target heatmap and the predicted one (each the maximum over classes, in
    [0, 1]) drawn over the greyscale image, side by side.

    Args:
        images: uint8 [3, H, W] model inputs; true_heatmaps, predicted_heatmaps: [C, h, w] each.
    """
    count = len(images)
    rows = -(-count // columns)
    figure = Figure(figsize=(4.2 * columns, 2.3 * rows + 0.4), layout="constrained")
    grid = figure.subplots(rows, 2 * columns, squeeze=False)
    for axes in grid.flat:
        axes.set_axis_off()
    shown = None
    for i, (image, true, predicted) in enumerate(zip(images, true_heatmaps, predicted_heatmaps)):
        grey = image.float().mean(0).numpy()
        height, width = grey.shape
        for j, (heat, title) in enumerate(((true, "target"), (predicted, "predicted"))):
            axes = grid[i // columns, 2 * (i % columns) + j]
            axes.imshow(grey, cmap="gray", vmin=0, vmax=255)
            peak = heat.float().amax(0).clamp(0, 1).numpy()
            # opacity follows the value: the image stays visible where the heatmap is 0
            shown = axes.imshow(peak, cmap="inferno", vmin=0, vmax=1, alpha=np.clip(0.25 + peak, 0, 0.9),
                                extent=(0, width, height, 0), interpolation="bilinear")
            axes.set_title(f"image {i + 1}: {title}", fontsize="small")
    if shown is not None:
        figure.colorbar(shown, ax=grid, shrink=0.6, label="heatmap (max over classes)")
    return figure
