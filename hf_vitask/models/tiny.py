"""Tiny, randomly initialised vision-language models built entirely offline.

Tests and demos need a real ``transformers`` VLM (same classes, same module names, same
processor behaviour as the production checkpoints) but cannot download one. This module
builds one in well under a second: a byte-level BPE tokenizer trained on a small corpus,
the family's real processor class configured for 32x32 images, a chat template, and a
model with a couple of 64-wide layers.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaConfig,
    GotOcr2ImageProcessor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    LlavaProcessor,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessor,
    MllamaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
)
from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig
from transformers.models.mllama.image_processing_mllama import get_all_supported_aspect_ratios
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

from hf_vitask.models.families import PALIGEMMA_CHAT_TEMPLATE, get_family
from hf_vitask.models.loading import TINY_PREFIX

__all__ = [
    "tiny_family",
    "DEFAULT_CORPUS",
    "INTERNVL_CHAT_TEMPLATE",
    "LLAVA_CHAT_TEMPLATE",
    "QWEN2_VL_CHAT_TEMPLATE",
    "TINY_FAMILIES",
    "build_tiny_tokenizer",
    "build_tiny_vlm",
    "save_tiny_vlm",
]

TINY_FAMILIES = (
    "llava",
    "qwen2_vl",
    "qwen2_5_vl",
    "internvl",
    "llava_next",
    "llava_onevision",
    "idefics3",
    "gemma3",
    "qwen3_vl",
    "smolvlm",
    "paligemma",
    "mllama",
)


def tiny_family(name: str) -> str:
    """The family of a demo model name: "tiny-qwen2-vl" / "tiny-qwen2_vl" -> "qwen2_vl"."""
    family = name[len(TINY_PREFIX) :].replace("-", "_")
    if family not in TINY_FAMILIES:
        raise ValueError(
            f"Unknown tiny model {name!r}; choose one of {[TINY_PREFIX + f for f in TINY_FAMILIES]}"
        )
    return family


_DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

DEFAULT_CORPUS: list[str] = [
    "Analyze the given image. The possible diagnoses are: pneumonia, normal, effusion, nodule.",
    "Analyze the given image and answer the question.",
    "The possible answers are: yes, no.",
    "Classify the given image. The possible classes are: cat, dog, bird, car, airplane.",
    "What is shown in this image? Answer with one word.",
    "Which handwritten digit is shown in the image?",
    "This is a handwritten digit. The digit is " + ", ".join(_DIGITS) + ".",
    *[f"The handwritten digit is {word}." for word in _DIGITS],
    *[f"Answer: {word} ({i})" for i, word in enumerate(_DIGITS)],
    "Describe the image in detail. The image shows a chest X-ray of a patient.",
    "Diagnosis: pneumonia. Diagnosis: normal. Diagnosis: benign. Diagnosis: malignant.",
    "You are a helpful assistant. Please answer the question about the image.",
    "USER: ASSISTANT: USER: ASSISTANT: user assistant system user assistant system",
    "Question: what is the label of the image? Answer: the label is",
    "0 1 2 3 4 5 6 7 8 9 10 42 100",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z . , : ; ! ? ( ) - ' \"",
]

# --------------------------------------------------------------------------------------
# Chat templates. Both satisfy: render(prompt + [assistant]) starts with
# render(prompt, add_generation_prompt=True), and the assistant turn ends with eos so
# the model learns to stop. `{% generation %}` marks assistant tokens for
# `return_assistant_tokens_mask`. `content` may be a string or a list of
# {"type": "image"} / {"type": "text", "text": ...} items.
# --------------------------------------------------------------------------------------

LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}{%- set n_images = 0 -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ text + '\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ 'USER: ' }}{{ '<image>\n' * n_images }}{{ text + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT:' }}{% generation %}{{ ' ' + text + eos_token }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

QWEN2_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}"
    "{%- set body = message['content'] -%}"
    "{%- else -%}"
    "{%- set ns = namespace(body='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{%- set ns.body = ns.body + '<|vision_start|><|image_pad|><|vision_end|>' -%}"
    "{%- elif item['type'] == 'video' -%}"
    "{%- set ns.body = ns.body + '<|vision_start|><|video_pad|><|vision_end|>' -%}"
    "{%- elif item['type'] == 'text' -%}"
    "{%- set ns.body = ns.body + item['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set body = ns.body -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ body + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ body + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# InternVL's template is Qwen2's ChatML with `<IMG_CONTEXT>\n` for an image; the processor expands
# it to `<img>` + image_seq_length `<IMG_CONTEXT>` per tile + `</img>`.
INTERNVL_CHAT_TEMPLATE = QWEN2_VL_CHAT_TEMPLATE.replace(
    "'<|vision_start|><|image_pad|><|vision_end|>'", "'<IMG_CONTEXT>\\n'"
)

# LLaVA-OneVision (Qwen2 based): ChatML with `<image>\n`.
LLAVA_ONEVISION_CHAT_TEMPLATE = QWEN2_VL_CHAT_TEMPLATE.replace(
    "'<|vision_start|><|image_pad|><|vision_end|>'", "'<image>\\n'"
)

# Idefics3's own User:/Assistant: turns closed by <end_of_utterance> (its eos), bos written by the template.
IDEFICS3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set body = ': ' + message['content'] -%}"
    "{%- else -%}"
    "{%- set ns = namespace(body=(':' if message['content'][0]['type'] == 'image' else ': ')) -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.body = ns.body + '<image>' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.body = ns.body + item['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set body = ns.body -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ 'Assistant:' }}{% generation %}{{ body[1:] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ message['role'] | capitalize }}{{ body + '<end_of_utterance>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)

# Gemma's turns: `<start_of_turn>user ... <end_of_turn>`, the assistant is "model", an image is
# `<start_of_image>` (the processor expands it); bos written by the template.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set body = message['content'] -%}"
    "{%- else -%}"
    "{%- set ns = namespace(body='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.body = ns.body + '<start_of_image>' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.body = ns.body + item['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set body = ns.body -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<start_of_turn>model\n' }}{% generation %}{{ body + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ '<start_of_turn>' + message['role'] + '\n' + body + '<end_of_turn>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# Llama 3's header turns; an image is one `<|image|>` token (read through cross-attention).
MLLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['content'] is string -%}"
    "{%- set body = message['content'] -%}"
    "{%- else -%}"
    "{%- set ns = namespace(body='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.body = ns.body + '<|image|>' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.body = ns.body + item['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set body = ns.body -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ body + eos_token }}{% endgeneration %}"
    "{%- else -%}"
    "{{ body + '<|eot_id|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)

# Per-family tokenizer layout. Qwen2-VL needs the video pad token too: its processor
# looks both placeholders up at construction time.
_TOKENIZER_SPECS: dict[str, dict[str, Any]] = {
    "llava": {
        "special_tokens": ["<pad>", "<s>", "</s>", "<image>"],
        "pad": "<pad>",
        "bos": "<s>",
        "eos": "</s>",
        "extra": {"image_token": "<image>"},
        "add_bos": True,  # like the real llava-1.5 (Llama) tokenizer
        "chat_template": LLAVA_CHAT_TEMPLATE,
    },
    "qwen2_vl": {
        "special_tokens": [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ],
        "pad": "<|endoftext|>",
        "bos": None,  # like the real Qwen2 tokenizer: no bos is prepended
        "eos": "<|im_end|>",
        "extra": {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
        "add_bos": False,
        "chat_template": QWEN2_VL_CHAT_TEMPLATE,
    },
    "llava_next": {
        "special_tokens": ["<pad>", "<s>", "</s>", "<image>"],
        "pad": "<pad>",
        "bos": "<s>",
        "eos": "</s>",
        "extra": {"image_token": "<image>"},
        "add_bos": True,
        "chat_template": LLAVA_CHAT_TEMPLATE,  # llava-v1.6-vicuna's USER/ASSISTANT turns
    },
    "llava_onevision": {
        "special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        "pad": "<|endoftext|>",
        "bos": None,
        "eos": "<|im_end|>",
        "extra": {"image_token": "<image>", "video_token": "<video>"},
        "add_bos": False,
        "chat_template": LLAVA_ONEVISION_CHAT_TEMPLATE,
    },
    "idefics3": {
        "special_tokens": [
            "<|finetune_right_pad_id|>",
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<fake_token_around_image>",
            "<image>",
            "<end_of_utterance>",
            "<global-img>",
            *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
        ],
        "pad": "<|finetune_right_pad_id|>",
        "bos": "<|begin_of_text|>",
        "eos": "<end_of_utterance>",
        "extra": {
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
        "add_bos": True,
        "chat_template": IDEFICS3_CHAT_TEMPLATE,
    },
    "gemma3": {
        "special_tokens": [
            "<pad>",
            "<bos>",
            "<eos>",
            "<start_of_turn>",
            "<end_of_turn>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
        ],
        "pad": "<pad>",
        "bos": "<bos>",
        "eos": "<end_of_turn>",  # what a Gemma chat turn ends with (its generation eos)
        "extra": {
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
        "add_bos": True,
        "chat_template": GEMMA3_CHAT_TEMPLATE,
    },
    "paligemma": {
        "special_tokens": ["<pad>", "<eos>", "<bos>", "<image>"],
        "pad": "<pad>",
        "bos": "<bos>",
        "eos": "<eos>",
        "extra": {"image_token": "<image>"},
        "add_bos": False,  # the processor writes <bos> after the image tokens
        "chat_template": PALIGEMMA_CHAT_TEMPLATE,
    },
    "mllama": {
        "special_tokens": [
            "<|finetune_right_pad_id|>",
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|image|>",
            "<|python_tag|>",
        ],
        "pad": "<|finetune_right_pad_id|>",
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "extra": {"image_token": "<|image|>"},
        "add_bos": False,  # the template writes it
        "chat_template": MLLAMA_CHAT_TEMPLATE,
    },
    "internvl": {
        "special_tokens": [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<img>",
            "</img>",
            "<IMG_CONTEXT>",
            "<video>",
        ],
        "pad": "<|endoftext|>",
        "bos": None,
        "eos": "<|im_end|>",
        "extra": {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        "add_bos": False,
        "chat_template": INTERNVL_CHAT_TEMPLATE,
    },
}


# same ChatML and vision tokens
_TOKENIZER_SPECS["qwen2_5_vl"] = _TOKENIZER_SPECS["qwen3_vl"] = _TOKENIZER_SPECS["qwen2_vl"]
_TOKENIZER_SPECS["smolvlm"] = dict(  # Idefics3's turns and image tags, plus a video placeholder
    _TOKENIZER_SPECS["idefics3"],
    special_tokens=[*_TOKENIZER_SPECS["idefics3"]["special_tokens"], "<video>"],
    extra=dict(_TOKENIZER_SPECS["idefics3"]["extra"], video_token="<video>"),
)


def _tiny_name(family: str) -> str:
    return f"tiny-{family.replace('_', '-')}"


def _check_family(family: str) -> str:
    if family not in _TOKENIZER_SPECS:
        raise ValueError(f"No tiny builder for family {family!r}; supported: {', '.join(TINY_FAMILIES)}")
    return family


def build_tiny_tokenizer(
    family: str = "llava", corpus: list[str] | None = None, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with the family's special tokens.

    Byte-level means every string encodes without unknown tokens and decodes back
    exactly, so tests can feed arbitrary labels ("café 42!") through it.
    """
    spec = _TOKENIZER_SPECS[_check_family(family)]
    specials: list[str] = spec["special_tokens"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus if corpus is not None else DEFAULT_CORPUS), trainer)
    if spec["add_bos"]:
        bos = spec["bos"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, backend.token_to_id(bos))],
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)

    kwargs: dict[str, Any] = {"pad_token": spec["pad"], "eos_token": spec["eos"]}
    if spec["bos"] is not None:
        kwargs["bos_token"] = spec["bos"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        padding_side="right",
        model_max_length=2048,
        extra_special_tokens=dict(spec["extra"]),
        chat_template=spec["chat_template"],
        name_or_path=_tiny_name(family),
        **kwargs,
    )
    return tokenizer


