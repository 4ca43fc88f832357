"""URL lists: a text file of one URL per line (blank lines and `#` comments ignored), or one URL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ray_jobs.ingest.items import InputItem
from ray_jobs.ingest.options import IngestOptions
from ray_jobs.ingest.sources.base import ListedSource, SourceError

KIND = "url"


def url_item(url: str) -> InputItem:
    """Return the input item of one URL."""
    return InputItem(source=url, source_kind=KIND, locator="url", url=url)


def single_url_source(location: str, options: IngestOptions) -> ListedSource:
    """Return the source of one URL given on the command line."""
    return ListedSource(KIND, lambda: iter([url_item(location)]))


def url_list_source(location: str, options: IngestOptions) -> ListedSource:
    """Return the source of a text file listing URLs."""
    path = Path(location)
    if not path.is_file():
        raise SourceError(f"{location} is not a file")
    return ListedSource(KIND, lambda: _lines(path))


def _lines(path: Path) -> Iterator[InputItem]:
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            url = line.strip()
            if url and not url.startswith("#"):
                yield url_item(url)
