"""LlamaBoard (LLaMA-Factory's web UI) with Lance entries: launching it, and its training subprocesses.

- Listing needs nothing: the UI lists every ``dataset_info.json`` entry of the right stage,
  Lance entries included.
- Preview of Lance entries: :mod:`llamafactory_ext.preview`, installed by
  :func:`llamafactory_ext.patch.activate` before ``create_ui()``.
- Training from the UI runs ``llamafactory-cli train`` in a subprocess: :func:`launch` puts
  the hook's ``sitecustomize`` on its PYTHONPATH so the extension is active there too.
- gradio 5.50 sends a ``gr.JSON`` output of a non-queued event (LlamaBoard's preview is one) as
  the text ``"root=[...]"``, which the page cannot show: :func:`plain_json_outputs` fixes that
  for every dataset, Lance or not.
"""

from __future__ import annotations

import os
from typing import Any


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
