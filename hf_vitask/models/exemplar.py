"""Exemplar prompting (EP): the TSM connector and the insertion of exemplar tokens.

The exemplar is the TSM's feature projected into the LLM embedding space and added to the
VLM input as extra token(s) right after the image block. Insertion works on token ids, not
on a family-specific merge of image features: :func:`insert_exemplar_slots` opens ``k``
placeholder positions in every row, and :class:`ExemplarInjector`, a forward hook on the
LLM input embedding, writes the projected features into those positions. Every VLM embeds
its ``input_ids`` through that one layer, so the same code serves LLaVA, Qwen2-VL, ... and
the no-exemplar path is the unmodified model.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hf_vitask.jsonfile import check_fields
from hf_vitask.losses import IGNORE_INDEX


@dataclass
class ConnectorConfig:
    """Shape of the TSM connector."""

    tsm_dim: int
    """Size of the TSM feature."""
    llm_dim: int
    """Size of the LLM input embedding."""
    num_tokens: int = 1
    """Number of exemplar tokens inserted after the image."""
    feature: str = "pooled"
    """``"pooled"``: the TSM's CLS/pooled pre-logits feature (the paper's best choice); ``"patch"``: its
    patch tokens, average-pooled to ``num_tokens`` tokens."""
    hidden_dim: int | None = None
    """Hidden width of the MLP; ``None`` uses ``llm_dim``."""

    def __post_init__(self):
        if self.feature not in ("pooled", "patch"):
            raise ValueError(f"feature must be 'pooled' or 'patch', got {self.feature!r}")
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "connector config") -> ConnectorConfig:
        """The config as read from a bundle's ``vitask_config.json``, type-checked field by field."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be an object, got {type(data).__name__}")
        check_fields(
            data,
            {
                "tsm_dim": "positive",
                "llm_dim": "positive",
                "num_tokens": "positive",
                "feature": "str",
                "hidden_dim": "positive?",
            },
            where,
            required=("tsm_dim", "llm_dim"),
            allow_unknown=False,
        )
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


