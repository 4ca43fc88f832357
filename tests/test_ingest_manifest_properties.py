"""Property-based: any manifest either lists items (each a located input or an error with a reason)
or is refused with a SourceError; never a crash, never a path outside the manifest's root."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ray_jobs.ingest.options import IngestOptions
from ray_jobs.ingest.sources import SourceError, open_source

path_parts = st.sampled_from(["a.jpg", "..", ".", "imgs", "/etc/passwd", "~", "x y.png", "é.jpg", "", "\\..\\", "%2e%2e"])
paths = st.lists(path_parts, min_size=1, max_size=4).map("/".join)
values = st.one_of(st.none(), st.text(max_size=20), st.integers(), st.floats(allow_nan=False), paths)
rows = st.lists(
    st.fixed_dictionaries({"path": st.one_of(paths, st.none(), st.integers())}, optional={"truth": values, "note": values}),
    min_size=0,
    max_size=8,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=rows, as_csv=st.booleans())
@example(rows=[{"path": 2**63}], as_csv=False)  # found by hypothesis in CI: over 64 bits
def test_any_manifest_lists_items_or_is_refused_and_never_escapes_its_root(rows, as_csv):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        if as_csv:
            import csv

            manifest = root / "m.csv"
            with manifest.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["path", "truth", "note"])
                writer.writeheader()
                writer.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
        else:
            manifest = root / "m.jsonl"
            manifest.write_text("\n".join(json.dumps(r) for r in rows))
        try:
            items = list(open_source(str(manifest), IngestOptions()).items())
        except SourceError as exc:
            assert str(exc), "a refusal says why"
            return
        assert len(items) <= len(rows)
        for item in items:
            if item.error is not None:
                assert item.error[0] and item.error[1], "an error has a reason code and a message"
            elif item.path is not None:
                assert Path(item.path).resolve().is_relative_to(root.resolve()), item.path
