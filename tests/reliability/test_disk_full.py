"""Disk full during a write: a clear error naming the table and its intact version; a rerun completes."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pytest

from lance_io import (
    TableWriteError,
    append_images,
    ensure_columns,
    open_table,
    plan_fragments,
    write_fragment,
)
from tests.table_fixtures import image_rows

OUTPUT = pa.schema([pa.field("label", pa.string())])


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A size-limited tmpfs at ``path`` (needs root, as CI and the dev machines run)."""
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_append_on_a_full_disk_fails_clearly_and_leaves_the_table_at_its_last_version(tmp_path):
    with small_disk(tmp_path / "disk", "3m") as disk:
        uri = str(disk / "t.lance")
        added = 0
        with pytest.raises(TableWriteError, match=r"no space left on the device; the table is unchanged at version \d+"):
            for k in range(100):
                added += append_images(uri, image_rows(range(10 * k, 10 * k + 10), padding=50_000)).added
        assert added > 0
        assert open_table(uri).count_rows() == added
        assert open_table(uri).to_table(columns=["id"]).num_rows == added  # data readable, not just metadata


def test_label_write_on_a_full_disk_fails_clearly_and_a_rerun_after_freeing_space_completes(tmp_path):
    with small_disk(tmp_path / "disk", "4m") as disk:
        uri = str(disk / "t.lance")
        append_images(uri, image_rows(range(60)), max_rows_per_file=10)
        ensure_columns(uri, OUTPUT)
        ballast = disk / "ballast"
        free = subprocess.run(["df", "--output=avail", "-B1", str(disk)], capture_output=True, text=True).stdout.split()[-1]
        ballast.write_bytes(b"\0" * max(0, int(free) - 20_000))  # leave ~20 KB

        def compute(batch: pa.RecordBatch) -> pa.RecordBatch:
            return pa.record_batch([pa.array(["x" * 2000] * batch.num_rows)], schema=OUTPUT)

        def label_all() -> None:
            for frag in plan_fragments(uri, "label IS NULL"):
                write_fragment(uri, frag.fragment_id, compute, read_columns=[], output_schema=OUTPUT, todo="label IS NULL")

        with pytest.raises(TableWriteError, match="no space left on the device"):
            label_all()
        ds = open_table(uri)
        assert ds.count_rows() == 60
        done = ds.count_rows(filter="label IS NOT NULL")
        assert done < 60

        ballast.unlink()
        label_all()
        assert open_table(uri).count_rows(filter="label IS NULL") == 0
