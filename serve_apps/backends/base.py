"""The backend interface, its typed config, and the registry that picks a backend by name.

A backend turns image bytes plus a :mod:`task <lance_io.tasks>` into
:class:`~serve_apps.results.LabelResult` records, one per image, in order. It never raises for
one bad image: that image gets an error record and the others are answered.

Backends register themselves by name in their own module::

    @register_backend("vllm")
    class VllmBackend(Backend):
        def __init__(self, config: BackendConfig) -> None: ...
        def label(self, images, task): ...
        def info(self): ...

and :func:`create_backend` imports a backend's module lazily the first time its name is asked
for (``BACKEND_MODULES``), so heavy imports (torch, vllm) happen only where that backend runs.

Example::

    backend = create_backend(BackendConfig(kind="transformers", model="/models/tiny-qwen"))
    results = backend.label([png_bytes, jpeg_bytes], load_task("hotel"))
"""

from __future__ import annotations

import importlib
import io
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from lance_io.augment import ImageViews, read_views
from lance_io.image_size import ImagePixels, model_image, read_image_pixels
from lance_io.reasons import ReasonError
from lance_io.tasks import Question, Task
from serve_apps.results import Answer, ErrorCode, LabelResult, Provenance, assemble, error_result

BACKEND_MODULES: dict[str, str] = {
    "transformers": "serve_apps.backends.transformers_backend",
    "openai": "serve_apps.backends.openai_backend",
    "vllm": "serve_apps.backends.vllm_backend",
    "random": "serve_apps.backends.random_backend",
}
"""Backend name -> module that registers it (imported on first use)."""

HUB_MISSES = frozenset({"HFValidationError", "RepositoryNotFoundError", "LocalEntryNotFoundError", "OfflineModeIsEnabled",
                        "GatedRepoError", "RevisionNotFoundError", "EntryNotFoundError"})
"""huggingface_hub's errors for a model that is neither a folder nor a reachable hub id (transformers and
LLaMA-Factory wrap them in OSErrors that say less): their names in an error mean ``model_not_found``."""

MODEL_HINT = "give a model folder or a hub id (offline: one already in the Hugging Face cache)"

MAX_IMAGE_PIXELS = 40_000_000
"""Images with more pixels are refused (``image_too_large``) before decoding."""


class BackendConfig(BaseModel):
    """How to build a backend. Fields a backend does not use are ignored by it.

    ``options`` carries backend-specific settings (for vllm, e.g. ``max_model_len``,
    ``gpu_memory_utilization``, ``enforce_eager``) so this model stays the same for all.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field("transformers", description="Registered backend name: transformers, vllm, openai, random")
    model: str = Field(description="Local folder or hub id (openai: the served model name)")
    adapter: str | None = Field(None, description="LoRA adapter folder, optional")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    batch_size: int = Field(8, ge=1, le=1024, description="Images per model call")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model (off unless set)")
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1)
    # openai-compatible endpoints
    base_url: str | None = Field(None, description="e.g. http://127.0.0.1:8001/v1")
    api_key_env: str | None = Field(
        None, description="Name of the env var holding the API key (never the key)"
    )
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout")
    retries: int = Field(3, ge=0, le=10, description="Retries on transient errors (connect, 429, 5xx)")
    logprobs: bool = Field(True, description="Ask the endpoint for log-probabilities when it supports them")
    options: dict[str, Any] = Field(default_factory=dict, description="Backend-specific settings")
    views: int | None = Field(
        None, ge=1, le=32,
        description="Views of each image whose closed-set answers are averaged (test-time augmentation); "
        "None: as the model's lancetag_views.json says (written by a validating training run), else 1",
    )

    @property
    def adapter_id(self) -> str | None:
        """The adapter's identity as stored in provenance (its path as given)."""
        return self.adapter


@dataclass
class ChatMessage:
    """One turn of a free-form conversation: role plus text and decoded images, in order.

    ``parts`` holds ``str`` (text) and ``PIL.Image.Image`` (an image) items.
    """

    role: str
    parts: list[Any]


def template_turns(
    messages: list[ChatMessage], pixels: ImagePixels | None = None
) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """Return ``messages`` as a processor's chat-template turns (an image is a placeholder) and their images, in order.

    ``pixels``: the size the model was trained at, which each image is resized to (:meth:`ImagePixels.fit`).
    """
    turns, images = [], []
    for m in messages:
        content: list[dict[str, Any]] = []
        for part in m.parts:
            if isinstance(part, Image.Image):
                images.append(pixels.fit(part) if pixels else part)
                content.append({"type": "image"})
            else:
                content.append({"type": "text", "text": str(part)})
        turns.append({"role": m.role, "content": content})
    return turns, images


