"""Where the tagging job's labels come from: a Serve app over HTTP, by handle, or one it starts."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from serve_apps.client import LabelerClient
from serve_apps.results import LabelResult


@dataclass(frozen=True)
class LabelerEndpoint:
    """How a fragment task reaches the labeler: ``url`` (HTTP) or ``app_name`` (in-cluster handle)."""

    url: str | None = None
    app_name: str | None = None
    token_env: str | None = None
    request_size: int = 8
    in_flight: int = 4
    timeout_s: float = 300.0  # a request unanswered this long: labeler_unavailable, and the run ends

    def connect(self) -> LabelerClient:
        """Return a client for this endpoint (call inside the process that uses it)."""
        if self.url:
            token = os.environ.get(self.token_env) if self.token_env else None
            return LabelerClient.over_http(self.url, token=token, timeout_s=self.timeout_s)
        return LabelerClient.over_handle(self.app_name or "lancetag-labeler", timeout_s=self.timeout_s)


def label_concurrently(client: LabelerClient, images: list[bytes], request_size: int, in_flight: int) -> list[LabelResult]:
    """Label ``images`` in requests of ``request_size``, keeping ``in_flight`` requests open; keep order."""
    chunks = [images[i : i + request_size] for i in range(0, len(images), request_size)]
    if len(chunks) <= 1:
        return client.label(images)
    with ThreadPoolExecutor(max_workers=min(in_flight, len(chunks))) as pool:
        return [r for chunk_results in pool.map(client.label, chunks) for r in chunk_results]
