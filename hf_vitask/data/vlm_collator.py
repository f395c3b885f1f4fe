"""trl's vision-language collator, taught the family quirks it does not know.

trl's ``DataCollatorForVisionLanguageModeling`` tokenises the prompt (with its images) and the
completion (text alone) in two processor calls, joins them and flushes padding left. That fails
for processors that refuse text without images (PaliGemma), that add a bos to it (Mllama), whose
completion tokens carry another token type (PaliGemma's suffix), or whose outputs have a sequence
axis trl does not pad (Mllama's ``cross_attention_mask``). :class:`VLMCollator` keeps trl's
collation and lets the family adapter fix those three points: the text-alone call goes to the
tokenizer, completion token types are filled in, and :meth:`VLMFamily.rebuild_token_tensors`
completes the joined batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from hf_vitask.models.families import VLMFamily, family_of_processor, get_family

__all__ = ["VLMCollator"]


class _TextAloneToTokenizer:
    """Stands in for the processor inside trl's collator: calls without images are tokenised by
    the tokenizer, with the family's completion token types; everything else is the processor."""

    def __init__(self, processor, family: VLMFamily):
        self._processor, self._family = processor, family

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, images=None, text=None, **kwargs):
        if images is not None:
            return self._processor(images=images, text=text, **kwargs)
        kwargs.setdefault("return_token_type_ids", False)
        out = self._processor.tokenizer(text, **kwargs)
        for key, value in self._family.completion_fill:
            out[key] = torch.full_like(out["input_ids"], value)
        return out


@dataclass
class VLMCollator(DataCollatorForVisionLanguageModeling):
    """``DataCollatorForVisionLanguageModeling`` for every registered family.

    ``family``: a :class:`~hf_vitask.models.families.VLMFamily` or its name; None finds it from
    the processor's class (and, for a processor no family claims, behaves exactly as trl's).
    """

    family: VLMFamily | str | None = None

    def __post_init__(self):
        if isinstance(self.family, str):
            self.family = get_family(self.family)
        elif self.family is None:
            self.family = family_of_processor(self.processor)
        self._processor = self.processor
        if self.family is not None and self.family.tokenize_text_alone:
            self.processor = _TextAloneToTokenizer(self.processor, self.family)

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        if self.family is None:
            return batch
        return self.family.rebuild_token_tensors(batch, self.family.image_token_id(self._processor))
