"""Evaluate a model on a data file: greedy decoding, then the metrics the data's ground truth
supports. Per-sample metrics are the reward functions GRPO trains on, averaged (so "IoU" means
one thing); detection mAP is a data-set metric, computed once over all samples.

Which metrics apply is read from the columns: one box per sample -> ``mean_iou`` and
``iou@0.5``; several boxes or labels -> ``map`` / ``map50`` / ``map75`` (COCO AP computed once
over the whole data set by pycocotools, labels as categories when the data has them; the
mean of per-sample APs is a different number) and ``box_f1`` (mean
``multi_box_iou``); ``choices`` -> ``choice_accuracy``; a numeric ``answer`` without ``choices``
-> ``accuracy`` (exact match, over those samples); ``label`` -> ``accuracy`` (class).
``format_rate`` (the ``<think>..</think><answer>..</answer>`` template) is always reported. Data
whose samples carry a ``qtype`` field also gets each metric per question type (``metric/<qtype>``).
Safety data (``safety_label``) gets attack success, over-refusal, helpfulness and the risk named,
overall and per category (``eval.safety``), and the report a bar plot of them.

A completion cut off at ``max_new_tokens`` before it closed its ``</answer>`` has no answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vlreason.data.batch import load_sample_media
from vlreason.data.jsonl import read_jsonl
from vlreason.data.schema import Sample
from vlreason.eval.safety import plot_safety, safety_metrics, safety_outcomes
from vlreason.models.vlm import VLM
from vlreason.rewards.api import get_reward
from vlreason.rewards.detection import coco_map
from vlreason.rewards.parsing import PredBox
from vlreason.rewards.safety import SafetyReward
from vlreason.rewards.scoring import OnRewardError, RewardScorer, RewardTable, reward_columns
from vlreason.rollout.agent import AgentLoop
from vlreason.rollout.engine import SamplingParams, Trajectories, encode_prompts
from vlreason.rollout.hf import HFEngine
from vlreason.vision.video import ClipReader, FrameSampling


@dataclass
class EvalReport:
    """Metrics over a data file and the per-sample predictions behind them."""

    data: str
    metrics: dict[str, float]
    predictions: list[dict[str, Any]] = field(default_factory=list)


def task_metrics(samples: Sequence[Sample]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Per-sample metrics the samples' ground truth supports: metric name -> (reward name, options).
    Detection data also gets the data-set metrics of ``detection_metrics``."""
    metrics: dict[str, tuple[str, dict[str, Any]]] = {"format_rate": ("format", {})}
    if is_detection(samples):
        metrics["box_f1"] = ("multi_box_iou", {"match_labels": any(s.labels for s in samples)})
    elif any(s.boxes for s in samples):
        metrics["mean_iou"] = ("iou", {})
        metrics["iou@0.5"] = ("iou", {"threshold": 0.5})
    if any(s.choices for s in samples):
        metrics["choice_accuracy"] = ("choice", {})
    if any(s.answer is not None and not s.choices and _is_number(s.answer) for s in samples):
        metrics["accuracy"] = ("numeric", {})  # over the samples with a numeric answer (None elsewhere)
    if any(s.label is not None for s in samples):
        metrics["accuracy"] = ("classification", {})
    return metrics


def is_detection(samples: Sequence[Sample]) -> bool:
    """Whether the samples' boxes are a detection task (several boxes or labels somewhere), not
    single-box grounding."""
    return any(s.boxes and (len(s.boxes) > 1 or s.labels) for s in samples)


def detection_metrics(samples: Sequence[Sample], pred_boxes: Sequence[Sequence[PredBox]]) -> dict[str, float | None]:
    """``map``, ``map50`` and ``map75``: COCO AP over every sample with a ``boxes`` field at once
    (pycocotools), with ``labels`` as categories when the data has them and a sample's
    ``crowd_regions`` (``[{"box": [x1, y1, x2, y2], "label": ...}]``, as ``data convert coco``
    writes them) as COCO's crowd regions."""
    scored = [(sample, preds) for sample, preds in zip(samples, pred_boxes, strict=True) if sample.boxes is not None]
    labels = [s.labels for s, _ in scored] if any(s.labels for s, _ in scored) else None
    crowd = [[(tuple(region["box"]), region.get("label")) for region in s.extra.get("crowd_regions") or []]
             for s, _ in scored]
    result = coco_map([preds for _, preds in scored], [s.boxes for s, _ in scored], labels, crowd)
    return {"map": _finite(result["ap"]), "map50": _finite(result["ap50"]), "map75": _finite(result["ap75"])}


