"""Everything that differs between VLM families lives here: one adapter object per family.

The rest of the package (collators, exemplar insertion, fused passes, LoRA/QLoRA setup,
contrastive negatives, evaluation) asks a :class:`VLMFamily` instead of branching on model
classes, the way peft keeps per-model-type target maps and transformers per-model processors.
Supporting a new architecture means describing it once here (:func:`register_family`), adding
a tiny builder to :mod:`hf_vitask.models.tiny`, and one line in the shared family test.

What an adapter answers:

* which tokens delimit the image block (the exemplar slot goes right after it);
* which processor outputs follow the tokens (``per_token_keys``, any rank, sequence on dim 1)
  and what an exemplar slot holds in them (``slot_fill``);
* which outputs carry the images, and how one row's image is cut out of them
  (:meth:`VLMFamily.select_images`: all its tiles, grid patches or cross-attention tiles);
* the position ids the model would compute (:meth:`VLMFamily.positions`: 0..L-1, or M-RoPE);
* how image features reach the language model (``feature_route``), which decides whether the
  vision tower can run once and be reused by stacked passes;
* LoRA targets and the modules kept out of 4-bit quantisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedConfig

__all__ = [
    "FAMILIES",
    "LANGUAGE_MODEL_LORA_REGEX",
    "VLMFamily",
    "family_of_processor",
    "get_family",
    "lora_regex",
    "register_family",
    "support_matrix",
]

FAMILIES_GUIDE = 'docs/families.md ("Adding a family")'


def lora_regex(decoder: str = "language_model", attention: tuple[str, ...] = ("self_attn",)) -> str:
    """Full-match regex for peft ``target_modules``: the attention and MLP linears of the text
    decoder whose layers live under ``<decoder>.layers.N`` (never the vision tower's own q/k/v).
    ``attention``: the attention blocks of a layer (Mllama's cross-attention layers: ``cross_attn``)."""
    return (
        rf"(.*\.)?{decoder}\.layers\.\d+\."
        rf"(({'|'.join(attention)})\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
    )


# transformers 5 names most VLMs' text decoder `model.language_model` (old checkpoints'
# `language_model.model.*` keys are renamed on load); Idefics3/SmolVLM call it `text_model`.
LANGUAGE_MODEL_LORA_REGEX = lora_regex("language_model")

#: How image features reach the language model, which decides how stacked passes ("batch") reuse
#: one run of the vision tower. ``"embedding"``: the features replace the image-token positions of
#: the input embedding (masked_scatter), so the stacked forward gets them written there;
#: ``"encoder_outputs"``: the model also uses other outputs of its vision tower (Qwen3-VL's deepstack
#: features, added inside the decoder) and takes them precomputed as ``mm_encoder_outputs``, which
#: the stacked forward gets rearranged to its rows; ``None``: neither (cross-attention), so the
#: step runs its passes separately.
FEATURE_ROUTES = ("embedding", "encoder_outputs", None)


@dataclass(frozen=True)
class VLMFamily:
    """What a VLM family needs the rest of the package to know about it.

    The defaults describe the common layout (LLaVA): images stacked one per row on dim 0,
    features written at image-token positions, positions 0..L-1.
    """

    name: str
    #: ``config.model_type`` values this family serves.
    model_types: tuple[str, ...]
    #: Placeholder the processor expands into one token per image feature.
    image_token: str
    #: Token closing an image block (``<|vision_end|>``, ``</img>``); None when there is none.
    image_end_token: str | None
    #: Full-match regex for peft ``target_modules``: language-model linears only.
    lora_target_modules: str
    #: Full transformers-5 module names kept out of quantisation (bnb ``llm_int8_skip_modules``).
    vision_modules: tuple[str, ...]
    #: Processor outputs besides input_ids/attention_mask whose dims 0 and 1 are (batch, length)
    #: and must be edited in step with input_ids when tokens are inserted, removed or padded.
    per_token_keys: tuple[str, ...] = ()
    #: Processor outputs carrying the image data; all but the first may be absent from a batch.
    image_keys: tuple[str, ...] = ("pixel_values",)
    #: Image keys that concatenate every image's tiles / patches on dim 0 (InternVL tiles, Qwen
    #: patches); the other image keys hold one entry per image.
    tiled_keys: tuple[str, ...] = ()
    #: Value an exemplar slot gets in each per-token key (default 0); ``"previous"`` copies the
    #: token before the slot (a cross-attention mask keeps attending to the image).
    slot_fill: tuple[tuple[str, int | str], ...] = ()
    #: See :data:`FEATURE_ROUTES`.
    feature_route: str | None = "embedding"
    #: Whether the image prefix can run once into a KV cache shared by all passes (not when the
    #: image attends to the text after it: PaliGemma's bidirectional prefix).
    prefix_fusion: bool = True
    #: Whether the decoder takes ``attention_mask`` as a dict of 4-D masks keyed by layer type
    #: (``config.layer_types``). Option scoring packs a prompt's responses in one row under a custom
    #: mask; where a sliding window hides part of the prompt from some layers only, it needs one mask
    #: per layer type, and otherwise copies the prompt's KV cache per response instead.
    layer_type_masks: bool = False
    #: Tokenise text that comes without images (the completion half of trl's collator) with the
    #: tokenizer: the processor refuses it (PaliGemma) or adds a bos to it (Mllama).
    tokenize_text_alone: bool = False
    #: Value each per-token key takes on completion tokens (PaliGemma: token_type_ids 1 = suffix).
    completion_fill: tuple[tuple[str, int], ...] = ()
    #: Chat template for checkpoints whose processor has none (PaliGemma: image, prompt, newline).
    default_chat_template: str | None = None
    #: Whether the forward applies the output layer last (only soft-capping after it), so a loss can
    #: take the final hidden states and apply the layer itself (``hf_vitask.models.head``). Set False
    #: for a model that transforms its logits in other ways.
    deferred_output_layer: bool = True
    #: Whether the forward soft-caps its logits after the output layer with the text config's
    #: ``final_logit_softcapping`` (PaliGemma, whose Gemma 2 decoder sets it). Gemma 3's vision model
    #: never applies it, even when its text config carries one.
    softcaps_logits: bool = False

    # -- tokens ----------------------------------------------------------------------------------
    def image_token_id(self, tokenizer: Any) -> int:
        """Id of :attr:`image_token` in ``tokenizer`` (a tokenizer or a processor)."""
        token_id = _token_id(tokenizer, self.image_token)
        if token_id is None:
            raise ValueError(
                f"Tokenizer has no {self.image_token!r} token required by the {self.name} family"
            )
        return token_id

    def image_end_token_id(self, tokenizer: Any) -> int | None:
        """Id of :attr:`image_end_token`, or None for families without one."""
        if self.image_end_token is None:
            return None
        token_id = _token_id(tokenizer, self.image_end_token)
        if token_id is None:
            raise ValueError(
                f"Tokenizer has no {self.image_end_token!r} token required by the {self.name} family"
            )
        return token_id

    @property
    def fusion_modes(self) -> tuple[str, ...]:
        """The ``pass_fusion`` modes this family can run (``"none"`` always can). ``"prefix"``
        also needs every row of a batch to share the image prefix (same-size images); otherwise it
        falls back to the next mode, with one warning."""
        modes = []
        if self.prefix_fusion:
            modes.append("prefix")
        if self.feature_route is not None:
            modes.append("batch")
        return (*modes, "none")

    @property
    def token_keys(self) -> tuple[str, ...]:
        """Every key whose dims 0 and 1 are (batch, length)."""
        return ("input_ids", "attention_mask", "labels", *self.per_token_keys)

    def slot_value(self, key: str) -> int | str:
        """What an exemplar slot holds in per-token key ``key``."""
        return dict(self.slot_fill).get(key, 0)

    def rebuild_token_tensors(self, batch: dict, image_token_id: int) -> dict:
        """Recompute the per-token tensors that depend on where each image sits, for a batch whose
        tokens were joined or spliced: trl's collator (which builds them for the prompt only) and
        CRT negatives (row j's image under row i's text). Default: none do; ``batch`` as is."""
        return batch

    # -- positions -------------------------------------------------------------------------------
    def positions(self, model, inputs: dict) -> torch.Tensor:
        """Position ids as the model computes them for right-padded ``inputs``: ``(B, L)`` 0..L-1.
        ``model`` is the VLM (peft-wrapped or not)."""
        ids = inputs["input_ids"]
        return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)

    # -- images ----------------------------------------------------------------------------------
    def image_inputs(self, batch: dict) -> dict:
        """The image tensors of ``batch`` (what the vision tower needs)."""
        return {key: batch[key] for key in self.image_keys if batch.get(key) is not None}

    def tiles_per_image(self, batch: dict, image_token_id: int | None) -> list[int] | None:
        """How many dim-0 entries of the :attr:`tiled_keys` each row's image owns (None: no tiled keys)."""
        if not self.tiled_keys:
            return None
        raise TypeError(
            f"{self.name}: a family with tiled_keys must override tiles_per_image (see TiledFamily)"
        )

    def select_images(self, batch: dict, index: torch.Tensor, image_token_id: int | None = None) -> dict:
        """Return the image tensors with row ``i`` holding the WHOLE image of row ``index[i]``
        (all its tiles, patches or cross-attention tiles).

        Builds contrastive negatives and sub-batches without re-running the processor. Assumes
        one image per row; ``image_token_id`` is needed by families that count tiles from tokens.
        """
        if batch.get(self.image_keys[0]) is None:
            raise ValueError(f"{self.name}: batch lacks {self.image_keys[0]!r}; it has {sorted(batch)}")
        index = torch.as_tensor(index, dtype=torch.long)
        if index.ndim != 1:
            raise ValueError(f"index must be 1-D, got shape {tuple(index.shape)}")
        rows = batch["input_ids"].shape[0] if batch.get("input_ids") is not None else None
        tiles = self.tiles_per_image(batch, image_token_id)
        out = {}
        for key in self.image_keys:
            value = batch.get(key)
            if value is None:
                continue
            if key in self.tiled_keys:
                if sum(tiles) != value.shape[0]:
                    raise ValueError(
                        f"{self.name}: {key} has {value.shape[0]} tiles/patches but the images account for "
                        f"{sum(tiles)} ({tiles})"
                    )
                _check_index(self.name, len(tiles), rows, index)
                chunks = value.split(tiles, dim=0)
                out[key] = torch.cat([chunks[j] for j in index.tolist()], dim=0)
            else:
                _check_index(self.name, value.shape[0], rows, index)
                out[key] = value[index.to(value.device)]
        return out

    def take_rows(self, batch: dict, rows: torch.Tensor, image_token_id: int | None = None) -> dict:
        """The sub-batch of ``rows``: their token tensors and their images."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=batch["input_ids"].device)
        out = {k: batch[k][rows] for k in self.token_keys if batch.get(k) is not None}
        out.update(self.select_images(batch, rows, image_token_id))
        return out


def _token_id(tokenizer: Any, token: str) -> int | None:
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor carries its tokenizer
    token_id = tok.convert_tokens_to_ids(token)
    if token_id is None or (tok.unk_token_id is not None and token_id == tok.unk_token_id):
        return None
    return int(token_id)


def _check_index(name: str, n_images: int, rows: int | None, index: torch.Tensor) -> None:
    if rows is not None and n_images != rows:
        raise ValueError(
            f"{name}: select_images needs exactly one image per row, got {n_images} images for {rows} rows"
        )
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= n_images):
        raise ValueError(f"{name}: index {index.tolist()} out of range for {n_images} images")


def image_tokens_per_row(input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    return (input_ids == image_token_id).sum(1).tolist()


@dataclass(frozen=True)
class TiledFamily(VLMFamily):
    """Images cut into a variable number of equal tiles, all concatenated on dim 0 of the pixel
    values, each tile giving the same number of image tokens (InternVL). A row's tile count is
    its image-token count over the tokens per tile."""

    def tiles_per_image(self, batch: dict, image_token_id: int | None) -> list[int]:
        if image_token_id is None:
            raise ValueError(f"{self.name}: counting an image's tiles needs the image token id")
        tokens = image_tokens_per_row(batch["input_ids"], image_token_id)
        total_tiles = batch[self.tiled_keys[0]].shape[0]
        per_tile, rest = divmod(sum(tokens), total_tiles) if total_tiles else (0, 1)
        if rest or not per_tile or any(t % per_tile for t in tokens):
            raise ValueError(
                f"{self.name}: {sum(tokens)} image tokens ({tokens} per row) do not split evenly over "
                f"{total_tiles} tiles; was the batch built by the model's processor?"
            )
        return [t // per_tile for t in tokens]


@dataclass(frozen=True)
class MRopeFamily(VLMFamily):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: each image's patches concatenated on dim 0 with one
    ``image_grid_thw`` row per image, and 3-D multimodal RoPE positions (``get_rope_index``)."""

    def tiles_per_image(self, batch: dict, image_token_id: int | None) -> list[int]:
        return batch["image_grid_thw"].prod(dim=-1).tolist()

    def positions(self, model, inputs: dict) -> torch.Tensor:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        kwargs = {
            k: inputs[k] for k in ("mm_token_type_ids", "image_grid_thw", "attention_mask") if k in inputs
        }
        positions, _ = base.model.get_rope_index(inputs["input_ids"], **kwargs)
        return positions


@dataclass(frozen=True)
class CrossAttentionFamily(VLMFamily):
    """Llama-3.2-Vision (Mllama): one ``<|image|>`` token per image; the tokens from it onward read
    the image's tiles through cross-attention layers, as ``cross_attention_mask`` (B, L, images,
    tiles) says. ``pixel_values`` (B, images, max tiles, C, H, W) hold one entry per row."""

    def rebuild_token_tensors(self, batch: dict, image_token_id: int) -> dict:
        from transformers.models.mllama.processing_mllama import (
            convert_sparse_cross_attention_mask_to_dense,
            get_cross_attention_token_mask,
        )

        ids, tiles = batch["input_ids"], batch["aspect_ratio_mask"]
        spans = [get_cross_attention_token_mask(row.tolist(), image_token_id) for row in ids]
        if not all(spans):
            raise ValueError(
                f"{self.name}: rows {[i for i, s in enumerate(spans) if not s]} have no image token"
            )
        num_tiles = tiles.sum(-1).tolist()  # (B, images): valid tiles of each image
        dense = convert_sparse_cross_attention_mask_to_dense(spans, num_tiles, tiles.shape[-1], ids.shape[1])
        return {**batch, "cross_attention_mask": torch.from_numpy(dense).to(ids.device)}


FAMILIES: dict[str, VLMFamily] = {}


def register_family(family: VLMFamily) -> None:
    """Add (or replace, by name) a family; a model_type may belong to one family only."""
    for other in FAMILIES.values():
        if other.name == family.name:
            continue
        clash = set(other.model_types) & set(family.model_types)
        if clash:
            raise ValueError(f"model_type(s) {sorted(clash)} already served by family {other.name!r}")
    if family.feature_route not in FEATURE_ROUTES:
        raise ValueError(f"feature_route must be one of {FEATURE_ROUTES}, got {family.feature_route!r}")
    FAMILIES[family.name] = family


register_family(
    VLMFamily(
        name="llava",
        model_types=("llava",),
        image_token="<image>",
        image_end_token=None,
        lora_target_modules=LANGUAGE_MODEL_LORA_REGEX,
        vision_modules=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
    )
)

# Qwen2.5-VL shares the module layout (model.visual / model.language_model / lm_head), the
# image processor (pixel_values + image_grid_thw) and the mm_token_type_ids output.
register_family(
    MRopeFamily(
        name="qwen2_vl",
        model_types=("qwen2_vl", "qwen2_5_vl"),
        image_token="<|image_pad|>",
        image_end_token="<|vision_end|>",
        lora_target_modules=LANGUAGE_MODEL_LORA_REGEX,
        vision_modules=("model.visual", "lm_head"),
        per_token_keys=("mm_token_type_ids",),
        image_keys=("pixel_values", "image_grid_thw"),
        tiled_keys=("pixel_values",),
    )
)

# Qwen3-VL: Qwen2-VL's images and M-RoPE (interleaved), plus "deepstack": features of several vision
# layers are added to the hidden states of the first decoder layers at the image positions, so
# stacked passes hand the model all its vision outputs (`mm_encoder_outputs`).
register_family(
    MRopeFamily(
        name="qwen3_vl",
        model_types=("qwen3_vl",),
        image_token="<|image_pad|>",
        image_end_token="<|vision_end|>",
        lora_target_modules=LANGUAGE_MODEL_LORA_REGEX,
        vision_modules=("model.visual", "lm_head"),
        per_token_keys=("mm_token_type_ids",),
        image_keys=("pixel_values", "image_grid_thw"),
        tiled_keys=("pixel_values",),
        feature_route="encoder_outputs",
    )
)

# LLaVA-NeXT / LLaVA-OneVision ("anyres"): pixel_values (images, max tiles, C, H, W) zero-padded on
# the tile axis, one `image_sizes` row per image (the model recomputes the tile grid from it), and
# OneVision's `batch_num_images` per row; features packed with a newline vector per row are
# written at the `<image>` positions.
register_family(
    VLMFamily(
        name="llava_next",
        model_types=("llava_next", "llava_onevision"),
        image_token="<image>",
        image_end_token=None,
        lora_target_modules=LANGUAGE_MODEL_LORA_REGEX,
        vision_modules=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        image_keys=("pixel_values", "image_sizes", "batch_num_images"),
    )
)

# Idefics3 and SmolVLM (Idefics3's architecture and image handling): the text decoder is
# `model.text_model`; an image is split into tiles + a global image, stacked per row on dim 1 of
# pixel_values (B, max tiles, C, H, W) with `pixel_attention_mask`; the image block interleaves
# `<fake_token_around_image>`, `<row_r_col_c>` / `<global-img>` tags and `<image>` runs, and
# closes with `<fake_token_around_image>`.
register_family(
    VLMFamily(
        name="idefics3",
        model_types=("idefics3", "smolvlm"),
        image_token="<image>",
        image_end_token="<fake_token_around_image>",
        lora_target_modules=lora_regex("text_model"),
        vision_modules=("model.vision_model", "model.connector", "lm_head"),
        image_keys=("pixel_values", "pixel_attention_mask"),
    )
)

# InternVL (InternVL2/2.5/3 in transformers format): `<img>` + 256 `<IMG_CONTEXT>` per 448px tile
# + `</img>`; GotOcr2's processor cuts an image into 1..max_patches tiles (+ a thumbnail),
# concatenated on dim 0 of pixel_values with no per-image count in the batch.
register_family(
    TiledFamily(
        name="internvl",
        model_types=("internvl",),
        image_token="<IMG_CONTEXT>",
        image_end_token="</img>",
        lora_target_modules=LANGUAGE_MODEL_LORA_REGEX,
        vision_modules=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        tiled_keys=("pixel_values",),
    )
)


# Gemma 3: every image resized to one square (896 px, 256 soft tokens after pooling); the chat
# template's `<start_of_image>` expands to `<start_of_image>` + `<image_soft_token>`s + `<end_of_image>`,
# and `token_type_ids` (1 on image tokens) make attention bidirectional inside an image block.
register_family(
    VLMFamily(
        name="gemma3",
        model_types=("gemma3",),
        image_token="<image_soft_token>",
        image_end_token="<end_of_image>",
        lora_target_modules=LANGUAGE_MODEL_LORA_REGEX,
        vision_modules=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        per_token_keys=("token_type_ids",),
        layer_type_masks=True,
    )
)


# PaliGemma: `<image>` x N + `<bos>` + prompt + "\n" is a bidirectional prefix (token_type_ids 0), the
# answer a causal suffix (token_type_ids 1). The image attends to the prompt after it, so no image
# prefix can be shared; the processor takes no text without images.
PALIGEMMA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set n_images = 0 -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}{{ text + eos_token }}{% endgeneration %}"
    "{%- else -%}{{ '<image>' * n_images + text }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

