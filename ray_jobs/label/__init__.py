"""The incremental tagging job: label columns through the Serve labeler, grouped commits by the driver."""

from ray_jobs.label.job import LabelOptions, LabelSummary, label_commits, label_table

__all__ = ["LabelOptions", "LabelSummary", "label_commits", "label_table"]
