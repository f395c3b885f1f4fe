"""Training configurations. Every knob is a documented dataclass field; the CLI is generated from them."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

# Fields with a fixed set of values name it in their metadata (``choices``): argparse checks it on
# the command line, :func:`check_choices` when a config is created. The sets other modules use too:
RDA_TEACHERS = ("self", "frozen")
PROXY_FEEDS = ("ema", "raw")
PROXY_INIT_RESIZES = ("linear", "repeat")
DEFAULT_INSTRUCTION = "Describe the findings in this image."
CRT_NEGATIVES = ("batch", "batch+dataset")
PASS_MODES = ("prefix", "batch", "none")
#: Where the frozen RDA teacher's outputs are cached ("auto": chosen from the estimated size).
TEACHER_CACHE_MODES = ("auto", "memory", "disk", "off")
#: How a class's answer is scored from its token log-probabilities: their sum (the answer's
#: log-likelihood) or their mean (per token: no preference for short class names).
OPTION_SCORES = ("sum", "mean")
#: "mean": never worse than "sum" in the ablation on both bundled datasets, and better on the
#: textures' class names of 1 to 7 words (docs/ablation.md).
DEFAULT_OPTION_SCORE = "mean"
#: RDA and CRT weights: the best mean test accuracy without the TSM over the two ablation datasets
#: (alpha x beta sweep, docs/ablation.md); the differences were within the seed spread.
DEFAULT_RDA_WEIGHT = 0.3
DEFAULT_CRT_WEIGHT = 0.1
#: VITaskConfig fields whose default depends on the stage: left None, they take ``{stage: value}``.
STAGE_DEFAULTS = {
    "crt_weight": {1: 0.0, 2: DEFAULT_CRT_WEIGHT},
    "freeze_connector": {1: False, 2: True},
}
logger = logging.getLogger(__name__)


def check_choices(config) -> None:
    """Every field of the dataclass ``config`` whose metadata names ``choices`` holds one of them (each
    item, for a list field). None passes where it is the field's default."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices is None or (value is None and f.default is None):
            continue
        for item in value if isinstance(value, list) else [value]:
            if item not in choices:
                what = f"{f.name} entries" if isinstance(value, list) else f.name
                raise ValueError(f"{what} must be one of {list(choices)}, got {item!r}")


@dataclass
class VLMTuningArguments(TrainingArguments):
    """What every trainer of this package shares: data columns, the length check, LoRA, and the
    ``TrainingArguments`` defaults that suit VLM collators."""

    image_column: str = field(default="image", metadata={"help": "Dataset column holding the image."})
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Maximum tokens per example. Longer examples raise an error; they are never truncated."
        },
    )
    # -- LoRA ------------------------------------------------------------------------------------
    use_lora: bool = field(
        default=True, metadata={"help": "Wrap a plain VLM in LoRA adapters (peft). False trains all weights."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Regex of modules to adapt. Default: the family's language-model linear layers (never the vision tower)."
        },
    )
    fused_loss_head: bool = field(
        default=True,
        metadata={
            "help": "Apply the output layer inside the loss, a chunk of response tokens at a time, so no (tokens x "
            "vocabulary) logits are kept for backward (same losses and gradients; VITask's terms also share each "
            "pass's softmax). Used when the output layer is a plain Linear that the model applies last and, for "
            "VITask, with a fused pass_fusion; not under FSDP or DeepSpeed (sharded weights)."
        },
    )
    # -- TrainingArguments defaults that suit these trainers -----------------------------------------
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep raw columns: the collator needs the images and their targets."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every X updates steps."})

    def effective_dict(self) -> dict:
        """``to_dict()`` with every field as training uses it: what a bundle's training_config.json
        records. ``to_dict()`` itself keeps the fields as given, so that it round-trips."""
        return self.to_dict()

    def __post_init__(self):
        _cpu_processes_use_gloo(self)
        super().__post_init__()
        if self.device.type == "cpu":  # pinned memory needs an accelerator (torch warns on every DataLoader)
            self.dataloader_pin_memory = False
        if (
            self.fsdp or self.deepspeed
        ) and self.device.type == "cpu":  # accelerate would run plain DDP instead
            raise ValueError(
                f"{'fsdp' if self.fsdp else 'deepspeed'} needs GPUs: accelerate shards models only "
                "across GPUs, and on CPU the run would silently be plain DDP. Drop it on CPU."
            )
        if self.fp16 and self.device.type == "cpu":  # transformers would train in float32 without a word
            raise ValueError(
                "fp16=True needs a GPU: there is none here (or use_cpu is set). Train without fp16 on CPU, "
                "or with bf16/fp16 on a GPU."
            )