register_family(
    VLMFamily(
        name="paligemma",
        model_types=("paligemma",),
        image_token="<image>",
        image_end_token="<bos>",
        lora_target_modules=LANGUAGE_MODEL_LORA_REGEX,
        vision_modules=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        per_token_keys=("token_type_ids",),
        prefix_fusion=False,
        tokenize_text_alone=True,
        completion_fill=(("token_type_ids", 1),),
        default_chat_template=PALIGEMMA_CHAT_TEMPLATE,
        softcaps_logits=True,
    )
)


# Llama-3.2-Vision: the vision tower's tile features enter the decoder only through cross-attention
# layers, so there is no embedding route for stacked passes; the prefix runs once (its cache holds
# the cross-attention states) and the exemplar slot keeps reading the image ("previous").
register_family(
    CrossAttentionFamily(
        name="mllama",
        model_types=("mllama",),
        image_token="<|image|>",
        image_end_token=None,
        lora_target_modules=lora_regex("language_model", attention=("self_attn", "cross_attn")),
        vision_modules=("model.vision_model", "model.multi_modal_projector", "lm_head"),
        per_token_keys=("cross_attention_mask",),
        image_keys=("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"),
        slot_fill=(("cross_attention_mask", "previous"),),
        feature_route=None,
        tokenize_text_alone=True,
    )
)


