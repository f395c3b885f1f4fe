"""Loading a VLM and its processor for training: by hub id / local path, or a tiny offline model."""

from __future__ import annotations

import torch

TINY_PREFIX = "tiny-"


def load_vlm(model_name_or_path: str, *, torch_dtype: str | None = None, trust_remote_code: bool = False, **kwargs):
    """Return ``(model, processor)``.

    ``tiny-llava`` / ``tiny-qwen2_vl`` build a tiny random VLM offline (demos and tests); anything
    else goes through ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained``.
    """
    if model_name_or_path.startswith(TINY_PREFIX):
        from hf_vitask.models.tiny import TINY_FAMILIES, build_tiny_vlm

        family = model_name_or_path[len(TINY_PREFIX) :]
        if family not in TINY_FAMILIES:
            raise ValueError(
                f"Unknown tiny model {model_name_or_path!r}; choose one of {[TINY_PREFIX + f for f in TINY_FAMILIES]}"
            )
        return build_tiny_vlm(family, **kwargs)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = torch_dtype if torch_dtype in (None, "auto") else getattr(torch, torch_dtype)
    model = AutoModelForImageTextToText.from_pretrained(
        model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
    )
    processor = AutoProcessor.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    return model, processor
