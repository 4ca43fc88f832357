"""The ingest job: any image source into a Lance table with Ray Data, every input accounted for.

    from ray_jobs.ingest import IngestOptions, ingest
    summary = ingest(["photos/"], "/data/photos.lance", IngestOptions(label_from_dir=True))

Modules: ``sources/`` (one per source kind), ``decode`` (validate one image), ``fetch`` (URLs,
SSRF guard), ``messages`` (sharegpt turns), ``worker`` (one Ray task's batch), ``job`` (the
pipeline and the accounting), ``progress``.
"""

from ray_jobs.ingest.items import IngestSummary, InputItem
from ray_jobs.ingest.job import ingest
from ray_jobs.ingest.options import IngestOptions

__all__ = ["IngestOptions", "IngestSummary", "InputItem", "ingest"]
