"""The web UI's pieces that need no gradio: preview rows of a Lance entry, the missing-gradio error.

The real LlamaBoard, in Chromium, is tested in ``tests/test_lf_webui_browser.py`` (from .venv-webui).
"""

from __future__ import annotations

import pytest

from bench.data import digit_images, write_table
from lance_io.splits import split_of


@pytest.fixture()
def dataset_dir(tmp_path):
    """A dataset_dir with a 5-row Lance table (2 rows per fragment) registered whole and as a split."""
    from llamafactory_ext.register import register_dataset

    write_table(tmp_path / "digits.lance", digit_images(5), rows_per_file=2)
    register_dataset(str(tmp_path / "digits.lance"), "digits_lance", tmp_path)
    register_dataset(
        str(tmp_path / "digits.lance"), "digits_val", tmp_path, split="validation", val_fraction=0.5
    )
    return tmp_path


def test_preview_rows_pages_across_fragments_and_describes_images(dataset_dir):
    from llamafactory_ext.preview import preview_rows

    total, rows = preview_rows(str(dataset_dir), "digits_lance", page_index=1)
    assert total == 5
    assert [r["messages"][1]["content"] for r in rows] == ["this is a photo of 2.", "this is a photo of 3."]
    assert rows[0]["images"][0].startswith("<image: ") and rows[0]["images"][0].endswith(" bytes>")
    _, last = preview_rows(str(dataset_dir), "digits_lance", page_index=2)
    assert len(last) == 1


def test_preview_rows_of_a_split_entry_count_and_show_only_that_split(dataset_dir):
    import lance

    from llamafactory_ext.preview import preview_rows

    ids = lance.dataset(str(dataset_dir / "digits.lance")).to_table(columns=["id"]).column(0).to_pylist()
    in_val = [i for i in ids if split_of(str(i), 0.5, held_out="validation", salt="validation") == "validation"]
    total, rows = preview_rows(str(dataset_dir), "digits_val", page_size=10)
    assert 0 < total < 5  # the split really splits these 5 rows
    assert total == len(in_val) == len(rows)


def test_preview_rows_of_a_native_entry_is_an_error_naming_it(dataset_dir):
    from llamafactory_ext.preview import preview_rows

    with pytest.raises(ValueError, match="'nope' is not a Lance entry"):
        preview_rows(str(dataset_dir), "nope")


def test_webui_without_gradio_fails_with_an_actionable_reason(monkeypatch):
    from llamafactory.extras import packages

    from llamafactory_ext import webui

    monkeypatch.setattr(packages, "is_gradio_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"gradio_missing: .*scripts/setup.sh webui"):
        webui.launch()
