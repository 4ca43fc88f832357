"""Training samples of an ingest: wait for a sample's images to settle, then add, dedup or refuse it.

A sample refers to its images by id, so it can only be judged once every one of its images has
an outcome: added or already present (the image id fills its position), or failed (the sample
becomes an error record naming the image and its reason; nothing is dropped silently). A
single image that brings its own messages (a manifest's or a dataset's messages column, or the
``--prompt``/``--answer-column`` template) is a one-image sample.

Counts: ``samples_in == added + duplicates + errors``; a duplicate is the same image ids and the
same messages (the sample id, :func:`lance_io.samples.sample_id`) as a sample already in the
samples table or in the same commit (``append_samples`` finds both; the collector keeps no ids, so
its memory does not grow with the run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lance_io.errors import ErrorRecord
from lance_io.schema import TRUTH
from ray_jobs.ingest.items import InputItem, SampleCounts, SampleSpec
from ray_jobs.ingest.messages import messages_from_template
from ray_jobs.ingest.options import IngestOptions

STAGE = "sample"


@dataclass
class _Pending:
    spec: SampleSpec
    image_ids: list[str | None]
    failures: list[str] = field(default_factory=list)
    settled: int = 0


class SampleCollector:
    """Collects settled images into samples; hands out the samples and error records ready to commit."""

    def __init__(self, job: str, options: IngestOptions) -> None:
        self.job, self.options = job, options
        self.counts = SampleCounts()
        self.ready: list[dict[str, Any]] = []
        self.errors: list[ErrorRecord] = []
        self._pending: dict[int, _Pending] = {}

    def settle(self, item: InputItem, image_id: str | None, failure: tuple[str, str] | None = None) -> None:
        """Record the outcome of one image: its id (added or already present) or why it failed."""
        spec = item.sample or self._single_image_spec(item)
        if spec is None:
            return
        if spec.split is None and isinstance(item.metadata.get("split"), str):
            spec.split = item.metadata["split"]  # a DatasetDict's split, set on its items
        pending = self._pending.get(id(spec))
        if pending is None:
            pending = self._pending[id(spec)] = _Pending(spec, [None] * spec.images)
        if spec.images:
            if image_id is not None and failure is None:
                pending.image_ids[item.sample_position] = image_id
            else:
                reason, message = failure or ("not_an_image", "the file is not an image")
                pending.failures.append(f"image {item.sample_position} ({item.source}) failed: {reason}: {message}")
        pending.settled += 1
        if pending.settled >= max(spec.images, 1):
            del self._pending[id(spec)]
            self._finish(pending)

    def take(self) -> tuple[list[dict[str, Any]], list[ErrorRecord]]:
        """Return and forget the samples and sample errors settled so far (samples in source order)."""
        ready, errors, self.ready, self.errors = self.ready, self.errors, [], []
        # Workers finish out of order; within a commit, keep the dataset's order (stable for readers).
        ready.sort(key=lambda s: (s["source"], -1 if s["source_index"] is None else s["source_index"]))
        return ready, errors

    def _finish(self, pending: _Pending) -> None:
        spec = pending.spec
        self.counts.samples_in += 1
        name = spec.source if spec.index is None else f"{spec.source}#{spec.index}"
        if spec.error is not None or pending.failures:
            reason, message = spec.error or ("image_failed", "; ".join(pending.failures) + "; fix or remove the image")
            self.counts.errors += 1
            self.errors.append(ErrorRecord(source=name, reason=reason, message=message, job=self.job, stage=STAGE))
            return
        assert spec.messages is not None
        image_ids = [i for i in pending.image_ids if i is not None]
        self.ready.append(
            {
                "image_ids": image_ids,
                "messages": spec.messages,
                "system": spec.system,
                "tools": spec.tools,
                "source": spec.source,
                "source_index": spec.index,
                "source_kind": spec.source_kind,
                "split": spec.split,
                "metadata": spec.metadata,
            }
        )

    def _single_image_spec(self, item: InputItem) -> SampleSpec | None:
        """Return the one-image sample of an item that brings messages (or gets them from the template)."""
        messages = item.messages or self._template_messages(item)
        if not messages:
            return None
        return SampleSpec(
            source=item.source,
            source_kind=item.source_kind,
            index=None,
            images=1,
            messages=messages,
            split=item.metadata.get("split") if isinstance(item.metadata.get("split"), str) else None,
        )

    def _template_messages(self, item: InputItem) -> list[dict[str, str]] | None:
        if not self.options.prompt or not self.options.answer_column:
            return None
        answer = (
            item.truth
            if self.options.answer_column == TRUTH
            else item.metadata.get(self.options.answer_column)
        )
        return messages_from_template(self.options.prompt, answer, {TRUTH: item.truth, **item.metadata})
