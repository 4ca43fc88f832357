"""A sharegpt dataset shaped like LLaMA-Factory's ``data/mllm_demo.json``, made from real digit images (bench and tests).

Six conversations over three images: several conversations per image, multi-turn, one
conversation showing the same file twice, one over two different images, English and Chinese.
"""

from __future__ import annotations

from pathlib import Path

from bench.data import digit_images, write_sharegpt


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
    return write_sharegpt(folder, name, samples if samples is not None else mllm_demo_samples())


def multi_turn_samples(n_images: int) -> list[dict]:
    """Return conversations over ``n_images`` images named ``images/<i>.png``: per image a two-turn English
    and a one-turn Chinese conversation, every third image also a conversation over it and the next one,
    every twentieth one showing it twice (about 2.4 conversations and 2.9 image references per image)."""
    samples = []
    for i in range(n_images):
        image, following = f"images/{i}.png", f"images/{(i + 1) % n_images}.png"
        samples.append(
            {"messages": _chat("<image>Which digit is this?", f"It is image {i}.", "Is it written neatly?", "Yes."),
             "images": [image]}
        )
        samples.append({"messages": _chat("<image>这是哪个数字？", f"图片 {i}。"), "images": [image]})
        if i % 3 == 0:
            samples.append({"messages": _chat("<image>and<image>: the same digit?", "Compare the strokes."),
                            "images": [image, following]})
        if i % 20 == 0:
            samples.append({"messages": _chat("<image><image>Twice the same?", "Yes."), "images": [image, image]})
    return samples


def write_multi_turn(folder: Path, n_images: int, *, name: str = "native", size: int = 56) -> tuple[Path, int, int]:
    """Write ``n_images`` digit PNGs, the sharegpt JSON of :func:`multi_turn_samples` and a native entry.

    Return (the JSON path, number of conversations, image bytes written).
    """
    (folder / "images").mkdir(parents=True, exist_ok=True)
    total = 0
    for i, (data, _) in enumerate(digit_images(n_images, size=size)):
        (folder / "images" / f"{i}.png").write_bytes(data)
        total += len(data)
    samples = multi_turn_samples(n_images)
    return write_sharegpt(folder, name, samples), len(samples), total
