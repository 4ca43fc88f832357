"""The incremental tagging job: label columns through the Serve labeler, fragment by fragment."""

from ray_jobs.label.job import LabelOptions, LabelSummary, label_commits, label_table

__all__ = ["LabelOptions", "LabelSummary", "label_commits", "label_table"]
