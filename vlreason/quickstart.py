"""``vlreason quickstart``: the seed recipe end to end on a CPU, in minutes, with an honest control.

The task is synthetic grounding ("Where is the red triangle?" -> a box). The setting mimics real
cold-start data: the SFT responses come from an imperfect annotator whose boxes are
systematically loose (each side pushed out by ``loose_margin`` of the box's size, as
teacher-model boxes often are), while GRPO only sees prompts and scores its own samples with
the exact IoU reward. Supervised training can at best imitate the annotator; RL with a
verifiable reward can move past it.

The model is the random tiny Qwen3-VL (about 0.9M parameters, vision tower trained too) and each
image holds one shape. Both choices are measured: within a few minutes of SFT on two cores, the
tiny Qwen2.5-VL barely starts to use the image (its vision tower has no absolute position
embedding, so a box must be read from rotary offsets alone), and with distractor shapes even the
tiny Qwen3-VL is still learning which shape the prompt names when the budget runs out.

Four models are evaluated on the same held-out prompts (exact boxes):

* ``base``: the random tiny model;
* ``sft``: after the SFT cold start;
* ``grpo``: SFT, then GRPO with format + IoU rewards;
* ``sft_more``: the control: SFT continued on the same data for about as long as GRPO trains
  (``sft_more_steps``, set from the step times measured on the reference machine), with the
  learning rate annealed to zero.

Every budget is a number of steps and the thread count is fixed, so the same seed gives the same
report with the same software on the same kind of device, however fast or busy (only the timings
differ). ``DIR/report.json`` holds the metrics, steps and timings;
``DIR/reward_curve.png`` shows the GRPO rewards per step.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vlreason.config import StageConfig, load_config
from vlreason.data.synth import synthesize
from vlreason.eval import evaluate
from vlreason.models.vlm import build_tiny_vlm, load_vlm, save_vlm
from vlreason.training.metrics import plot_curves, read_metrics
from vlreason.training.pipeline import run_stage
from vlreason.vision.boxes import clamp_box

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuickstartPlan:
    """Sizes and step budgets of the quickstart (the defaults run in about 6 minutes on two CPU cores)."""

    preset: str = "tiny-qwen3-vl"
    distractors: int = 0  # other shapes per image
    train_samples: int = 3000
    eval_samples: int = 200
    image_size: int = 96
    loose_margin: float = 0.25  # the annotator's boxes grow by this share of the box side, per side
    sft_steps: int = 700
    sft_learning_rate: float = 1e-3
    sft_batch_size: int = 32
    grpo_steps: int = 120
    grpo_learning_rate: float = 3e-4
    grpo_batch_size: int = 8
    num_generations: int = 8
    max_new_tokens: int = 48
    sft_more_steps: int = 240  # the control's budget: GRPO's training time on the reference machine
    threads: int = 2  # torch CPU threads: float sums depend on the count, so it is fixed like the seed
    device: str = "auto"  # where the models train and are evaluated (the README's table: the CPU)


def run_quickstart(out_dir: str | Path, seed: int = 0, plan: QuickstartPlan = QuickstartPlan()) -> dict[str, Any]:
    """Run the whole comparison; returns (and writes to ``out_dir/report.json``) the report."""
    threads = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    try:
        return _compare(Path(out_dir), seed, plan)
    finally:
        torch.set_num_threads(threads)


def _compare(out: Path, seed: int, plan: QuickstartPlan) -> dict[str, Any]:
    """Data, the four models, their evaluations and the report (the steps of the module docstring)."""
    started = time.perf_counter()
    clear_previous_run(out)
    logger.info("quickstart 1/5: data (%d train, %d held-out prompts) and the random %s", plan.train_samples,
                plan.eval_samples, plan.preset)
    data = make_data(out / "data", seed, plan)
    base = save_vlm(build_tiny_vlm(plan.preset, seed=seed), out / "runs" / "base")
    report: dict[str, Any] = {"base": _evaluate(base, data["eval"], plan)}

    logger.info("quickstart 2/5: SFT cold start on the loose annotator's boxes, %d steps", plan.sft_steps)
    sft = run_stage(_stage("sft", base, data["sft"], out, seed, plan, learning_rate=plan.sft_learning_rate,
                           max_steps=plan.sft_steps))
    report["sft"] = _evaluate(sft.final_path, data["eval"], plan)

    logger.info("quickstart 3/5: GRPO from the SFT model, rewarded with the exact boxes, %d steps", plan.grpo_steps)
    grpo_stage = _stage("grpo", sft.final_path, data["grpo"], out, seed, plan,
                        learning_rate=plan.grpo_learning_rate, max_steps=plan.grpo_steps)
    grpo = run_stage(grpo_stage)
    report["grpo"] = _evaluate(grpo.final_path, data["eval"], plan)

    logger.info("quickstart 4/5: the control, %d more SFT steps from the SFT model", plan.sft_more_steps)
    sft_more = run_stage(_stage("sft_more", sft.final_path, data["sft"], out, seed, plan,
                                learning_rate=plan.sft_learning_rate, max_steps=plan.sft_more_steps,
                                scheduler="linear"))
    report["sft_more"] = _evaluate(sft_more.final_path, data["eval"], plan)

    logger.info("quickstart 5/5: report")
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["training_seconds"] = {"sft": round(sft.seconds, 1), "grpo": round(grpo.seconds, 1),
                                  "sft_more": round(sft_more.seconds, 1)}
    report["steps"] = {"sft": sft.steps, "grpo": grpo.steps, "sft_more": sft_more.steps}
    report["seed"] = seed
    report["plan"] = asdict(plan)
    plot_curves(read_metrics(Path(grpo_stage.output_dir) / "metrics.jsonl"),
                ["reward/total", "reward/iou", "reward/format"], out / "reward_curve.png",
                "GRPO on the quickstart grounding task")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


OUTPUTS = frozenset({"data", "runs", "report.json", "reward_curve.png"})


def clear_previous_run(out: Path) -> None:
    """Delete an earlier quickstart's outputs in ``out``; refuse a folder holding anything else."""
    if not out.exists():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS)
    if foreign:
        raise FileExistsError(f"{out} holds files the quickstart did not write ({', '.join(foreign[:3])}); "
                              "choose an empty or new --out folder")
    shutil.rmtree(out)


