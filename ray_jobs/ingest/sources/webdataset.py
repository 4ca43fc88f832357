"""WebDataset tar shards as a source: local files, object-storage objects, brace patterns.

Members are grouped by key (the member path up to the first dot of its file name); each image
member of a group is one input; the group's ``.txt`` becomes ``caption``, ``.cls`` the truth, and
the top-level fields of its ``.json`` metadata columns (their names and types are those of the
first ``.json`` of the first shard). The driver reads only tar headers (tarfile seeks past the
data) and the small text members; a worker reads an image member's bytes by offset and size
(``worker.read_member``). A shard that is not a tar, or whose headers break off, gives one error
record for the broken part; the members before it still ingest.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pyarrow as pa

from lance_io.storage import is_object_uri, pyarrow_filesystem, resolve_storage_options
from ray_jobs.ingest.decode import IMAGE_EXTENSIONS
from ray_jobs.ingest.items import InputItem
from ray_jobs.ingest.options import IngestOptions
from ray_jobs.ingest.sources.base import ListedSource, SourceError, pass_through_columns
from ray_jobs.ingest.sources.objectstore import list_objects, listing_failure

KIND = "webdataset"
CAPTION = "caption"
TEXT_LIMIT = 1024**2
"""Largest .txt/.json/.cls member read on the driver; a larger one is an error of its group."""
_BRACE = re.compile(r"\{([^{}]*)\}")
_PEEK_MEMBERS = 200
JsonFields = dict[str, tuple[str, pa.DataType]]
"""Metadata columns of ``.json`` members: table column -> (the JSON field it is read from, its type)."""


def expand_braces(pattern: str) -> list[str]:
    """Return the names a brace pattern stands for: ``{000..099}`` (zero-padded ranges) and ``{a,b}``."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    if ".." in body:
        low, _, high = body.partition("..")
        if not (low.isdigit() and high.isdigit()):
            raise SourceError(f"{pattern}: a brace range needs numbers, like {{00000..00099}}")
        width = len(low) if low.startswith("0") else 0
        choices = [str(n).zfill(width) for n in range(int(low), int(high) + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def looks_like_webdataset(location: str) -> bool:
    """True when a location names tar shards: a ``.tar`` name or a brace pattern."""
    return location.lower().endswith(".tar") or _BRACE.search(location) is not None


def webdataset_source(location: str, options: IngestOptions) -> ListedSource:
    """Return the source of the image members of one shard, a brace pattern of shards, or a folder of shards."""
    shards = _shards(location)
    storage_options = resolve_storage_options(location)
    fields = _peek_json_fields(shards, storage_options)
    return ListedSource(
        KIND,
        lambda: _items(_shards(location), storage_options, options, fields),
        {CAPTION: pa.string(), **{name: dtype for name, (_, dtype) in fields.items()}},
    )


def _shards(location: str) -> Iterator[str]:
    """Yield the shard locations of a pattern, a single shard, or a folder/prefix of ``.tar`` files."""
    if _BRACE.search(location):
        yield from expand_braces(location)
    elif location.lower().endswith(".tar"):
        yield location
    elif is_object_uri(location):
        prefix = location if location.endswith("/") else location + "/"
        yield from (uri for uri, _ in list_objects(prefix, resolve_storage_options(prefix)) if uri.endswith(".tar"))
    elif Path(location).is_dir():
        yield from (str(p) for p in sorted(Path(location).rglob("*.tar")))
    else:
        raise SourceError(f"{location} is neither a .tar shard, a brace pattern of shards, nor a folder of shards")


@contextmanager
def open_shard(shard: str, storage_options: dict[str, str] | None) -> Iterator[IO[bytes]]:
    """Open a shard for random access: a local file, or an object read by ranges."""
    if is_object_uri(shard):
        filesystem, path = pyarrow_filesystem(shard, storage_options)
        with filesystem.open_input_file(path) as handle:
            # Buffered: a header is 512 bytes, one ranged GET each would be slow; small text
            # members next to it come in the same read. Images beyond the buffer are skipped.
            yield io.BufferedReader(_RangedReader(handle), buffer_size=64 * 1024)
    else:
        with open(shard, "rb") as handle:
            yield handle


class _RangedReader(io.RawIOBase):
    """A pyarrow random-access file as a Python raw stream that, like a local file, may seek past its end."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.size, self.position = handle, handle.size(), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer: Any) -> int:
        if self.position >= self.size:
            return 0
        data = self.handle.read_at(min(len(buffer), self.size - self.position), self.position)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def _split_name(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), suffix.lower()


def _members(shard: str, storage_options: dict[str, str] | None) -> Iterator[tuple[tarfile.TarInfo | None, Any]]:
    """Yield ``(member, reader)`` for each file member, then ``(None, (reason, message))`` if the shard breaks off."""
    try:
        with open_shard(shard, storage_options) as handle:
            size = handle.seek(0, 2)
            handle.seek(0)
            try:
                tar = tarfile.open(fileobj=handle, mode="r:")  # noqa: SIM115 - closed with `handle`
            except tarfile.ReadError as exc:
                yield None, ("corrupt_tar", f"not a readable tar shard: {exc}")
                return
            while True:
                try:
                    member = tar.next()
                except tarfile.TarError as exc:
                    if tar.offset < size:  # past the end: the last member is cut, and reported as such
                        yield None, ("corrupt_tar", f"a broken tar header at byte {tar.offset}: {exc}")
                    return
                if member is None:
                    break
                if member.isfile() or member.issym() or member.islnk():  # a link: its own not_a_file record
                    yield member, tar
            # tarfile stops silently at a broken header after the first: look at where it stopped.
            handle.seek(tar.offset)
            block = handle.read(512)
            if block and block != b"\0" * len(block):
                yield None, ("corrupt_tar", f"the shard breaks off at byte {min(tar.offset, size)} (truncated or corrupt)")
    except FileNotFoundError:
        yield None, ("not_found", "no such shard")
    except OSError as exc:
        yield None, listing_failure(exc)


def _peek_json_fields(shards: Iterator[str], storage_options: dict[str, str] | None) -> JsonFields:
    """Return the metadata columns declared by the first ``.json`` member of the first shard: table
    column -> (the field it is read from, its type); a field named like a computed column is kept as
    ``source_<name>`` (``base.pass_through_columns``)."""
    first = next(iter(shards), None)
    if first is None:
        return {}
    for count, (member, tar) in enumerate(_members(first, storage_options)):
        if member is None or count >= _PEEK_MEMBERS:
            break
        if _split_name(member.name)[1] == "json" and member.size <= TEXT_LIMIT:
            try:
                document = json.loads(tar.extractfile(member).read())
            except (ValueError, OSError, tarfile.TarError):
                continue
            if isinstance(document, dict):
                kept = pass_through_columns([k for k in document if k != CAPTION], set())
                return {name: (key, _json_type(document[key])) for name, key in kept.items()}
    return {}


def _json_type(value: Any) -> pa.DataType:
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64() if -(2**63) <= value < 2**63 else pa.string()  # JSON integers have no size limit
    if isinstance(value, float):
        return pa.float64()
    return pa.string()


def _fit(value: Any, dtype: pa.DataType) -> Any:
    """Return ``value`` as the column type wants it, or None when it cannot be (a later sample's other type)."""
    if value is None:
        return None
    if pa.types.is_string(dtype):
        return value if isinstance(value, str) else json.dumps(value)
    fits = _json_type(value) == dtype or (pa.types.is_floating(dtype) and _json_type(value) == pa.int64())
    return value if fits else None


def _items(
    shards: Iterator[str], storage_options: dict[str, str] | None, options: IngestOptions, fields: JsonFields
) -> Iterator[InputItem]:
    for shard in shards:
        group_key: str | None = None
        group: list[tuple[str, tarfile.TarInfo, str | tuple[str, str] | None]] = []
        for member, tar in _members(shard, storage_options):
            if member is None:
                yield from _group_items(shard, group, options, fields)
                group = []
                yield InputItem(source=shard, source_kind=KIND, locator="none", error=tar)
                continue
            key, suffix = _split_name(member.name)
            if key != group_key and group:
                yield from _group_items(shard, group, options, fields)
                group = []
            group_key = key
            text = suffix in ("txt", "json", "cls") and member.isfile()
            group.append((suffix, member, _read_text(member, tar) if text else None))
        yield from _group_items(shard, group, options, fields)


def _read_text(member: tarfile.TarInfo, tar: tarfile.TarFile) -> str | tuple[str, str]:
    """Return a small text member's content, or ``(reason, message)`` when it cannot be read whole."""
    if member.size > TEXT_LIMIT:
        return "too_large", f"{member.name} is over {TEXT_LIMIT} bytes"
    try:
        data = tar.extractfile(member).read()
    except (OSError, tarfile.TarError) as exc:
        return "corrupt_tar", f"cannot read {member.name}: {exc}"
    if len(data) < member.size:
        return "corrupt_tar", f"{member.name} is truncated ({len(data)} of {member.size} bytes)"
    return data.decode("utf-8", errors="replace")


def _group_items(
    shard: str, group: list[tuple[str, tarfile.TarInfo, str | tuple[str, str] | None]], options: IngestOptions, fields: JsonFields
) -> Iterator[InputItem]:
    if not group:
        return
    texts: dict[str, str] = {}
    problem: tuple[str, str] | None = None
    for suffix, _, text in group:
        if isinstance(text, tuple):
            problem = text
        elif text is not None:
            texts[suffix] = text
    metadata: dict[str, Any] = {CAPTION: texts.get("txt", "").strip() or None}
    if "json" in texts:
        try:
            document = json.loads(texts["json"])
        except ValueError:
            document, problem = None, ("bad_metadata", "the .json member is not valid JSON")
        if isinstance(document, dict):
            metadata.update({name: _fit(document.get(key), dtype) for name, (key, dtype) in fields.items()})
    truth = texts.get("cls", "").strip() or None
    images = [(s, m) for s, m, _ in group if "." + s.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
    for _, member in images:
        source = f"{shard}#{member.name}"
        if problem is not None:
            yield InputItem(source=source, source_kind=KIND, locator="none", error=problem)
        elif not member.isfile():
            yield InputItem(
                source=source, source_kind=KIND, locator="none",
                error=("not_a_file", f"a link member (to {member.linkname}): WebDataset readers read regular members only"),
            )
        elif member.size > options.max_bytes:
            yield InputItem(
                source=source, source_kind=KIND, locator="none",
                error=("too_large", f"{member.size} bytes is over the limit of {options.max_bytes} (raise --max-bytes)"),
            )
        else:
            yield InputItem(
                source=source, source_kind=KIND, locator="member", url=shard, scan=True,
                path=f"{member.offset_data}:{member.size}", truth=truth, metadata=dict(metadata),
            )
    if not images:
        key = _split_name(group[0][1].name)[0]
        yield InputItem(source=f"{shard}#{key}", source_kind=KIND, locator="none", skip="the sample has no image member")
