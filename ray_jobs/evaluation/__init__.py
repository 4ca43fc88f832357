"""Evaluation of label columns against ground truth, with reports and cost per 1,000 images."""

from ray_jobs.evaluation.job import EvalResult, evaluate_table
from ray_jobs.evaluation.metrics import Evaluation, evaluate

__all__ = ["EvalResult", "Evaluation", "evaluate", "evaluate_table"]
