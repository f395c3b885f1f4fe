"""VITask at real scale: a MedMNIST dataset and a real VLM, QLoRA on one GPU.

The user downloads the MedMNIST .npz (https://medmnist.com; e.g. dermamnist_224.npz); this
script never downloads data. Model weights come from the Hugging Face Hub on first use.

    python examples/medmnist_vitask.py --npz dermamnist_224.npz --model Qwen/Qwen2-VL-2B-Instruct

Steps, top to bottom: load the data -> TSM (ViT-B, ImageNet-21k, best validation epoch) ->
4-bit base model + LoRA -> VITask stage 1 (EP + RDA) -> stage 2 (+ CRT) -> evaluation with
and without the TSM, complete and incomplete instructions. The same run from the CLI:
`examples/configs/medmnist_qlora.yaml`.
"""

import argparse
import json
from pathlib import Path

import torch

from hf_vitask import TaskSpec, TaskSpecificModel, VITaskConfig, VITaskTrainer, train_tsm
from hf_vitask.data.sources import class_names_of, load_medmnist_npz
from hf_vitask.evaluation import evaluate_tsm, evaluate_vlm
from hf_vitask.models.loading import load_vlm

MODALITY = {  # the instruction's "{modality}" per MedMNIST flag
    "dermamnist": "dermatoscopy",
    "pneumoniamnist": "chest X-ray",
    "breastmnist": "breast ultrasound",
    "bloodmnist": "blood cell microscopy",
    "pathmnist": "colon pathology",
    "octmnist": "retinal OCT",
    "retinamnist": "fundus",
    "tissuemnist": "kidney cortex microscopy",
    "organamnist": "abdominal CT",
    "organcmnist": "abdominal CT",
    "organsmnist": "abdominal CT",
}

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--npz", required=True, help="MedMNIST-format .npz file")
parser.add_argument("--model", default="Qwen/Qwen2-VL-2B-Instruct", help="hub id or path of a supported VLM")
parser.add_argument("--output-dir", default="runs/medmnist")
parser.add_argument("--epochs", type=float, default=1.0, help="epochs per VITask stage (the paper: 1)")
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--tsm-epochs", type=int, default=30)
parser.add_argument("--no-4bit", action="store_true", help="train the base in bf16 instead of 4-bit")
cli = parser.parse_args()
out = Path(cli.output_dir)

# 1. Data and task.
data = load_medmnist_npz(cli.npz, image_size=224)
flag = Path(cli.npz).stem.split("_")[0]
task = TaskSpec(class_names=class_names_of(data), name=flag, modality=MODALITY.get(flag, "medical"))
print(task.instruction())

# 2. Stage 0: the TSM (the paper: ViT-Base, ImageNet-21k, fully fine-tuned, best validation epoch).
tsm = TaskSpecificModel("vit_base_patch16_224.augreg_in21k", num_classes=task.num_classes, pretrained=True)
train_tsm(
    tsm,
    data["train"],
    eval_dataset=data["validation"],
    epochs=cli.tsm_epochs,
    batch_size=64,
    learning_rate=1e-4,
)
tsm.save_pretrained(out / "tsm")

# 3. The VLM: 4-bit base (vision tower, projector and lm_head kept in full precision) + LoRA.
vlm, processor = load_vlm(cli.model, load_in_4bit=not cli.no_4bit, torch_dtype="bfloat16")


def config(stage: int) -> VITaskConfig:
    return VITaskConfig(
        output_dir=str(out / f"stage{stage}"),
        stage=stage,
        num_train_epochs=cli.epochs,
        per_device_train_batch_size=cli.batch_size,
        gradient_accumulation_steps=max(1, 32 // cli.batch_size),
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        bf16=torch.cuda.is_available(),
        gradient_checkpointing=True,
        logging_steps=10,
        save_strategy="epoch",
        report_to="none",
    )


# 4. VITask stage 1 (EP + RDA, connector trains) and stage 2 (connector frozen, + CRT).
stage1 = VITaskTrainer(
    model=vlm, args=config(1), processing_class=processor, train_dataset=data["train"], task=task, tsm=tsm
)
stage1.train()
stage1.save_model()
stage2 = VITaskTrainer(
    model=stage1.model, args=config(2), processing_class=processor, train_dataset=data["train"], task=task
)
stage2.train()
stage2.save_model()

# 5. Evaluation on the test split.
results = {"tsm": evaluate_tsm(tsm, data["test"])}
for use_tsm in (False, True):
    for complete in (True, False):
        key = f"{'with' if use_tsm else 'without'}_tsm/{'complete' if complete else 'incomplete'}"
        results[key] = evaluate_vlm(
            stage2.model,
            processor,
            task,
            data["test"],
            use_tsm=use_tsm,
            complete_instruction=complete,
            batch_size=16,
        )
(out / "results.json").write_text(json.dumps(results, indent=2))
print(json.dumps(results, indent=2))
