"""Unreadable files and folders: one error record each, the rest ingested, counts reconcile.

The tests run as root, and permission bits do not deny root. So the ingest runs through
``setpriv`` with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped from its capability bounding
set: the CLI, the local Ray cluster it starts and every Ray worker then see ``chmod 000`` the way
an ordinary ingest user does.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lance_io import open_table, read_errors
from tests.conftest import LANCETAG
from tests.ingest_fixtures import build_class_folder, image_bytes

DROP_READ_OVERRIDE = [
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
    "--",
]

pytestmark = pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")


@pytest.fixture
def locked_folder(tmp_path: Path) -> Iterator[Path]:
    """A class folder with one file and one subfolder its reader may not open; restored afterwards."""
    root = build_class_folder(tmp_path, {"cat": 3, "dog": 3})
    secret = root / "cat" / "secret.jpg"
    secret.write_bytes(image_bytes(900))
    hidden = root / "hidden"
    hidden.mkdir()
    (hidden / "inside.jpg").write_bytes(image_bytes(901))
    secret.chmod(0)
    hidden.chmod(0)
    yield root
    secret.chmod(0o644)
    hidden.chmod(0o755)


def test_unreadable_files_and_folders_are_error_records_and_the_rest_is_ingested(
    locked_folder: Path, tmp_path: Path
) -> None:
    probe = subprocess.run([*DROP_READ_OVERRIDE, "cat", str(locked_folder / "cat" / "secret.jpg")], capture_output=True)
    assert probe.returncode != 0, "the dropped capabilities must make chmod 000 deny the reader"

    table = str(tmp_path / "photos.lance")
    run = subprocess.run(
        [*DROP_READ_OVERRIDE, LANCETAG, "ingest", str(locked_folder), "--table", table, "--label-from-dir", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    # The six readable images, one error for the file, one for the folder whose content cannot be listed.
    assert (summary["inputs"], summary["added"], summary["errors"]) == (8, 6, 2)
    assert summary["inputs"] == summary["added"] + summary["duplicates"] + summary["errors"] + summary["skipped"]

    assert sorted(r["truth"] for r in open_table(table).to_table(columns=["truth"]).to_pylist()) == ["cat"] * 3 + ["dog"] * 3
    errors = {Path(e["source"]).name: e for e in read_errors(table).to_pylist()}
    assert set(errors) == {"secret.jpg", "hidden"}
    assert errors["secret.jpg"]["reason"] == "unreadable" and "permission denied" in errors["secret.jpg"]["message"]
    assert errors["hidden"]["reason"] == "unreadable" and "cannot list the folder" in errors["hidden"]["message"]
