"""Loading a VLM and its processor for training: full precision or QLoRA (4-bit), plus LoRA setup.

- :func:`load_vlm` loads by hub id / local path (or builds a tiny offline model), optionally in
  4-bit NF4 with the vision tower, projector and ``lm_head`` kept out of quantisation.
- :func:`prepare_for_training` readies a (quantised) model for adapter training: gradient
  checkpointing without reentrancy and input grads on, so LoRA layers get gradients.
- :func:`lora_config` builds the ``peft.LoraConfig`` targeting the language model only.
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Any

import torch

from hf_vitask.models.families import VLMFamily, get_family

__all__ = [
    "QuantizationUnavailableError",
    "TINY_PREFIX",
    "bitsandbytes_available",
    "bnb_4bit_config",
    "default_compute_dtype",
    "is_quantized",
    "load_vlm",
    "lora_config",
    "lora_target_names",
    "prepare_for_training",
]

TINY_PREFIX = "tiny-"
# Where to find a checkpoint (also needed by AutoConfig / AutoProcessor).
_LOCATION_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")
# Hub-loading options that mean nothing to a tiny model built in memory.
_HUB_ONLY_KWARGS = (*_LOCATION_KWARGS, "low_cpu_mem_usage")


class QuantizationUnavailableError(RuntimeError):
    """4-bit loading was requested but bitsandbytes is missing or cannot run on this machine."""


# -- bitsandbytes ---------------------------------------------------------------------------------------
def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def _probe_4bit(device: str) -> str | None:
    """Quantise and dequantise a small matrix in NF4 on ``device``; the error text, or None if it works."""
    try:
        import bitsandbytes.functional as bnbf

        weight = torch.randn(64, 64, device=device)
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        restored = bnbf.dequantize_4bit(packed, state, quant_type="nf4")
        if not torch.isfinite(restored).all() or restored.shape != weight.shape:
            return "a 4-bit round trip gave wrong values"
    except Exception as err:  # any backend failure means "cannot run here"
        return f"{type(err).__name__}: {err}"
    return None


def bitsandbytes_available(device: str | None = None) -> tuple[bool, str]:
    """Whether bitsandbytes can run 4-bit (NF4) layers on ``device`` (default: CUDA if present, else CPU).

    Returns ``(ok, reason)``: ``reason`` names the version and device when it works, and says what
    is wrong (not installed, import error, no backend for the device) when it does not. The check
    runs a real NF4 quantise/dequantise round trip once per device.
    """
    device = device or _default_device()
    try:
        import bitsandbytes
    except ModuleNotFoundError:
        return False, "bitsandbytes is not installed"
    except Exception as err:  # a broken install (missing native library, CUDA mismatch, ...)
        return False, f"bitsandbytes failed to import ({type(err).__name__}: {err})"
    version = getattr(bitsandbytes, "__version__", "?")
    problem = _probe_4bit(device)
    if problem is not None:
        return False, f"bitsandbytes {version} cannot run 4-bit layers on {device} ({problem})"
    return True, f"bitsandbytes {version} runs 4-bit on {device}"


def _require_bitsandbytes() -> None:
    ok, reason = bitsandbytes_available()
    if not ok:
        raise QuantizationUnavailableError(
            f"load_in_4bit=True (QLoRA) needs bitsandbytes, but {reason}. Install or upgrade it with "
            "`pip install -U bitsandbytes` (or `pip install 'hf_vitask[quantization]'`) — CUDA GPUs are "
            "supported by every release, recent releases also run on CPU — or load the model in full "
            "precision (load_in_4bit: false) / run on a CUDA machine."
        )


def _resolve_dtype(torch_dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if torch_dtype is None or torch_dtype == "auto" or isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    dtype = getattr(torch, str(torch_dtype), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(
            f"Unknown torch_dtype {torch_dtype!r}; use 'auto', 'bfloat16', 'float16' or 'float32'"
        )
    return dtype


def default_compute_dtype(device: str | None = None) -> torch.dtype:
    """bfloat16 on CUDA (float16 on GPUs without bf16), float32 on CPU."""
    if (device or _default_device()).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def bnb_4bit_config(family: VLMFamily, compute_dtype: torch.dtype | None = None):
    """QLoRA ``BitsAndBytesConfig``: NF4, double quantisation, the family's vision modules left unquantised.

    ``llm_int8_skip_modules`` needs the full transformers-5 module names (``model.vision_tower``,
    ``model.multi_modal_projector``, ``lm_head``); short names such as ``vision_tower`` skip nothing.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or default_compute_dtype(),
        llm_int8_skip_modules=list(family.vision_modules),
    )