def _build_processor(
    family: str, tokenizer: PreTrainedTokenizerFast, image_size: int, grid: int = 4
) -> ProcessorMixin:
    chat_template = _TOKENIZER_SPECS[family]["chat_template"]
    if family == "llava":
        # patch = image_size / 4 -> 4x4 = 16 patches; the "default" feature strategy drops
        # the CLS token the processor counts via num_additional_image_tokens=1.
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            do_center_crop=True,
        )
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=image_size // grid,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=chat_template,
        )
    if family in ("llava_next", "llava_onevision"):
        # "anyres": a base tile (the whole image at image_size) plus high-resolution tiles from the
        # best-fitting pinpoint grid; each tile is a grid x grid patch map, packed with one newline
        # feature per row. A 32x32 image gives 36 image tokens, a 64x32 one 52 (llava_next).
        return _anyres_processor(family, tokenizer, image_size, grid, chat_template)
    if family in ("idefics3", "smolvlm"):
        # The longest edge goes to 2 * image_size, then image_size tiles + one global image: a square
        # image gives 2x2 tiles + global (5 tiles), a 2:1 one 1x2 + global (3); tokens_per_tile each.
        sizes = {"size": {"longest_edge": 2 * image_size}, "max_image_size": {"longest_edge": image_size}}
        common = {
            "tokenizer": tokenizer,
            "image_seq_len": _internvl_tokens_per_tile(grid),
            "chat_template": chat_template,
        }
        if family == "smolvlm":
            return SmolVLMProcessor(
                image_processor=SmolVLMImageProcessor(**sizes, do_image_splitting=True),
                video_processor=SmolVLMVideoProcessor(**sizes),
                **common,
            )
        return Idefics3Processor(
            image_processor=Idefics3ImageProcessor(**sizes, do_image_splitting=True), **common
        )
    if family == "gemma3":
        # Every image is resized to one image_size square; the vision tower's patch map is average-pooled
        # to grid x grid soft tokens.
        return Gemma3Processor(
            image_processor=Gemma3ImageProcessor(
                size={"height": image_size, "width": image_size},
                image_mean=[0.5] * 3,
                image_std=[0.5] * 3,
            ),
            tokenizer=tokenizer,
            image_seq_length=grid * grid,
            chat_template=chat_template,
        )
    if family == "paligemma":
        # One square image_size image, a grid x grid patch map, one token per patch.
        image_processor = SiglipImageProcessor(
            size={"height": image_size, "width": image_size},
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
        image_processor.image_seq_length = grid * grid  # what the checkpoint's preprocessor_config says
        # adds PaliGemma's 1024 <locNNNN> and 128 <segNNN> tokens to the tokenizer
        return PaliGemmaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template
        )
    if family == "mllama":
        # Tiles of image_size px, at most two per image: a square image is one tile, a 2:1 one two.
        return MllamaProcessor(
            image_processor=MllamaImageProcessor(
                size={"height": image_size, "width": image_size},
                max_image_tiles=_MLLAMA_MAX_TILES,
            ),
            tokenizer=tokenizer,
            chat_template=chat_template,
        )
    if family == "internvl":
        # Tiles of image_size/2 px: a square image is cut into 2x2 tiles plus a thumbnail (5 tiles),
        # a 2:1 one into 2x1 plus a thumbnail (3); each tile gives tokens_per_tile image tokens.
        tile = image_size // 2
        size = {"height": tile, "width": tile}
        return InternVLProcessor(
            image_processor=GotOcr2ImageProcessor(
                size=size, crop_to_patches=True, min_patches=1, max_patches=4
            ),
            tokenizer=tokenizer,
            video_processor=InternVLVideoProcessor(size=size),
            image_seq_length=_internvl_tokens_per_tile(grid),
            chat_template=chat_template,
        )
    # Qwen2-VL resizes images to a multiple of patch*merge with an area in
    # [min_pixels, max_pixels]. Pinning both to image_size**2 makes every square image
    # (whatever its resolution) an (image_size/patch)^2 grid -> 16 tokens after 2x2 merge.
    patch = image_size // (2 * grid)
    common = {
        "patch_size": patch,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_pixels": image_size * image_size,
        "max_pixels": image_size * image_size,
    }
    image_processor = Qwen2VLImageProcessor(**common)
    if family == "qwen3_vl":
        return Qwen3VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=Qwen3VLVideoProcessor(**common),
            chat_template=chat_template,
        )
    video_processor = Qwen2VLVideoProcessor(**common)
    return (Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen2VLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template,
    )


