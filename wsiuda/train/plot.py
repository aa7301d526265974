"""The training-curve PNG of a run (matplotlib's Agg canvas, no global pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsiuda.config import atomic_output

LOSS_KEYS = (
    "dice", "bce", "em_source", "em_target", "consistency", "consistency_source",
    "adv", "recons", "pseudo", "d_loss",
)  # fmt: skip


def plot_history(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Loss terms (log scale) on the left; source/target validation Dice and D accuracy on the right."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    epochs = [entry["epoch"] for entry in history]
    for key in LOSS_KEYS:
        values = [entry.get("losses", {}).get(key) for entry in history]
        if any(v is not None and v > 0 for v in values):
            left.plot(epochs, [v if v is not None and v > 0 else float("nan") for v in values], label=key)
    left.set_yscale("log")
    left.set_xlabel("epoch")
    left.set_title("weighted loss terms (epoch means)")
    for key, label in (
        ("source_val_dice", "source val Dice"),
        ("target_val_dice", "target val Dice (report only)"),
    ):
        values = [entry.get(key) for entry in history]
        if any(v is not None for v in values):
            right.plot(epochs, [float("nan") if v is None else v for v in values], marker=".", label=label)
    accuracy = [entry.get("losses", {}).get("d_acc") for entry in history]
    if any(v is not None for v in accuracy):
        right.plot(epochs, [float("nan") if v is None else v for v in accuracy], ls="--", label="D accuracy")
    right.set_ylim(0, 1)
    right.set_xlabel("epoch")
    for axes in (left, right):
        if axes.get_legend_handles_labels()[0]:  # nothing plotted yet (first epoch): no legend to draw
            axes.legend(fontsize=7)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
