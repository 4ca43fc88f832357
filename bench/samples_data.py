"""A sharegpt dataset shaped like LLaMA-Factory's ``data/mllm_demo.json``, made from real digit images (bench and tests).

Six conversations over three images: several conversations per image, multi-turn, one
conversation showing the same file twice, one over two different images, English and Chinese.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.data import digit_images

SHAREGPT_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
}


def _chat(*turns: str) -> list[dict[str, str]]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


def mllm_demo_samples() -> list[dict]:
    """Return the six samples (image paths relative to the JSON file's folder)."""
    a, b, c = "mllm_demo_data/1.png", "mllm_demo_data/2.png", "mllm_demo_data/3.png"
    return [
        {"messages": _chat("<image>Who are they?", "A digit.", "What is it doing?", "Standing still."), "images": [a]},
        {"messages": _chat("<image>What digit is this?", "It looks like a one."), "images": [b]},
        {"messages": _chat("<image>Describe the strokes.", "Two curves meet."), "images": [c]},
        {"messages": _chat("<image>他们是谁？", "一个数字。", "它在做什么？", "静止不动。"), "images": [a]},
        {"messages": _chat("<image><image>Are these the same picture?", "Yes, twice the same."), "images": [b, b]},
        {"messages": _chat("<image>和<image>有什么不同？", "笔画不同。"), "images": [a, c]},
    ]


def write_mllm_demo(folder: Path, samples: list[dict] | None = None, *, name: str = "mllm_demo") -> Path:
    """Write the images, ``NAME.json`` and a native ``dataset_info.json`` entry; return the JSON path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mllm_demo_data").mkdir(exist_ok=True)
    for i, (data, _) in enumerate(digit_images(3, start=10), start=1):
        (folder / "mllm_demo_data" / f"{i}.png").write_bytes(data)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(samples if samples is not None else mllm_demo_samples(), ensure_ascii=False))
    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[name] = {
        "file_name": path.name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": dict(SHAREGPT_TAGS),
    }
    info_path.write_text(json.dumps(info, indent=2, ensure_ascii=False))
    return path
