"""hf_vitask: turn a Hugging Face vision-language model into a task specialist.

What a user script needs is here: the trainers and their configs, ``TaskSpec``, the data loaders,
``load_vlm`` / ``load_vitask``, the models and the evaluation functions. The bundled demo (digits)
lives in :mod:`hf_vitask.data.digits`, tiny random test models in :mod:`hf_vitask.models.tiny`.

Names are imported on first use (PEP 562), so ``import hf_vitask`` and ``hf-vitask --help`` do not
pay for torch, transformers, trl, peft, timm or bitsandbytes until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from hf_vitask.version import __version__ as __version__

#: public name -> the module that defines it
_EXPORTS = {
    "InstructionFreeConfig": "hf_vitask.config",
    "VITaskConfig": "hf_vitask.config",
    "VITaskCollator": "hf_vitask.data.collator",
    "InstructionFreeCollator": "hf_vitask.data.instruction_free",
    "load_data_files": "hf_vitask.data.sources",
    "load_hf_dataset": "hf_vitask.data.sources",
    "load_image_folder": "hf_vitask.data.sources",
    "load_medmnist_npz": "hf_vitask.data.sources",
    "load_source": "hf_vitask.data.sources",
    "evaluate_tsm": "hf_vitask.evaluation",
    "evaluate_vlm": "hf_vitask.evaluation",
    "generate_answers": "hf_vitask.evaluation",
    "mc_evaluate": "hf_vitask.evaluation",
    "predict_classes": "hf_vitask.evaluation",
    "score_options": "hf_vitask.evaluation",
    "load_vitask": "hf_vitask.hub",
    "push_bundle": "hf_vitask.hub",
    "ConnectorConfig": "hf_vitask.models.exemplar",
    "ExemplarConnector": "hf_vitask.models.exemplar",
    "load_vlm": "hf_vitask.models.loading",
    "VITaskModel": "hf_vitask.models.modeling",
    "ProxyInstruction": "hf_vitask.models.proxy",
    "TaskSpecificModel": "hf_vitask.models.tsm",
    "TransformersTSM": "hf_vitask.models.tsm",
    "tsm_predict": "hf_vitask.models.tsm",
    "VITaskProcessor": "hf_vitask.processing",
    "TaskSpec": "hf_vitask.task",
    "NonFiniteLossError": "hf_vitask.trainers.base",
    "InstructionFreeTrainer": "hf_vitask.trainers.instruction_free",
    "TSMTrainer": "hf_vitask.trainers.tsm",
    "train_tsm": "hf_vitask.trainers.tsm",
    "VITaskTrainer": "hf_vitask.trainers.vitask",
}

__all__ = [
    "ConnectorConfig",
    "ExemplarConnector",
    "InstructionFreeCollator",
    "InstructionFreeConfig",
    "InstructionFreeTrainer",
    "NonFiniteLossError",
    "ProxyInstruction",
    "TSMTrainer",
    "TaskSpec",
    "TaskSpecificModel",
    "TransformersTSM",
    "VITaskCollator",
    "VITaskConfig",
    "VITaskModel",
    "VITaskProcessor",
    "VITaskTrainer",
    "evaluate_tsm",
    "evaluate_vlm",
    "generate_answers",
    "load_data_files",
    "load_hf_dataset",
    "load_image_folder",
    "load_medmnist_npz",
    "load_source",
    "load_vitask",
    "load_vlm",
    "mc_evaluate",
    "predict_classes",
    "push_bundle",
    "score_options",
    "train_tsm",
    "tsm_predict",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # the next access is a plain attribute
        return value
    raise AttributeError(f"module 'hf_vitask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from hf_vitask.config import InstructionFreeConfig, VITaskConfig
    from hf_vitask.data.collator import VITaskCollator
    from hf_vitask.data.instruction_free import InstructionFreeCollator
    from hf_vitask.data.sources import (
        load_data_files,
        load_hf_dataset,
        load_image_folder,
        load_medmnist_npz,
        load_source,
    )
    from hf_vitask.evaluation import (
        evaluate_tsm,
        evaluate_vlm,
        generate_answers,
        mc_evaluate,
        predict_classes,
        score_options,
    )
    from hf_vitask.hub import load_vitask, push_bundle
    from hf_vitask.models.exemplar import ConnectorConfig, ExemplarConnector
    from hf_vitask.models.loading import load_vlm
    from hf_vitask.models.modeling import VITaskModel
    from hf_vitask.models.proxy import ProxyInstruction
    from hf_vitask.models.tsm import TaskSpecificModel, TransformersTSM, tsm_predict
    from hf_vitask.processing import VITaskProcessor
    from hf_vitask.task import TaskSpec
    from hf_vitask.trainers.base import NonFiniteLossError
    from hf_vitask.trainers.instruction_free import InstructionFreeTrainer
    from hf_vitask.trainers.tsm import TSMTrainer, train_tsm
    from hf_vitask.trainers.vitask import VITaskTrainer
