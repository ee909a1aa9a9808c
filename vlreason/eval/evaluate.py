"""Evaluate a model on a data file: greedy decoding, then the metrics the data's ground truth
supports. Per-sample metrics are the reward functions GRPO trains on, averaged (so "IoU" means
one thing); detection mAP is a data-set metric, computed once over all samples.

Which metrics apply is read from the columns: one box per sample -> ``mean_iou`` and
``iou@0.5``; several boxes or labels -> ``map`` / ``map50`` / ``map75`` (COCO AP computed once
over the whole data set by pycocotools, labels as categories when the data has them; the
mean of per-sample APs is a different number) and ``box_f1`` (mean
``multi_box_iou``); ``choices`` -> ``choice_accuracy``; a numeric ``answer`` without ``choices``
-> ``accuracy`` (exact match, over those samples); ``label`` -> ``accuracy`` (class).
``count`` -> ``count_accuracy`` (exact ``numeric`` on that column). ``format_rate`` (the
``<think>..</think><answer>..</answer>`` template) is always reported. The caller may choose the
metrics instead (``metric_spec``: built-in names and rewards as metrics). Data whose samples carry
a ``qtype`` field also gets each per-sample metric per question type (``metric/<qtype>``).
Safety data (``safety_label``) gets attack success, over-refusal, helpfulness and the risk named,
overall and per category (``eval.safety``), and the report a bar plot of them. The report also
plots its metrics in [0, 1] (``eval.plots``).

A completion cut off at ``max_new_tokens`` before it closed its ``</answer>`` has no answer.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vlreason.data.batch import load_sample_media
from vlreason.data.jsonl import read_jsonl
from vlreason.data.schema import Sample
from vlreason.eval.plots import plot_metrics
from vlreason.eval.safety import plot_safety, safety_metrics, safety_outcomes
from vlreason.models.vlm import VLM
from vlreason.rewards.api import RewardFn, check_columns, get_reward
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


Metrics = dict[str, tuple[str | None, dict[str, Any]]]
"""Metrics as ``metric_spec`` gives them: name -> (reward spec, its options); a None reward names
the built-in metric of that name, whose reward the data decides (``built_in_metric``)."""

# built-in metric -> the ground truth it needs
BUILT_IN_METRICS = {
    "format_rate": "none (it scores the completion's template)",
    "mean_iou": "`boxes`",
    "iou@0.5": "`boxes`",
    "box_f1": "`boxes`",
    "map": "`boxes`",
    "map50": "`boxes`",
    "map75": "`boxes`",
    "choice_accuracy": "`choices` with an `answer`",
    "accuracy": "a `label`, or a numeric `answer` without `choices`",
    "count_accuracy": "`count`",
}
DATASET_METRICS = ("map", "map50", "map75")  # computed once over all samples (``detection_metrics``)


def task_metrics(samples: Sequence[Sample]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Per-sample metrics the samples' ground truth supports: metric name -> (reward name, options).
    Detection data also gets the data-set metrics of ``detection_metrics``."""
    names = ["format_rate", *(["box_f1"] if is_detection(samples) else ["mean_iou", "iou@0.5"]),
             "choice_accuracy", "accuracy", "count_accuracy"]
    return {name: found for name in names if (found := built_in_metric(name, samples)) is not None}


def built_in_metric(name: str, samples: Sequence[Sample]) -> tuple[str, dict[str, Any]] | None:
    """The reward (name, options) that scores the built-in per-sample metric ``name`` on these
    samples, or None when no sample has the ground truth it needs (``BUILT_IN_METRICS``)."""
    if name == "format_rate":
        return "format", {}
    if name in ("mean_iou", "iou@0.5", "box_f1") and any(s.boxes for s in samples):
        if name == "box_f1":
            return "multi_box_iou", {"match_labels": any(s.labels for s in samples)}
        return "iou", {} if name == "mean_iou" else {"threshold": 0.5}
    if name == "choice_accuracy" and any(s.choices for s in samples):
        return "choice", {}
    if name == "accuracy" and any(s.label is not None for s in samples):
        return "classification", {}
    if name == "accuracy" and any(s.answer is not None and not s.choices and _is_number(s.answer) for s in samples):
        return "numeric", {}  # over the samples with a numeric answer (None elsewhere)
    if name == "count_accuracy" and any(s.count is not None for s in samples):
        return "numeric", {"column": "count"}
    return None


