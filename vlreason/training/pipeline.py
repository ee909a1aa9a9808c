"""Run the stages of a config in order, each starting from the previous stage's final model.

Data named in another format (``data.train: coco:PATH``, see ``vlreason.data.sources``) is
converted first, into ``<output_dir>/data/``. Before any stage trains, the whole config is
checked (``preflight.check_pipeline``): data, rewards and output folders of every stage. The
run holds a lock on ``output_dir`` throughout. Per stage: train, save
``<output_dir>/<stage>/final``, then evaluate it on ``data.eval`` (if set) into
``<stage>/eval.json`` and ``eval.md``. The resolved config is saved as
``<output_dir>/config.yaml`` and a summary of every stage as ``<output_dir>/pipeline.json``.

An output folder holding an earlier run is refused unless ``resume`` (continue it) or
``overwrite`` (delete its outputs first) says what to do. With ``resume``, stages that reached
their ``optim.max_steps`` are skipped and the first unfinished one continues from its newest
checkpoint (a finished stage whose ``max_steps`` was raised counts as unfinished).

Under a multi-process launcher (``vlreason.training.distributed``) every rank runs this: the
main process holds the lock, checks and prepares the folders, writes the summaries and evaluates;
the others read and check the data themselves and train alongside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlreason.config import ConfigError, PipelineConfig, SourceConfig, StageConfig, StageKind, as_dict, final_checkpoint
from vlreason.data.sources import converted_path, prepare_source
from vlreason.eval import evaluate, metric_spec, write_report
from vlreason.models.vlm import load_vlm
from vlreason.rewards.api import get_reward
from vlreason.rollout.agent import build_agent
from vlreason.training.distributed import processes
from vlreason.training.groups import stage_loop
from vlreason.training.grpo import run_grpo
from vlreason.training.model_setup import stage_clip_reader
from vlreason.training.preflight import StageInputs, check_pipeline, stage_finished, stage_inputs
from vlreason.training.run_dir import RunLock
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


def run_pipeline(config: PipelineConfig, resume: bool = False, overwrite: bool = False) -> list[StageOutcome]:
    """Check the whole config, then train and evaluate its stages in order (see the module docstring)."""
    out = Path(config.output_dir)
    ranks = processes()
    with RunLock(out) if ranks.is_main else contextlib.nullcontext():
        ranks.on_main(lambda: resolve_sources(config))
        if not ranks.is_main:
            resolve_sources(config, convert=False)
        checked = ranks.on_main(lambda: _prepare(config, resume, overwrite))
        inputs = checked if ranks.is_main else {stage.name: stage_inputs(stage) for stage in config.stages}
        outcomes = [_run_or_skip(stage, resume, inputs[stage.name]) for stage in config.stages]
        if ranks.is_main:
            (out / "pipeline.json").write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    return outcomes


def resolve_sources(config: PipelineConfig, convert: bool = True) -> None:
    """Put each stage's converted JSONL file in place of a data source (``SourceConfig``),
    converting it here (``convert``) or, on the other processes, where the main one did.

    Raises:
        ConfigError: a source that does not convert, naming its key.
    """
    cache = Path(config.output_dir) / "data"
    for stage in config.stages:
        for key in ("train", "eval"):
            source = getattr(stage.data, key)
            if not isinstance(source, SourceConfig):
                continue
            spec = dataclasses.asdict(source)
            try:
                path = prepare_source(spec, cache, stage.logging.progress) if convert else converted_path(spec, cache)
            except ValueError as exc:
                raise ConfigError(f"stages[{stage.name}].data.{key}: {exc}") from None
            setattr(stage.data, key, str(path))


def _prepare(config: PipelineConfig, resume: bool, overwrite: bool) -> dict[str, StageInputs]:
    inputs = check_pipeline(config, resume, overwrite)
    (Path(config.output_dir) / "config.yaml").write_text(yaml.safe_dump(as_dict(config), sort_keys=False))
    return inputs


def _run_or_skip(stage: StageConfig, resume: bool, inputs: StageInputs) -> StageOutcome:
    final = Path(final_checkpoint(stage.output_dir))
    if resume and stage_finished(stage):
        logger.info("stage %s finished earlier (%s); skipping it", stage.name, final)
        return StageOutcome(stage.name, stage.kind.value, str(final), None, None,  # evaluated unless cut short
                            processes().on_main(lambda: _read_eval(stage) or evaluate_stage(stage)))
    logger.info("stage %s (%s) -> %s", stage.name, stage.kind.value, stage.output_dir)
    result = run_stage(stage, resume, inputs)
    return StageOutcome(stage.name, stage.kind.value, str(result.final_path), result.steps,
                        round(result.seconds, 2), processes().on_main(lambda: evaluate_stage(stage)))


def run_stage(stage: StageConfig, resume: bool = False, inputs: StageInputs | None = None) -> StageResult:
    """Train one stage (its inputs are read and checked here when not given)."""
    if stage.kind is StageKind.SFT:
        return run_sft(stage, resume, inputs)
    return run_grpo(stage, resume, inputs)


def evaluate_stage(stage: StageConfig) -> dict[str, Any] | None:
    """Evaluate the stage's final model on ``data.eval`` and write the report next to it."""
    if not stage.data.eval:
        return None
    vlm = load_vlm(final_checkpoint(stage.output_dir), dtype=stage.model.dtype, min_pixels=stage.model.min_pixels,
                   max_pixels=stage.model.max_pixels, device=stage.model.device)
    agent = build_agent(stage.agent.mode.value, stage.agent.tools, stage.agent.grounding_prompt)
    safety = stage.rewards.get("safety")  # the stage's own judge and taxonomy sort safety data
    report = evaluate(vlm, stage.data.eval, max_new_tokens=stage.rollout.max_new_tokens,
                      progress=stage.logging.progress, loop=stage_loop(vlm, stage, agent),
                      read_clip=stage_clip_reader(vlm, stage),
                      safety=get_reward(safety.fn or "safety", **safety.options) if safety else None,
                      metrics=metric_spec(stage.data.eval_metrics) if stage.data.eval_metrics else None)
    write_report(report, stage.output_dir, title=f"Evaluation after stage {stage.name}")
    logger.info("stage %s: %s", stage.name, ", ".join(f"{k}={v:.4f}" for k, v in report.metrics.items()
                                                       if isinstance(v, float)))
    return report.metrics


def _read_eval(stage: StageConfig) -> dict[str, Any] | None:
    """The stage's earlier evaluation, or None when there is none (or a kill cut its file short)."""
    path = Path(stage.output_dir) / "eval.json"
    try:
        return json.loads(path.read_text())["metrics"]
    except (OSError, ValueError, KeyError):
        return None
