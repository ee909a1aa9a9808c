"""Evaluation: greedy answers on held-out data, scored with the task's metrics; for video, also
sparse-to-dense frame scaling (Video-RTS)."""

from vlreason.eval.evaluate import EvalReport, evaluate, task_metrics, write_report
from vlreason.eval.frame_scaling import evaluate_frame_scaling

__all__ = ["EvalReport", "evaluate", "evaluate_frame_scaling", "task_metrics", "write_report"]