def metric_spec(entries: Sequence[str | Mapping[str, Mapping[str, Any]]]) -> Metrics:
    """Metrics chosen by the caller: the one parser for a config's metrics list and ``vlreason
    eval --metric``. Nothing is imported here; ``metric_rewards`` resolves the result against data.

    ``entries``: a non-empty list whose items are either

    * a built-in metric name (``BUILT_IN_METRICS``: format_rate, mean_iou, iou@0.5, box_f1, map,
      map50, map75, choice_accuracy, accuracy, count_accuracy), scored as the default metrics
      score it (``map``, ``map50``, ``map75``: COCO AP over the whole data set); or
    * a mapping ``{name: {reward: SPEC, **options}}`` (one or more names), SPEC a registered
      reward name, ``module:attr`` or ``file.py:attr`` (as ``get_reward`` resolves it), the other
      keys its options; the metric is the reward's mean over the samples it applies to.

    Example: ``["iou@0.5", {"my_metric": {"reward": "plugins/r.py:MyReward", "threshold": 0.3}}]``
    gives ``{"iou@0.5": (None, {}), "my_metric": ("plugins/r.py:MyReward", {"threshold": 0.3})}``.

    Raises:
        ValueError: not a non-empty list; an unknown built-in name (the choices listed); a mapping
            not of the form above; a name given twice or holding "/" (it separates per-type metrics).
    """
    if isinstance(entries, str | Mapping) or not isinstance(entries, Sequence) or not entries:
        raise ValueError(f"metrics: expected a non-empty list of metric names and {{name: {{reward: SPEC}}}} "
                         f"mappings, got {entries!r}")
    metrics: Metrics = {}
    for entry in entries:
        for name, spec in _metric_entry(entry):
            if name in metrics:
                raise ValueError(f"metric {name!r} is given twice; name each metric once")
            metrics[name] = spec
    return metrics


def _metric_entry(entry: Any) -> list[tuple[str, tuple[str | None, dict[str, Any]]]]:
    """One item of ``metric_spec``'s list as (name, (reward spec or None, options)) pairs."""
    form = "a built-in metric name or {name: {reward: SPEC, option: value, ...}}"
    if isinstance(entry, str):
        if entry not in BUILT_IN_METRICS:
            close = difflib.get_close_matches(entry, BUILT_IN_METRICS, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ValueError(f"unknown metric {entry!r}; {hint}built-in metrics: {', '.join(BUILT_IN_METRICS)}; "
                             "or score one with a reward: {name: {reward: SPEC}} (--metric NAME=SPEC)")
        return [(entry, (None, {}))]
    if not isinstance(entry, Mapping) or not entry:
        raise ValueError(f"metric {entry!r}: expected {form}")
    pairs = []
    for name, body in entry.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"metric name {name!r}: expected a non-empty name without '/'")
        if not isinstance(body, Mapping) or not isinstance(body.get("reward"), str) or not body["reward"]:
            raise ValueError(f"metric {name!r}: expected {{reward: SPEC, option: value, ...}} with SPEC a reward "
                             f"name, module:attr or file.py:attr, got {body!r}")
        pairs.append((name, (body["reward"], {k: v for k, v in body.items() if k != "reward"})))
    return pairs


def metric_rewards(samples: Sequence[Sample], source: str, metrics: Metrics | None = None
                   ) -> tuple[dict[str, RewardFn], list[str]]:
    """The rewards that score the per-sample metrics on these samples (name -> reward) and the
    data-set metrics (``DATASET_METRICS``) to compute; ``metrics``: the caller's choice
    (``metric_spec``), default the data's own (``task_metrics``, and mAP for detection).

    Raises:
        ValueError: a chosen built-in metric whose ground truth no sample has, or a reward that
            needs columns the samples lack or cannot score them as configured (``check_columns``).
        PluginError: a reward spec that names no reward, or options it does not take.
    """
    if metrics is None:
        spec, dataset = task_metrics(samples), list(DATASET_METRICS) if is_detection(samples) else []
    else:
        spec, dataset = _chosen_metrics(metrics, samples, source)
    rewards = {name: get_reward(reward, **options) for name, (reward, options) in spec.items()}
    check_columns(rewards, _columns(samples), source, samples)
    return rewards, dataset


def _chosen_metrics(metrics: Metrics, samples: Sequence[Sample], source: str
                    ) -> tuple[dict[str, tuple[str, dict[str, Any]]], list[str]]:
    """``metrics`` with each built-in name replaced by the reward the data decides (per-sample
    ones) or listed among the data-set metrics."""
    spec: dict[str, tuple[str, dict[str, Any]]] = {}
    dataset, missing = [], []
    for name, (reward, options) in metrics.items():
        if reward is not None:
            spec[name] = (reward, options)
        elif name in DATASET_METRICS and any(s.boxes for s in samples):
            dataset.append(name)
        elif name not in DATASET_METRICS and (found := built_in_metric(name, samples)) is not None:
            spec[name] = found
        else:
            missing.append(name)
    if missing:
        lines = [f"  {name} needs {BUILT_IN_METRICS[name]}" for name in missing]
        raise ValueError(f"{source}: no sample has the ground truth of metric(s) {', '.join(missing)}:\n"
                         + "\n".join(lines) + "\nChoose metrics this data supports.")
    return spec, dataset