@dataclass
class ChatReply:
    """A backend's free-form answer with token counts (for the OpenAI-compatible route)."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"


class Backend(ABC):
    """Turns images into result records for a task. Subclasses register with ``register_backend``."""

    name: ClassVar[str] = ""
    averages_views: ClassVar[bool] = False  # answers closed-set questions from the mean over views of each image

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.views = resolve_views(config) if self.averages_views else None
        self.image_pixels = read_image_pixels(config.adapter, config.model)  # the training's size, if recorded

    @abstractmethod
    def label(self, images: list[bytes], task: Task) -> list[LabelResult]:
        """Return one record per image, in order; a bad image gets an error record, never an exception."""

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """Return what this backend serves: backend, model, adapter, library versions."""

    @classmethod
    def check_task(cls, task: Task) -> None:
        """Raise ReasonError if this backend cannot answer ``task`` (checked before the labeler is deployed)."""
        return None

    def chat(self, messages: list[ChatMessage], *, max_tokens: int = 256) -> ChatReply:
        """Return a free-form answer to a conversation (images allowed); optional for a backend."""
        raise NotImplementedError(f"the {self.name} backend does not answer free-form chat")

    def close(self) -> None:
        """Release the model and any server or connection the backend holds."""
        return None

    def provenance(self, task: Task) -> Provenance:
        """Return the provenance stamped on this backend's results for ``task``."""
        return Provenance(
            model_id=self.config.model,
            adapter_id=self.config.adapter_id,
            task_hash=task.prompt_hash(),
            backend=self.name,
            views=views_used(task, self.views.count if self.views else 1),
        )


def views_for(config: BackendConfig, task: Task) -> int:
    """Return the views of each image a backend built from ``config`` averages for ``task``, as its records say."""
    views = resolve_views(config) if backend_class(config.kind).averages_views else None
    return views_used(task, views.count if views else 1)


def views_used(task: Task, count: int) -> int:
    """Return how many views of each image the answers to ``task`` average: ``count`` if it asks a
    closed-set question (free text is asked of the image alone), else 1."""
    return count if any(q.closed for q in task.questions()) else 1


def resolve_views(config: BackendConfig) -> ImageViews | None:
    """Return the views a backend averages (None: one, the image itself).

    ``config.views`` wins; otherwise the adapter's folder, then the model's, may hold a
    ``lancetag_views.json`` (a hub id or remote endpoint holds none).
    """
    described = next((v for folder in (config.adapter, config.model) if folder and (v := read_views(folder))), None)
    count = config.views if config.views is not None else (described.count if described else 1)
    if count <= 1:
        return None
    return (described or ImageViews()).model_copy(update={"count": count})


_REGISTRY: dict[str, type[Backend]] = {}
B = TypeVar("B", bound=type[Backend])


def register_backend(name: str) -> Callable[[B], B]:
    """Class decorator: make ``create_backend`` build this class for ``BackendConfig(kind=name)``."""

    def decorate(cls: B) -> B:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_backends() -> list[str]:
    """Return the backend names ``create_backend`` accepts."""
    return sorted(set(BACKEND_MODULES) | set(_REGISTRY))


def backend_class(kind: str) -> type[Backend]:
    """Return the class registered as ``kind``, importing its module on first use."""
    if kind not in _REGISTRY and kind in BACKEND_MODULES:
        importlib.import_module(BACKEND_MODULES[kind])
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ReasonError(
            "bad_option", f"unknown backend {kind!r}: choose one of {', '.join(available_backends())}"
        ) from None


def create_backend(config: BackendConfig) -> Backend:
    """Return a ready backend of kind ``config.kind`` (loads the model)."""
    return backend_class(config.kind)(config)


@dataclass
class ImageError:
    """Why an image could not be used: a reason code and a message a user can act on."""

    code: ErrorCode
    message: str


def decode_image(
    data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS, fit: ImagePixels | None = None
) -> Image.Image | ImageError:
    """Return the image as the model sees it (:func:`~lance_io.image_size.model_image`: RGB, upright,
    transparency over white), or an ImageError saying why not.

    ``fit``: the size the model was trained at. The image is resized to it as training resized it,
    and a JPEG larger than that is decoded at 1/2 to 1/8 of its scale first (:class:`ImagePixels`).
    """
    if not data:
        return ImageError(ErrorCode.IMAGE_DECODE_FAILED, "image_decode_failed: empty image (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                return ImageError(
                    ErrorCode.IMAGE_TOO_LARGE,
                    f"image_too_large: {width}x{height} pixels exceeds the limit of {max_pixels}; resize it first",
                )
            return model_image(image, fit)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return ImageError(ErrorCode.IMAGE_TOO_LARGE, f"image_too_large: {exc}")
    except Exception as exc:  # Pillow raises many types for bad data
        reason = "not a recognised image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        return ImageError(
            ErrorCode.IMAGE_DECODE_FAILED,
            f"image_decode_failed: {reason} ({len(data)} bytes, starting {data[:8]!r}); send PNG, JPEG or WebP bytes",
        )


