"""Labels become samples: a label column's chats, a human-written dataset and both together train through one path."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import lance

from bench.data import digit_images, write_table
from bench.samples_data import write_mllm_demo
from tests.conftest import LANCETAG


def _cli(*args: str) -> dict:
    out = subprocess.run([LANCETAG, *args, "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _loaded(source) -> list[tuple[str, tuple[bytes, ...]]]:
    from llamafactory_ext.reader import load_rows

    return sorted((json.dumps(r["messages"]), tuple(r["images"])) for r in load_rows(source))


def test_label_samples_equal_the_label_entry_mix_with_a_sharegpt_dataset_and_follow_relabels(ray_cluster, tmp_path: Path):
    from lance_io.samples import open_samples
    from llamafactory_ext.reader import resolve
    from llamafactory_ext.register import register_dataset
    from llamafactory_ext.source import LanceSource
    from ray_jobs.ingest import IngestOptions, ingest

    table = str(tmp_path / "digits.lance")
    write_table(table, digit_images(12))
    made = _cli("lf", "samples-from-labels", table, "--label-column", "truth")
    assert (made["samples"], made["added"], made["removed"], made["source"]) == (12, 12, 0, "labels:truth")
    again = _cli("lf", "samples-from-labels", table, "--label-column", "truth")
    assert (again["added"], again["removed"]) == (0, 0)  # idempotent: a sample is its content

    from_labels = resolve(LanceSource(uri=table, label_column="truth"))
    as_samples = register_dataset(table, "s", tmp_path / "d", where="source = 'labels:truth'")
    samples_source = LanceSource.model_validate(json.loads((tmp_path / "d" / "dataset_info.json").read_text())["s"]["lance"])
    assert as_samples.rows == 12 and _loaded(samples_source) == _loaded(from_labels)

    demo = write_mllm_demo(tmp_path / "human")
    ingest([str(demo)], table, IngestOptions(progress=False))  # a human-written dataset into the same table
    mixed = register_dataset(table, "mixed", tmp_path / "d")
    assert mixed.rows == 12 + 6
    kinds = sorted(r["source_kind"] for r in open_samples(table).to_table(columns=["source_kind"]).to_pylist())
    assert kinds == ["labels"] * 12 + ["sharegpt"] * 6

    first = lance.dataset(table).to_table(columns=["id"], limit=1).column("id")[0].as_py()
    lance.dataset(table).update({"truth": "'3'"}, where=f"id = '{first}' AND truth != '3'")
    relabeled = _cli("lf", "samples-from-labels", table, "--label-column", "truth")
    assert (relabeled["added"], relabeled["removed"]) == (1, 1)  # the old answer goes, the new one comes
    assert open_samples(table).count_rows() == 18
    answers = [
        r["messages"][-1]["content"]
        for r in open_samples(table).to_table(filter="source = 'labels:truth'").to_pylist()
        if r["image_ids"] == [first]
    ]
    assert len(answers) == 1 and "3" in answers[0]


def test_label_samples_are_made_a_scan_batch_at_a_time_and_follow_relabels(tmp_path: Path, monkeypatch):
    """Batches of 8 rows make the same samples as the rows one by one, across both commits (create, merge)."""
    import pyarrow as pa
    import pytest

    from lance_io import samples as samples_module
    from lance_io.labels import messages_for_row
    from lance_io.scan import TableReadError
    from lance_io.tasks import load_task

    task = load_task("digits")
    labels = [str(n % 10) for n in range(50)]
    labels[3], labels[17] = None, "eleven"  # no answer; an answer outside the task
    uri = str(tmp_path / "t.lance")
    lance.write_dataset(pa.table({"id": [f"img{n:02d}" for n in range(50)], "label": labels}), uri)
    monkeypatch.setattr(samples_module, "SCAN_BATCH", 8)

    def taught() -> dict[str, list]:
        rows = samples_module.open_samples(uri).to_table(columns=["image_ids", "messages"]).to_pylist()
        return {r["image_ids"][0]: r["messages"] for r in rows}

    made = samples_module.label_samples(uri, task, "label")
    assert (made.samples, made.added, made.removed) == (48, 48, 0)
    assert made.skipped == {"label_missing": 1, "label_not_in_task": 1}
    expected = {f"img{n:02d}": messages_for_row(task, "label", {"label": labels[n]})
                for n in range(50) if n not in (3, 17)}
    assert taught() == expected

    relabeled = [labels[n] if n % 2 else str((int(labels[n]) + 1) % 10) for n in range(50) if n != 17]
    lance.write_dataset(pa.table({"id": [f"img{n:02d}" for n in range(50) if n != 17], "label": relabeled}),
                        uri, mode="overwrite")
    again = samples_module.label_samples(uri, task, "label")
    assert (again.samples, again.added, again.removed) == (48, 25, 25)  # the 25 even rows' samples replaced
    diff = samples_module.diff_samples(uri, 1, 2)  # image versions 1 and 2: the samples as of each
    assert (diff.before, diff.after, diff.added, diff.removed) == (48, 48, 25, 25)
    assert taught() == {f"img{n:02d}": messages_for_row(task, "label", {"label": relabeled[k]})
                        for k, n in enumerate(n for n in range(50) if n != 17) if n != 3}

    with pytest.raises(TableReadError) as err:
        samples_module.label_samples(uri, task, "label", where="label ==== '1'")
    assert err.value.reason == "bad_where"