def _columns(samples: Sequence[Sample]) -> set[str]:
    """Columns at least one sample has a value for (as ``DataFile.columns``)."""
    return {"id"} | {name for s in samples for name, value in s.columns().items() if value is not None}


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
             read_clip: ClipReader | None = None, safety: SafetyReward | None = None,
             metrics: Metrics | None = None) -> EvalReport:
    """Greedy answers for the samples of ``data_path`` and the task's metrics (see module docstring).

    ``loop``: how to roll out (engine, agent and budgets); default: the HF engine, one turn. With
    an agent the report adds ``tool_call_rate`` (samples with a tool call), ``invalid_call_rate``
    (failed calls over all calls) and ``turns_per_sample``. ``read_clip``: how videos are decoded
    (a training stage's, ``VLM.use_video``); default: ``FrameSampling()``'s frames at the model's
    default video budget. ``safety``: the ``safety`` reward that sorts safety data's completions
    (its judge and taxonomy; default: the rule judge, categories by name). ``metrics``: the
    metrics to report (``metric_spec``); default: those the data's ground truth supports.

    Raises:
        ValueError: no samples, or a chosen metric the data cannot give (before any generation).
    """
    samples = read_jsonl(data_path).samples[:limit]
    if not samples:
        raise ValueError(f"{data_path}: no samples to evaluate")
    metric_rewards(samples, str(data_path), metrics)  # a metric the data cannot give fails before generating
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
                               [bool(cut) for part in parts for cut in part.truncated], parts, safety, metrics)
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
                      safety: SafetyReward | None = None, metrics: Metrics | None = None) -> EvalReport:
    """Metrics of given completions (one per sample; ``truncated``: which hit the token limit;
    ``trajectories``: where they came from, for the tool trace rewards read; ``safety`` and
    ``metrics``: see ``evaluate``). Safety data's metrics, ``truncated_rate`` and ``samples`` are
    always reported."""
    rewards, dataset = metric_rewards(samples, data, metrics)
    names = sorted({c for s in samples for c in s.columns()})
    trace = {key: [v for part in trajectories for v in part.reward_columns()[key]]
             for key in (trajectories[0].reward_columns() if trajectories else {})}
    columns = reward_columns(samples, texts, names, decoders=decoders, truncated=truncated, trace=trace)
    table = _score(rewards, texts, columns)
    values = {name: _nanmean(table.column(name)) for name in rewards}
    if dataset:
        values |= detection_metrics(samples, columns["pred_boxes"])
    result = {name: values[name] for name in (metrics or values)}
    result |= _per_qtype(samples, table, rewards)
    outcomes = [None] * len(samples)
    if any(s.safety_label for s in samples):
        outcomes = safety_outcomes(texts, columns, safety)
        result |= safety_metrics(samples, outcomes)
    result["truncated_rate"] = float(np.mean(truncated)) if truncated else 0.0
    result["samples"] = len(samples)
    predictions = [{"id": s.id, "completion": text, **{n: _finite(v) for n, v in zip(table.names, row, strict=True)},
                    **({"safety_outcome": outcome} if outcome else {})}
                   for s, text, row, outcome in zip(samples, texts, table.values, outcomes, strict=True)]
    return EvalReport(data=data, metrics=result, predictions=predictions)


def _score(rewards: dict[str, RewardFn], texts: Sequence[str], columns: dict[str, list[Any]]) -> RewardTable:
    """``[N, R]`` scores of the rewards (failures: not applicable); no columns without rewards
    (only data-set metrics chosen)."""
    if not rewards:
        return RewardTable(names=[], values=np.empty((len(texts), 0)))
    return RewardScorer(rewards, OnRewardError.SKIP)(list(texts), columns)


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
    """``out_dir/eval.json`` (metrics + predictions) and ``out_dir/eval.md`` (metrics, examples and
    the plots: ``out_dir/metrics.png``, the rates as bars (``plot_metrics``), and for safety data
    ``out_dir/safety.png``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "eval.json", out / "eval.md"
    json_path.write_text(json.dumps({"data": report.data, "metrics": report.metrics,
                                     "predictions": report.predictions}, indent=1))
    lines = [f"# {title}", "", f"Data: `{report.data}`", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in report.metrics.items()]
    if plot_metrics(report.metrics, out / "metrics.png", title) is not None:
        lines += ["", "![the metrics in [0, 1], per question type or category where the data has them](metrics.png)"]
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
