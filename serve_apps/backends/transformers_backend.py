"""The ``transformers`` backend: any image-text model that ``AutoModelForImageTextToText`` loads.

Closed sets (classify, attributes, score) are answered by *scoring*, not generating: the image
and prompt (the prefix) go through the model once per image, its KV cache is repeated for every
candidate answer, and each candidate's summed log-likelihood is computed in one batched forward
over the candidates. A softmax over those sums gives the probabilities, so the answer is always
in the set. Captions are generated greedily. Tested with Qwen2-VL and LLaVA-NeXT; Qwen2.5-VL
uses the same multimodal-RoPE path as Qwen2-VL.

Example::

    backend = create_backend(BackendConfig(kind="transformers", model="Qwen/Qwen2-VL-2B-Instruct"))
    backend.label([jpeg_bytes], load_task("hotel"))[0].label   # 'Pool'
"""

from __future__ import annotations

import threading
from typing import Any

from PIL import Image

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
from serve_apps.results import Answer, LabelResult

DEFAULT_MAX_CANDIDATE_ROWS = 512
"""Rows (images x candidates) scored in one forward; bounds the repeated KV cache's memory."""


def _threads_of_replica() -> int | None:
    """Return the torch threads of a CPU model in a Ray worker: its CPUs rounded up (None: leave as is).

    Ray sets a worker's ``OMP_NUM_THREADS`` to the floor of its CPUs, so a replica given 1.5 CPUs
    (a core of its own, half of one it shares with the light row readers) would compute on one
    thread; rounded up it uses both cores. An ``OMP_NUM_THREADS`` of your own (other than that
    floor) wins.
    """
    import math
    import os

    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if not cpus or os.environ.get("OMP_NUM_THREADS") != str(max(1, math.floor(cpus))):
        return None
    return math.ceil(cpus)


def _shared_start(ids: Any, mask: Any) -> int:
    """Return how many leading tokens all candidates share, leaving each at least one of its own."""
    same = (ids == ids[:1]).all(dim=0) & mask.bool().all(dim=0)
    common = int(same.long().cumprod(0).sum())
    return max(0, min(common, int(mask.sum(dim=1).min()) - 1))


def _append_tokens(inputs: Any, tokens: Any) -> Any:
    """Return processor ``inputs`` with ``tokens`` (plain text, attended) appended to every row."""
    import torch

    batch = inputs["input_ids"].shape[0]
    extra = {
        "input_ids": tokens.to(inputs["input_ids"])[None].expand(batch, -1),
        "attention_mask": torch.ones(batch, len(tokens), dtype=inputs["attention_mask"].dtype),
    }
    for name in ("token_type_ids", "mm_token_type_ids"):  # text, not image, where a processor marks it
        if name in inputs:
            extra[name] = torch.zeros(batch, len(tokens), dtype=inputs[name].dtype)
    for name, tail in extra.items():
        inputs[name] = torch.cat([inputs[name], tail.to(inputs[name].device)], dim=1)
    return inputs


def _torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


