"""No training example of a Lance entry is cut to ``cutoff_len``.

LLaMA-Factory cuts an example longer than ``cutoff_len`` tokens without a word: the end of the
prompt goes first (for a closed-set task, the last labels of the list and the turn's closing
tokens), then the answer. The model then learns from a prompt the labeler never sends, and answers
the full prompt at random: a 22-class task whose label list is 295 tokens trained at 256 scored
27.5% held out, under the pixel baselines. So a run that reads a Lance entry refuses such examples
with ``cutoff_too_short`` and the length they need (:func:`preprocess_uncut`), and
:func:`cutoff_for` gives a run built from a task (the demo) a ``cutoff_len`` that holds its
longest example, its image's tokens counted by LLaMA-Factory's own rule for the model
(:func:`image_tokens`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyarrow.compute as pc

from lance_io.reasons import ReasonError
from lance_io.tasks import Task

TEMPLATE_TOKENS = 64  # a chat template's own tokens around one turn: system prompt, role tags, image markers
ROUND_TO = 64
UNCUT = 1 << 30
PROBE_RATIOS = (1 / 3, 3.0)  # images from 3:1 tall to 3:1 wide, whatever the data
PROBE_STEPS = 33  # aspects probed between the tallest and the widest: Qwen2-VL's count is not monotone in them


class CutoffError(ReasonError):
    """Training examples longer than ``cutoff_len``; ``reason`` is ``cutoff_too_short``."""


def cutoff_for(task: Task, tokenizer: Any, visual_tokens: int) -> int:
    """Return a ``cutoff_len`` (a multiple of ROUND_TO) that holds every turn of ``task`` over one
    image of ``visual_tokens`` tokens, with its longest answer."""

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    needed = visual_tokens
    for question in task.questions():  # an attribute task asks several, in one conversation
        needed += TEMPLATE_TOKENS + length(question.prompt) + length(question.system or "")
        needed += max((length(choice) for choice in question.choices or ()), default=question.max_tokens)
    return ROUND_TO * math.ceil(needed / ROUND_TO)


def probe_shapes(max_pixels: int, ratios: Iterable[float] = ()) -> list[tuple[int, int]]:
    """Return the (width, height) of images of ``max_pixels`` pixels whose aspects run in PROBE_STEPS
    geometric steps from the tallest to the widest of PROBE_RATIOS and ``ratios`` (width over height)."""
    aspects = [*PROBE_RATIOS, *ratios]
    low, high = math.log(min(aspects)), math.log(max(aspects))
    shapes = []
    for step in range(PROBE_STEPS):
        ratio = math.exp(low + (high - low) * step / (PROBE_STEPS - 1))
        height = max(1, round(math.sqrt(max_pixels / ratio)))
        shapes.append((max(1, round(height * ratio)), height))
    return shapes


def image_tokens(
    model: str, template: str, max_pixels: int, min_pixels: int | None = None, ratios: Iterable[float] = ()
) -> int:
    """Return the most tokens LLaMA-Factory's ``template`` gives one image of at most ``max_pixels``
    pixels for ``model``, by its own rule (the template's plugin, the model's processor), over the
    :func:`probe_shapes` of ``ratios``, such as the data's widest and tallest. Qwen2-VL's count moves
    with an image's aspect (not always up: its sides round to 28 pixels), LLaVA-NeXT's with its tiles."""
    return _image_tokens(_processor(model, max_pixels, min_pixels), template, max_pixels, ratios)


def task_cutoff(
    task: Task, model: str, template: str, max_pixels: int, min_pixels: int | None = None, ratios: Iterable[float] = ()
) -> int:
    """Return :func:`cutoff_for` ``task`` over one image of :func:`image_tokens`, the model's processor loaded once."""
    processor = _processor(model, max_pixels, min_pixels)
    return cutoff_for(task, processor.tokenizer, _image_tokens(processor, template, max_pixels, ratios))


def _processor(model: str, max_pixels: int, min_pixels: int | None) -> Any:
    from llamafactory.hparams import ModelArguments
    from llamafactory.model.patcher import patch_processor
    from transformers import AutoProcessor

    bounds = {"image_max_pixels": max_pixels} | ({} if min_pixels is None else {"image_min_pixels": min_pixels})
    processor = AutoProcessor.from_pretrained(model)
    patch_processor(processor, processor.tokenizer, ModelArguments(model_name_or_path=model, **bounds))
    return processor


def _image_tokens(processor: Any, template: str, max_pixels: int, ratios: Iterable[float]) -> int:
    from llamafactory.data.template import TEMPLATES
    from llamafactory.extras.constants import IMAGE_PLACEHOLDER
    from PIL import Image

    plugin = TEMPLATES[template].mm_plugin
    counts = []
    for size in probe_shapes(max_pixels, ratios):
        (message,) = plugin.process_messages([{"role": "user", "content": IMAGE_PLACEHOLDER}], [Image.new("RGB", size)], [], [], processor)
        counts.append(message["content"].count(plugin.image_token))
    return max(counts)


def preprocess_uncut(original: Callable[..., Any], dataset: Any, data_args: Any, *rest: Any, **kwargs: Any) -> Any:
    """Run LLaMA-Factory's ``_get_preprocessed_dataset`` (``original``) with ``cutoff_len`` lifted, and
    refuse the result if an example is longer than ``data_args.cutoff_len`` (CutoffError).

    Where every example fits, LLaMA-Factory cuts nothing, so the result is what it would have
    given. An in-memory dataset is checked now (one pass over its lengths); a streamed one is
    returned wrapped, and the first such example read raises.
    """
    lifted = copy.copy(data_args)
    lifted.cutoff_len = UNCUT
    processed = original(dataset, lifted, *rest, **kwargs)
    limit = data_args.cutoff_len
    if processed is None:
        return processed
    if not hasattr(processed, "__len__"):  # streamed: checked as it is read
        return processed.map(_raise_on_cut, batched=True, fn_kwargs={"cutoff_len": limit})
    cut, longest = 0, 0
    for sizes in _length_batches(processed):
        cut += sum(size > limit for size in sizes)
        longest = max([longest, *sizes])
    if cut:
        raise CutoffError("cutoff_too_short", _message(f"{cut} of {len(processed)} training examples are", limit, longest))
    return processed


def _length_batches(dataset: Any) -> Iterator[list[int]]:
    lengths = dataset.select_columns(["input_ids"]).with_format("arrow")
    for batch in lengths.iter(batch_size=8192):
        yield pc.list_value_length(batch.column("input_ids")).to_pylist()


def _raise_on_cut(batch: dict[str, list[Any]], cutoff_len: int) -> dict[str, list[Any]]:
    longest = max((len(ids) for ids in batch.get("input_ids", ())), default=0)
    if longest > cutoff_len:
        raise CutoffError("cutoff_too_short", _message("a training example is", cutoff_len, longest))
    return batch


def _message(which: str, cutoff_len: int, longest: int) -> str:
    return (
        f"{which} longer than cutoff_len ({cutoff_len} tokens; the longest is {longest}). "
        "LLaMA-Factory would cut the end of their prompt "
        "(a closed-set task's label list, the turn's closing tokens) or answer, and the model would learn "
        "from text the labeler never sends: raise cutoff_len (each image adds its visual tokens, "
        "each label its tokens to the prompt)"
    )
