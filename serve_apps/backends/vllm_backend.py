"""The ``vllm`` backend: the vLLM engine inside the labeler's replica, in the ``.venv-vllm`` environment.

Closed sets (classify, attributes, score) are answered one of two ways (``options.closed_set``):

- ``score`` (default): every allowed answer is appended to the image prompt and vLLM returns the
  log-probability of each answer token (``prompt_logprobs``); a softmax over the candidates'
  summed log-likelihoods gives a distribution over the whole set (sums to 1), the same numbers
  the ``transformers`` backend computes. The answer is the most likely candidate, so always in
  the set, and ``confidence`` is its probability.
- ``constrained``: vLLM generates under a grammar that admits only the allowed answers
  (``StructuredOutputsParams(choice=...)``) and ``confidence`` is the probability of the
  generated tokens under the masked, renormalised distribution the decoder sampled from. That
  is one tokenization path of the answer, so it is a lower bound on the answer's probability and
  no distribution over the set is given; it costs a few decode steps instead of one prompt pass
  per candidate (cheaper for large label sets with long answers).

Captions are generated greedily (confidence: mean per-token probability). LoRA adapters load by
path (``BackendConfig.adapter``, or per call with :meth:`VllmBackend.label_with`); the engine is
built with ``enable_lora`` when an adapter is configured or ``options.enable_lora`` is set.

The replica must run in the vLLM environment: :func:`~serve_apps.backends.vllm_env.vllm_runtime_env`
(re-exported here) returns the Ray ``runtime_env`` that starts it with ``.venv-vllm/bin/python``, or
in the vLLM container image on a cluster. See ``docs/vllm.md``.

Example::

    config = BackendConfig(kind="vllm", model="/models/qwen2-vl", adapter="/adapters/hotel-lora")
    LabelerConfig(task="hotel", backend=config, runtime_env=vllm_runtime_env(config))
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from lance_io.tasks import Question, Task
from serve_apps.backends.base import (
    Backend,
    BackendConfig,
    ChatMessage,
    ChatReply,
    label_images,
    register_backend,
    template_turns,
)
from serve_apps.backends.vllm_env import ClosedSetMode, VllmOptions, vllm_options, vllm_runtime_env
from serve_apps.results import Answer, LabelResult

TAILS_CACHED = 256  # questions whose choices' token ids are kept (tasks' questions, routed chat questions)

__all__ = ["ClosedSetMode", "VllmBackend", "VllmOptions", "vllm_options", "vllm_runtime_env"]


def _engine_lora_rank(rank: int) -> int:
    """Return the smallest ``max_lora_rank`` vLLM accepts that fits ``rank`` (vLLM allows a fixed list)."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    allowed = sorted(get_args(MaxLoRARanks))
    fitting = [r for r in allowed if r >= rank]
    if not fitting:
        raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {allowed[-1]}")
    return fitting[0]


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _quiet_cpu_thread_warning() -> None:
    """Drop vLLM's CPU warning logged on every torch.set_num_threads call (once per request in-process)."""
    logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(
        _DropMessage("doesn't allow to use `torch.set_num_threads`")
    )


