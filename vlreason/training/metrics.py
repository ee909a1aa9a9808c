"""Per-step metrics: a ``metrics.jsonl`` line per logged step, TensorBoard scalars, and plots.

On resume the logs keep the lines up to the checkpoint's step and drop later ones (they belong
to the steps that are about to be run again), so each file always tells one history.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from vlreason.config import StageConfig, as_dict  # noqa: E402

logger = logging.getLogger(__name__)


class MetricsLog:
    """Append-only ``out_dir/metrics.jsonl`` (+ ``out_dir/tensorboard``, + a Weights & Biases run).

    Args:
        resume_step: the step a resumed run continues from; later records are dropped.
        wandb_project: also log every record to W&B under this project (the run's files go to
            ``out_dir/wandb``; ``WANDB_MODE=offline`` needs no account). A resumed stage
            continues the same W&B run (its id comes from ``out_dir``); W&B keeps the steps it
            already had, so steps after ``resume_step`` that were logged before the interruption
            are not replaced there (``metrics.jsonl`` is the exact record).
        run_name / run_config: the W&B run's name and config.
    """

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None,
                 wandb_project: str | None = None, run_name: str = "", run_config: Mapping[str, Any] | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep_steps_upto(self.path, resume_step if resume_step is not None else 0)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step)
        self.wandb = _wandb_run(Path(out_dir), wandb_project, run_name, run_config) if wandb_project else None

    def write(self, step: int, values: Mapping[str, float]) -> None:
        record = {"step": step, **{k: _finite_or_none(v) for k, v in values.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def stage_metrics_log(stage: StageConfig, resume_step: int | None = None) -> MetricsLog:
    """The ``MetricsLog`` of a training stage, as its ``logging`` section asks (in ``output_dir``)."""
    return MetricsLog(stage.output_dir, stage.logging.tensorboard, resume_step,
                      wandb_project=stage.logging.wandb_project, run_name=stage.name, run_config=as_dict(stage))


def _wandb_run(out_dir: Path, project: str, name: str, config: Mapping[str, Any] | None) -> Any:
    """A W&B run for the stage in ``out_dir``, resumed if it exists (``preflight`` checked that
    ``wandb`` is installed)."""
    import wandb

    run_id = hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=project, name=name or out_dir.name, id=run_id, resume="allow", dir=str(out_dir),
                      config=dict(config or {}))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a per-step JSONL log (``metrics.jsonl``, ``rollouts.jsonl``); empty when it
    does not exist. A line that a kill or a full disk cut short is left out with a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            logger.warning("%s:%d: not a complete log record (cut off by a kill or a full disk?); left out",
                           path, number)
            continue
        records.append(record)
    return records


def keep_steps_upto(path: str | Path, step: int) -> None:
    """Rewrite a per-step JSONL log with only the complete records up to ``step`` (later steps
    are about to run again), atomically."""
    path = Path(path)
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)


def plot_curves(records: Sequence[Mapping[str, Any]], keys: Sequence[str], out: str | Path, title: str,
                x_key: str = "step") -> Path:
    """Plot ``keys`` of metrics records against ``x_key`` (one line each, light smoothing) to a PNG."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(r[x_key], r[key]) for r in records if r.get(key) is not None]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, alpha=0.3, linewidth=1)
        ax.plot(xs, _smooth(ys), label=key, linewidth=2, color=ax.lines[-1].get_color())
    ax.set_xlabel(x_key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def _smooth(values: Sequence[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average, as TensorBoard's smoothing slider does."""
    out, last = [], values[0]
    for value in values:
        last = weight * last + (1 - weight) * value
        out.append(last)
    return out


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