_MLLAMA_MAX_TILES = 2
#: The vision towers of the tiny models: two 32-wide layers.
_SMALL_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def _pinpoints(family: str, image_size: int) -> list[list[int]]:
    if family == "llava_next":  # every image gets at least two high-resolution tiles
        return [
            [image_size, 2 * image_size],
            [2 * image_size, image_size],
            [2 * image_size, 2 * image_size],
            [3 * image_size, image_size],
            [image_size, 3 * image_size],
        ]
    return [[image_size * i, image_size * j] for i in range(1, 4) for j in range(1, 4)]


def _anyres_processor(family, tokenizer, image_size: int, grid: int, chat_template: str) -> ProcessorMixin:
    patch = image_size // grid
    if family == "llava_next":
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=_pinpoints(family, image_size),
            do_center_crop=True,
            do_pad=True,
        )
        return LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS
            chat_template=chat_template,
        )
    common = {
        "size": {"height": image_size, "width": image_size},
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            image_grid_pinpoints=_pinpoints(family, image_size), do_pad=True, **common
        ),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(**common),
        num_image_tokens=grid * grid,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=chat_template,
    )


def _anyres_model(
    family, tokenizer, image_size: int, grid: int, text_common: dict, image_id: int
) -> PreTrainedModel:
    patch = image_size // grid
    small = _SMALL_VISION
    if family == "llava_next":
        config = LlavaNextConfig(
            vision_config=CLIPVisionConfig(
                **small, image_size=image_size, patch_size=patch, projection_dim=32
            ),
            text_config=LlamaConfig(**text_common),
            image_token_index=image_id,
            image_grid_pinpoints=_pinpoints(family, image_size),
            image_seq_length=grid * grid,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            pad_token_id=text_common["pad_token_id"],
        )
        return LlavaNextForConditionalGeneration(config)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            **small, image_size=image_size, patch_size=patch, vision_use_head=False
        ),
        text_config=Qwen2Config(**text_common),
        image_token_index=image_id,
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=_pinpoints(family, image_size),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        pad_token_id=text_common["pad_token_id"],
    )
    return LlavaOnevisionForConditionalGeneration(config)


