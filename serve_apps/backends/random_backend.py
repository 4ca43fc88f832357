"""The ``random`` backend: seeded random answers, for load tests and the article's demo scorer.

The Ray article's scoring service returned a random score in 60-100 ("replace with a model in
production"). This backend is that service as a real backend of the Serve app: requests go
through the same deployment, dynamic batching, HTTP client and commit path as every model, so
a run measures the platform (reading rows, moving bytes, batching, commits) without a model.

- ``classify``: a probability distribution over the task's labels (flat Dirichlet) and a label
  drawn from it; ``confidence`` is that label's probability.
- ``score``: an integer drawn uniformly from ``[min_score, max_score]``; the distribution is the
  uniform one, so ``confidence`` is ``1 / (max_score - min_score + 1)``.
- other kinds (``caption``, ``attributes``) are refused with a :class:`ReasonError` when the
  labeler is built (:meth:`RandomBackend.check_task`), before anything is deployed.

Answers are reproducible: each image's generator is seeded from ``options["seed"]`` (default
0), the sha256 of the image bytes (the table's ``id`` is its first 32 hex digits) and the
question, so a rerun, another batch size or another replica gives every image the same answer.
``options["latency_ms"]`` (default 0) makes each image cost that much wall time, as a model's
inference would (the replica's thread sleeps, using no CPU): fault and autoscaling tests need a
run that lasts and requests that queue, on a 2-core machine.

Every image is decoded with :func:`~serve_apps.backends.base.decode_image`, like the model
backends do: undecodable images get ``image_decode_failed`` records, oversized ones
``image_too_large``, and a load test pays the per-image decode every real labeler pays.

Example::

    backend = create_backend(BackendConfig(kind="random", model="random", options={"seed": 7}))
    backend.label([png_bytes], load_task("quality"))[0].score   # e.g. 83, the same every run
"""

from __future__ import annotations

import hashlib
import random
import time
from typing import Any

from lance_io.reasons import ReasonError
from lance_io.tasks import Question, Task
from serve_apps.backends.base import Backend, BackendConfig, ImageError, decode_image, register_backend
from serve_apps.results import Answer, LabelResult, assemble, error_result

SUPPORTED_KINDS = ("classify", "score")


@register_backend("random")
class RandomBackend(Backend):
    """Seeded random labels and scores; no model is loaded."""

    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        seed = config.options.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ReasonError("bad_backend_option", f"random backend: options.seed must be an integer, got {seed!r}")
        self.seed = seed
        latency = config.options.get("latency_ms", 0)
        if not isinstance(latency, int | float) or isinstance(latency, bool) or latency < 0:
            raise ReasonError("bad_backend_option", f"random backend: options.latency_ms must be a number >= 0, got {latency!r}")
        self.latency_s = latency / 1000

    @classmethod
    def check_task(cls, task: Task) -> None:
        """Refuse tasks other than classify and score: there is no meaningful random caption."""
        if task.kind not in SUPPORTED_KINDS:
            raise ReasonError(
                "task_kind_unsupported",
                f"the random backend answers classify and score tasks, not {task.kind} "
                f"(task {task.name!r}); serve this task with a model backend (transformers, vllm, openai)",
            )

    def label(self, images: list[bytes], task: Task) -> list[LabelResult]:
        """Return one record per image, in order: a seeded random answer, or the image's decode error."""
        self.check_task(task)
        provenance = self.provenance(task)
        uniform = task.kind == "score"
        started = time.perf_counter()
        out = []
        for data in images:
            decoded = decode_image(data, max_pixels=self.config.max_image_pixels)
            if isinstance(decoded, ImageError):
                out.append(error_result(task, provenance, decoded.code, decoded.message))
                continue
            digest = hashlib.sha256(data).hexdigest()
            answers = {q.key: self._answer(q, digest, uniform=uniform) for q in task.questions()}
            out.append(assemble(task, answers, provenance, latency_ms=0.0))
        if self.latency_s:
            time.sleep(self.latency_s * len(images))
        per_image_ms = round((time.perf_counter() - started) * 1000 / max(len(images), 1), 3)
        return [r.model_copy(update={"latency_ms": per_image_ms}) if r.ok else r for r in out]

    def _answer(self, question: Question, digest: str, *, uniform: bool) -> Answer:
        """Draw one image's answer to ``question`` from a generator seeded by seed, content and question."""
        values = question.values or ()
        rng = random.Random(f"{self.seed}:{digest}:{question.key}")  # str seeds hash the same in every process
        # Normalised exponentials are a flat Dirichlet: a distribution shaped like a model's.
        weights = [1.0] * len(values) if uniform else [rng.expovariate(1.0) for _ in values]
        total = sum(weights)
        probabilities = {v: w / total for v, w in zip(values, weights, strict=True)}
        value = rng.choices(values, weights=weights)[0]
        return Answer(value, raw_text=value, probabilities=probabilities, confidence=probabilities[value])

    def info(self) -> dict[str, Any]:
        """Return backend, model name, seed and the kinds it answers."""
        return {
            "backend": self.name,
            "model": self.config.model,
            "adapter": self.config.adapter,
            "seed": self.seed,
            "latency_ms": self.latency_s * 1000,
            "kinds": list(SUPPORTED_KINDS),
            "batch_size": self.config.batch_size,
        }