def _default_device_map() -> Any:
    if torch.cuda.is_available():
        # one full copy per process (DDP): each rank loads onto its own GPU
        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return "cpu"


def is_quantized(model) -> bool:
    """Whether ``model`` (or the base under a peft / VITask wrapper) was loaded in 4 or 8 bit."""
    model = getattr(model, "vlm", model)  # VITaskModel
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


# -- loading --------------------------------------------------------------------------------------------
def load_vlm(
    model_name_or_path: str,
    *,
    torch_dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
    device_map: Any = None,
    attn_implementation: str | None = None,
    **kwargs,
):
    """Return ``(model, processor)``.

    Args:
        model_name_or_path: hub id or local directory (``AutoModelForImageTextToText`` /
            ``AutoProcessor``); ``tiny-<model_type>`` (``tiny-llava``, ``tiny-mllama``, any of
            :data:`~hf_vitask.models.tiny.TINY_FAMILIES`) builds a tiny random VLM offline.
        torch_dtype: ``'auto'``, ``'bfloat16'``, ``'float16'``, ``'float32'`` (or a ``torch.dtype``).
            With ``load_in_4bit`` it is also the 4-bit compute dtype (default: bfloat16 on CUDA,
            float32 on CPU).
        trust_remote_code: run modelling code shipped with the checkpoint (off unless asked).
        load_in_4bit: QLoRA: NF4 + double quantisation of the language model through
            bitsandbytes; the family's vision tower, projector and ``lm_head`` stay in full
            precision. Raises :class:`QuantizationUnavailableError` when bitsandbytes cannot run.
        device_map: passed to ``from_pretrained``; with ``load_in_4bit`` it defaults to this
            process's GPU (``LOCAL_RANK``), or ``"cpu"`` without CUDA.
        attn_implementation: ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``, ...
        kwargs: more ``from_pretrained`` arguments (``revision``, ``token``, ...); for tiny
            models, :func:`~hf_vitask.models.tiny.build_tiny_vlm` arguments (``seed``, ...).
    """
    if "dtype" in kwargs:  # the transformers-5 spelling, e.g. forwarded from from_pretrained kwargs
        dtype_kwarg = kwargs.pop("dtype")
        torch_dtype = torch_dtype if torch_dtype is not None else dtype_kwarg
    if model_name_or_path.startswith(TINY_PREFIX):
        return _load_tiny(
            model_name_or_path,
            torch_dtype=torch_dtype,
            load_in_4bit=load_in_4bit,
            device_map=device_map,
            attn_implementation=attn_implementation,
            **kwargs,
        )
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = _resolve_dtype(torch_dtype)
    if load_in_4bit:
        if "quantization_config" in kwargs:
            raise ValueError("Pass either load_in_4bit=True or a quantization_config, not both")
        _require_bitsandbytes()
        from transformers import AutoConfig

        # The family (hence the modules to keep unquantised) must be known before the weights load.
        config = AutoConfig.from_pretrained(
            model_name_or_path,
            trust_remote_code=trust_remote_code,
            **{k: v for k, v in kwargs.items() if k in _LOCATION_KWARGS},
        )
        family = get_family(config.model_type)
        device_map = device_map if device_map is not None else _default_device_map()
        compute = dtype if isinstance(dtype, torch.dtype) else default_compute_dtype(_map_device(device_map))
        kwargs["quantization_config"] = bnb_4bit_config(family, compute)
        dtype = compute  # the unquantised modules (vision tower, projector, lm_head) load in this dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(
        model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
    )
    processor_kwargs = {k: v for k, v in kwargs.items() if k in _LOCATION_KWARGS}
    processor = AutoProcessor.from_pretrained(
        model_name_or_path, trust_remote_code=trust_remote_code, **processor_kwargs
    )
    family = get_family(model)
    if getattr(processor, "chat_template", None) is None and family.default_chat_template is not None:
        # e.g. PaliGemma checkpoints ship no chat template; prompts and answers still need one
        processor.chat_template = family.default_chat_template
    return model, processor


