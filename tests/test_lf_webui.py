"""LlamaBoard with Lance entries: its own listing and preview functions, without gradio.

gradio cannot be installed next to Ray Serve in .venv (starlette conflict), so these tests use
``FakeGradio``, a test double that records the components LlamaBoard's functions return; the
functions themselves are LLaMA-Factory's (listing) and the extension's patch (preview).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.lf_fixtures import digit_images, write_native, write_table


class _Component(SimpleNamespace):
    """What a gradio component constructor was called with."""


def fake_gradio() -> SimpleNamespace:
    """Test double for the `gradio` module: Dropdown, Button and Column record their kwargs."""
    return SimpleNamespace(Dropdown=_Component, Button=_Component, Column=_Component)


@pytest.fixture()
def board(monkeypatch, tmp_path):
    """A dataset_dir with a Lance entry and a native entry, and LlamaBoard modules wired to FakeGradio."""
    from llamafactory.webui import control
    from llamafactory.webui.components import data

    import llamafactory_ext
    from llamafactory_ext.register import register_dataset

    llamafactory_ext.activate()
    monkeypatch.setattr(control, "gr", fake_gradio(), raising=False)
    monkeypatch.setattr(data, "gr", fake_gradio(), raising=False)
    images = digit_images(5)
    write_table(tmp_path / "digits.lance", images)
    register_dataset(str(tmp_path / "digits.lance"), "digits_lance", tmp_path)
    rows = [{"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "7"}]}]
    write_native(tmp_path, "native", rows, [images[0][0]])
    return SimpleNamespace(dir=str(tmp_path), control=control, data=data)


def test_llamaboard_lists_a_registered_lance_dataset_next_to_native_ones(board):
    dropdown = board.control.list_datasets(board.dir, "Supervised Fine-Tuning")
    assert set(dropdown.choices) == {"digits_lance", "native"}


def test_llamaboard_preview_pages_through_a_lance_dataset(board):
    assert board.data.can_preview(board.dir, ["digits_lance"]).interactive is True
    total, rows, box = board.data.get_preview(board.dir, ["digits_lance"], 2)
    assert total == 5 and box.visible is True
    assert len(rows) == 1  # page 2 of size 2 over 5 rows
    assert rows[0]["messages"][1]["content"].startswith("this is a photo of ")
    assert rows[0]["images"][0].startswith("<image: ")


def test_llamaboard_preview_of_native_entries_is_unchanged(board):
    assert board.data.can_preview(board.dir, ["native"]).interactive is True
    total, rows, _ = board.data.get_preview(board.dir, ["native"], 0)
    assert total == 1 and rows[0]["messages"][1]["content"] == "7"
    info = json.loads((Path(board.dir) / "dataset_info.json").read_text())
    assert "lance" not in info["native"]


def test_webui_without_gradio_fails_with_an_actionable_reason(monkeypatch):
    from llamafactory.extras import packages

    from llamafactory_ext import webui

    monkeypatch.setattr(packages, "is_gradio_available", lambda: False)
    with pytest.raises(RuntimeError, match="gradio_missing"):
        webui.launch()
