"""Several models evaluated on one data file with the same settings, side by side.

``compare_models`` evaluates the models one after another (each freed before the next loads),
writes each one's own report to ``DIR/<n>-<name>/`` and the comparison (``write_comparison``):
``DIR/compare.json`` (the metrics per model), ``DIR/compare.md`` (a row per metric, a column per
model, the best value of a row in bold where the models differ) and ``DIR/compare.png`` (the
rates as grouped bars).

The best value is the highest, except for the metrics where lower is better
(``LOWER_IS_BETTER``) and those that describe rather than rank (``NO_BEST``: no bold).
"""

from __future__ import annotations

import gc
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlreason.eval.evaluate import EvalReport, write_report
from vlreason.eval.plots import COUNTS, bar_groups, rates

logger = logging.getLogger(__name__)

LOWER_IS_BETTER = ("truncated_rate", "attack_success_rate", "over_refusal_rate", "invalid_call_rate")
NO_BEST = (*COUNTS, "tool_call_rate", "decided_at")


@dataclass
class Comparison:
    """The metrics of several models on one data file."""

    data: str
    models: list[str]  # as given: checkpoint folders, hub ids or tiny presets
    names: list[str]  # "<n>-<name>": each model's report folder and column
    metrics: list[dict[str, Any]]  # per model

    def rows(self) -> list[tuple[str, list[Any]]]:
        """Per metric (in order of first appearance), its value for each model (None where absent)."""
        names = dict.fromkeys(name for metrics in self.metrics for name in metrics)
        return [(name, [metrics.get(name) for metrics in self.metrics]) for name in names]


def compare_models(models: Sequence[str], evaluate_model: Callable[[str], EvalReport], out_dir: str | Path
                   ) -> tuple[Comparison, Path, Path]:
    """Evaluate each of ``models`` with ``evaluate_model`` (which loads the model, evaluates it
    and returns the report without keeping the model), write its report to
    ``out_dir/<n>-<name>/``, free its memory, then write the comparison.

    Returns:
        The comparison and the paths of ``compare.json`` and ``compare.md``.
    """
    if not models:
        raise ValueError("no models to compare")
    out = Path(out_dir)
    names = [f"{index}-{short_name(model)}" for index, model in enumerate(models, start=1)]
    reports = []
    for index, (model, name) in enumerate(zip(models, names, strict=True), start=1):
        logger.info("evaluating %s (%d of %d)", model, index, len(models))
        reports.append(evaluate_model(model))
        write_report(reports[-1], out / name, title=f"Evaluation of {model}")
        free_memory()
    comparison = Comparison(reports[0].data, list(models), names, [report.metrics for report in reports])
    return comparison, *write_comparison(comparison, out)


def short_name(model: str) -> str:
    """A folder-safe name for a model: the last two parts of its path or hub id
    ("runs/grounding/grpo/final" -> "grpo_final", "Qwen/Qwen2-VL-2B-Instruct" ->
    "Qwen_Qwen2-VL-2B-Instruct", "tiny-qwen3-vl" stays)."""
    parts = [part for part in re.split(r"[\\/]+", model) if part not in ("", ".", "..")]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts[-2:])) or "model"


def free_memory() -> None:
    """Return an evaluated model's memory (its last references are gone) before the next loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_comparison(comparison: Comparison, out_dir: str | Path) -> tuple[Path, Path]:
    """``compare.json``, ``compare.md`` and (when some metric is a rate) ``compare.png`` in
    ``out_dir``; returns the paths of the first two."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "compare.json", out / "compare.md"
    json_path.write_text(json.dumps({"data": comparison.data, "models": [
        {"name": name, "model": model, "report": f"{name}/eval.md", "metrics": metrics}
        for name, model, metrics in zip(comparison.names, comparison.models, comparison.metrics, strict=True)]},
        indent=1))
    lines = ["# Comparison", "", f"Data: `{comparison.data}`", "", "| column | model | report |", "| --- | --- | --- |"]
    lines += [f"| {name} | `{model}` | [{name}/eval.md]({name}/eval.md) |"
              for name, model in zip(comparison.names, comparison.models, strict=True)]
    lines += ["", "| metric | " + " | ".join(comparison.names) + " |", "| --- |" + " --- |" * len(comparison.names)]
    for metric, values in comparison.rows():
        best = best_columns(metric, values)
        cells = [f"**{cell(value)}**" if index in best else cell(value) for index, value in enumerate(values)]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines += ["", f"Bold: the best value of a row where the models differ (the lowest for "
                  f"{', '.join(LOWER_IS_BETTER)}; none for {', '.join(NO_BEST)})."]
    if plot_comparison(comparison, out / "compare.png") is not None:
        lines += ["", "![the metrics in [0, 1], a bar per model](compare.png)"]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def best_columns(metric: str, values: Sequence[Any]) -> set[int]:
    """The columns holding a row's best value: the highest, the lowest for ``LOWER_IS_BETTER``,
    none for ``NO_BEST`` or where every model has the same value (ties all count)."""
    base = metric.split("/", 1)[0]
    numbers = {index: value for index, value in enumerate(values)
               if isinstance(value, int | float) and not isinstance(value, bool)}
    if base in NO_BEST or len(set(numbers.values())) < 2:
        return set()
    best = (min if base in LOWER_IS_BETTER else max)(numbers.values())
    return {index for index, value in numbers.items() if value == best}


def plot_comparison(comparison: Comparison, path: str | Path) -> Path | None:
    """The rates (``plots.rates``) as grouped bars, a bar per model; None (no file) without any."""
    bars = {name: rates(metrics) for name, metrics in zip(comparison.names, comparison.metrics, strict=True)}
    if not any(bars.values()):
        return None
    return bar_groups(bars, path, f"Comparison on {Path(comparison.data).name}")


def cell(value: Any) -> str:
    """A metric as a table shows it: floats to 4 places, "-" where a model lacks it."""
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
