"""LlamaBoard's dataset preview for Lance entries.

Stock preview opens ``file_name`` as a file; :func:`patch_preview` makes the preview button and
pages read Lance entries through :func:`preview_rows` (images shown as a short description, not
bytes). Gradio binds these functions when the UI is built, so :func:`llamafactory_ext.patch.activate`
applies the patch before ``create_ui()``.
"""

from __future__ import annotations

from typing import Any

from llamafactory_ext.source import FILE_NAME_PREFIX, lance_source_of, read_dataset_info

PAGE_SIZE = 2  # as LLaMA-Factory's preview


def _lance_source(dataset_dir: str, names: list[str]) -> Any:
    """Return the Lance source of the first selected dataset, None for other entries."""
    if not names:
        return None
    entry = read_dataset_info(dataset_dir).get(names[0], {})
    if not str(entry.get("file_name", "")).startswith(FILE_NAME_PREFIX):
        return None
    return lance_source_of(entry, name=names[0])


def preview_rows(
    dataset_dir: str, name: str, page_index: int = 0, page_size: int = PAGE_SIZE
) -> tuple[int, list]:
    """Return ``(row count, rows of page_index)`` of a Lance entry, as the preview shows them."""
    from llamafactory_ext.reader import count_rows, iter_tables, resolve

    source = _lance_source(dataset_dir, [name])
    if source is None:
        raise ValueError(f"{name!r} is not a Lance entry of {dataset_dir}")
    source = resolve(source)
    total = count_rows(source)
    start, stop = page_index * page_size, (page_index + 1) * page_size
    rows, seen = [], 0
    for table in iter_tables(source):
        if seen + table.num_rows > start:
            for row in table.slice(max(0, start - seen), stop - max(seen, start)).to_pylist():
                row["images"] = [f"<image: {len(b)} bytes>" for b in row["images"]]
                rows.append(row)
        seen += table.num_rows
        if seen >= stop:
            break
    return total, rows


def patch_preview() -> None:
    """Make LlamaBoard's preview button and pages work for Lance entries (idempotent)."""
    from llamafactory.webui.components import data

    if getattr(data.can_preview, "__lancetag_wrapped__", False):
        return
    stock_can_preview, stock_get_preview = data.can_preview, data.get_preview

    def can_preview(dataset_dir: str, dataset: list) -> Any:
        if _lance_source(dataset_dir, dataset) is None:
            return stock_can_preview(dataset_dir, dataset)
        return data.gr.Button(interactive=True)

    def get_preview(dataset_dir: str, dataset: list, page_index: int) -> Any:
        if _lance_source(dataset_dir, dataset) is None:
            return stock_get_preview(dataset_dir, dataset, page_index)
        total, rows = preview_rows(dataset_dir, dataset[0], int(page_index), data.PAGE_SIZE)
        return total, rows, data.gr.Column(visible=True)

    for fn in (can_preview, get_preview):
        fn.__lancetag_wrapped__ = True  # type: ignore[attr-defined]
    data.can_preview, data.get_preview = can_preview, get_preview
