"""Everything that differs between VLM families lives here; adding a family is one entry plus a tiny-config test.

The rest of the package (collators, LoRA/QLoRA setup, contrastive negatives, generation)
asks a :class:`VLMFamily` instead of branching on model classes, so supporting a new
architecture means describing it once in :data:`FAMILIES` (or via :func:`register_family`)
and adding a tiny-config test next to ``tests/test_tiny.py``.
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
    "get_family",
    "register_family",
]

# transformers 5 names every VLM's text decoder `model.language_model` (old checkpoints'
# `language_model.model.*` keys are renamed on load), so one regex covers both families.
# peft full-matches a str `target_modules` against each module name; anchoring on
# `language_model.layers.N.` keeps it off the vision tower, which has its own q/k/v
# (CLIP) or gate/up/down (Qwen2.5-VL) projections.
LANGUAGE_MODEL_LORA_REGEX = (
    r"(.*\.)?language_model\.layers\.\d+\."
    r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
)


@dataclass(frozen=True)
class VLMFamily:
    """What a VLM family needs the rest of the package to know about it."""

    name: str
    #: ``config.model_type`` values this family serves.
    model_types: tuple[str, ...]
    #: Placeholder the processor expands into one token per image feature.
    image_token: str
    #: Token closing an image block (Qwen2-VL ``<|vision_end|>``); None when there is none.
    image_end_token: str | None
    #: Full-match regex for peft ``target_modules``: language-model linears only.
    lora_target_modules: str
    #: Full transformers-5 module names to keep out of quantisation (bnb ``llm_int8_skip_modules``).
    vision_modules: tuple[str, ...]
    #: Processor outputs besides input_ids/attention_mask shaped (B, L) that must be edited
    #: in step with input_ids when tokens are inserted, removed or padded.
    per_token_keys: tuple[str, ...]
    #: Processor outputs carrying the image data.
    image_keys: tuple[str, ...]
    #: Positions are multimodal RoPE indices from ``model.get_rope_index`` (Qwen2-VL), not 0..L-1.
    mrope: bool = False

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

    def select_images(self, batch: dict, index: torch.LongTensor) -> dict:
        """Return ``{key: tensor}`` for :attr:`image_keys`, row ``i`` getting the image of row ``index[i]``.

        Builds contrastive negatives (text of row ``i`` with the image of row ``index[i]``)
        without re-running the processor. Assumes one image per row. Raises ValueError
        when the swapped image would not fill row ``i``'s image tokens (different grid).
        """
        missing = [key for key in self.image_keys if key not in batch]
        if missing:
            raise ValueError(f"{self.name}: batch lacks image keys {missing}; it has {sorted(batch)}")
        index = torch.as_tensor(index, dtype=torch.long)
        if index.ndim != 1:
            raise ValueError(f"index must be 1-D, got shape {tuple(index.shape)}")
        if "image_grid_thw" in self.image_keys:
            return _select_patch_images(self.name, batch, index)
        return _select_stacked_images(self.name, self.image_keys, batch, index)


def _token_id(tokenizer: Any, token: str) -> int | None:
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor carries its tokenizer
    token_id = tok.convert_tokens_to_ids(token)
    if token_id is None or (tok.unk_token_id is not None and token_id == tok.unk_token_id):
        return None
    return int(token_id)


def _check_rows(name: str, n_images: int, batch: dict, index: torch.Tensor) -> None:
    input_ids = batch.get("input_ids")
    if input_ids is not None and n_images != input_ids.shape[0]:
        raise ValueError(
            f"{name}: select_images needs exactly one image per row, got {n_images} images "
            f"for {input_ids.shape[0]} rows"
        )
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= n_images):
        raise ValueError(f"{name}: index {index.tolist()} out of range for {n_images} images")


def _select_stacked_images(name: str, keys: tuple[str, ...], batch: dict, index: torch.Tensor) -> dict:
    """Images stacked on dim 0 (LLaVA: pixel_values (B, C, H, W)): plain indexing."""
    n_images = batch[keys[0]].shape[0]
    _check_rows(name, n_images, batch, index)
    return {key: batch[key][index.to(batch[key].device)] for key in keys}


def _select_patch_images(name: str, batch: dict, index: torch.Tensor) -> dict:
    """Qwen2-VL layout: pixel_values concatenates each image's grid.prod() patch rows."""
    pixel_values, grid = batch["pixel_values"], batch["image_grid_thw"]
    n_images = grid.shape[0]
    _check_rows(name, n_images, batch, index)
    patches = grid.prod(dim=-1).tolist()
    if sum(patches) != pixel_values.shape[0]:
        raise ValueError(
            f"{name}: pixel_values has {pixel_values.shape[0]} patch rows but image_grid_thw "
            f"accounts for {sum(patches)}"
        )
    idx = index.tolist()
    bad = [(i, j) for i, j in enumerate(idx) if patches[i] != patches[j]]
    if bad:
        i, j = bad[0]
        raise ValueError(
            f"{name}: cannot give row {i} the image of row {j}: their grids {grid[i].tolist()} and "
            f"{grid[j].tolist()} yield different numbers of image tokens ({patches[i]} vs {patches[j]} "
            "patches). Resize images to one size (or pair only same-size images) for contrastive negatives."
        )
    chunks = pixel_values.split(patches, dim=0)
    return {
        "pixel_values": torch.cat([chunks[j] for j in idx], dim=0),
        "image_grid_thw": grid[index.to(grid.device)],
    }


FAMILIES: dict[str, VLMFamily] = {}


def register_family(family: VLMFamily) -> None:
    """Add (or replace, by name) a family; a model_type may belong to one family only."""
    for other in FAMILIES.values():
        if other.name == family.name:
            continue
        clash = set(other.model_types) & set(family.model_types)
        if clash:
            raise ValueError(f"model_type(s) {sorted(clash)} already served by family {other.name!r}")
    FAMILIES[family.name] = family


register_family(
    VLMFamily(
        name="llava",
        model_types=("llava",),
        image_token="<image>",
        image_end_token=None,
        lora_target_modules=LANGUAGE_MODEL_LORA_REGEX,
        vision_modules=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
        per_token_keys=(),
        image_keys=("pixel_values",),
    )
)

# Qwen2.5-VL shares the module layout (model.visual / model.language_model / lm_head), the
# image processor (pixel_values + image_grid_thw) and the mm_token_type_ids output.
register_family(
    VLMFamily(
        name="qwen2_vl",
        model_types=("qwen2_vl", "qwen2_5_vl"),
        image_token="<|image_pad|>",
        image_end_token="<|vision_end|>",
        lora_target_modules=LANGUAGE_MODEL_LORA_REGEX,
        vision_modules=("model.visual", "lm_head"),
        per_token_keys=("mm_token_type_ids",),
        image_keys=("pixel_values", "image_grid_thw"),
        mrope=True,
    )
)


def _model_type(obj: Any) -> str | None:
    if isinstance(obj, PreTrainedConfig):
        return obj.model_type
    if hasattr(obj, "get_base_model"):  # peft PeftModel: look through the adapter wrapper
        obj = obj.get_base_model()
    return getattr(getattr(obj, "config", None), "model_type", None)


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
        f"{supported}. To support it, add an entry to hf_vitask.models.families.FAMILIES "
        "(hf_vitask.models.families.register_family)."
    )
