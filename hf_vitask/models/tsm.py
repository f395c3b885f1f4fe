"""The task-specific model (TSM): a timm (or transformers) image classifier trained on the target task.

VITask uses the TSM twice: its pooled pre-logits feature is the *exemplar* that exemplar
prompting (EP) feeds to the VLM through a connector, and its accuracy is the bar the tuned
VLM has to reach. Any timm model works (tests use timm's tiny `test_*` architectures), and so does
a transformers classifier through :class:`TransformersTSM`. It trains through
``transformers.Trainer`` (:mod:`hf_vitask.trainers.tsm`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence

import timm
import torch
from PIL import Image
from safetensors.torch import load_model, save_model
from torch import nn

from hf_vitask.data.images import to_rgb
from hf_vitask.files import TSM_CONFIG_FILE as CONFIG_NAME
from hf_vitask.files import TSM_WEIGHTS_FILE as WEIGHTS_NAME
from hf_vitask.jsonfile import check_fields, read_json

FEATURE_KINDS = ("pooled", "patch")


class TSMConfig(dict):
    """What it takes to rebuild a TSM, as a dict (saved as ``tsm_config.json``); attributes may be set
    on it like on a ``PretrainedConfig`` (``Trainer`` sets ``use_cache``), they are not saved."""


class TaskSpecificModel(nn.Module):
    """A timm classifier trained on the task; its pooled pre-logits feature is the exemplar (VITask EP).

    `img_size` sets the input size of `data_config`, so `preprocess` resizes images to it (e.g.
    32 px digits instead of a pretrained 224 px). ViTs also size their position embeddings with
    it; CNNs, which take any resolution, only use it for preprocessing.
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        num_classes: int = 2,
        *,
        pretrained: bool = False,
        img_size: int | None = None,
        **timm_kwargs,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        kwargs = dict(pretrained=pretrained, num_classes=num_classes, **timm_kwargs)
        try:
            self.model = timm.create_model(
                model_name, **kwargs, **({} if img_size is None else {"img_size": img_size})
            )
        except TypeError as err:
            if img_size is None or "img_size" not in str(err):
                raise
            # CNNs take any resolution: img_size then only sets the preprocessing size (data_config).
            self.model = timm.create_model(model_name, **kwargs)
        # What it takes to rebuild this model; weights then come from model.safetensors, so
        # `pretrained` is deliberately not part of it.
        self.config = TSMConfig(
            {
                "model_name": model_name,
                "num_classes": num_classes,
                "img_size": img_size,
                "timm_kwargs": dict(timm_kwargs),
            }
        )
        self.feature_dim: int = self.model.num_features
        self.num_prefix_tokens: int = int(getattr(self.model, "num_prefix_tokens", 0))

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Class logits, shape (B, num_classes)."""
        return self.model(pixel_values)

    def features(self, pixel_values: torch.Tensor, kind: str = "pooled") -> torch.Tensor:
        """Exemplar features: "pooled" -> (B, D) pre-logits, "patch" -> (B, N, D) patch tokens.

        The pooled feature is exactly what the classifier head sees (CLS token or global
        pool, after timm's head norm), which is the exemplar VITask found best.
        """
        if kind not in FEATURE_KINDS:
            raise ValueError(f"unknown feature kind {kind!r}; expected one of {FEATURE_KINDS}")
        tokens = self.model.forward_features(pixel_values)
        if kind == "pooled":
            return self.model.forward_head(tokens, pre_logits=True)
        return self._patch_tokens(tokens)

    def _patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bring timm's feature output to (B, N, D): drop ViT prefix tokens, flatten CNN maps."""
        if tokens.ndim == 3:
            return tokens[:, self.num_prefix_tokens :]
        if tokens.ndim == 4:
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC":  # e.g. Swin, MambaOut
                return tokens.flatten(1, 2)
            return tokens.flatten(2).transpose(1, 2)
        raise ValueError(f"cannot turn a feature output of shape {tuple(tokens.shape)} into patch tokens")

    @property
    def data_config(self) -> dict:
        """timm's preprocessing config (size, interpolation, mean/std, crop) for this model."""
        config = timm.data.resolve_data_config({}, model=self.model)
        # Lists come back from tsm_config.json (e.g. a pretrained_cfg_overlay); timm uses tuples.
        config = {key: tuple(value) if isinstance(value, list) else value for key, value in config.items()}
        if self.config["img_size"] is not None:
            # timm keeps the pretrained input size in pretrained_cfg even when img_size changes.
            config["input_size"] = (3, *_pair(self.config["img_size"]))
        return config

    def image_transform(self, train: bool = False) -> Callable:
        """PIL image -> normalised tensor.

        Training uses light augmentation only: a mild random-resized crop (>= 85% of the area,
        near-square) and no flips or colour jitter. timm's default training recipe (crops down
        to 8% of the image, horizontal flips) destroys small images such as 8x8 digits and
        changes what a mirrored digit means.
        """
        if not train:
            return timm.data.create_transform(**self.data_config, is_training=False)
        config = {k: v for k, v in self.data_config.items() if k not in ("crop_pct", "crop_mode")}
        return timm.data.create_transform(
            **config, is_training=True, scale=(0.85, 1.0), ratio=(0.9, 1.1), hflip=0.0, color_jitter=None
        )

    def preprocess(self, images: Sequence[Image.Image], train: bool = False) -> torch.Tensor:
        """Turn PIL images (or one image) of any mode into a (B, 3, H, W) batch for this model."""
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            raise ValueError("preprocess got no images")
        transform = self.image_transform(train=train)
        return torch.stack([transform(_to_rgb(image, index)) for index, image in enumerate(images)])

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `model.safetensors` and `tsm_config.json` into `save_directory`."""
        os.makedirs(save_directory, exist_ok=True)
        try:
            config_text = json.dumps(self.config, indent=2, sort_keys=True)
        except TypeError as err:
            raise TypeError(f"TSM config is not JSON-serialisable (check timm_kwargs): {err}") from err
        save_model(self.model, os.path.join(save_directory, WEIGHTS_NAME))
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            f.write(config_text + "\n")

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, map_location: str | torch.device = "cpu"
    ) -> TaskSpecificModel:
        """Rebuild a TSM saved with `save_pretrained` (random init, then the saved weights)."""
        config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
        for required in (config_path, weights_path):
            if not os.path.isfile(required):
                raise FileNotFoundError(
                    f"no {os.path.basename(required)} in {os.fspath(path)!r} (looked for {required})"
                )
        config = read_json(config_path)
        if config.get("backend") == TransformersTSM.backend:
            return TransformersTSM.load(path, map_location)
        check_fields(
            config,
            {"model_name": "str", "num_classes": "positive", "img_size": "sizes?", "timm_kwargs": "object"},
            config_path,
            required=("model_name", "num_classes"),
        )
        tsm = cls(
            config["model_name"],
            config["num_classes"],
            pretrained=False,
            img_size=config.get("img_size"),
            **config.get("timm_kwargs", {}),
        )
        load_model(tsm.model, weights_path, device=str(map_location))
        return tsm.to(map_location).eval()


class TransformersTSM(TaskSpecificModel):
    """A ``transformers`` image classifier (``AutoModelForImageClassification``: a ViT, ConvNeXt, ... you
    may already have fine-tuned) as the TSM, with its own image processor.

    The exemplar is the pooled feature the classification head sees (the input of its last linear
    layer, caught by a hook), so it is the same choice as for timm models; ``"patch"`` features are
    timm-only. Saved as the model's ``save_pretrained`` files, its processor and ``tsm_config.json``.
    """

    backend = "transformers"

    def __init__(self, model: nn.Module, image_processor):
        nn.Module.__init__(self)
        self.model, self.image_processor = model, image_processor
        num_classes = int(model.config.num_labels)
        heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
        if not heads:
            raise ValueError(
                f"{type(model).__name__} has no linear layer with num_labels={num_classes} outputs: "
                "not an image classifier"
            )
        self._head = heads[-1]
        self.config = TSMConfig({"backend": self.backend, "num_classes": num_classes})
        self.feature_dim = self._head.in_features
        self.num_prefix_tokens = 0

    @classmethod
    def from_classifier(cls, name_or_path: str | os.PathLike, **model_kwargs) -> TransformersTSM:
        """``AutoModelForImageClassification`` + ``AutoImageProcessor`` from a Hub id or a local folder."""
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(name_or_path, **model_kwargs)
        return cls(model, AutoImageProcessor.from_pretrained(name_or_path))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits

    def features(self, pixel_values: torch.Tensor, kind: str = "pooled") -> torch.Tensor:
        if kind != "pooled":
            raise ValueError(
                f"a transformers classifier gives the pooled feature only, not {kind!r} (timm TSMs "
                "give patch tokens too)"
            )
        seen: list[torch.Tensor] = []
        handle = self._head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            self.model(pixel_values=pixel_values)
        finally:
            handle.remove()
        return seen[-1]

    def preprocess(self, images: Sequence[Image.Image], train: bool = False) -> torch.Tensor:
        """The classifier's own image processor (no augmentation)."""
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            raise ValueError("preprocess got no images")
        rgb = [_to_rgb(image, index) for index, image in enumerate(images)]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        self.model.save_pretrained(save_directory)
        self.image_processor.save_pretrained(save_directory)
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            f.write(json.dumps(dict(self.config), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> TransformersTSM:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(os.fspath(path))
        return cls(model, AutoImageProcessor.from_pretrained(os.fspath(path))).to(map_location).eval()


@torch.no_grad()
def tsm_predict(
    tsm: TaskSpecificModel,
    dataset,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    image_column: str = "image",
    task_sizes: Sequence[int] | None = None,
    task_column: str = "task",
) -> torch.Tensor:
    """Softmax class probabilities, (N, num_classes) float32 on CPU, in dataset order.

    With `task_sizes` the softmax of each row is restricted to its own task's classes (global
    ids, zero elsewhere), as in training."""
    if len(dataset) == 0:
        raise ValueError("tsm_predict got an empty dataset")
    device = _resolve_device(tsm, device)
    was_training = tsm.training
    tsm.to(device).eval()
    chunks = []
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]
        logits = tsm(tsm.preprocess(batch[image_column]).to(device)).float()
        if task_sizes is not None:
            logits = restrict_to_tasks(logits, torch.tensor(batch[task_column]), task_sizes)
        chunks.append(logits.softmax(-1).cpu())
    tsm.train(was_training)
    return torch.cat(chunks)


def checked_labels(
    dataset,
    num_classes: int,
    image_column: str,
    label_column: str,
    name: str,
    task_sizes: Sequence[int] | None = None,
    task_column: str = "task",
) -> tuple[list[int], list[int] | None]:
    """Read all labels once, failing early (before any training step) on bad data.

    Returns the labels as ids of the (shared) head, and each row's task index when `task_sizes`
    is given (labels are then read as ids within the row's task)."""
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    columns = getattr(dataset, "column_names", None)
    needed = [image_column, label_column] + ([task_column] if task_sizes is not None else [])
    if columns is not None:
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(f"{name} has no column(s) {missing}; its columns are {columns}")
    labels = [int(label) for label in dataset[label_column]]
    if task_sizes is None:
        for row, label in enumerate(labels):
            if not 0 <= label < num_classes:
                raise ValueError(f"{name} row {row} has label {label}, outside [0, {num_classes})")
        return labels, None
    if sum(task_sizes) != num_classes:
        raise ValueError(
            f"task_sizes {list(task_sizes)} sum to {sum(task_sizes)}, but the TSM has {num_classes} classes"
        )
    offsets = task_offsets(task_sizes)
    task_ids = [int(t) for t in dataset[task_column]]
    for row, (label, task) in enumerate(zip(labels, task_ids)):
        if not 0 <= task < len(task_sizes):
            raise ValueError(f"{name} row {row} has task {task}, outside [0, {len(task_sizes)})")
        if not 0 <= label < task_sizes[task]:
            raise ValueError(
                f"{name} row {row} has label {label}, outside task {task}'s [0, {task_sizes[task]})"
            )
    return [offsets[t] + label for label, t in zip(labels, task_ids)], task_ids


def task_offsets(task_sizes: Sequence[int]) -> list[int]:
    """First head index of each task: tasks occupy consecutive ranges of the shared head."""
    offsets, total = [], 0
    for size in task_sizes:
        offsets.append(total)
        total += size
    return offsets


def restrict_to_tasks(
    logits: torch.Tensor, task_ids: torch.Tensor, task_sizes: Sequence[int]
) -> torch.Tensor:
    """Set every logit outside the row's own task range to -inf (shared head, per-task softmax)."""
    offsets = torch.tensor(task_offsets(task_sizes), device=logits.device)
    sizes = torch.tensor(list(task_sizes), device=logits.device)
    task_ids = task_ids.to(logits.device)
    j = torch.arange(logits.shape[-1], device=logits.device)
    start = offsets[task_ids][:, None]
    inside = (j >= start) & (j < start + sizes[task_ids][:, None])
    return logits.masked_fill(~inside, float("-inf"))


@contextlib.contextmanager
def running_batchnorm(model: nn.Module, active: bool):
    """On a one-row batch (a one-row split, or ``batch_size=1``) BatchNorm cannot compute batch
    statistics; let it normalise with its running statistics for that step (its affine weights
    still train) instead of failing."""
    norms = (
        [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        if active
        else []
    )
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def _resolve_device(tsm: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return next(tsm.parameters()).device


def _to_rgb(image, index: int) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise ValueError(f"item {index} is a {type(image).__name__}, not a PIL image")
    try:
        return image if image.mode == "RGB" else to_rgb(image)
    except (OSError, ValueError) as err:
        raise ValueError(f"item {index} (mode {image.mode!r}) cannot be converted to RGB: {err}") from err


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


__all__ = ["TaskSpecificModel", "TransformersTSM", "tsm_predict", "WEIGHTS_NAME", "CONFIG_NAME"]
