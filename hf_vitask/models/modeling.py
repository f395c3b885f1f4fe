"""VITaskModel: a VLM (usually a peft LoRA model) plus the TSM connector and, optionally, the TSM.

The wrapper adds one thing to the VLM's forward: when TSM input is given, exemplar tokens
are inserted after the image block (see :mod:`hf_vitask.models.exemplar`). Without TSM input
it is exactly the VLM, which is why the trained LoRA adapter alone is the no-TSM inference
model and loads with plain ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import ModelOutput

from hf_vitask.files import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CONNECTOR_FILE,
    TSM_DIR,
    VITASK_CONFIG_FILE,
)
from hf_vitask.jsonfile import check_fields, read_json
from hf_vitask.losses import reduce_tokens, response_logits, token_ce
from hf_vitask.models.exemplar import (
    ConnectorConfig,
    ExemplarConnector,
    ExemplarInjector,
    exemplar_positions,
    insert_exemplar_slots,
)
from hf_vitask.models.families import VLMFamily, get_family
from hf_vitask.models.passes import Passes, run_passes
from hf_vitask.models.tsm import TaskSpecificModel
from hf_vitask.version import __version__


def is_peft_model(model) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (imports peft only when it is installed)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


@dataclass
class VITaskOutput(ModelOutput):
    """Output of :class:`VITaskModel`: the VLM's logits plus those gathered at response tokens."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    response_logits: torch.Tensor | None = None
    response_targets: torch.Tensor | None = None


