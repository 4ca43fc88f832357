"""Tiny, randomly initialised Qwen2-VL and LLaVA-NeXT models, built offline in seconds.

They are ordinary model folders (config, safetensors weights, tokenizer, processor, chat
template), so every consumer loads them with the same ``from_pretrained(path)`` call that
loads ``Qwen/Qwen2-VL-2B-Instruct``. Use them to test the platform, or to smoke-test a
cluster without downloading weights.

Example::

    from serve_apps.tiny_models import build_tiny_model
    build_tiny_model("qwen2_vl", "/tmp/tiny-qwen")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

Arch = Literal["qwen2_vl", "llava_next"]
ARCHS: tuple[str, ...] = ("qwen2_vl", "llava_next")

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]

# ChatML, as Qwen2-VL ships it: images become <|vision_start|><|image_pad|><|vision_end|>.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Vicuna-style, as llava-v1.6-vicuna ships it (LLaMA-Factory template `llava_next`).
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}<image>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Text the byte-level BPE learns merges from: the words our prompts and answers use. The default
# vocabulary (512) learns nearly all of them as whole words, as a real model's large vocabulary
# does: a demo digit conversation is 90 tokens, against 141 with 320 (almost byte level), and the
# text model's cost in training and labeling grows with its tokens.
_TOKENIZER_CORPUS = """
You are a helpful assistant. Fill in the blank: this is a photo of a {}, you should select
the appropriate categories from the provided labels. this is a photo of 0. this is a photo of 1.
2 3 4 5 6 7 8 9 digit number handwritten room bathroom lobby pool restaurant bar exterior terrace
patio gym spa meeting beach view bedroom kitchen garden parking sleeve length fabric collar
pattern cotton denim short long caption describe the image score quality rate from 60 to 100
USER ASSISTANT system user assistant answer question what is in this picture
"""


def _train_tokenizer(special_tokens: list[str], vocab_size: int):
    """A byte-level BPE that can encode any text, trained on a few prompt words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TOKENIZER_CORPUS] * 4, trainer=trainer)
    return tokenizer


def _vision_heads(vision_hidden: int, head_dim: int) -> int:
    if vision_hidden % head_dim:
        raise ValueError(f"vision_hidden ({vision_hidden}) must be a multiple of {head_dim} (the head size)")
    return vision_hidden // head_dim


def _qwen2_vl(
    out: Path, hidden: int, layers: int, heads: int, vocab_size: int, seed: int, vision_hidden: int | None
) -> None:
    import torch
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )
    from transformers.generation import GenerationConfig

    raw = _train_tokenizer(QWEN_SPECIAL_TOKENS, vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
        padding_side="left",
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = hidden // heads
    # mrope sections (time, height, width) must sum to head_dim / 2; Qwen2-VL splits it 1:1.5:1.5.
    half = head_dim // 2
    t_section = half // 4
    h_section = (half - t_section) // 2
    mrope_section = [t_section, h_section, half - t_section - h_section]
    vision_width = vision_hidden or 64
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 4096,
            "rope_scaling": {"type": "mrope", "mrope_section": mrope_section},
            "rope_theta": 10000.0,
            "tie_word_embeddings": True,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "embed_dim": vision_width,
            "hidden_size": hidden,  # the merger's output must equal the text hidden size
            "num_heads": _vision_heads(vision_width, 32),
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], do_sample=False
    )
    # Small images stay small: a 56x56 image is 4x4 patches, 4 visual tokens after the 2x2 merge.
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=224 * 224)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=224 * 224),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _llava_next(
    out: Path, hidden: int, layers: int, heads: int, vocab_size: int, seed: int, vision_hidden: int | None
) -> None:
    import torch
    from transformers import (
        CLIPImageProcessor,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.generation import GenerationConfig

    raw = _train_tokenizer(LLAVA_SPECIAL_TOKENS, vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
        padding_side="left",
    )
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    image_size, patch_size = 56, 14
    vision_width = vision_hidden or 32
    config = LlavaNextConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": vision_width,
            "intermediate_size": 2 * vision_width,
            "num_hidden_layers": 2,
            "num_attention_heads": _vision_heads(vision_width, 16),
            "image_size": image_size,
            "patch_size": patch_size,
            "projection_dim": vision_width,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 4096,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        image_token_index=image_token,
        image_grid_pinpoints=[
            [image_size, image_size],
            [image_size, image_size * 2],
            [image_size * 2, image_size],
        ],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=config.image_grid_pinpoints,
    )
    # LLaVA-NeXT's processor counts the CLS token unless told otherwise (off by one).
    from transformers import LlavaNextImageProcessor

    image_processor = LlavaNextImageProcessor(**image_processor.to_dict())
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_tiny_model(
    arch: Arch,
    out: str | Path,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    vision_hidden: int | None = None,
) -> Path:
    """Build a tiny random ``arch`` model folder at ``out`` and return its path.

    The defaults (hidden 128, head dim 64) are sizes that vLLM's CPU attention accepts.
    ``vision_hidden`` widens the vision tower (default: Qwen2-VL 64, LLaVA-NeXT's CLIP 32), keeping
    its head size (32 and 16).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    builder = _qwen2_vl if arch == "qwen2_vl" else _llava_next
    builder(out, hidden, layers, heads, vocab_size, seed, vision_hidden)
    sizes = {"hidden": hidden, "layers": layers, "heads": heads, "vision_hidden": vision_hidden}
    (out / "lancetag_tiny.json").write_text(json.dumps({"arch": arch, **sizes, "seed": seed}) + "\n")
    return out