def _cpu_processes_use_gloo(args: TrainingArguments) -> None:
    """Several processes (``torchrun``, ``accelerate launch``) on a machine without a GPU: train with
    real DDP over gloo, as transformers does only with ``use_cpu=True``; without it every process
    would silently train its own copy of the model."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.cuda.is_available():
        return
    if not args.use_cpu or args.ddp_backend is None:
        logger.info(
            "%s processes and no GPU: training with DDP over gloo on CPU (use_cpu=True, ddp_backend='gloo')",
            os.environ["WORLD_SIZE"],
        )
    args.use_cpu = True
    if args.ddp_backend is None:
        args.ddp_backend = "gloo"
    elif args.ddp_backend != "gloo":
        raise ValueError(
            f"ddp_backend={args.ddp_backend!r} needs GPUs; {os.environ['WORLD_SIZE']} processes on a "
            "machine without one train with ddp_backend='gloo' (or leave it unset)"
        )


@dataclass
class VITaskConfig(VLMTuningArguments):
    """Arguments of :class:`~hf_vitask.VITaskTrainer`: ``TrainingArguments`` plus the VITask method.

    Stage 1 trains ``van_weight * L_van + ep_weight * L_EP + rda_weight * L_RDA`` with the
    connector and LoRA trainable. Stage 2 freezes the connector and adds ``crt_weight * L_CRT``.
    Setting ``ep_weight = rda_weight = crt_weight = 0`` gives plain instruction tuning (the
    "vanilla" baseline), which needs no TSM.

    ``crt_weight`` and ``freeze_connector`` hold what was set, None for the stage's default
    (:data:`STAGE_DEFAULTS`), so that copies for another stage (``for_stage``, ``dataclasses.replace``)
    take that stage's default; ``effective_crt_weight`` and ``effective_freeze_connector`` are the
    values the stage trains with.
    """

    # -- method ----------------------------------------------------------------------------------
    stage: int = field(
        default=1,
        metadata={
            "help": "VITask stage: 1 (EP + RDA, connector trains) or 2 (adds CRT, connector frozen).",
            "choices": [1, 2],
        },
    )
    van_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the plain response cross-entropy without the exemplar (L_van)."},
    )
    ep_weight: float = field(
        default=1.0, metadata={"help": "Weight of the response cross-entropy with the exemplar token (L_EP)."}
    )
    rda_weight: float = field(
        default=DEFAULT_RDA_WEIGHT,
        metadata={
            "help": "Weight alpha of response distribution alignment KL(no-EP || stopgrad EP) (L_RDA); the "
            "default comes from the ablation sweep (docs/ablation.md)."
        },
    )
    crt_weight: float | None = field(
        default=None,
        metadata={
            "help": f"Weight beta of contrastive response tuning (L_CRT). Default: 0 in stage 1, "
            f"{DEFAULT_CRT_WEIGHT} in stage 2 (from the ablation sweep, docs/ablation.md)."
        },
    )
    rda_teacher: str = field(
        default="self",
        metadata={
            "help": "RDA teacher: 'self' (the same model run with the exemplar, detached; the paper) or 'frozen' "
            "(a saved stage-1 model passed to the trainer as `teacher`, kept frozen).",
            "choices": list(RDA_TEACHERS),
        },
    )
    rda_detach: bool = field(
        default=True,
        metadata={
            "help": "With rda_teacher='self': stop the RDA gradient at the teacher (the EP pass), as in the paper. "
            "False lets it flow into the EP path too: a control for ablations, not a recommended setting."
        },
    )
    rda_teacher_dropout: bool = field(
        default=True,
        metadata={
            "help": "With rda_teacher='self': whether the teacher is the training EP pass itself, LoRA dropout "
            "included (no extra forward), or a separate no-grad EP pass without dropout (one more forward per step; "
            "no effect when lora_dropout is 0)."
        },
    )
    rda_teacher_cache: str = field(
        default="auto",
        metadata={
            "help": "With rda_teacher='frozen': keep the teacher's response-token log-probabilities per training sample "
            "(keyed by image and text), so the frozen teacher runs once per sample instead of once per step. 'memory': "
            "in RAM; 'disk': in <output_dir>/teacher_cache (RAM holds only its index; a resumed run reuses it); "
            "'auto': in RAM when the estimate (samples x response tokens x per-token size) fits 4 GiB, else on disk; "
            "'off': the teacher runs on every step. True and False mean 'auto' and 'off'. The choice and its size "
            "are logged when the trainer starts.",
            "choices": list(TEACHER_CACHE_MODES),
        },
    )
    rda_teacher_topk: int | None = field(
        default=None,
        metadata={
            "help": "What the cache keeps per response token. 0: the teacher's full distribution (exact; V float32). "
            "k > 0: only its top-k log-probabilities, the rest of the mass spread evenly over the other tokens "
            "(k float32 + k int32 ids). Default: the full distribution when the whole cache of it fits 4 GiB, else "
            "the top 256 (docs/training.md gives the measured change in L_RDA)."
        },
    )
    pass_fusion: str = field(
        default="prefix",
        metadata={
            "help": "How a step runs its no-EP, EP and CRT-negative passes: 'prefix' (the image prefix once into a KV "
            "cache, the continuations as one batched forward; also under gradient checkpointing), 'batch' (vision "
            "tower once, the passes stacked in one forward) or 'none' (one forward per pass). All three give the "
            "same losses and gradients; the fused ones compute logits only at response tokens.",
            "choices": list(PASS_MODES),
        },
    )
    rda_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature of the RDA KL (scaled by T^2)."}
    )
    crt_negatives: str = field(
        default="batch+dataset",
        metadata={
            "help": "Where CRT negatives (an image of another class) come from: 'batch' (rows without an in-batch "
            "negative are left out of L_CRT) or 'batch+dataset' (such rows get one drawn from the training set).",
            "choices": list(CRT_NEGATIVES),
        },
    )
    freeze_connector: bool | None = field(
        default=None,
        metadata={"help": "Freeze the TSM connector. Default: False in stage 1, True in stage 2."},
    )
    # -- exemplar --------------------------------------------------------------------------------
    num_exemplar_tokens: int = field(
        default=1, metadata={"help": "Number of exemplar tokens inserted after the image."}
    )
    exemplar_feature: str = field(
        default="pooled",
        metadata={
            "help": "TSM feature fed to the connector: 'pooled' (CLS / pre-logits) or 'patch'.",
            "choices": ["pooled", "patch"],
        },
    )
    connector_hidden_dim: int | None = field(
        default=None, metadata={"help": "Hidden width of the connector MLP (default: the LLM hidden size)."}
    )
    # -- data ------------------------------------------------------------------------------------
    instruction: str = field(
        default="complete",
        metadata={
            "help": "Instruction variant used for training: 'complete' (lists the classes) or 'incomplete'.",
            "choices": ["complete", "incomplete"],
        },
    )
    label_column: str = field(
        default="label", metadata={"help": "Dataset column holding the class id or name."}
    )
    metric_use_tsm: bool = field(
        default=False,
        metadata={
            "help": "With compute_metrics, score the evaluation options with the TSM exemplar (EP path) instead of without."
        },
    )
    metric_option_score: str = field(
        default=DEFAULT_OPTION_SCORE,
        metadata={
            "help": "With compute_metrics, score each class's answer by the 'sum' or the 'mean' of its token log-probs.",
            "choices": list(OPTION_SCORES),
        },
    )

    def __post_init__(self):
        if isinstance(self.rda_teacher_cache, bool):  # the on/off switch this field was before
            self.rda_teacher_cache = "auto" if self.rda_teacher_cache else "off"
        check_choices(self)
        for name in ("van_weight", "ep_weight", "rda_weight", "crt_weight"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.van_weight + self.ep_weight + self.rda_weight + self.effective_crt_weight == 0:
            raise ValueError("All loss weights are 0: nothing to train")
        if self.rda_teacher_topk is not None and self.rda_teacher_topk < 0:
            raise ValueError(f"rda_teacher_topk must be >= 0, got {self.rda_teacher_topk}")
        if self.num_exemplar_tokens < 1:
            raise ValueError(f"num_exemplar_tokens must be >= 1, got {self.num_exemplar_tokens}")
        if self.rda_temperature <= 0:
            raise ValueError(f"rda_temperature must be > 0, got {self.rda_temperature}")
        super().__post_init__()

    def for_stage(self, stage: int, **changes) -> VITaskConfig:
        """A copy for another stage; fields left to their stage's default (None) take the new stage's."""
        return dataclasses.replace(self, stage=stage, **changes)

    def _stage_value(self, name: str):
        value = getattr(self, name)
        return STAGE_DEFAULTS[name][self.stage] if value is None else value

    @property
    def effective_crt_weight(self) -> float:
        """``crt_weight`` as this stage trains with it: the value given, else the stage's default."""
        return self._stage_value("crt_weight")

    @property
    def effective_freeze_connector(self) -> bool:
        """``freeze_connector`` as this stage trains with it: the value given, else the stage's default."""
        return self._stage_value("freeze_connector")

    def effective_dict(self) -> dict:
        return {**super().effective_dict(), **{name: self._stage_value(name) for name in STAGE_DEFAULTS}}

    @property
    def uses_exemplar(self) -> bool:
        """Whether a step runs the EP pass (needs the TSM)."""
        return self.ep_weight > 0 or (self.rda_weight > 0 and self.rda_teacher == "self")

    @property
    def is_vanilla(self) -> bool:
        return self.ep_weight == 0 and self.rda_weight == 0 and self.effective_crt_weight == 0


