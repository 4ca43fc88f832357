"""What flows through an ingest: input items from sources, outcomes from workers, the summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lance_io.errors import printable

Locator = Literal["path", "url", "bytes", "object", "member", "cell", "none"]
"""How a worker gets an item's bytes: read a local path, fetch a URL, use inline bytes, read an
object-storage object (``url`` is its ``s3://...`` URI), read a tar member (``url`` is the shard,
``path`` is ``"offset:size"``), read a cell of an Arrow or Parquet file or a Lance table (``url`` is
the file, ``path`` is ``"format:stamp:row[/position]:column"``, see :class:`Cell`), or none (the source already knows the item failed, see
``InputItem.error``)."""


@dataclass(frozen=True)
class Cell:
    """Image bytes a source leaves where they are, in a cell of an Arrow or Parquet file or a Lance table: the workers read them.

    A Hugging Face dataset (``save_to_disk``: memory-mapped Arrow files) and a Parquet file with an
    image column (the Hub's format) hold their images inline. The driver lists the rows without
    the image column, and a worker reads ``row`` (counted from the file's start) of ``column`` (a
    binary column, or an ``Image`` struct's ``bytes``) from ``file`` (a local path or an
    object-storage URI) itself. An existing Lance table is read the same way: ``file`` is the
    table, ``row`` a row offset in the version the driver listed, and that version is the stamp
    (a Lance version never changes). In a column holding a list of images per row (a multi-image
    training sample), ``position`` is the image's place in the row's list.
    """

    file: str
    row: int
    column: str
    format: Literal["arrow", "parquet", "lance"] = "arrow"
    stamp: str = ""
    """The file's size and modification time when listed (a Lance table's version): a worker refuses a file that changed since."""
    position: int | None = None

    @property
    def span(self) -> str:
        """The work row's ``path``: ``"format:stamp:row:column"``, the row ``row/position`` in a list column."""
        row = self.row if self.position is None else f"{self.row}/{self.position}"
        return f"{self.format}:{self.stamp}:{row}:{self.column}"


@dataclass
class SampleSpec:
    """One training sample as a source lists it: a conversation over ``images`` images, in order.

    Each of its images is an :class:`InputItem` pointing back here with its position; the sample
    is settled when all of them are (see :mod:`ray_jobs.ingest.samples`). ``error`` is a problem
    the source already found in the conversation itself (``(reason, message)``).
    """

    source: str
    source_kind: str
    index: int | None
    images: int
    messages: list[dict[str, str]] | None
    system: str | None = None
    tools: str | None = None
    split: str | None = None
    metadata: dict[str, Any] | None = None
    error: tuple[str, str] | None = None


@dataclass
class InputItem:
    """One input image as a source yields it, before any byte is read.

    ``source`` is what a user recognises in an error record (a path, a URL, ``file.json#3``);
    ``scan`` marks items found by scanning a folder, prefix or tar shard: those that are not images
    by extension and magic bytes, and macOS metadata files, count as skipped instead of errors.
    """

    source: str
    source_kind: str
    locator: Locator
    path: str | None = None
    url: str | None = None
    data: bytes | None = None
    scan: bool = False
    truth: str | None = None
    messages: list[dict[str, str]] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None
    """``(reason, message)`` when the source already knows this input cannot be ingested."""
    skip: str | None = None
    """Why the source already knows this input is not an image (counted as skipped)."""
    sample: SampleSpec | None = None
    """The training sample this image belongs to (sharegpt), at ``sample_position`` among its images."""
    sample_position: int = 0

    def __post_init__(self) -> None:
        # what is stored as text, as valid UTF-8: a file or folder name need not be (``path`` keeps it as it is)
        if isinstance(self.source, str):
            self.source = printable(self.source)
        if isinstance(self.truth, str):
            self.truth = printable(self.truth)


@dataclass(frozen=True)
class IngestError:
    """Why one input was not ingested: a reason code and a message a user can act on."""

    reason: str
    message: str


@dataclass(frozen=True)
class ImageInfo:
    """What decode-validation learned about one image (the bytes are kept unmodified)."""

    width: int
    height: int
    format: str
    mode: str
    exif_orientation: int | None
    frames: int


@dataclass
class SampleCounts:
    """Where every training sample went. ``samples_in == added + duplicates + errors`` always holds."""

    samples_in: int = 0
    added: int = 0
    duplicates: int = 0
    errors: int = 0
    version: int | None = None

    @property
    def reconciled(self) -> bool:
        """True when every sample is accounted for exactly once."""
        return self.samples_in == self.added + self.duplicates + self.errors


@dataclass
class IngestSummary:
    """Where every input went. ``inputs == added + duplicates + errors + skipped`` always holds.

    ``samples`` counts the training samples (conversations) the inputs belong to, if any.
    """

    table: str
    job: str
    inputs: int = 0
    added: int = 0
    duplicates: int = 0
    errors: int = 0
    skipped: int = 0
    version: int | None = None
    truths_added: int = 0
    """Duplicates whose image the table held without a truth: their truth was added to its row."""
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    samples: SampleCounts = field(default_factory=SampleCounts)
    nodes: dict[str, int] = field(default_factory=dict)
    """Items each Ray node read and checked (node id -> count): where the work ran."""
    bytes_to_driver: int = 0
    """Bytes of task outcomes the driver received: ids, statuses and fragment metadata, no image bytes."""
    bytes_from_driver: int = 0
    """Bytes of work rows the driver sent to the tasks: locations and pass-through columns, and the
    image bytes of the few sources whose images the driver reads itself (docs/ingest.md, "Limits")."""

    @property
    def reconciled(self) -> bool:
        """True when every input, and every sample, is accounted for exactly once."""
        return self.inputs == self.added + self.duplicates + self.errors + self.skipped and self.samples.reconciled

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document: the issue's keys first, then errors by reason and timing."""
        return {
            "inputs": self.inputs,
            "added": self.added,
            "duplicates": self.duplicates,
            "errors": self.errors,
            "skipped": self.skipped,
            "version": self.version,
            "table": self.table,
            "job": self.job,
            "truths_added": self.truths_added,
            "errors_by_reason": dict(sorted(self.errors_by_reason.items())),
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.inputs / self.seconds, 1) if self.seconds > 0 else None,
            "nodes": dict(sorted(self.nodes.items())),
            "bytes_to_driver": self.bytes_to_driver,
            "bytes_from_driver": self.bytes_from_driver,
            "samples": {
                "samples_in": self.samples.samples_in,
                "samples_added": self.samples.added,
                "samples_duplicate": self.samples.duplicates,
                "samples_error": self.samples.errors,
                "version": self.samples.version,
            },
        }