def label_images(
    images: list[bytes],
    task: Task,
    provenance: Provenance,
    answer: Callable[[Question, list[Image.Image]], list[Answer]],
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    views: ImageViews | None = None,
    fit: ImagePixels | None = None,
) -> list[LabelResult]:
    """Decode ``images``, ask each of the task's questions of the good ones, return one record per input.

    ``answer(question, images)`` is the backend's model call: one answer per image, in order. An
    image that cannot be used gets its own error record. A model call that raises is asked again
    of each half of its images, down to single images (:func:`_ask_isolating`), so the reason
    lands on the images the model cannot take (Qwen2-VL refuses an aspect ratio over 200) and the
    rest of their batch is labeled. With ``views``, the closed-set questions are then asked of
    the other views of each image the views call unsure (:meth:`ImageViews.unsure`: every image
    unless ``unsure_at`` is set), and the answer is the value of highest mean probability over all
    its views (free text: the image itself only). ``fit``: the size the model was trained at
    (:func:`decode_image`).
    """
    started = time.perf_counter()
    decoded = [decode_image(b, max_pixels=max_pixels, fit=fit) for b in images]
    good = [i for i, d in enumerate(decoded) if not isinstance(d, ImageError)]
    answered = _ask_isolating(task, [decoded[i] for i in good], answer, views) if good else []
    outcome = dict(zip(good, answered, strict=True))
    per_image_ms = (time.perf_counter() - started) * 1000 / max(len(images), 1)
    out: list[LabelResult] = []
    for i, d in enumerate(decoded):
        if isinstance(d, ImageError):
            out.append(error_result(task, provenance, d.code, d.message))
        elif isinstance(outcome[i], str):
            out.append(error_result(task, provenance, ErrorCode.BACKEND_FAILED, outcome[i]))
        else:
            out.append(assemble(task, outcome[i], provenance, per_image_ms))
    return out


def _ask_isolating(
    task: Task,
    images: list[Image.Image],
    answer: Callable[[Question, list[Image.Image]], list[Answer]],
    views: ImageViews | None,
) -> list[dict[str, Answer] | str]:
    """Each image's answers (keyed by question), or the model's failure on it: ``backend_failed: <error>``.

    A batch whose model call raises is split in two and each half asked again, so one image
    the model cannot take costs about two calls per halving (log2 of the batch) and fails
    alone, and a batch too big for the device is labeled in smaller ones. A model that fails
    whatever it is asked costs about twice the batch's calls before every image gets the reason.
    """
    try:
        return list(_ask_all(task, images, answer, views))
    except Exception as exc:  # the model failed on this batch: find the images it fails on
        if len(images) == 1:
            return [f"backend_failed: {type(exc).__name__}: {exc}"]
        half = len(images) // 2
        return [*_ask_isolating(task, images[:half], answer, views), *_ask_isolating(task, images[half:], answer, views)]


def _ask_all(
    task: Task,
    images: list[Image.Image],
    answer: Callable[[Question, list[Image.Image]], list[Answer]],
    views: ImageViews | None,
) -> list[dict[str, Answer]]:
    """Every question of the task for each image, with the views of the unsure ones; raises what the model raises."""
    answers: list[dict[str, Answer]] = [{} for _ in images]
    for question in task.questions():
        for got, image_answers in zip(answer(question, images), answers, strict=True):
            image_answers[question.key] = got
    closed = [q for q in task.questions() if q.closed]
    if views is None or views.count <= 1 or not closed:
        return answers
    unsure = [k for k, a in enumerate(answers) if views.unsure([a[q.key].confidence for q in closed])]
    others, n = [v for k in unsure for v in views.of(images[k])[1:]], views.count - 1
    for question in closed if unsure else ():
        got_all = answer(question, others)
        for j, k in enumerate(unsure):
            answers[k][question.key] = mean_answer(question, [answers[k][question.key], *got_all[j * n : (j + 1) * n]])
    return answers


def mean_answer(question: Question, answers: list[Answer]) -> Answer:
    """Return the answer of highest mean probability over the answers to views of one image.

    A backend that gave no distribution for a view (an endpoint without log-probabilities) leaves
    the first view's answer, the image itself.
    """
    if len(answers) == 1 or any(a.probabilities is None for a in answers):
        return answers[0]
    assert question.values is not None and question.choices is not None
    mean = {v: sum(a.probabilities[v] for a in answers) / len(answers) for v in question.values}  # type: ignore[index]
    best = max(question.values, key=mean.__getitem__)
    return Answer(
        value=best, raw_text=question.choices[question.values.index(best)], probabilities=mean, confidence=mean[best]
    )