@dataclass
class InstructionFreeConfig(VLMTuningArguments):
    """Arguments of :class:`InstructionFreeTrainer`: ``TrainingArguments`` plus instruction-free tuning.

    The full method is the default (proxy fed as its EMA, m = 0.99, K = 8, responses shuffled).
    Ablations: ``proxy_momentum=0`` (learned proxy without momentum), ``shuffle_prob=0`` (no
    response shuffling), ``use_proxy=False`` (a fixed text instruction, ``instruction_text``).
    """

    # -- proxy instruction ------------------------------------------------------------------------
    use_proxy: bool = field(
        default=True,
        metadata={
            "help": "Learn a proxy instruction (K vectors after the image). False: the fixed-instruction "
            "baseline, which shows `instruction_text` instead."
        },
    )
    num_proxy_tokens: int = field(default=8, metadata={"help": "K, the number of proxy instruction vectors."})
    proxy_init_text: str = field(
        default=DEFAULT_INSTRUCTION,
        metadata={
            "help": "Text whose token embeddings initialise the proxy (resized to K, see proxy_init_resize). "
            "Empty: random normal init with the embedding matrix's standard deviation."
        },
    )
    proxy_init_resize: str = field(
        default="linear",
        metadata={
            "help": "How the init text's n token embeddings become K vectors: 'linear' (linear interpolation "
            "along the token axis, first and last token kept) or 'repeat' (the tokens cycled, then cut to K).",
            "choices": list(PROXY_INIT_RESIZES),
        },
    )
    proxy_momentum: float = field(
        default=0.99,
        metadata={
            "help": "m of the EMA t_ema <- m*t_ema + (1-m)*t after each optimizer step; 0 disables momentum "
            "(the learned proxy without momentum)."
        },
    )
    proxy_feed: str = field(
        default="ema",
        metadata={
            "help": "Copy fed to the model: 'ema' (the EMA, gradients reach the raw proxy straight-through: "
            "t_ema.detach() + t - t.detach()) or 'raw'.",
            "choices": list(PROXY_FEEDS),
        },
    )
    proxy_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the proxy vectors (default: learning_rate). No weight decay."},
    )
    proxy_slot_token: str | None = field(
        default=None,
        metadata={
            "help": "Placeholder token marking the K proxy positions in the prompt (default: the pad token); "
            "its embedding is overwritten."
        },
    )
    instruction_text: str | None = field(
        default=None,
        metadata={
            "help": "use_proxy=False: the constant instruction shown after the image (default: "
            "proxy_init_text, so both arms start from the same words; '' for no instruction)."
        },
    )
    # -- response shuffling -----------------------------------------------------------------------
    shuffle_prob: float = field(
        default=1.0,
        metadata={
            "help": "Probability that a description's segments are randomly permuted each time it is seen "
            "(0 disables response shuffling)."
        },
    )
    shuffle_separator: str = field(
        default=", ",
        metadata={"help": "Separator splitting a description into segments (e.g. ', ' or '. ')."},
    )
    # -- data --------------------------------------------------------------------------------------
    description_column: str = field(
        default="description", metadata={"help": "Dataset column holding the target description."}
    )

    def __post_init__(self):
        check_choices(self)
        if self.use_proxy:
            if self.num_proxy_tokens < 1:
                raise ValueError(f"num_proxy_tokens must be >= 1, got {self.num_proxy_tokens}")
            if self.instruction_text is not None:
                raise ValueError(
                    "instruction_text is the fixed-instruction baseline: set use_proxy=False to use it"
                )
        elif self.instruction_text is None:
            self.instruction_text = self.proxy_init_text
        if not 0 <= self.proxy_momentum < 1:
            raise ValueError(f"proxy_momentum must be in [0, 1), got {self.proxy_momentum}")
        if self.proxy_learning_rate is not None and self.proxy_learning_rate <= 0:
            raise ValueError(f"proxy_learning_rate must be > 0, got {self.proxy_learning_rate}")
        if not 0 <= self.shuffle_prob <= 1:
            raise ValueError(f"shuffle_prob must be in [0, 1], got {self.shuffle_prob}")
        if not self.shuffle_separator:
            raise ValueError("shuffle_separator must not be empty")
        if self.image_column == self.description_column:
            raise ValueError(f"image_column and description_column are both {self.image_column!r}")
        super().__post_init__()


