"""The options of an ingest, with safe defaults (issue 10): one typed model, shared by CLI and Python."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, field_validator


class IngestOptions(BaseModel):
    """How to ingest: limits per image, URL fetching, manifests, messages, Ray."""

    model_config = {"extra": "forbid", "frozen": True}

    max_pixels: int = Field(
        178_956_970, gt=0, description="refuse images declaring more pixels (width*height)"
    )
    max_bytes: int = Field(64 * 1024**2, gt=0, description="refuse files or bodies larger than this")
    label_from_dir: bool = Field(False, description="folders: the parent directory name becomes `truth`")
    allow_private_urls: bool = Field(False, description="fetch private, loopback and link-local addresses")
    manifest_root: Path | None = Field(
        None, description="relative manifest paths resolve here (default: the manifest's folder)"
    )
    allow_outside_root: bool = Field(
        False, description="let manifest paths and folder symlinks leave their root"
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="manifest column mapping: role (path, url, truth, messages, image) -> column",
    )
    prompt: str | None = Field(
        None, description="build sharegpt messages: user turn template, e.g. '<image>Describe the image.'"
    )
    answer_column: str | None = Field(
        None, description="the assistant turn: truth, caption or a metadata column"
    )

    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0, description="longest wait for the next bytes of a body")
    url_deadline_s: float = Field(30.0, gt=0, description="total time for one URL, retries included")
    retries: int = Field(
        3, ge=1, le=10, description="attempts per URL for transient failures (5xx, resets, timeouts)"
    )
    max_redirects: int = Field(5, ge=0, le=20)
    per_host_concurrency: int = Field(
        4, ge=1, description="concurrent requests to one host per worker process"
    )
    fetch_threads: int = Field(16, ge=1, le=256, description="concurrent URL fetches per worker process")

    batch_size: int = Field(
        64, ge=1, description="items a task reads and validates at a time (a worker holds one batch of images)"
    )
    commit_rows: int = Field(100_000, ge=1, description="commit when this many new rows wait (one version)")
    commit_seconds: float = Field(30.0, gt=0, description="commit when the oldest waiting rows are this old")
    segment_items: int = Field(50_000, ge=1, description="items listed on the driver per Ray Data pipeline")
    address: str | None = Field(None, description="an existing Ray cluster; default: start a local one")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local cluster (default: all)")
    concurrency: int | None = Field(None, ge=1, description="parallel decode tasks (default: Ray's choice)")
    progress: bool = Field(True, description="show a progress bar on stderr")

    @field_validator("prompt")
    @classmethod
    def _prompt_has_one_image(cls, value: str | None) -> str | None:
        if value is not None and value.count("<image>") > 1:
            raise ValueError("the prompt may hold at most one <image> placeholder: each row is one image")
        return value