def make_data(out: Path, seed: int, plan: QuickstartPlan) -> dict[str, Path]:
    """Held-out prompts, GRPO prompts (exact boxes) and SFT data from the loose annotator."""
    train = synthesize("grounding", out / "train", plan.train_samples, seed=seed, image_size=plan.image_size,
                       distractors=plan.distractors, progress=False)
    held_out = synthesize("grounding", out / "eval", plan.eval_samples, seed=seed + 10_000,
                          image_size=plan.image_size, distractors=plan.distractors, progress=False)
    sft = out / "train" / "sft_loose.jsonl"
    with train.open() as source, sft.open("w") as target:
        for line in source:
            target.write(json.dumps(loosen(json.loads(line), plan.loose_margin, plan.image_size)) + "\n")
    return {"sft": sft, "grpo": train, "eval": held_out}


def loosen(record: dict[str, Any], margin: float, image_size: int) -> dict[str, Any]:
    """The record as the loose annotator labels it: the box (in the response and in ``boxes``)
    grown by ``margin`` of its width / height on every side, clamped to the image."""
    (x1, y1, x2, y2), = record["boxes"]
    dx, dy = margin * (x2 - x1), margin * (y2 - y1)
    loose = [int(round(v)) for v in clamp_box((x1 - dx, y1 - dy, x2 + dx, y2 + dy), (image_size, image_size))]
    exact = "[" + ", ".join(str(v) for v in record["boxes"][0]) + "]"
    return {**record, "boxes": [loose], "response": record["response"].replace(exact, str(loose))}


def format_report(report: dict[str, Any]) -> str:
    """The comparison as a Markdown table."""
    keys = ("mean_iou", "iou@0.5", "format_rate")
    lines = ["| model | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for name in ("base", "sft", "sft_more", "grpo"):
        lines.append(f"| {name} | " + " | ".join(f"{report[name][k]:.3f}" for k in keys) + " |")
    seconds = report["training_seconds"]
    steps = report["steps"]
    lines.append(f"\nTotal {report['seconds']:.0f} s; training: SFT {steps['sft']} steps in {seconds['sft']:.0f} s, "
                 f"GRPO {steps['grpo']} steps in {seconds['grpo']:.0f} s, more SFT {steps['sft_more']} steps in "
                 f"{seconds['sft_more']:.0f} s.")
    return "\n".join(lines)


def _stage(name: str, model: Path | str, data: Path, out: Path, seed: int, plan: QuickstartPlan, *,
           learning_rate: float, max_steps: int, scheduler: str = "constant") -> StageConfig:
    kind = "grpo" if name == "grpo" else "sft"
    entry: dict[str, Any] = {
        # the vision tower is random too, so it trains with the rest; its patch embedding (a linear
        # map of pixels) stays a random projection: that saves a third of an SFT step
        "kind": kind, "name": name,
        "model": {"name_or_path": str(model), "freeze_vision": False, "freeze_patch_embed": True,
                  "device": plan.device},
        "optim": {"learning_rate": learning_rate, "max_steps": max_steps, "scheduler": scheduler,
                  "batch_size": plan.grpo_batch_size if kind == "grpo" else plan.sft_batch_size},
        "save": {"every": 0},
        "logging": {"tensorboard": False, "rollouts_every": 20, "log_every": 10},
    }
    if kind == "grpo":
        entry["rollout"] = {"num_generations": plan.num_generations, "max_new_tokens": plan.max_new_tokens}
        entry["rewards"] = {"format": {"weight": 0.2}, "iou": {"weight": 1.0}}
    raw = {"seed": seed, "output_dir": str(out / "runs"), "data": {"train": str(data)}, "stages": [entry]}
    return load_config(None, raw=raw).stages[0]


def _evaluate(model: Path | str, data: Path, plan: QuickstartPlan) -> dict[str, float]:
    report = evaluate(load_vlm(model, device=plan.device), data, max_new_tokens=plan.max_new_tokens)
    logger.info("%s: %s", model, report.metrics)
    return {k: v for k, v in report.metrics.items() if k != "samples"}
