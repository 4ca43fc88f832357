"""LlamaBoard (LLaMA-Factory's web UI) with Lance entries: listing, preview, training subprocess.

- Listing needs nothing: the UI lists every ``dataset_info.json`` entry of the right stage,
  Lance entries included.
- Preview: stock preview opens ``file_name`` as a file; :func:`patch_preview` makes the
  preview button and pages read Lance entries through :func:`preview_rows` (images shown as
  a short description, not bytes). Gradio binds these functions when the UI is built, so
  the patch is applied before ``create_ui()``.
- Training from the UI runs ``llamafactory-cli train`` in a subprocess: :func:`launch` puts
  the hook's ``sitecustomize`` on its PYTHONPATH so the extension is active there too.
- gradio 5.50 sends a ``gr.JSON`` output of a non-queued event (LlamaBoard's preview is one) as
  the text ``"root=[...]"``, which the page cannot show: :func:`plain_json_outputs` fixes that
  for every dataset, Lance or not.
"""

from __future__ import annotations

import os
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
    from llamafactory_ext.reader import iter_tables, resolve

    source = _lance_source(dataset_dir, [name])
    if source is None:
        raise ValueError(f"{name!r} is not a Lance entry of {dataset_dir}")
    source = resolve(source)
    total = _count(source)
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


def _count(source: Any) -> int:
    """Return the number of rows the entry loads (reads only the id column when a split applies)."""
    from lance_io.scan import open_at, scan_batches

    ds = open_at(source.uri, source.ref(), storage_options=source.storage_options())
    if source.split == "all":
        return ds.count_rows(filter=source.where)
    ids = (
        i for b in scan_batches(ds, [source.id_column], where=source.where) for i in b.column(0).to_pylist()
    )
    return sum(source.keeps(str(i)) for i in ids)


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


def subprocess_environment(env: dict[str, str]) -> dict[str, str]:
    """Return ``env`` changed so that a ``llamafactory-cli train`` started with it loads Lance entries.

    LlamaBoard starts training as ``llamafactory-cli train`` with a copy of its own environment:
    the hook's ``sitecustomize`` goes first on PYTHONPATH, and this interpreter's ``bin`` first on
    PATH (so the subprocess is the same environment's ``llamafactory-cli``).
    """
    import sys

    from llamafactory_ext.hook import ENV_SWITCH, pythonpath_with_hook

    out = dict(env)
    out["PYTHONPATH"] = pythonpath_with_hook(env.get("PYTHONPATH"))
    out["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    out.setdefault(ENV_SWITCH, "1")
    return out


def plain_json_outputs() -> None:
    """Make ``gr.JSON`` outputs plain JSON values, so non-queued events show them (idempotent).

    gradio's ``JSON.postprocess`` returns a pydantic ``JsonData``, but gradio dumps only its own
    ``GradioModel``/``GradioRootModel`` outputs to plain data; the route of non-queued events
    (``/run/predict``) then serialises ``JsonData`` with ``str()``. Same code in gradio 5.40-5.50.
    """
    import gradio as gr

    stock = gr.JSON.postprocess
    if getattr(stock, "__lancetag_wrapped__", False):
        return

    def postprocess(self: Any, value: Any) -> Any:
        data = stock(self, value)
        return getattr(data, "root", data)

    postprocess.__lancetag_wrapped__ = True  # type: ignore[attr-defined]
    gr.JSON.postprocess = postprocess


def set_default_dataset_dir(dataset_dir: str) -> None:
    """Make ``dataset_dir`` the value of the train and eval tabs' "Data dir" box (before ``create_ui()``)."""
    from llamafactory.webui import control
    from llamafactory.webui.components import eval as eval_tab
    from llamafactory.webui.components import train as train_tab

    for module in (control, eval_tab, train_tab):
        module.DEFAULT_DATA_DIR = dataset_dir


def launch(
    host: str = "127.0.0.1", port: int = 7860, dataset_dir: str | None = None, share: bool = False
) -> None:
    """Run LlamaBoard with the extension active here and in its training subprocesses (blocks).

    ``dataset_dir`` fills the "Data dir" box (LlamaBoard's default is ``data`` in the working
    directory). gradio's usage analytics stay off unless ``GRADIO_ANALYTICS_ENABLED`` says otherwise.
    """
    from llamafactory.extras.packages import is_gradio_available

    if not is_gradio_available():
        raise RuntimeError(
            "gradio_missing: the web UI needs gradio, which conflicts with Ray Serve in .venv; "
            "set up .venv-webui (`scripts/setup.sh webui`) and run `.venv-webui/bin/lancetag webui`"
        )
    from llamafactory_ext.patch import activate

    os.environ.update(subprocess_environment(dict(os.environ)))
    os.environ.setdefault("GRADIO_SERVER_NAME", host)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    activate()
    plain_json_outputs()
    if dataset_dir is not None:
        set_default_dataset_dir(dataset_dir)
    from llamafactory.webui.interface import create_ui

    create_ui().queue().launch(server_name=host, server_port=port, share=share, inbrowser=False)
