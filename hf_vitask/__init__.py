"""hf_vitask: turn a Hugging Face vision-language model into a task specialist."""

__version__ = "0.1.0"

from hf_vitask.config import InstructionFreeConfig, VITaskConfig
from hf_vitask.data.collator import VITaskCollator
from hf_vitask.data.instruction_free import (
    InstructionFreeCollator,
    add_digit_descriptions,
    digit_descriptions,
    make_mc_questions,
)
from hf_vitask.data.sources import load_digits_dataset
from hf_vitask.evaluation import (
    evaluate_tsm,
    evaluate_vlm,
    generate_answers,
    predict_classes,
    score_options,
)
from hf_vitask.hub import load_vitask
from hf_vitask.models.exemplar import ConnectorConfig, ExemplarConnector
from hf_vitask.models.modeling import VITaskModel
from hf_vitask.models.tsm import TaskSpecificModel, train_tsm, tsm_predict
from hf_vitask.task import TaskSpec, digits_task
from hf_vitask.trainers.base import NonFiniteLossError
from hf_vitask.trainers.instruction_free import InstructionFreeTrainer, ProxyInstruction, mc_evaluate
from hf_vitask.trainers.vitask import VITaskTrainer

__all__ = [
    "ConnectorConfig",
    "ExemplarConnector",
    "InstructionFreeCollator",
    "InstructionFreeConfig",
    "InstructionFreeTrainer",
    "NonFiniteLossError",
    "ProxyInstruction",
    "add_digit_descriptions",
    "digit_descriptions",
    "make_mc_questions",
    "mc_evaluate",
    "TaskSpec",
    "TaskSpecificModel",
    "VITaskCollator",
    "VITaskConfig",
    "VITaskModel",
    "VITaskTrainer",
    "digits_task",
    "evaluate_tsm",
    "evaluate_vlm",
    "generate_answers",
    "load_digits_dataset",
    "load_vitask",
    "predict_classes",
    "score_options",
    "train_tsm",
    "tsm_predict",
]