# -- pipeline arguments (CLI and YAML; the Python API takes the same dataclasses) --------------------------
@dataclass
class ModelArguments:
    """Which VLM to tune."""

    model_name_or_path: str = field(
        default="tiny-llava",
        metadata={
            "help": "Hub id or local path of the VLM (e.g. llava-hf/llava-1.5-7b-hf, Qwen/Qwen2-VL-2B-Instruct). "
            "'tiny-<model_type>' (tiny-llava, tiny-internvl, tiny-mllama, ...) builds a tiny random model offline "
            "(demos, tests)."
        },
    )
    torch_dtype: str | None = field(
        default=None, metadata={"help": "dtype to load the VLM in: 'auto', 'bfloat16', 'float16', 'float32'."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow custom modelling code from the hub (off unless you trust the repo)."},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA: load the language model in 4-bit NF4 (bitsandbytes, double quantisation); the vision "
            "tower, projector and lm_head stay in full precision."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel: 'eager', 'sdpa' or 'flash_attention_2' (default: the model's)."},
    )


@dataclass
class DataArguments:
    """Where the labelled images come from and how the task is phrased."""

    dataset: str = field(
        default="digits",
        metadata={
            "help": "Data source: 'digits' (bundled), 'textures' (generated offline), 'imagefolder' (class_name/*.png), 'npz' (MedMNIST format), 'hf' (hub id / save_to_disk dir) or a file format of `datasets` ('json', 'csv', 'parquet', ...: rows of image path or bytes and label)."
        },
    )
    dataset_path: dict[str, str] | str | None = field(
        default=None,
        metadata={
            "help": "Path or hub id of the data (not needed for 'digits'). For a file format: one file (split into "
            "train/validation/test here), a folder of files named after their split, or (YAML) a {split: file} mapping."
        },
    )
    dataset_paths: list[str] | None = field(
        default=None,
        metadata={
            "help": "Several tasks in one run (e.g. 12 MedMNIST files): one path per task, all of the `dataset` source "
            "type; each becomes a TaskSpec named after its file or folder. The TSM gets one shared head."
        },
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training rows (fast runs)."}
    )
    image_size: int = field(default=32, metadata={"help": "Side of the digits / textures images in pixels."})
    data_seed_split: int = field(
        default=0, metadata={"help": "Seed of the train/validation/test split when one is made."}
    )
    train_split: str = field(default="train", metadata={"help": "Split used for training."})
    validation_split: str = field(
        default="validation", metadata={"help": "Split used to pick the best TSM epoch."}
    )
    task_name: str | None = field(
        default=None, metadata={"help": "Task name (default: from the data source)."}
    )
    modality: str | None = field(
        default=None, metadata={"help": "Image modality in the instruction, e.g. 'dermatoscopy'."}
    )
    class_names: list[str] | None = field(
        default=None,
        metadata={"help": "Class names in label order (default: the dataset's ClassLabel names)."},
    )
    question: str | None = field(
        default=None, metadata={"help": "Optional question replacing the default instruction."}
    )
    dataset_image_column: str = field(
        default="image",
        metadata={
            "help": "Column of the source holding the image (a path relative to its data file, an absolute path "
            "or bytes), for 'hf' and the file formats; loading renames it 'image'."
        },
    )
    dataset_label_column: str = field(
        default="label",
        metadata={
            "help": "Column of the source holding the class id or name, for 'hf' and the file formats; loading "
            "renames it 'label'."
        },
    )

    def __post_init__(self):
        columns = (self.dataset_image_column, self.dataset_label_column)
        if columns != ("image", "label") and self.dataset.lower() in (
            "digits",
            "textures",
            "imagefolder",
            "npz",
            "medmnist",
        ):
            raise ValueError(
                f"dataset_image_column/dataset_label_column name columns of a table; the {self.dataset!r} "
                "source has none (use 'hf' or a file format such as 'json' or 'csv')"
            )


@dataclass
class TSMArguments:
    """The task-specific model (a timm classifier)."""

    tsm_model: str = field(
        default="vit_base_patch16_224.augreg_in21k",
        metadata={"help": "timm model name (the paper: a ViT-Base with ImageNet-21k weights)."},
    )
    tsm_pretrained: bool = field(
        default=True, metadata={"help": "Start from timm's pretrained weights (downloads them)."}
    )
    tsm_img_size: int | None = field(
        default=None, metadata={"help": "Input size of the TSM (default: the model's)."}
    )
    tsm_epochs: int = field(
        default=30, metadata={"help": "TSM training epochs (best validation epoch kept)."}
    )
    tsm_batch_size: int = field(default=32, metadata={"help": "TSM batch size."})
    tsm_learning_rate: float = field(default=1e-4, metadata={"help": "TSM AdamW learning rate."})
    tsm_path: str | None = field(
        default=None, metadata={"help": "Directory of a trained TSM (default: <output_dir>/tsm)."}
    )


@dataclass
class EvalArguments:
    """How to evaluate and predict."""

    model_path: str | None = field(
        default=None,
        metadata={
            "help": "Saved bundle to evaluate / predict with (default: the last stage in <output_dir>)."
        },
    )
    eval_split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    eval_methods: list[str] = field(
        default_factory=lambda: ["likelihood", "generate"],
        metadata={
            "help": "Answer extraction: 'likelihood' (option scoring) and/or 'generate' (greedy + parse).",
            "choices": ["likelihood", "generate"],
        },
    )
    option_score: str = field(
        default=DEFAULT_OPTION_SCORE,
        metadata={
            "help": "Likelihood scoring of a class's answer: 'sum' of its token log-probs (its log-likelihood) "
            "or 'mean' per token (no preference for short class names).",
            "choices": list(OPTION_SCORES),
        },
    )
    eval_use_tsm: str = field(
        default="both",
        metadata={
            "help": "Evaluate with the TSM exemplar: 'yes', 'no' or 'both'.",
            "choices": ["yes", "no", "both"],
        },
    )
    eval_instructions: str = field(
        default="both",
        metadata={
            "help": "Instruction variants to evaluate: 'complete', 'incomplete' or 'both'.",
            "choices": ["complete", "incomplete", "both"],
        },
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Images per evaluation batch."})
    eval_max_samples: int | None = field(
        default=None, metadata={"help": "Evaluate at most this many images."}
    )
    plugin_tsm: str | None = field(
        default=None,
        metadata={"help": "Directory of a different TSM to plug in at evaluation (VITask_plug)."},
    )
    predict_inputs: list[str] | None = field(
        default=None, metadata={"help": "predict: image files and/or folders (searched recursively)."}
    )
    predictions_file: str = field(default="predictions.csv", metadata={"help": "predict: CSV file written."})

    def __post_init__(self):
        check_choices(self)
