"""WebDataset tar shards as an ingest source: members grouped by key, captions, metadata and truth
from the companions, and broken shards (truncated, a corrupt header, not a tar) ending as error
records while their good members still ingest. Local shards here; shards on a real S3-compatible
server (moto on 127.0.0.1) in tests/test_ingest_objectstore.py.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from lance_io import open_table, read_errors
from ray_jobs.ingest import IngestOptions, ingest
from ray_jobs.ingest.decode import APPLE_DOUBLE
from ray_jobs.ingest.sources import detect_kind, open_source
from ray_jobs.ingest.sources.webdataset import expand_braces
from tests.ingest_fixtures import image_bytes

QUIET = {"progress": False}


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sample_members(first: int, count: int) -> list[tuple[str, bytes]]:
    """Members of `count` samples, keys `s{n}`: an image, a caption, JSON metadata and a class."""
    members = []
    for n in range(first, first + count):
        members += [
            (f"s{n:05d}.jpg", image_bytes(n, size=(16, 12))),
            (f"s{n:05d}.txt", f"caption {n}\n".encode()),
            (f"s{n:05d}.json", json.dumps({"width_hint": n, "author": f"a{n % 3}", "sha256": f"declared-{n}"}).encode()),
            (f"s{n:05d}.cls", str(n % 10).encode()),
        ]
    return members


def build_shards(folder: Path) -> dict[str, int]:
    """Write four shards with every hostile case; return the expected counts."""
    folder.mkdir(parents=True, exist_ok=True)
    good = [*sample_members(0, 20), ("textonly.txt", b"no image here"), ("bad.png", b"not an image at all" * 10)]
    good += [("dup.jpg", image_bytes(3, size=(16, 12)))]  # the same content as s00003.jpg
    good += [("._s00001.jpg", APPLE_DOUBLE + bytes(120))]  # a tar made on a Mac: the metadata of s00001.jpg
    (folder / "shard-00000.tar").write_bytes(_tar(good))
    # Truncated inside the data of the last image member: its 9 samples before still ingest.
    truncated = _tar(sample_members(100, 10))
    last_image = truncated.rfind(b"s00109.jpg")
    (folder / "shard-00001.tar").write_bytes(truncated[: last_image + 512 + 200])
    # A corrupt header after 5 samples (20 members): those 5 ingest, the rest is one error record.
    corrupt = bytearray(_tar(sample_members(200, 8)))
    header = corrupt.find(b"s00205.jpg")
    corrupt[header : header + 512] = b"\x07" * 512
    (folder / "shard-00002.tar").write_bytes(bytes(corrupt))
    (folder / "shard-00003.tar").write_bytes(b"this is not a tar file" * 40)
    return {"added": 20 + 9 + 5, "duplicates": 1, "skipped": 2}


def test_brace_patterns_expand_to_zero_padded_ranges_and_lists() -> None:
    assert expand_braces("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert detect_kind("shards/{00000..00099}.tar") == "webdataset"
    assert detect_kind("s3://bucket/shards/x.tar") == "webdataset"


def test_a_shard_lists_one_item_per_image_member_with_its_companions(tmp_path: Path) -> None:
    (tmp_path / "one.tar").write_bytes(_tar(sample_members(0, 3)))
    source = open_source(str(tmp_path / "one.tar"), IngestOptions(**QUIET))
    assert set(source.metadata_fields) == {"caption", "width_hint", "author", "source_sha256"}  # a computed name: kept aside
    items = list(source.items())
    assert [i.source.rsplit("#", 1)[1] for i in items] == ["s00000.jpg", "s00001.jpg", "s00002.jpg"]
    assert [(i.truth, i.metadata["caption"], i.metadata["width_hint"], i.metadata["source_sha256"]) for i in items] == [
        ("0", "caption 0", 0, "declared-0"), ("1", "caption 1", 1, "declared-1"), ("2", "caption 2", 2, "declared-2")
    ]
    assert all(i.locator == "member" and i.data is None for i in items), "the driver reads no image bytes"


def test_a_link_member_is_its_own_not_a_file_record(tmp_path: Path) -> None:
    """Before: a symlink or hard-link member was passed over unseen, in no count."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        data = image_bytes(1, size=(16, 12))
        info = tarfile.TarInfo("s1.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for name, kind in (("s2.jpg", tarfile.SYMTYPE), ("s3.jpg", tarfile.LNKTYPE)):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, "s1.jpg"
            tar.addfile(link)
    (tmp_path / "links.tar").write_bytes(buffer.getvalue())
    items = list(open_source(str(tmp_path / "links.tar"), IngestOptions(**QUIET)).items())
    assert [(i.source.rsplit("#", 1)[1], i.error[0] if i.error else i.locator) for i in items] == [
        ("s1.jpg", "member"), ("s2.jpg", "not_a_file"), ("s3.jpg", "not_a_file")
    ]


def test_json_fields_lance_cannot_name_or_hold_as_given_still_land(ray_cluster, tmp_path: Path) -> None:
    """A dotted key (Lance refuses '.' in a top-level column) and an integer past 64 bits: both ended the
    whole run before (write_failed after Ray started; an internal OverflowError)."""
    members = [(f"s{n}.jpg", image_bytes(n, size=(16, 12))) for n in range(2)]
    members += [(f"s{n}.json", json.dumps({"a.b": f"x{n}", "big": 2**70 + n}).encode()) for n in range(2)]
    (tmp_path / "odd.tar").write_bytes(_tar(sorted(members)))
    table = str(tmp_path / "odd.lance")
    summary = ingest([str(tmp_path / "odd.tar")], table, IngestOptions(**QUIET))
    assert summary.reconciled and summary.added == 2
    rows = open_table(table).to_table(columns=["a_b", "big"]).to_pylist()
    assert sorted(rows, key=lambda r: r["a_b"]) == [{"a_b": "x0", "big": str(2**70)}, {"a_b": "x1", "big": str(2**70 + 1)}]


@pytest.mark.slow
def test_local_shards_with_broken_parts_ingest_every_good_member_and_record_the_rest(
    ray_cluster, tmp_path: Path
) -> None:
    expected = build_shards(tmp_path / "shards")
    table = str(tmp_path / "wds.lance")
    summary = ingest([str(tmp_path / "shards" / "shard-{00000..00003}.tar")], table, IngestOptions(**QUIET))
    assert summary.reconciled, summary
    assert (summary.added, summary.duplicates, summary.skipped) == (
        expected["added"], expected["duplicates"], expected["skipped"]
    )
    reasons = Counter(summary.errors_by_reason)
    assert reasons["corrupt_tar"] == 2, reasons  # the corrupt header of shard 2, shard 3 not a tar
    assert (reasons["truncated"], reasons["not_an_image"]) == (1, 1), reasons  # shard 1's cut member, bad.png
    assert sum(reasons.values()) == summary.errors == 4, reasons
    rows = open_table(table).to_table(columns=["source", "truth", "caption", "author", "width_hint"]).to_pylist()
    assert len(rows) == expected["added"]
    by_key = {r["source"].rsplit("#", 1)[1]: r for r in rows}
    assert by_key["s00007.jpg"] == {**by_key["s00007.jpg"], "truth": "7", "caption": "caption 7", "author": "a1"}
    assert by_key["s00204.jpg"]["width_hint"] == 204 and "s00205.jpg" not in by_key
    assert "s00108.jpg" in by_key and "s00109.jpg" not in by_key
    errors = read_errors(table, job=summary.job).to_pylist()
    assert len(errors) == summary.errors and all(e["source"] and e["message"] for e in errors)
    assert any(e["source"].endswith("shard-00003.tar") for e in errors)
