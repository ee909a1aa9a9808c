"""Run the stages of a config in order, each starting from the previous stage's final model.

Per stage: train, save ``<output_dir>/<stage>/final``, then evaluate it on ``data.eval`` (if
set) into ``<stage>/eval.json`` and ``eval.md``. The resolved config is saved as
``<output_dir>/config.yaml`` and a summary of every stage as ``<output_dir>/pipeline.json``.
With ``resume``, finished stages (those with a ``final`` model) are skipped and the running
stage continues from its newest checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlreason.config import PipelineConfig, StageConfig, StageKind, as_dict, final_checkpoint
from vlreason.eval import evaluate, write_report
from vlreason.models.vlm import load_vlm
from vlreason.training.grpo import run_grpo
from vlreason.training.sft import StageResult, run_sft

logger = logging.getLogger(__name__)


@dataclass
class StageOutcome:
    name: str
    kind: str
    final_path: str
    steps: int | None  # None when the stage was already finished (resume)
    seconds: float | None
    eval: dict[str, Any] | None


def run_pipeline(config: PipelineConfig, resume: bool = False) -> list[StageOutcome]:
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(as_dict(config), sort_keys=False))
    outcomes = []
    for stage in config.stages:
        final = Path(final_checkpoint(stage.output_dir))
        if resume and final.is_dir():
            logger.info("stage %s finished earlier (%s); skipping it", stage.name, final)
            outcomes.append(StageOutcome(stage.name, stage.kind.value, str(final), None, None, _read_eval(stage)))
            continue
        logger.info("stage %s (%s) -> %s", stage.name, stage.kind.value, stage.output_dir)
        result = run_stage(stage, resume)
        outcomes.append(StageOutcome(stage.name, stage.kind.value, str(result.final_path), result.steps,
                                     round(result.seconds, 2), evaluate_stage(stage)))
    (out / "pipeline.json").write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    return outcomes


def run_stage(stage: StageConfig, resume: bool = False) -> StageResult:
    if stage.kind is StageKind.SFT:
        return run_sft(stage, resume)
    return run_grpo(stage, resume)


def evaluate_stage(stage: StageConfig) -> dict[str, Any] | None:
    """Evaluate the stage's final model on ``data.eval`` and write the report next to it."""
    if not stage.data.eval:
        return None
    vlm = load_vlm(final_checkpoint(stage.output_dir), min_pixels=stage.model.min_pixels,
                   max_pixels=stage.model.max_pixels)
    report = evaluate(vlm, stage.data.eval, max_new_tokens=stage.rollout.max_new_tokens,
                      progress=stage.logging.progress)
    write_report(report, stage.output_dir, title=f"Evaluation after stage {stage.name}")
    logger.info("stage %s: %s", stage.name, ", ".join(f"{k}={v:.4f}" for k, v in report.metrics.items()
                                                       if isinstance(v, float)))
    return report.metrics


def _read_eval(stage: StageConfig) -> dict[str, Any] | None:
    path = Path(stage.output_dir) / "eval.json"
    return json.loads(path.read_text())["metrics"] if path.is_file() else None