@register_backend("transformers")
class TransformersBackend(Backend):
    """A local or hub image-text model run in this process with transformers (LoRA via peft)."""

    averages_views = True

    def __init__(self, config: BackendConfig) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        super().__init__(config)
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.dtype = _torch_dtype(config.dtype, device)
        if device == "cpu" and (threads := _threads_of_replica()):
            torch.set_num_threads(threads)
        self.processor = AutoProcessor.from_pretrained(
            config.model, trust_remote_code=config.trust_remote_code
        )
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # prefixes are left-padded so their last tokens line up
        model = AutoModelForImageTextToText.from_pretrained(
            config.model, dtype=self.dtype, trust_remote_code=config.trust_remote_code
        )
        if config.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, config.adapter).merge_and_unload()
        self._use(model.to(device).eval())

    @classmethod
    def around(cls, model: Any, processor: Any, config: BackendConfig) -> TransformersBackend:
        """Return a backend answering with an already loaded ``model`` (e.g. one being trained), as is.

        The caller owns the model: this backend neither moves it nor switches it to eval mode.
        """
        backend = cls.__new__(cls)
        Backend.__init__(backend, config)
        backend.processor, backend.tokenizer = processor, processor.tokenizer
        backend.tokenizer.padding_side = "left"
        parameter = next(model.parameters())
        backend.device, backend.dtype = str(parameter.device), parameter.dtype
        backend._use(model)
        return backend

    def _use(self, model: Any) -> None:
        self.model = model
        self.max_rows = int(self.config.options.get("max_candidate_rows", DEFAULT_MAX_CANDIDATE_ROWS))
        self._candidates: dict[tuple[str, ...], Any] = {}
        # Qwen2-VL keeps rope_deltas on the model between calls: one model call at a time.
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- public interface

    def label(self, images: list[bytes], task: Task) -> list[LabelResult]:
        """Return one record per image, in order; undecodable images get error records."""
        return label_images(
            images, task, self.provenance(task), self._answer, max_pixels=self.config.max_image_pixels, views=self.views,
            fit=self.image_pixels,
        )

    def info(self) -> dict[str, Any]:
        """Return backend, model, adapter, device, dtype and library versions."""
        import torch
        import transformers

        return {
            "backend": self.name,
            "model": self.config.model,
            "adapter": self.config.adapter,
            "architecture": type(self.model).__name__,
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "batch_size": self.config.batch_size,
            "views": self.views.count if self.views else 1,
            "image_pixels": vars(self.image_pixels) if self.image_pixels else None,  # None: the processor's own
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        }

    def chat(self, messages: list[ChatMessage], *, max_tokens: int = 256) -> ChatReply:
        """Return the greedy answer to a conversation whose turns may carry images."""
        import torch

        chat, images = template_turns(messages, self.image_pixels)
        text = self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=[text], images=images or None, return_tensors="pt").to(self.device)
        with self._lock, torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        stopped = len(new) < max_tokens or int(new[-1]) in self._eos_ids()
        return ChatReply(
            text=self.tokenizer.decode(new, skip_special_tokens=True).strip(),
            prompt_tokens=int(inputs["input_ids"].shape[1]),
            completion_tokens=len(new),
            finish_reason="stop" if stopped else "length",
        )

    def close(self) -> None:
        """Drop the model so its memory can be freed."""
        self.model = None
        self._candidates.clear()

    # ----------------------------------------------------------------- internals

    def _answer(self, question: Question, images: list[Image.Image]) -> list[Answer]:
        """One answer per image, in forwards of at most ``_group_size`` images."""
        size, got = self._group_size(question), []
        with self._lock:
            for start in range(0, len(images), size):
                group = images[start : start + size]
                got += self._score(group, question) if question.closed else self._generate(group, question)
        return got

    def _group_size(self, question: Question) -> int:
        """Images per forward: the configured batch, fewer when the candidate rows would not fit."""
        n = len(question.choices or ()) or 1
        return max(1, min(self.config.batch_size, self.max_rows // n))

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _prompt_text(self, question: Question) -> str:
        messages: list[dict[str, Any]] = []
        if question.system:
            messages.append({"role": "system", "content": question.system})
        messages.append(
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.prompt}]}
        )
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _prefix_inputs(self, images: list[Image.Image], question: Question) -> Any:
        text = self._prompt_text(question)
        return self.processor(text=[text] * len(images), images=images, padding=True, return_tensors="pt").to(
            self.device
        )

    def _candidate_ids(self, question: Question) -> tuple[Any, Any]:
        """Token ids of every choice as the chat template ends it (answer + end of turn), right-padded.

        Each continuation is the text the template adds after the generation prompt, cut after
        the end-of-turn token, tokenized on its own as LLaMA-Factory tokenizes responses.
        """
        import torch

        assert question.choices is not None
        key = (question.system or "", question.prompt, *question.choices)
        if key in self._candidates:
            return self._candidates[key]
        if len(self._candidates) >= 256:  # chat routes make a question per request: keep the cache bounded
            self._candidates.clear()
        prompt = self._prompt_text(question)
        eos = self.tokenizer.eos_token or ""
        rows = []
        for choice in question.choices:
            messages: list[dict[str, Any]] = []
            if question.system:
                messages.append({"role": "system", "content": question.system})
            messages += [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.prompt}]},
                {"role": "assistant", "content": [{"type": "text", "text": choice}]},
            ]
            full = self.processor.apply_chat_template(messages, tokenize=False)
            tail = full[len(prompt) :] if full.startswith(prompt) else choice + eos
            if eos and eos in tail:
                tail = tail[: tail.index(eos) + len(eos)]
            rows.append(self.tokenizer(tail, add_special_tokens=False)["input_ids"])
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
        self._candidates[key] = (ids, mask)
        return ids, mask

    def _score(self, images: list[Image.Image], question: Question) -> list[Answer]:
        """Answer a closed-set question for each image by candidate log-likelihood (prefix computed once)."""
        import torch

        assert question.choices is not None and question.values is not None
        cand_ids, cand_mask = self._candidate_ids(question)
        n = cand_ids.shape[0]
        batch = len(images)
        inputs = self._prefix_inputs(images, question)
        # Tokens every candidate starts with ("this is a photo of") join the prefix: read once per
        # image, not once per candidate. Their log-likelihood is the same for all, so no answer moves.
        shared = _shared_start(cand_ids, cand_mask)
        if shared:
            inputs = _append_tokens(inputs, cand_ids[0, :shared])
            cand_ids, cand_mask = cand_ids[:, shared:], cand_mask[:, shared:]
        with torch.inference_mode():
            prefix = self.model(**inputs, use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(prefix.logits[:, -1, :].float(), dim=-1)  # (B, V)
            cache = prefix.past_key_values
            cache.batch_repeat_interleave(n)
            prefix_len = inputs["input_ids"].shape[1]
            ids = cand_ids.to(self.device).repeat(batch, 1)  # image-major: b0c0, b0c1, ..., b1c0, ...
            mask = cand_mask.to(self.device).repeat(batch, 1)
            attention = torch.cat([inputs["attention_mask"].repeat_interleave(n, dim=0), mask], dim=1)
            kwargs: dict[str, Any] = {}
            rope_deltas = getattr(prefix, "rope_deltas", None)
            if (
                rope_deltas is not None
            ):  # multimodal RoPE (Qwen2-VL family): real-token position + per-image delta
                steps = (
                    attention.long().cumsum(-1)[:, prefix_len:] - 1
                )  # counts real tokens only (left padding)
                positions = steps + rope_deltas.to(self.device).repeat_interleave(n, dim=0)
                kwargs["position_ids"] = positions[None].expand(3, -1, -1)
            cont = self.model(
                input_ids=ids, attention_mask=attention, past_key_values=cache, use_cache=True, **kwargs
            )
            logp = torch.log_softmax(cont.logits.float(), dim=-1)  # (B*n, W, V)
            first_lp = first.repeat_interleave(n, dim=0).gather(1, ids[:, :1]).squeeze(1)
            rest_lp = logp[:, :-1, :].gather(2, ids[:, 1:, None]).squeeze(2) * mask[:, 1:]
            totals = (first_lp + rest_lp.sum(dim=1)).view(batch, n)
            probs = torch.softmax(totals, dim=-1).cpu()
        answers = []
        for row in probs:
            best = int(row.argmax())
            dist = {v: float(p) for v, p in zip(question.values, row.tolist(), strict=True)}
            answers.append(
                Answer(
                    value=question.values[best],
                    raw_text=question.choices[best],
                    probabilities=dist,
                    confidence=dist[question.values[best]],
                )
            )
        return answers

    def _generate(self, images: list[Image.Image], question: Question) -> list[Answer]:
        """Answer a free-text question for each image by greedy decoding (mean token probability as confidence)."""
        import torch

        inputs = self._prefix_inputs(images, question)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=question.max_tokens,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
            scores = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        new = out.sequences[:, inputs["input_ids"].shape[1] :]
        eos = self._eos_ids() | {self.tokenizer.pad_token_id}
        answers = []
        for tokens, token_lp in zip(new.tolist(), scores, strict=True):
            keep = next((j for j, t in enumerate(tokens) if t in eos), len(tokens))
            text = self.tokenizer.decode(tokens[:keep], skip_special_tokens=True).strip()
            lp = token_lp[: max(keep, 1)]
            confidence = float(torch.exp(lp.float().mean())) if len(lp) else None
            answers.append(Answer(value=text, raw_text=text, confidence=confidence))
        return answers