def _internvl_tokens_per_tile(grid: int) -> int:
    """A square image is 4 tiles + a thumbnail; ``grid**2`` tokens are spread over the 4 tiles."""
    if grid % 2:
        raise ValueError(f"internvl: image_tokens must be (2g)^2 for a tiled image, got {grid * grid}")
    return (grid // 2) ** 2


def _build_model(
    family: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    image_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    grid: int = 4,
) -> PreTrainedModel:
    vocab = len(tokenizer)
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    # Qwen has no bos token; its real config uses <|endoftext|> as bos.
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id
    image_id = tokenizer.convert_tokens_to_ids(get_family(family).image_token)
    text_common = {
        "vocab_size": vocab,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "max_position_embeddings": 2048,
        "pad_token_id": pad_id,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }
    if family == "llava":
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=image_size // grid,
            projection_dim=32,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=LlamaConfig(**text_common),
            image_token_index=image_id,
            image_seq_length=grid * grid,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            pad_token_id=pad_id,
        )
        model: PreTrainedModel = LlavaForConditionalGeneration(config)
    elif family in ("llava_next", "llava_onevision"):
        model = _anyres_model(family, tokenizer, image_size, grid, text_common, image_id)
    elif family in ("idefics3", "smolvlm"):
        # pixel shuffle (scale 2) merges 2x2 patches: a tile of (2g)^2 patches gives g^2 tokens
        g = math.isqrt(_internvl_tokens_per_tile(grid))
        vision_config, config_class, model_class = {
            "idefics3": (Idefics3VisionConfig, Idefics3Config, Idefics3ForConditionalGeneration),
            "smolvlm": (SmolVLMVisionConfig, SmolVLMConfig, SmolVLMForConditionalGeneration),
        }[family]
        vision = vision_config(
            **_SMALL_VISION,
            image_size=image_size,
            patch_size=image_size // (2 * g),
        )
        config = config_class(
            text_config=LlamaConfig(**text_common),
            vision_config=vision,
            scale_factor=2,
            image_token_id=image_id,
            pad_token_id=pad_id,
            tie_word_embeddings=False,
        )
        model = model_class(config)
    elif family == "gemma3":
        vision = SiglipVisionConfig(
            **_SMALL_VISION,
            image_size=image_size,
            patch_size=image_size // (2 * grid),
            vision_use_head=False,
        )
        text = Gemma3TextConfig(
            **text_common,
            head_dim=hidden_size // num_heads,
            query_pre_attn_scalar=hidden_size // num_heads,
            sliding_window=16,
            tie_word_embeddings=False,
        )
        config = Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=grid * grid,
            boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
            eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
            image_token_index=image_id,
            pad_token_id=pad_id,
            tie_word_embeddings=False,
        )
        model = Gemma3ForConditionalGeneration(config)
        with torch.no_grad():  # initialised to zeros: the image would not reach the language model
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    elif family == "paligemma":
        vision = SiglipVisionConfig(
            **_SMALL_VISION,
            image_size=image_size,
            patch_size=image_size // grid,
            vision_use_head=False,
        )
        config = PaliGemmaConfig(
            vision_config=vision,
            text_config=GemmaConfig(**text_common, head_dim=hidden_size // num_heads),
            image_token_index=image_id,
            projection_dim=hidden_size,
            hidden_size=hidden_size,
            vocab_size=vocab,
            pad_token_id=pad_id,
            tie_word_embeddings=False,
        )
        model = PaliGemmaForConditionalGeneration(config)
    elif family == "mllama":
        vision = MllamaVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=2,
            image_size=image_size,
            patch_size=image_size // grid,
            max_num_tiles=_MLLAMA_MAX_TILES,
            # the image processor's tile arrangements, in its order (aspect_ratio_ids index them)
            supported_aspect_ratios=[list(r) for r in get_all_supported_aspect_ratios(_MLLAMA_MAX_TILES)],
            intermediate_layers_indices=[0],
            vision_output_dim=2 * 32,  # last layer + one intermediate layer, concatenated
        )
        # num_layers self-attention layers with one cross-attention layer after the first (as in
        # Llama-3.2-Vision, layer 0 is self-attention: the KV cache counts its tokens)
        text = MllamaTextConfig(
            **{k: v for k, v in text_common.items() if k != "num_hidden_layers"},
            num_hidden_layers=num_layers + 1,
            cross_attention_layers=[1],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
        config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id)
        model = MllamaForConditionalGeneration(config)
        with torch.no_grad():  # tanh gates start at 0: the text would ignore the image
            for name, param in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    param.fill_(1.0)
    elif family == "internvl":
        # pixel shuffle (downsample 0.5) merges 2x2 patches: a tile of (2g)^2 patches gives g^2 tokens
        g = math.isqrt(_internvl_tokens_per_tile(grid))
        vision = InternVLVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size // 2,
            patch_size=image_size // 2 // (2 * g),
        )
        config = InternVLConfig(
            vision_config=vision,
            text_config=Qwen2Config(**text_common),
            image_token_id=image_id,
            image_seq_length=g * g,
            downsample_ratio=0.5,
            pad_token_id=pad_id,
        )
        model = InternVLForConditionalGeneration(config)
    else:
        head_dim = hidden_size // num_heads
        half = head_dim // 2
        # M-RoPE splits the rotary half-dim into (temporal, height, width) sections.
        mrope = [half - 2 * (half // 3), half // 3, half // 3]
        vision = {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": hidden_size,  # merger output must match the text width
            "num_heads": 2,
            "mlp_ratio": 2,
            "in_channels": 3,
            "patch_size": image_size // (2 * grid),
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        }
        text = dict(
            text_common,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        )
        tokens = {
            "image_token_id": image_id,
            "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        }
        if family == "qwen3_vl":
            text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
            config = Qwen3VLConfig(
                text_config=dict(text, head_dim=head_dim),
                vision_config={
                    "depth": 2,
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_heads": 2,
                    "patch_size": vision["patch_size"],
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                    "out_hidden_size": hidden_size,
                    "num_position_embeddings": (2 * grid) ** 2,  # learnt, interpolated to each image's grid
                    "deepstack_visual_indexes": [0],  # vision layer 0's features join decoder layer 0
                },
                **tokens,
                pad_token_id=pad_id,
            )
            model = Qwen3VLForConditionalGeneration(config)
        elif family == "qwen2_5_vl":
            config = Qwen2_5_VLConfig(
                text_config=text,
                vision_config={
                    "depth": 2,
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_heads": 2,
                    "patch_size": vision["patch_size"],
                    "spatial_merge_size": 2,
                    "temporal_patch_size": 2,
                    "out_hidden_size": hidden_size,
                    # windows of 2x2 merged patches in block 0, full attention in block 1 (as 3 of 4 blocks in the real model)
                    "window_size": 2 * 2 * vision["patch_size"],
                    "fullatt_block_indexes": [1],
                },
                **tokens,
                pad_token_id=pad_id,
            )
            model = Qwen2_5_VLForConditionalGeneration(config)
        else:
            config = Qwen2VLConfig(
                text_config=text,
                vision_config=vision,
                **tokens,
                pad_token_id=pad_id,
                bos_token_id=bos_id,
                eos_token_id=eos_id,
            )
            model = Qwen2VLForConditionalGeneration(config)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = pad_id, bos_id, eos_id
    return model


def build_tiny_vlm(
    family: str = "llava",
    *,
    seed: int = 0,
    image_size: int = 32,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    corpus: list[str] | None = None,
    output_init_std: float = 0.15,
    image_tokens: int = 16,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build a tiny random ``(model, processor)`` pair for ``family``, a ``model_type`` in
    :data:`TINY_FAMILIES`, with the family's real processor and image handling.

    Same seed, same weights. ``image_tokens`` (a square number; 16 by default) sets the patch grid
    of one image or tile (tiling families give a 32x32 image several tiles; see docs/families.md).
    The model is float32 and in train mode.

    ``output_init_std``: the output layer (``lm_head``) is drawn with this std instead of the
    usual 0.02. LoRA never trains ``lm_head``, and with a 0.02 head the logits of a 64-wide
    model span about ±1.3, so the response cross-entropy cannot fall much below ln(V) - 1.3
    (~4.9 nats) however long one trains: a trained generalist's head has a far wider range.
    """
    _check_family(family)
    grid = math.isqrt(image_tokens)
    if grid * grid != image_tokens:
        raise ValueError(f"image_tokens must be a square number (a grid of patches), got {image_tokens}")
    if image_size % (2 * grid):
        raise ValueError(
            f"image_size must be a multiple of {2 * grid} for {image_tokens} image tokens, got {image_size}"
        )
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ValueError("hidden_size / num_heads must be an even integer")
    tokenizer = build_tiny_tokenizer(family, corpus)
    processor = _build_processor(family, tokenizer, image_size, grid)
    torch.manual_seed(seed)
    model = _build_model(
        family,
        tokenizer,
        image_size=image_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        grid=grid,
    )
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, output_init_std)
    model = model.to(torch.float32)
    # PreTrainedModel copies config.name_or_path at init; set both so logs/model cards say "tiny-llava".
    model.config.name_or_path = model.name_or_path = _tiny_name(family)
    model.train()
    return model, processor


def save_tiny_vlm(path: str | os.PathLike, family: str = "llava", **kwargs: Any) -> str:
    """Build a tiny VLM and save model + processor so the Auto* classes load it offline."""
    model, processor = build_tiny_vlm(family, **kwargs)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