def _adapter_rank(adapter: str | None) -> int | None:
    """Return the LoRA rank ``r`` an adapter folder declares, or None."""
    if adapter is None:
        return None
    try:
        data = json.loads((Path(adapter) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    ranks = [int(data.get("r") or 0), *(int(v) for v in (data.get("rank_pattern") or {}).values())]
    return max(ranks) or None


@register_backend("vllm")
class VllmBackend(Backend):
    """A local model run by the vLLM engine in this process (vLLM environment only)."""

    averages_views = True

    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        self.options = vllm_options(config)
        # vLLM reads these when the engine is built; the runtime env normally sets them already.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.options.cpu_kvcache_space_gib))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if self.options.multiprocessing else "0")
        from transformers import AutoProcessor
        from vllm import LLM
        from vllm.platforms import current_platform

        self.on_cpu = bool(current_platform.is_cpu())
        enforce_eager = self.options.enforce_eager if self.options.enforce_eager is not None else self.on_cpu
        lora = config.adapter is not None or self.options.enable_lora
        engine_args: dict[str, Any] = {
            "model": config.model,
            "dtype": config.dtype,
            "enforce_eager": enforce_eager,
            "max_model_len": self.options.max_model_len,
            "limit_mm_per_prompt": {"image": self.options.max_images_per_prompt},
            "trust_remote_code": config.trust_remote_code,
            "seed": self.options.seed,
            "tensor_parallel_size": self.options.tensor_parallel_size,
        }
        if not self.on_cpu:
            engine_args["gpu_memory_utilization"] = self.options.gpu_memory_utilization
        if lora:
            rank = _engine_lora_rank(self.options.max_lora_rank or _adapter_rank(config.adapter) or 64)
            engine_args.update(enable_lora=True, max_lora_rank=rank, max_loras=self.options.max_loras)
        engine_args.update(self.options.engine_args)
        if self.on_cpu:
            _quiet_cpu_thread_warning()
        started = time.perf_counter()
        self.llm = LLM(**engine_args)
        self.engine_start_s = time.perf_counter() - started
        self.processor = AutoProcessor.from_pretrained(
            config.model, trust_remote_code=config.trust_remote_code
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.lora_enabled = lora
        self._lora_ids: dict[str, int] = {}
        self._tails: dict[tuple[str, ...], list[list[int]]] = {}

    # ----------------------------------------------------------------- public interface

    def label(self, images: list[bytes], task: Task) -> list[LabelResult]:
        """Return one record per image, in order, with the configured adapter; bad images get error records."""
        return self.label_with(images, task, adapter=self.config.adapter)

    def label_with(
        self, images: list[bytes], task: Task, *, adapter: str | None, closed_set: ClosedSetMode | None = None
    ) -> list[LabelResult]:
        """Return one record per image, in order, answered with LoRA ``adapter`` (None: the base model).

        ``closed_set`` overrides ``options.closed_set`` for this call. Another adapter than the
        configured one needs an engine built with LoRA (an adapter configured, or ``options.enable_lora``).
        """
        mode = closed_set or self.options.closed_set
        provenance = self.provenance(task)
        provenance.adapter_id = adapter

        def answer(question: Question, pil: list[Any]) -> list[Answer]:
            lora = self._lora_request(adapter)
            if not question.closed:
                return self._generate(pil, question, lora)
            if mode == "constrained":
                return self._constrained(pil, question, lora)
            return self._score(pil, question, lora)

        return label_images(images, task, provenance, answer, max_pixels=self.config.max_image_pixels, views=self.views,
                            fit=self.image_pixels)

    def info(self) -> dict[str, Any]:
        """Return backend, model, adapter, closed-set mode, device, interpreter and library versions."""
        import torch
        import transformers
        import vllm

        return {
            "backend": self.name,
            "model": self.config.model,
            "adapter": self.config.adapter,
            "closed_set": self.options.closed_set,
            "views": self.views.count if self.views else 1,
            "image_pixels": vars(self.image_pixels) if self.image_pixels else None,  # None: the processor's own
            "device": "cpu" if self.on_cpu else "gpu",
            "dtype": self.config.dtype,
            "python": sys.executable,
            "engine_start_s": round(self.engine_start_s, 2),
            "versions": {
                "vllm": vllm.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
        }

    def chat(self, messages: list[ChatMessage], *, max_tokens: int = 256) -> ChatReply:
        """Return the greedy answer to a conversation whose turns may carry images."""
        from vllm import SamplingParams

        chat, images = template_turns(messages, self.image_pixels)
        text = self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        request: dict[str, Any] = {"prompt": text}
        if images:
            request["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        (out,) = self.llm.generate(
            [request], params, lora_request=self._lora_request(self.config.adapter), use_tqdm=False
        )
        completion = out.outputs[0]
        return ChatReply(
            text=completion.text.strip(),
            prompt_tokens=len(out.prompt_token_ids or []),
            completion_tokens=len(completion.token_ids),
            finish_reason=completion.finish_reason or "stop",
        )

    def close(self) -> None:
        """Drop the engine so its memory can be freed."""
        self.llm = None

    # ----------------------------------------------------------------- internals

    def _lora_request(self, adapter: str | None) -> Any:
        """Return the LoRARequest for an adapter folder (ids are stable per path), or None."""
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        if not self.lora_enabled:
            raise ValueError(
                f"adapter {adapter}: this engine was built without LoRA; configure an adapter or options.enable_lora"
            )
        if not (Path(adapter) / "adapter_config.json").exists():
            raise FileNotFoundError(
                f"adapter {adapter}: no adapter_config.json (expected a peft LoRA folder)"
            )
        lora_id = self._lora_ids.setdefault(adapter, len(self._lora_ids) + 1)
        return LoRARequest(Path(adapter).name or "adapter", lora_id, str(adapter))

    def _messages(self, question: Question, answer: str | None = None) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if question.system:
            messages.append({"role": "system", "content": question.system})
        messages.append(
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.prompt}]}
        )
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return messages

    def _prompt_text(self, question: Question) -> str:
        return self.processor.apply_chat_template(
            self._messages(question), add_generation_prompt=True, tokenize=False
        )

    def _prompt_ids(self, question: Question) -> list[int]:
        return self.tokenizer(self._prompt_text(question), add_special_tokens=False)["input_ids"]

    def _tail_ids(self, question: Question) -> list[list[int]]:
        """Token ids of every choice as the chat template ends it (answer + end of turn).

        Same continuation the transformers backend scores: the text the template adds after the
        generation prompt, cut after the end-of-turn token, tokenized on its own (as LLaMA-Factory
        tokenizes responses), so both backends give the same probabilities for the same model.
        """
        assert question.choices is not None
        key = (question.system or "", question.prompt, *question.choices)
        if key not in self._tails:
            prompt = self._prompt_text(question)
            eos = self.tokenizer.eos_token or ""
            rows = []
            for choice in question.choices:
                full = self.processor.apply_chat_template(self._messages(question, choice), tokenize=False)
                tail = full[len(prompt) :] if full.startswith(prompt) else choice + eos
                if eos and eos in tail:
                    tail = tail[: tail.index(eos) + len(eos)]
                rows.append(self.tokenizer(tail, add_special_tokens=False)["input_ids"])
            if len(self._tails) >= TAILS_CACHED:  # oldest first out: chat questions are unbounded
                del self._tails[next(iter(self._tails))]
            self._tails[key] = rows
        return self._tails[key]

    def _score(self, images: list[Any], question: Question, lora: Any) -> list[Answer]:
        """Answer a closed-set question per image from every candidate's log-likelihood (softmax over the set)."""
        from vllm import SamplingParams

        assert question.choices is not None and question.values is not None
        prompt = self._prompt_ids(question)
        tails = self._tail_ids(question)
        requests = [
            {"prompt_token_ids": prompt + tail, "multi_modal_data": {"image": image}}
            for image in images
            for tail in tails
        ]
        # prompt_logprobs=0: the log-probability of each prompt token itself (top-0 alternatives).
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate(requests, params, lora_request=lora, use_tqdm=False)
        n = len(tails)
        answers = []
        for b in range(len(images)):
            totals = []
            for c, tail in enumerate(tails):
                out = outputs[b * n + c]
                rows = out.prompt_logprobs[-len(tail) :]
                ids = out.prompt_token_ids[-len(tail) :]
                totals.append(sum(row[tid].logprob for row, tid in zip(rows, ids, strict=True)))
            top = max(totals)
            weights = [math.exp(t - top) for t in totals]
            norm = sum(weights)
            dist = {v: w / norm for v, w in zip(question.values, weights, strict=True)}
            best = max(range(n), key=lambda j: totals[j])
            value = question.values[best]
            answers.append(
                Answer(
                    value=value, raw_text=question.choices[best], probabilities=dist, confidence=dist[value]
                )
            )
        return answers

    def _constrained(self, images: list[Any], question: Question, lora: Any) -> list[Answer]:
        """Answer a closed-set question per image by decoding under a grammar of the allowed answers."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        assert question.choices is not None
        prompt = self._prompt_ids(question)
        # A grammar may spell an answer byte by byte: leave room for the longest one, plus end of turn.
        longest = max(len(c.encode()) for c in question.choices) + 2
        params = SamplingParams(
            max_tokens=longest,
            temperature=0.0,
            logprobs=0,
            structured_outputs=StructuredOutputsParams(choice=list(question.choices)),
        )
        requests = [{"prompt_token_ids": prompt, "multi_modal_data": {"image": image}} for image in images]
        outputs = self.llm.generate(requests, params, lora_request=lora, use_tqdm=False)
        answers = []
        for out in outputs:
            completion = out.outputs[0]
            text = completion.text
            # Logprobs are taken after the grammar mask: the probability among allowed continuations.
            logprob = completion.cumulative_logprob
            confidence = math.exp(logprob) if logprob is not None else None
            answers.append(Answer(value=question.match(text), raw_text=text, confidence=confidence))
        return answers

    def _generate(self, images: list[Any], question: Question, lora: Any) -> list[Answer]:
        """Answer a free-text question per image by greedy decoding (mean token probability as confidence)."""
        from vllm import SamplingParams

        prompt = self._prompt_ids(question)
        params = SamplingParams(max_tokens=question.max_tokens, temperature=0.0, logprobs=0)
        requests = [{"prompt_token_ids": prompt, "multi_modal_data": {"image": image}} for image in images]
        outputs = self.llm.generate(requests, params, lora_request=lora, use_tqdm=False)
        answers = []
        for out in outputs:
            completion = out.outputs[0]
            text = completion.text.strip()
            count = len(completion.token_ids)
            logprob = completion.cumulative_logprob
            confidence = math.exp(logprob / count) if count and logprob is not None else None
            answers.append(Answer(value=text, raw_text=text, confidence=confidence))
        return answers
