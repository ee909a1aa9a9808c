"""Bar plots of evaluation metrics: one report's rates (``plot_metrics``: each metric overall and
per question type or category) and several models' side by side (``compare.plot_comparison``),
both drawn by ``bar_groups``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COUNTS = ("samples", "turns_per_sample", "mean_rounds", "mean_frames")  # metrics that count, not rates


def rates(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics that are rates: float values in [0, 1], except the counts (``COUNTS``) even
    when one happens to lie in that range."""
    return {name: value for name, value in metrics.items()
            if isinstance(value, float) and 0.0 <= value <= 1.0 and name.split("/", 1)[0] not in COUNTS}


def plot_metrics(metrics: Mapping[str, Any], path: str | Path, title: str = "Evaluation") -> Path | None:
    """The rates among ``metrics`` as bars, a group per metric: its overall value ("all") and,
    for a metric also given per question type or category (``name/<type>``), one bar per type.
    None, and no file, when no metric is a rate."""
    shown = rates(metrics)
    if not shown:
        return None
    groups = list(dict.fromkeys(name.split("/", 1)[0] for name in shown))
    kinds = sorted({name.split("/", 1)[1] for name in shown if "/" in name})
    bars = {"all": {group: shown[group] for group in groups if group in shown}}
    bars |= {kind: {group: shown[f"{group}/{kind}"] for group in groups if f"{group}/{kind}" in shown}
             for kind in kinds}
    return bar_groups(bars, path, title)


def bar_groups(values: Mapping[str, Mapping[str, float]], path: str | Path, title: str) -> Path:
    """Grouped bars on a [0, 1] axis: ``values[series][group]``, one x position per group (in
    order of first appearance) holding, side by side and centred, a bar for each series that has
    a value there; a series keeps its colour throughout, with a legend when there are several."""
    groups = list(dict.fromkeys(group for bars in values.values() for group in bars))
    present = {group: [label for label, bars in values.items() if group in bars] for group in groups}
    width = 0.8 / max(len(labels) for labels in present.values())
    figure, axes = plt.subplots(figsize=(min(16.0, 2.0 + (0.3 * len(values) + 0.4) * len(groups)), 3.6))
    for label, bars in values.items():
        places = [x + (present[group].index(label) - (len(present[group]) - 1) / 2) * width
                  for x, group in enumerate(groups) if group in bars]
        axes.bar(places, [bars[group] for group in groups if group in bars], width, label=label)
    axes.set_xticks(np.arange(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    axes.set_ylim(0, 1.05)
    axes.set_title(title)
    if len(values) > 1:
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return Path(path)