def support_matrix() -> list[dict[str, str]]:
    """One row per registered family: model types, fused-pass modes, what gradient checkpointing
    runs, the modules kept out of 4-bit quantisation (``hf-vitask info`` prints it)."""
    rows = []
    for family in FAMILIES.values():
        rows.append(
            {
                "family": family.name,
                "model_type": ", ".join(family.model_types),
                "pass_fusion": ", ".join(family.fusion_modes),
                "gradient_checkpointing": family.fusion_modes[0],
                "4-bit (kept full precision)": ", ".join(family.vision_modules),
            }
        )
    return rows


def _model_type(obj: Any) -> str | None:
    if isinstance(obj, PreTrainedConfig):
        return obj.model_type
    if hasattr(obj, "get_base_model"):  # peft PeftModel: look through the adapter wrapper
        obj = obj.get_base_model()
    return getattr(getattr(obj, "config", None), "model_type", None)


def family_of_processor(processor: Any) -> VLMFamily | None:
    """The registered family whose model types use ``processor``'s class (or a base class of it) in
    transformers' processor mapping; None when none or several do. A wrapper that holds the VLM's
    processor as ``vlm_processor`` (``VITaskProcessor``) is looked through."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    processor = getattr(processor, "vlm_processor", processor)
    classes = {cls.__name__ for cls in type(processor).__mro__}
    found = {
        family.name
        for family in FAMILIES.values()
        for model_type in family.model_types
        if PROCESSOR_MAPPING_NAMES.get(model_type) in classes
    }
    return FAMILIES[found.pop()] if len(found) == 1 else None


def get_family(obj: Any) -> VLMFamily:
    """Family for a name, a model_type string, a config, a model, a peft model or anything with ``.config``."""
    if isinstance(obj, str):
        if obj in FAMILIES:
            return FAMILIES[obj]
        model_type = obj
    else:
        model_type = _model_type(obj)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(f"{f.name} (model_type {', '.join(f.model_types)})" for f in FAMILIES.values())
    raise ValueError(
        f"Unsupported VLM model_type {model_type!r} (from {type(obj).__name__}). Supported families: "
        f"{supported}. To support it, add an entry to hf_vitask.models.families.FAMILIES with "
        f"register_family(...): see {FAMILIES_GUIDE}."
    )