class ExemplarConnector(nn.Module):
    """LayerNorm -> Linear(tsm, hidden) -> GELU -> Linear(hidden, llm): TSM features to exemplar tokens.

    Pooled features ``(B, D)`` give ``num_tokens`` tokens from one MLP with a widened output;
    patch features ``(B, N, D)`` are pooled to ``num_tokens`` and projected token by token.
    """

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        #: Whether the weights were trained (set when loaded from a bundle or after an EP stage): stage 2
        #: freezes the connector, which only makes sense for a trained one.
        self.trained = False
        self.config = config
        hidden = config.hidden_dim or config.llm_dim
        out = config.llm_dim * (config.num_tokens if config.feature == "pooled" else 1)
        self.norm = nn.LayerNorm(config.tsm_dim)
        self.fc1 = nn.Linear(config.tsm_dim, hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` pooled or ``(B, N, D)`` patch features -> ``(B, num_tokens, llm_dim)``."""
        cfg = self.config
        if cfg.feature == "pooled":
            if features.dim() != 2:
                raise ValueError(
                    f"pooled connector expects (batch, dim) features, got {tuple(features.shape)}"
                )
            x = self.fc2(F.gelu(self.fc1(self.norm(features))))
            return x.view(features.shape[0], cfg.num_tokens, cfg.llm_dim)
        if features.dim() != 3:
            raise ValueError(
                f"patch connector expects (batch, tokens, dim) features, got {tuple(features.shape)}"
            )
        pooled = F.adaptive_avg_pool1d(features.transpose(1, 2), cfg.num_tokens).transpose(1, 2)
        return self.fc2(F.gelu(self.fc1(self.norm(pooled))))


def exemplar_positions(
    input_ids: torch.Tensor, image_token_id: int, image_end_token_id: int | None = None
) -> torch.Tensor:
    """Index right after each row's image block (after its end marker, if the family has one)."""
    is_image = input_ids == image_token_id
    missing = (~is_image.any(dim=1)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(
            f"rows {missing} have no image token (id {image_token_id}); cannot place the exemplar"
        )
    length = input_ids.shape[1]
    last = length - 1 - is_image.flip(1).int().argmax(dim=1)
    pos = last + 1
    if image_end_token_id is not None:
        nxt = input_ids.gather(1, pos.clamp(max=length - 1)[:, None]).squeeze(1)
        pos = torch.where((pos < length) & (nxt == image_end_token_id), pos + 1, pos)
    return pos


def insert_exemplar_slots(
    batch: dict[str, torch.Tensor],
    positions: torch.Tensor,
    num_tokens: int,
    slot_token_id: int,
    per_token_keys: tuple[str, ...] = (),
    slot_fill: dict[str, int | str] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Open ``num_tokens`` positions at ``positions[i]`` in every row of the sequence tensors.

    ``input_ids`` gets ``slot_token_id`` there (its embedding is overwritten by the injector),
    ``attention_mask`` 1, ``labels`` -100 and the other ``per_token_keys`` (any rank, sequence on
    dim 1, e.g. a ``(B, L, images, tiles)`` cross-attention mask) ``slot_fill[key]``: a value
    (default 0) or ``"previous"``, a copy of the token before the slot. Returns the new batch
    (other keys untouched) and the ``(B, L + k)`` boolean mask of the slots.
    """
    input_ids = batch["input_ids"]
    bsz, length = input_ids.shape
    new_len = length + num_tokens
    j = torch.arange(new_len, device=input_ids.device).expand(bsz, new_len)
    p = positions.to(input_ids.device)[:, None]
    slot = (j >= p) & (j < p + num_tokens)
    src = torch.where(j < p, j, j - num_tokens).clamp(0, length - 1)
    src_previous = torch.where(slot, (p - 1).clamp(min=0), src)
    fills = {"input_ids": slot_token_id, "attention_mask": 1, "labels": IGNORE_INDEX, **(slot_fill or {})}
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "labels", *per_token_keys):
        if key not in batch or batch[key] is None:
            continue
        t = batch[key]
        if t.shape[:2] != (bsz, length):
            raise ValueError(
                f"{key} has shape {tuple(t.shape)}, expected (batch, length, ...) = {(bsz, length)}"
            )
        fill = fills.get(key, 0)
        index = src_previous if fill == "previous" else src
        moved = t.gather(
            1, index.view(bsz, new_len, *([1] * (t.dim() - 2))).expand(bsz, new_len, *t.shape[2:])
        )
        if fill != "previous":
            moved = moved.masked_fill(slot.view(bsz, new_len, *([1] * (t.dim() - 2))), fill)
        out[key] = moved
    return out, slot


class ExemplarInjector:
    """Writes exemplar (or proxy) embeddings into slot positions of the LLM input embedding.

    :meth:`inject` is a context manager around one model call: it adds a forward hook to the
    embedding on entry and removes it on exit, so a model carries no hook between calls, however
    often it is wrapped or evaluated. The hook fires once, on the first embedding call whose shape
    matches the slot mask (the prefill when generating), and the context raises if it never fired,
    so an exemplar is never silently dropped.
    """

    def __init__(self, embedding: nn.Module):
        self.embedding = embedding

    def inject(self, mask: torch.Tensor, values: torch.Tensor) -> contextlib.AbstractContextManager:
        """``mask`` (B, L) marks the slots; ``values`` (B, k, D) are written there in order."""
        expected = int(mask.sum())
        if values.shape[0] * values.shape[1] != expected:
            raise ValueError(f"{values.shape[0] * values.shape[1]} exemplar tokens for {expected} slots")
        return _injection(self.embedding, mask, values)


@contextlib.contextmanager
def _injection(embedding: nn.Module, mask: torch.Tensor, values: torch.Tensor):
    fired = []

    def hook(module, args, output):
        if fired or output.shape[:2] != mask.shape:
            return output
        fired.append(True)
        written = values.to(dtype=output.dtype, device=output.device)
        return output.masked_scatter(mask.to(output.device).unsqueeze(-1), written)

    handle = embedding.register_forward_hook(hook, prepend=True)  # before any hook of the user's
    try:
        yield
    finally:
        handle.remove()
    if not fired:
        raise RuntimeError(
            "The exemplar tokens were never written: the model did not embed input_ids of the expected "
            "shape through get_input_embeddings(). This VLM family needs an entry in hf_vitask.models.families."
        )
