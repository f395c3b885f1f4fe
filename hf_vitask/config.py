"""Training configurations. Every knob is a documented dataclass field; the CLI is generated from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

RDA_TEACHERS = ("self", "frozen")
CRT_NEGATIVES = ("batch", "batch+dataset")


@dataclass
class VITaskConfig(TrainingArguments):
    """Arguments of :class:`~hf_vitask.VITaskTrainer`: ``TrainingArguments`` plus the VITask method.

    Stage 1 trains ``van_weight * L_van + ep_weight * L_EP + rda_weight * L_RDA`` with the
    connector and LoRA trainable. Stage 2 freezes the connector and adds ``crt_weight * L_CRT``.
    Setting ``ep_weight = rda_weight = crt_weight = 0`` gives plain instruction tuning (the
    "vanilla" baseline), which needs no TSM.
    """

    # -- method ----------------------------------------------------------------------------------
    stage: int = field(default=1, metadata={"help": "VITask stage: 1 (EP + RDA, connector trains) or 2 (adds CRT, connector frozen)."})
    van_weight: float = field(default=1.0, metadata={"help": "Weight of the plain response cross-entropy without the exemplar (L_van)."})
    ep_weight: float = field(default=1.0, metadata={"help": "Weight of the response cross-entropy with the exemplar token (L_EP)."})
    rda_weight: float = field(default=1.0, metadata={"help": "Weight alpha of response distribution alignment KL(no-EP || stopgrad EP) (L_RDA)."})
    crt_weight: float | None = field(
        default=None,
        metadata={"help": "Weight beta of contrastive response tuning (L_CRT). Default: 0 in stage 1, 1.0 in stage 2."},
    )
    rda_teacher: str = field(
        default="self",
        metadata={
            "help": "RDA teacher: 'self' (the same model run with the exemplar, detached; the paper) or 'frozen' "
            "(a saved stage-1 model passed to the trainer as `teacher`, kept frozen)."
        },
    )
    rda_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the RDA KL (scaled by T^2)."})
    crt_negatives: str = field(
        default="batch+dataset",
        metadata={
            "help": "Where CRT negatives (an image of another class) come from: 'batch' (rows without an in-batch "
            "negative are left out of L_CRT) or 'batch+dataset' (such rows get one drawn from the training set)."
        },
    )
    freeze_connector: bool | None = field(
        default=None, metadata={"help": "Freeze the TSM connector. Default: False in stage 1, True in stage 2."}
    )
    # -- exemplar --------------------------------------------------------------------------------
    num_exemplar_tokens: int = field(default=1, metadata={"help": "Number of exemplar tokens inserted after the image."})
    exemplar_feature: str = field(
        default="pooled", metadata={"help": "TSM feature fed to the connector: 'pooled' (CLS / pre-logits) or 'patch'."}
    )
    connector_hidden_dim: int | None = field(
        default=None, metadata={"help": "Hidden width of the connector MLP (default: the LLM hidden size)."}
    )
    # -- data ------------------------------------------------------------------------------------
    instruction: str = field(
        default="complete",
        metadata={"help": "Instruction variant used for training: 'complete' (lists the classes) or 'incomplete'."},
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Maximum tokens per example. Longer examples raise an error; they are never truncated."},
    )
    image_column: str = field(default="image", metadata={"help": "Dataset column holding the image."})
    label_column: str = field(default="label", metadata={"help": "Dataset column holding the class id or name."})
    # -- LoRA ------------------------------------------------------------------------------------
    use_lora: bool = field(default=True, metadata={"help": "Wrap a plain VLM in LoRA adapters (peft). False trains all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "Regex of modules to adapt. Default: the family's language-model linear layers (never the vision tower)."},
    )
    # -- TrainingArguments defaults that suit this trainer -----------------------------------------
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep raw columns: the collator needs the images and labels."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every X updates steps."})

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage!r}")
        if self.crt_weight is None:
            self.crt_weight = 1.0 if self.stage == 2 else 0.0
        if self.freeze_connector is None:
            self.freeze_connector = self.stage == 2
        for name in ("van_weight", "ep_weight", "rda_weight", "crt_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.van_weight + self.ep_weight + self.rda_weight + self.crt_weight == 0:
            raise ValueError("All loss weights are 0: nothing to train")
        if self.rda_teacher not in RDA_TEACHERS:
            raise ValueError(f"rda_teacher must be one of {RDA_TEACHERS}, got {self.rda_teacher!r}")
        if self.crt_negatives not in CRT_NEGATIVES:
            raise ValueError(f"crt_negatives must be one of {CRT_NEGATIVES}, got {self.crt_negatives!r}")
        if self.instruction not in ("complete", "incomplete"):
            raise ValueError(f"instruction must be 'complete' or 'incomplete', got {self.instruction!r}")
        if self.exemplar_feature not in ("pooled", "patch"):
            raise ValueError(f"exemplar_feature must be 'pooled' or 'patch', got {self.exemplar_feature!r}")
        if self.num_exemplar_tokens < 1:
            raise ValueError(f"num_exemplar_tokens must be >= 1, got {self.num_exemplar_tokens}")
        if self.rda_temperature <= 0:
            raise ValueError(f"rda_temperature must be > 0, got {self.rda_temperature}")
        super().__post_init__()

    @property
    def uses_exemplar(self) -> bool:
        """Whether a step runs the EP pass (needs the TSM)."""
        return self.ep_weight > 0 or (self.rda_weight > 0 and self.rda_teacher == "self")

    @property
    def is_vanilla(self) -> bool:
        return self.ep_weight == 0 and self.rda_weight == 0 and self.crt_weight == 0