@torch.no_grad()
def evaluate(vlm: VLM, data_path: str | Path, batch_size: int = 32, max_new_tokens: int = 64,
             limit: int | None = None, progress: bool = True, loop: AgentLoop | None = None,
             read_clip: ClipReader | None = None, safety: SafetyReward | None = None) -> EvalReport:
    """Greedy answers for the samples of ``data_path`` and the task's metrics (see module docstring).

    ``loop``: how to roll out (engine, agent and budgets); default: the HF engine, one turn. With
    an agent the report adds ``tool_call_rate`` (samples with a tool call), ``invalid_call_rate``
    (failed calls over all calls) and ``turns_per_sample``. ``read_clip``: how videos are decoded
    (a training stage's, ``VLM.use_video``); default: ``FrameSampling()``'s frames at the model's
    default video budget. ``safety``: the ``safety`` reward that sorts safety data's completions
    (its judge and taxonomy; default: the rule judge, categories by name).
    """
    samples = read_jsonl(data_path).samples[:limit]
    if not samples:
        raise ValueError(f"{data_path}: no samples to evaluate")
    loop = loop or AgentLoop(vlm, HFEngine(vlm))
    read_clip = read_clip or vlm.use_video(FrameSampling())
    vlm.model.eval()
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    kept, infos, parts = [], [], []
    for start in tqdm(range(0, len(samples), batch_size), desc="eval", unit="batch", disable=not progress):
        batch, media, _ = load_sample_media(samples[start:start + batch_size], read_clip)
        if not batch:
            continue
        prompts = encode_prompts(vlm, [s.prompt_messages for s in batch], media, loop.tool_schemas)
        parts.append(loop.run(prompts, params).without_media())
        kept += batch
        infos += prompts.infos
    report = score_predictions(str(data_path), kept, [t for part in parts for t in part.texts],
                               [vlm.box_decoder(row) for row in infos],
                               [bool(cut) for part in parts for cut in part.truncated], parts, safety)
    if loop.agent is not None:
        report.metrics |= agent_metrics(parts)
    return report


def agent_metrics(parts: Sequence[Trajectories]) -> dict[str, float]:
    """``tool_call_rate``, ``invalid_call_rate`` and ``turns_per_sample`` of evaluation trajectories."""
    calls = [row for part in parts for row in part.tool_calls]
    every_call = [call for row in calls for call in row]
    invalid = sum(call["error"] is not None for call in every_call)
    return {"tool_call_rate": float(np.mean([bool(row) for row in calls])),
            "invalid_call_rate": invalid / len(every_call) if every_call else 0.0,
            "turns_per_sample": float(np.mean([len(spans) for part in parts for spans in part.turns]))}


def score_predictions(data: str, samples: Sequence[Sample], texts: Sequence[str], decoders: Sequence[Any],
                      truncated: Sequence[bool], trajectories: Sequence[Trajectories] = (),
                      safety: SafetyReward | None = None) -> EvalReport:
    """Metrics of given completions (one per sample; ``truncated``: which hit the token limit;
    ``trajectories``: where they came from, for the tool trace rewards read; ``safety``: see
    ``evaluate``)."""
    spec = task_metrics(samples)
    rewards = {name: get_reward(reward, **options) for name, (reward, options) in spec.items()}
    names = sorted({c for s in samples for c in s.columns()})
    trace = {key: [v for part in trajectories for v in part.reward_columns()[key]]
             for key in (trajectories[0].reward_columns() if trajectories else {})}
    columns = reward_columns(samples, texts, names, decoders=decoders, truncated=truncated, trace=trace)
    table = RewardScorer(rewards, OnRewardError.SKIP)(list(texts), columns)
    metrics = {name: _nanmean(table.column(name)) for name in spec}
    metrics |= _per_qtype(samples, table, spec)
    if is_detection(samples):
        metrics |= detection_metrics(samples, columns["pred_boxes"])
    outcomes = [None] * len(samples)
    if any(s.safety_label for s in samples):
        outcomes = safety_outcomes(texts, columns, safety)
        metrics |= safety_metrics(samples, outcomes)
    metrics["truncated_rate"] = float(np.mean(truncated)) if truncated else 0.0
    metrics["samples"] = len(samples)
    predictions = [{"id": s.id, "completion": text, **{n: _finite(v) for n, v in zip(table.names, row, strict=True)},
                    **({"safety_outcome": outcome} if outcome else {})}
                   for s, text, row, outcome in zip(samples, texts, table.values, outcomes, strict=True)]
    return EvalReport(data=data, metrics=metrics, predictions=predictions)


def _per_qtype(samples: Sequence[Sample], table: RewardTable, spec: dict[str, Any]) -> dict[str, float | None]:
    """``metric/<type>`` for data whose samples name their question type in a ``qtype`` field
    (``video_qa`` does): each per-sample metric over that type's samples where it applies."""
    kinds = [s.extra.get("qtype") for s in samples]
    if not any(kinds):
        return {}
    out = {}
    for kind in sorted({k for k in kinds if k}):
        rows = np.array([k == kind for k in kinds])
        for name in spec:
            value = _nanmean(table.column(name)[rows])
            if value is not None and name != "format_rate":
                out[f"{name}/{kind}"] = value
    return out


def write_report(report: EvalReport, out_dir: str | Path, title: str = "Evaluation") -> tuple[Path, Path]:
    """``out_dir/eval.json`` (metrics + predictions) and ``out_dir/eval.md`` (metrics + examples;
    for safety data also ``out_dir/safety.png``, shown in it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "eval.json", out / "eval.md"
    json_path.write_text(json.dumps({"data": report.data, "metrics": report.metrics,
                                     "predictions": report.predictions}, indent=1))
    lines = [f"# {title}", "", f"Data: `{report.data}`", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in report.metrics.items()]
    if "attack_success_rate" in report.metrics or "over_refusal_rate" in report.metrics:
        plot_safety(report.metrics, out / "safety.png", title)
        lines += ["", "![attack success, over-refusal and helpfulness per category](safety.png)"]
    lines += ["", "## Examples", ""]
    for prediction in report.predictions[:5]:
        scores = ", ".join(f"{k}={_fmt(v)}" for k, v in prediction.items() if k not in ("id", "completion"))
        lines += [f"- `{prediction['id']}` ({scores}): `{prediction['completion'][:200]}`"]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def _nanmean(values: np.ndarray) -> float | None:
    return float(np.nanmean(values)) if (~np.isnan(values)).any() else None


def _finite(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