class VITaskModel(nn.Module):
    """A VLM with a trainable TSM connector for exemplar prompting.

    Args:
        vlm: the vision-language model (a ``PreTrainedModel`` or a ``PeftModel`` around one).
        connector: projects TSM features to exemplar tokens; ``None`` for a model trained without EP.
        tsm: the task-specific model used when ``tsm_pixel_values`` are passed (kept frozen).
        image_token_id / image_end_token_id: where the image block is, to place the exemplar after it.
        slot_token_id: id put at exemplar positions before their embedding is overwritten.
    """

    # Trainer: our loss is normalised by num_items_in_batch and counted over shifted labels.
    accepts_loss_kwargs = True
    loss_type = "ForCausalLM"

    def __init__(
        self,
        vlm: nn.Module,
        connector: ExemplarConnector | None,
        *,
        tsm: TaskSpecificModel | None = None,
        image_token_id: int,
        image_end_token_id: int | None = None,
        slot_token_id: int = 0,
    ):
        super().__init__()
        self.vlm = vlm
        self.connector = connector
        self.tsm = tsm
        self.family: VLMFamily = get_family(vlm)
        self.image_token_id = int(image_token_id)
        self.image_end_token_id = None if image_end_token_id is None else int(image_end_token_id)
        self.slot_token_id = int(slot_token_id)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_vlm(
        cls,
        vlm: nn.Module,
        processor=None,
        *,
        tsm: TaskSpecificModel | None = None,
        tsm_dim: int | None = None,
        num_exemplar_tokens: int = 1,
        exemplar_feature: str = "pooled",
        connector_hidden_dim: int | None = None,
        with_connector: bool = True,
    ) -> VITaskModel:
        """Wrap a VLM, creating a fresh connector sized from the TSM and the LLM embedding."""
        family = get_family(vlm)
        tokenizer = getattr(processor, "tokenizer", processor)
        if tokenizer is not None:
            image_token_id = family.image_token_id(tokenizer)
            image_end_token_id = family.image_end_token_id(tokenizer)
            slot = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        else:
            cfg = vlm.config
            image_token_id = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
            image_end_token_id = getattr(cfg, "vision_end_token_id", None)
            slot = getattr(cfg, "pad_token_id", None) or 0
        connector = None
        if with_connector:
            dim = tsm_dim or (tsm.feature_dim if tsm is not None else None)
            if dim is None:
                raise ValueError(
                    "Creating an exemplar connector needs the TSM (or tsm_dim) to know its feature size"
                )
            emb = vlm.get_input_embeddings()
            connector = ExemplarConnector(
                ConnectorConfig(
                    tsm_dim=dim,
                    llm_dim=emb.embedding_dim,
                    num_tokens=num_exemplar_tokens,
                    feature=exemplar_feature,
                    hidden_dim=connector_hidden_dim,
                )
            ).to(emb.weight.device)
        return cls(
            vlm,
            connector,
            tsm=tsm,
            image_token_id=image_token_id,
            image_end_token_id=image_end_token_id,
            slot_token_id=slot or 0,
        )

    # -- transformers plumbing -----------------------------------------------------------------
    @property
    def config(self):
        return self.vlm.config

    @property
    def device(self) -> torch.device:
        return self.vlm.get_input_embeddings().weight.device

    def get_input_embeddings(self):
        return self.vlm.get_input_embeddings()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs):
        """Non-reentrant checkpointing with input grads on, so LoRA layers still receive gradients.
        Extra keywords (``every_n_layers``, ``offload`` in recent transformers) pass through."""
        ckpt = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt, **kwargs)
        self.vlm.enable_input_require_grads()

    def gradient_checkpointing_disable(self):
        self.vlm.gradient_checkpointing_disable()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs):
        """The name transformers 5.24's Trainer calls; same behaviour as gradient_checkpointing_enable."""
        ckpt = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        enable = getattr(self.vlm, "activation_checkpointing_enable", None)
        if enable is None:
            self.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
        else:
            enable(activation_checkpointing_kwargs=ckpt, **kwargs)
        self.vlm.enable_input_require_grads()

    def activation_checkpointing_disable(self):
        disable = (
            getattr(self.vlm, "activation_checkpointing_disable", None)
            or self.vlm.gradient_checkpointing_disable
        )
        disable()

    @property
    def is_peft(self) -> bool:
        return is_peft_model(self.vlm)

    # -- exemplar --------------------------------------------------------------------------------
    def exemplar_embeds(
        self,
        tsm_pixel_values: torch.Tensor | None = None,
        tsm_features: torch.Tensor | None = None,
        connector: ExemplarConnector | None = None,
    ) -> torch.Tensor:
        """TSM input -> ``(B, k, D)`` exemplar tokens. The TSM is frozen; the connector is not.
        ``connector`` overrides the model's own (the frozen RDA teacher brings its own)."""
        conn = connector if connector is not None else self.connector
        if conn is None:
            raise ValueError("This model has no exemplar connector (it was trained without EP)")
        if tsm_features is None:
            if self.tsm is None:
                raise ValueError(
                    "tsm_pixel_values were given but the model has no TSM; attach one with model.tsm = ..."
                )
            with torch.no_grad():
                self.tsm.eval()
                tsm_features = self.tsm.features(
                    tsm_pixel_values.to(next(self.tsm.parameters()).device), kind=conn.config.feature
                )
        return conn(tsm_features.to(device=conn.fc1.weight.device, dtype=conn.fc1.weight.dtype))

    def open_exemplar_slots(self, inputs: dict, exemplar: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Insert ``exemplar.shape[1]`` slot tokens after each row's image block: the new token
        tensors and the ``(B, L + k)`` slot mask that :meth:`inject` fills."""
        positions = exemplar_positions(inputs["input_ids"], self.image_token_id, self.image_end_token_id)
        return insert_exemplar_slots(
            inputs,
            positions,
            exemplar.shape[1],
            self.slot_token_id,
            self.family.per_token_keys,
            dict(self.family.slot_fill),
        )

    def inject(self, mask: torch.Tensor, values: torch.Tensor):
        """Context manager: write ``values`` (B, k, D) at ``mask`` in the input embedding during one call."""
        return ExemplarInjector(self.vlm.get_input_embeddings()).inject(mask, values)

    # -- forward / generate ----------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        tsm_pixel_values: torch.Tensor | None = None,
        tsm_features: torch.Tensor | None = None,
        exemplar_embeds: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        passes: dict | None = None,
        **vlm_inputs,
    ) -> VITaskOutput | Passes:
        """Run the VLM, with exemplar tokens when any TSM input (or ready ``exemplar_embeds``) is given.

        The loss, when ``labels`` are given, is the response cross-entropy; ``response_logits`` are
        the next-token logits at response positions, aligned across EP and no-EP calls.

        ``passes``: run every pass of a training step in this one call instead (keywords of
        :func:`~hf_vitask.models.passes.run_passes`: ``mode``, ``negative_index``; the TSM input,
        if any, is the EP pass's exemplar) and return the :class:`~hf_vitask.models.passes.Passes`.
        One forward per step is what a distributed wrapper (DDP, FSDP, DeepSpeed) expects, so the
        fused passes run under it unchanged.
        """
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **vlm_inputs}
        if exemplar_embeds is None and (tsm_pixel_values is not None or tsm_features is not None):
            exemplar_embeds = self.exemplar_embeds(tsm_pixel_values, tsm_features)
        if passes is not None:
            out = run_passes(
                self, {k: v for k, v in inputs.items() if v is not None}, exemplar=exemplar_embeds, **passes
            )
            out.exemplar = exemplar_embeds
            return out
        labels_used = labels
        if exemplar_embeds is None:
            context = contextlib.nullcontext()
        else:
            inputs, slots = self.open_exemplar_slots(inputs, exemplar_embeds)
            labels_used = inputs["labels"]
            context = self.inject(slots, exemplar_embeds)
        inputs.pop("labels")  # we compute the loss on response positions ourselves
        with context:
            out = self.vlm(**{k: v for k, v in inputs.items() if v is not None})
        result = VITaskOutput(logits=out.logits)
        if labels_used is not None:
            resp, targets = response_logits(out.logits, labels_used)
            result.response_logits, result.response_targets = resp, targets
            result.loss = reduce_tokens(token_ce(resp, targets), num_items_in_batch)
        return result

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        tsm_pixel_values: torch.Tensor | None = None,
        tsm_features: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``vlm.generate`` with exemplar tokens when TSM input is given. Returns only the new tokens
        (the prompt lengths differ between the two paths, so full sequences would not line up)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        context = contextlib.nullcontext()
        if tsm_pixel_values is not None or tsm_features is not None:
            exemplar = self.exemplar_embeds(tsm_pixel_values, tsm_features)
            inputs, slots = self.open_exemplar_slots(inputs, exemplar)
            context = self.inject(slots, exemplar)
        with context:
            out = self.vlm.generate(**{k: v for k, v in inputs.items() if v is not None})
        return out[:, inputs["input_ids"].shape[1] :]

    # -- adapters (frozen RDA teacher) -----------------------------------------------------------
    @contextlib.contextmanager
    def use_adapter(self, name: str):
        """Temporarily run another (frozen) peft adapter, then restore the trainable one."""
        if not self.is_peft:
            raise ValueError("Switching adapters needs a peft model")
        active = self.vlm.active_adapter
        self.vlm.set_adapter(name, inference_mode=True)
        try:
            yield
        finally:
            self.vlm.set_adapter(active)

    # -- persistence -----------------------------------------------------------------------------
    def vitask_config(self) -> dict:
        base = getattr(self.vlm, "get_base_model", lambda: self.vlm)()
        return {
            "hf_vitask_version": __version__,
            "family": self.family.name,
            "base_model_name_or_path": getattr(base.config, "_name_or_path", None),
            "image_token_id": self.image_token_id,
            "image_end_token_id": self.image_end_token_id,
            "slot_token_id": self.slot_token_id,
            "connector": None if self.connector is None else self.connector.config.to_dict(),
        }

    def save_pretrained(
        self,
        save_directory: str | PathLike,
        save_tsm: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write the adapter (or full model), the connector and the TSM, all as safetensors.

        ``state_dict``: this model's full state dict, when FSDP or DeepSpeed ZeRO-3 gathered it from
        the shards (the parameters of the modules themselves are then only shards)."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        vlm_state = None if state_dict is None else submodule_state(state_dict, "vlm.")
        if self.is_peft:
            self.vlm.save_pretrained(
                path,
                selected_adapters=[self.vlm.active_adapter],
                state_dict=vlm_state,
                save_embedding_layers=_embedding_layers_setting(self.vlm),
            )
        else:
            self.vlm.save_pretrained(path, state_dict=vlm_state)
        if self.connector is not None:
            connector = (
                self.connector.state_dict()
                if state_dict is None
                else submodule_state(state_dict, "connector.")
            )
            state = {k: v.detach().contiguous().cpu() for k, v in connector.items()}
            save_file(state, str(path / CONNECTOR_FILE))
        if save_tsm and self.tsm is not None:
            self.tsm.save_pretrained(path / TSM_DIR)
        (path / VITASK_CONFIG_FILE).write_text(json.dumps(self.vitask_config(), indent=2) + "\n")

    def load_trainable_weights(self, path: str | PathLike) -> None:
        """Load adapter + connector weights from a directory written by :meth:`save_pretrained`
        into this model in place (checkpoint resume, best-model reload)."""
        path = Path(path)
        if self.is_peft:
            from peft import set_peft_model_state_dict

            file = path / ADAPTER_WEIGHTS_FILE
            if not file.is_file():
                raise FileNotFoundError(f"No {ADAPTER_WEIGHTS_FILE} in {path}")
            set_peft_model_state_dict(self.vlm, load_file(str(file)), adapter_name=self.vlm.active_adapter)
        else:
            from transformers.modeling_utils import load_sharded_checkpoint

            load_sharded_checkpoint(self.vlm, str(path), strict=False)
        if self.connector is not None:
            self.connector.load_state_dict(load_file(str(path / CONNECTOR_FILE)))
            self.connector.trained = True

    @classmethod
    def from_pretrained(
        cls,
        path: str | PathLike,
        base_model: nn.Module | None = None,
        *,
        load_tsm: bool = True,
        is_trainable: bool = False,
        adapter_name: str = "default",
        **model_kwargs,
    ) -> VITaskModel:
        """Restore a model saved by :meth:`save_pretrained`.

        ``base_model`` is loaded from the adapter's ``base_model_name_or_path`` with
        ``AutoModelForImageTextToText.from_pretrained(**model_kwargs)`` unless given. To add a
        second adapter to an existing peft model (the frozen RDA teacher), pass that peft model
        as ``base_model`` with a new ``adapter_name``.
        """
        path = Path(path)
        cfg = read_vitask_config(path)
        _check_bundle_files(path, cfg)
        check_finite_weights(path)
        if base_model is not None and cfg.get("family"):
            from hf_vitask.models.families import get_family

            family = get_family(base_model).name
            if family != cfg["family"]:
                raise ValueError(
                    f"{path} was trained on a {cfg['family']} model ({cfg.get('base_model_name_or_path')}) but the "
                    f"base_model given is a {family} model: load it on its own base (base_model=None)."
                )
        if (path / ADAPTER_CONFIG_FILE).is_file():
            from peft import PeftModel

            if is_peft_model(base_model):
                base_model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=is_trainable)
                vlm = base_model
            else:
                if base_model is None:
                    base_model = _load_base(read_json(path / ADAPTER_CONFIG_FILE), **model_kwargs)
                vlm = PeftModel.from_pretrained(
                    base_model, str(path), adapter_name=adapter_name, is_trainable=is_trainable
                )
        else:
            from transformers import AutoModelForImageTextToText

            vlm = AutoModelForImageTextToText.from_pretrained(str(path), **model_kwargs)
        connector = None
        if cfg.get("connector") is not None:
            connector = load_connector(path, cfg)
            connector.to(vlm.get_input_embeddings().weight.device)
            connector.requires_grad_(is_trainable)
        tsm = None
        if load_tsm and (path / TSM_DIR).is_dir():
            tsm = TaskSpecificModel.from_pretrained(path / TSM_DIR)
        return cls(
            vlm,
            connector,
            tsm=tsm,
            image_token_id=cfg["image_token_id"],
            image_end_token_id=cfg.get("image_end_token_id"),
            slot_token_id=cfg.get("slot_token_id", 0),
        )


def _embedding_layers_setting(peft_model) -> bool | str:
    """peft's ``save_embedding_layers``: "auto" looks the base model's config up (on the Hub unless it
    is a local folder) to see whether the vocabulary grew; skip that lookup, and its warnings, for
    a base that is neither a folder nor a Hub id (the tiny demo models), unless the adapter itself
    trains embedding layers."""
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    config = peft_model.peft_config[peft_model.active_adapter]
    targets = getattr(config, "target_modules", None) or ()
    targets = [targets] if isinstance(targets, str) else list(targets)
    if any(name in str(target) for target in targets for name in EMBEDDING_LAYER_NAMES):
        return "auto"
    name = getattr(config, "base_model_name_or_path", None) or ""
    return "auto" if Path(name).is_dir() or name.count("/") == 1 else False


def submodule_state(state_dict: dict, prefix: str) -> dict:
    """The entries of a submodule in its parent's state dict, with the submodule's own key names."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def read_vitask_config(path: str | PathLike) -> dict:
    """The bundle's ``vitask_config.json``, type-checked (token ids, family, connector shape)."""
    file = Path(path) / VITASK_CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"No {VITASK_CONFIG_FILE} in {path}: not a directory written by hf_vitask")
    cfg = read_json(file)
    check_fields(
        cfg,
        {
            "hf_vitask_version": "str?",
            "family": "str?",
            "base_model_name_or_path": "str?",
            "image_token_id": "size",
            "image_end_token_id": "size?",
            "slot_token_id": "size",
            "connector": "object?",
        },
        str(file),
        required=("image_token_id",),
    )
    if cfg.get("connector") is not None:
        cfg["connector"] = ConnectorConfig.from_dict(cfg["connector"], where=f"{file}: connector").to_dict()
    return cfg


def load_connector(path: Path, cfg: dict) -> ExemplarConnector:
    """The trained exemplar connector of a bundle, its weights checked against its config's shape."""
    connector = ExemplarConnector(ConnectorConfig.from_dict(cfg["connector"]))
    try:
        connector.load_state_dict(load_file(str(path / CONNECTOR_FILE)))
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[-1].strip()
        raise ValueError(
            f"{path / CONNECTOR_FILE} does not fit the connector that {VITASK_CONFIG_FILE} describes "
            f"({detail}); the two files come from different runs: copy the whole bundle"
        ) from None
    connector.trained = True
    return connector


def _check_bundle_files(path: Path, cfg: dict) -> None:
    """Name a missing bundle file here, before peft or transformers go looking for it on the Hub."""
    missing = []
    if (path / ADAPTER_CONFIG_FILE).is_file() and not (path / ADAPTER_WEIGHTS_FILE).is_file():
        missing.append(ADAPTER_WEIGHTS_FILE)
    if (
        not (path / ADAPTER_CONFIG_FILE).is_file()
        and not (path / ADAPTER_WEIGHTS_FILE).is_file()
        and not (path / "config.json").is_file()
    ):
        missing.append(
            f"{ADAPTER_CONFIG_FILE} + {ADAPTER_WEIGHTS_FILE} (or config.json + weights of a full model)"
        )
    elif (path / ADAPTER_WEIGHTS_FILE).is_file() and not (path / ADAPTER_CONFIG_FILE).is_file():
        missing.append(ADAPTER_CONFIG_FILE)
    if cfg.get("connector") is not None and not (path / CONNECTOR_FILE).is_file():
        missing.append(CONNECTOR_FILE)
    if missing:
        raise FileNotFoundError(f"The bundle {path} is incomplete: missing {', '.join(missing)}")


def check_finite_weights(path: Path) -> None:
    """Refuse a bundle whose trained weights (adapter, connector, TSM) hold NaN or inf: the run that
    wrote them diverged, and a model loaded from them would predict garbage without complaint."""
    for name in ("adapter_model.safetensors", CONNECTOR_FILE, f"{TSM_DIR}/model.safetensors"):
        file = path / name
        if not file.is_file():
            continue
        for key, tensor in load_file(str(file)).items():
            if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                raise ValueError(
                    f"{file}: tensor {key!r} holds NaN or inf values; the run that saved it diverged. "
                    "Retrain (lower learning_rate, max_grad_norm > 0) or load an earlier checkpoint."
                )


def _load_base(adapter_config: dict, **model_kwargs):
    from hf_vitask.models.loading import load_vlm

    name = adapter_config.get("base_model_name_or_path")
    if not name:
        raise ValueError("The adapter config names no base model; pass base_model= to from_pretrained")
    return load_vlm(name, **model_kwargs)[0]
