"""Evaluation: greedy answers on held-out data, scored with the task's metrics."""

from vlreason.eval.evaluate import EvalReport, evaluate, task_metrics, write_report

__all__ = ["EvalReport", "evaluate", "task_metrics", "write_report"]
