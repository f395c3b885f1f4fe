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


class _ProcessorProxy:
    """Stands in for the processor inside trl's collator. A processor error on the prompts is
    re-raised naming the rows whose rendered prompt lacks the image placeholder; with
    ``text_alone``, calls without images are tokenised by the tokenizer, with the family's
    completion token types; everything else is the processor."""

    def __init__(self, processor, family: VLMFamily, text_alone: bool):
        self._processor, self._family, self._text_alone = processor, family, text_alone

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, images=None, text=None, **kwargs):
        if images is not None:
            try:
                return self._processor(images=images, text=text, **kwargs)
            except ValueError as err:
                bad = self._rows_the_processor_refuses(images, text, kwargs)
                if not bad:
                    raise
                raise ValueError(
                    f"Rows {bad} have no image token after the chat template: the processor's chat template "
                    f"must render {{'type': 'image'}} content as the image placeholder (the processor said: {err})"
                ) from None
        if not self._text_alone:
            return self._processor(text=text, **kwargs)
        kwargs.setdefault("return_token_type_ids", False)
        out = self._processor.tokenizer(text, **kwargs)
        for key, value in self._family.completion_fill:
            out[key] = torch.full_like(out["input_ids"], value)
        return out

    def _rows_the_processor_refuses(self, images, text, kwargs) -> list[int]:
        """Only on the error path: process the rows one at a time to find the ones at fault."""
        bad = []
        for i, (row_images, row_text) in enumerate(zip(images, text)):
            try:
                self._processor(images=[row_images], text=[row_text], **kwargs)
            except ValueError:
                bad.append(i)
        return bad if len(bad) < len(text) or all(_no_placeholder(self._processor, t) for t in text) else []


def _no_placeholder(processor, text: str) -> bool:
    token = getattr(processor, "image_token", None)
    return isinstance(token, str) and token not in text


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
        if self.family is not None:
            self.processor = _ProcessorProxy(self.processor, self.family, self.family.tokenize_text_alone)

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        if self.family is None:
            return batch
        return self.family.rebuild_token_tensors(batch, self.family.image_token_id(self._processor))
