"""The momentum proxy instruction of instruction-free tuning: ``K`` learnable vectors in the LLM
input-embedding space, written where an instruction would go (the exemplar's sibling: both are
embeddings injected at slot positions, :meth:`VITaskModel.inject`).

The vectors are smoothed by an EMA ``t̄ ← m·t̄ + (1−m)·t`` after every optimizer step; the model
is fed the EMA copy (straight-through: ``t̄.detach() + t − t.detach()``, so gradients reach ``t``)
or the raw one.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from hf_vitask.config import PROXY_FEEDS, PROXY_INIT_RESIZES
from hf_vitask.files import PROXY_FILE


def resize_tokens(embeds: torch.Tensor, k: int, mode: str = "linear") -> torch.Tensor:
    """``(n, D)`` token embeddings -> ``(k, D)``.

    ``"linear"``: linear interpolation along the token axis with the first and last token kept
    (k > n blends neighbours, k < n samples evenly; k = n is the identity). ``"repeat"``: the n
    tokens cycled (``t1..tn t1..``) and cut to k (k <= n keeps the first k tokens).
    """
    n = embeds.shape[0]
    if n == 0 or k < 1:
        raise ValueError(f"cannot resize {n} token embeddings to {k}")
    if mode == "repeat":
        return embeds.repeat(math.ceil(k / n), 1)[:k].clone()
    if mode != "linear":
        raise ValueError(f"resize mode must be one of {PROXY_INIT_RESIZES}, got {mode!r}")
    if n == 1:
        return embeds.expand(k, -1).clone()
    x = embeds.t().unsqueeze(0).float()  # (1, D, n)
    return F.interpolate(x, size=k, mode="linear", align_corners=True)[0].t().to(embeds.dtype).contiguous()


class ProxyInstruction(nn.Module):
    """``K`` learnable vectors (``weight``) and their exponential moving average (``ema``).

    ``ema`` starts equal to ``weight``; :meth:`update_ema` applies ``ema ← m·ema + (1−m)·weight``
    and counts ``step``. :meth:`fed` is what the model sees: the EMA with a straight-through
    gradient to ``weight`` (``feed="ema"``) or ``weight`` itself (``feed="raw"``). With ``m = 0``
    both feeds are the raw proxy.
    """

    def __init__(self, init: torch.Tensor, momentum: float = 0.99, feed: str = "ema"):
        super().__init__()
        if init.dim() != 2:
            raise ValueError(f"the proxy init must be (K, D), got {tuple(init.shape)}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if feed not in PROXY_FEEDS:
            raise ValueError(f"feed must be one of {PROXY_FEEDS}, got {feed!r}")
        self.momentum = float(momentum)
        self.feed = feed
        self.weight = nn.Parameter(init.detach().float().clone())
        self.register_buffer("ema", init.detach().float().clone())
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def num_tokens(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def from_text(
        cls,
        embedding: nn.Embedding,
        tokenizer,
        text: str,
        num_tokens: int,
        *,
        resize: str = "linear",
        momentum: float = 0.99,
        feed: str = "ema",
        generator: torch.Generator | None = None,
    ) -> ProxyInstruction:
        """Initialise from the token embeddings of ``text`` resized to ``num_tokens``
        (:func:`resize_tokens`); an empty text gives ``N(0, std(embedding))`` vectors."""
        weight = embedding.weight.detach()
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if ids:
            init = resize_tokens(
                weight[torch.tensor(ids, device=weight.device)].float().cpu(), num_tokens, resize
            )
        else:
            std = weight.float().std().item()
            init = torch.randn(num_tokens, weight.shape[1], generator=generator) * std
        return cls(init.to(weight.device), momentum=momentum, feed=feed)

    def fed(self) -> torch.Tensor:
        """The ``(K, D)`` vectors written into the prompt."""
        if self.feed == "raw":
            return self.weight
        return self.ema.detach() + self.weight - self.weight.detach()

    @torch.no_grad()
    def update_ema(self) -> None:
        """``ema ← m·ema + (1−m)·weight``; called once after every optimizer step."""
        self.ema.mul_(self.momentum).add_(self.weight.detach(), alpha=1 - self.momentum)
        self.step += 1

    # -- persistence -------------------------------------------------------------------------------
    def save(self, path: str | Path, state: dict | None = None) -> None:
        """``proxy.safetensors``-style file: ``proxy`` (raw), ``proxy_ema``, ``step``, metadata m and feed.
        ``state``: this module's state dict when it was gathered from FSDP / DeepSpeed shards."""
        state = state or {"weight": self.weight, "ema": self.ema, "step": self.step}
        tensors = {
            "proxy": state["weight"].detach().float().cpu().contiguous(),
            "proxy_ema": state["ema"].detach().float().cpu().contiguous(),
            "step": state["step"].detach().cpu().reshape(1),
        }
        save_file(tensors, str(path), metadata={"momentum": repr(self.momentum), "feed": self.feed})

    def load(self, path: str | Path) -> None:
        """Restore raw, EMA and step in place (exact resume)."""
        state = load_file(str(path))
        if state["proxy"].shape != self.weight.shape:
            raise ValueError(
                f"{path} holds a proxy of shape {tuple(state['proxy'].shape)}, expected {tuple(self.weight.shape)}"
            )
        with torch.no_grad():
            self.weight.copy_(state["proxy"])
            self.ema.copy_(state["proxy_ema"])
            self.step.copy_(state["step"].reshape(()))


def load_proxy(path: str | Path) -> dict[str, torch.Tensor]:
    """``{"proxy", "proxy_ema", "step"}`` from a checkpoint / output directory or a ``proxy.safetensors`` file."""
    path = Path(path)
    return load_file(str(path / PROXY_FILE if path.is_dir() else path))


def inject_proxy(model, proxy: ProxyInstruction, slot_mask: torch.Tensor):
    """Context manager writing ``proxy.fed()`` into every row's slots of ``model`` (a
    :class:`~hf_vitask.models.modeling.VITaskModel`) for one call."""
    values = proxy.fed().unsqueeze(0).expand(slot_mask.shape[0], -1, -1)
    return model.inject(slot_mask, values)


__all__ = ["PROXY_FILE", "ProxyInstruction", "inject_proxy", "load_proxy", "resize_tokens"]
