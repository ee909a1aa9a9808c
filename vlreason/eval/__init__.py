"""Evaluation: greedy answers on held-out data, scored with the task's metrics or the caller's
(``metric_spec``); several models side by side (``compare_models``); for video, also
sparse-to-dense frame scaling (Video-RTS)."""

from vlreason.eval.compare import Comparison, compare_models
from vlreason.eval.evaluate import (
    BUILT_IN_METRICS,
    EvalReport,
    Metrics,
    evaluate,
    metric_rewards,
    metric_spec,
    task_metrics,
    write_report,
)
from vlreason.eval.frame_scaling import evaluate_frame_scaling

__all__ = ["BUILT_IN_METRICS", "Comparison", "EvalReport", "Metrics", "compare_models", "evaluate",
           "evaluate_frame_scaling", "metric_rewards", "metric_spec", "task_metrics", "write_report"]
