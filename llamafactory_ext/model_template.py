"""The LLaMA-Factory template a model is fine-tuned with, found from the model itself.

A training config names its template; ``lancetag demo --model M`` has no config of the user's, so
it asks :func:`template_for`. In order:

1. LLaMA-Factory's own table of models (``SUPPORTED_MODELS``, the one its web UI reads): a hub id,
   or a local folder named as a hub id ends (``/models/llava-v1.6-mistral-7b-hf``).
2. The model's ``config.json`` (a hub id's from the cache or the hub): the Qwen2-VL family trains with ``qwen2_vl`` whatever its size;
   a LLaVA-NeXT with ``llava_next_mistral`` over Mistral, and with ``llava_next`` over a Vicuna, whose
   chat template speaks ``USER:`` / ``ASSISTANT:``.

Anything else is refused (``template_unknown``): a template that does not match the model's chat
format trains it on prompts the labeler never sends.
"""

from __future__ import annotations

import json
from pathlib import Path

from lance_io.reasons import ReasonError

QWEN2_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def template_for(model: str) -> str:
    """Return the LLaMA-Factory template to fine-tune ``model`` (a hub id or a local folder) with."""
    from llamafactory.extras.constants import DEFAULT_TEMPLATE, SUPPORTED_MODELS

    wanted = model.rstrip("/").lower()
    folder = Path(model)
    for name, sources in SUPPORTED_MODELS.items():
        for path in sources.values():
            if DEFAULT_TEMPLATE.get(name) and (path.lower() == wanted or (folder.is_dir() and path.lower().endswith("/" + folder.name.lower()))):
                return DEFAULT_TEMPLATE[name]
    config = _config(model)
    kind = config.get("model_type")
    if kind in QWEN2_VL_TYPES:
        return "qwen2_vl"
    if kind == "llava_next":
        text = (config.get("text_config") or {}).get("model_type")
        if text == "mistral":
            return "llava_next_mistral"
        if text == "llama" and _vicuna(folder):
            return "llava_next"
    raise ReasonError(
        "template_unknown",
        f"no LLaMA-Factory template is known for {model} (model_type {kind or 'unknown'}): lancetag demo fine-tunes "
        "the models of LLaMA-Factory's table, the Qwen2-VL family and LLaVA-NeXT over Mistral or Vicuna; "
        "fine-tune this one with lancetag train and a config that names its template",
    )


def _config(model: str) -> dict:
    """Return ``model``'s config: a folder's ``config.json`` as it is, a hub id's through transformers
    (from the cache, or the hub; a miss propagates, and the CLI reports it as ``model_not_found``)."""
    folder = Path(model)
    if folder.is_dir():
        try:
            return json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # no config.json, or not JSON: not a model we know
            return {}
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model).to_dict()


def _vicuna(folder: Path) -> bool:
    """Whether the model's chat template is Vicuna's (``USER: ... ASSISTANT:``)."""
    texts = [folder / "chat_template.jinja", folder / "chat_template.json", folder / "tokenizer_config.json"]
    template = "".join(path.read_text(encoding="utf-8", errors="replace") for path in texts if path.is_file())
    return "USER:" in template and "ASSISTANT:" in template