def _map_device(device_map: Any) -> str:
    """'cpu' when ``device_map`` keeps the model on the CPU (or there is no GPU), else 'cuda'."""
    if not torch.cuda.is_available():
        return "cpu"
    places = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
    return "cpu" if places <= {"cpu", "disk", torch.device("cpu")} else "cuda"


def _load_tiny(name: str, *, torch_dtype, load_in_4bit: bool, device_map, attn_implementation, **kwargs):
    """Tiny random VLM. In 4-bit it is saved to a temporary directory and loaded back quantised, so
    the real ``from_pretrained`` + bitsandbytes path runs (tests and CPU demos of QLoRA).

    The one place production code reaches the test and demo models of :mod:`hf_vitask.models.tiny`:
    a name starting with ``TINY_PREFIX`` ("tiny-llava") comes here, any other name goes to the Hub
    or a local path.
    """
    from hf_vitask.models.tiny import build_tiny_vlm, save_tiny_vlm, tiny_family

    family = tiny_family(name)
    for key in _HUB_ONLY_KWARGS:
        kwargs.pop(key, None)
    if not load_in_4bit:
        model, processor = build_tiny_vlm(family, **kwargs)
        dtype = _resolve_dtype(torch_dtype)
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
        return model, processor
    _require_bitsandbytes()  # before spending time on building and saving
    with tempfile.TemporaryDirectory(prefix="hf_vitask-tiny-") as tmp:
        save_tiny_vlm(tmp, family, **kwargs)
        model, processor = load_vlm(
            tmp,
            torch_dtype=torch_dtype,
            load_in_4bit=True,
            device_map=device_map,
            attn_implementation=attn_implementation,
        )
    # Name it like the in-memory tiny model, so saved adapters point at a base load_vlm can rebuild.
    tiny_name = f"{TINY_PREFIX}{family}"
    model.config.name_or_path = model.name_or_path = tiny_name
    return model, processor


# -- training setup -------------------------------------------------------------------------------------
def prepare_for_training(model, *, gradient_checkpointing: bool = False, quantized: bool | None = None):
    """Ready a base VLM for adapter training; call it before ``get_peft_model``. Returns the model.

    Quantised (``quantized=None`` detects it): ``peft.prepare_model_for_kbit_training`` — freezes
    the base, upcasts the non-4-bit weights to float32 — with non-reentrant checkpointing when
    ``gradient_checkpointing``. Otherwise: non-reentrant gradient checkpointing when asked. Either
    way input grads are switched on with checkpointing, so LoRA layers behind checkpointed blocks
    still receive gradients.
    """
    if quantized is None:
        quantized = is_quantized(model)
    gc_kwargs = {"use_reentrant": False}
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def lora_config(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules=None, **kwargs):
    """``peft.LoraConfig`` for ``model`` (causal LM task); by default the family's language-model
    linear layers (``VLMFamily.lora_target_modules``), never the vision tower or projector.
    ``kwargs`` go to ``LoraConfig`` (``modules_to_save``, ``use_dora``, ...)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules
        if target_modules is not None
        else get_family(model).lora_target_modules,
        task_type="CAUSAL_LM",
        **kwargs,
    )


def lora_target_names(model, config) -> list[str]:
    """Names of the modules of ``model`` that ``config`` (a ``LoraConfig``) would adapt, as peft matches them."""
    from peft.tuners.tuners_utils import check_target_module_exists

    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return [name for name, _ in model.named_modules() if name and check_target_module_exists(config, name)]
