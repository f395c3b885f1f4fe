"""VITask end to end on the bundled handwritten digits, on a CPU, in about three minutes.

Reads top to bottom: train the task-specific model (TSM), a vanilla instruction-tuned
baseline, then VITask stage 1 (EP + RDA) and stage 2 (+ CRT), and compare test accuracy
with and without the TSM at inference. The VLM is a tiny random LLaVA built offline; swap in
`AutoModelForImageTextToText.from_pretrained(<hub id>)` and its processor for a real one.

    python examples/quickstart_digits.py [--output-dir DIR] [--steps N]
"""

import argparse

import torch

from hf_vitask import TaskSpecificModel, VITaskConfig, VITaskTrainer, predict_classes, train_tsm, tsm_predict
from hf_vitask.data.digits import digits_task, load_digits_dataset
from hf_vitask.models.tiny import build_tiny_vlm

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--output-dir", default="vitask-quickstart")
parser.add_argument(
    "--steps", type=int, default=240, help="optimizer steps per VITask stage (vanilla gets twice)"
)
parser.add_argument(
    "--samples", type=int, default=600, help="digits used in total (train/validation/test split)"
)
parser.add_argument("--seed", type=int, default=0)
cli = parser.parse_args()
torch.manual_seed(cli.seed)

# 1. Data and task: real 8x8 digits upscaled to 32x32, phrased as instruction following.
data, task = load_digits_dataset(max_samples=cli.samples, seed=cli.seed), digits_task()
test_images, test_labels = data["test"]["image"], torch.tensor(data["test"]["label"])
print(f"train {len(data['train'])}, validation {len(data['validation'])}, test {len(test_images)} images")
print("instruction:", task.instruction())


def accuracy(predictions) -> float:
    return (torch.tensor(predictions) == test_labels).float().mean().item()


# 2. Stage 0: the task-specific model, a timm classifier.
tsm = TaskSpecificModel("test_resnet", num_classes=task.num_classes, img_size=32)
train_tsm(
    tsm,
    data["train"],
    eval_dataset=data["validation"],
    epochs=8,
    batch_size=16,
    learning_rate=3e-3,
    seed=cli.seed,
)
results = {"TSM": accuracy(tsm_predict(tsm, data["test"]).argmax(-1).tolist())}


def config(name: str, steps: int = cli.steps, **kw) -> VITaskConfig:
    return VITaskConfig(
        output_dir=f"{cli.output_dir}/{name}",
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        lora_r=16,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=cli.seed,
        **kw,
    )


# 3. Vanilla instruction tuning: same model and data, as many optimizer steps as both VITask stages.
vlm, processor = build_tiny_vlm("llava", seed=cli.seed)
vanilla = VITaskTrainer(
    model=vlm,
    args=config("vanilla", 2 * cli.steps, ep_weight=0, rda_weight=0),
    processing_class=processor,
    train_dataset=data["train"],
    task=task,
)
vanilla.train()
results["vanilla"] = accuracy(predict_classes(vanilla.model, processor, task, test_images))

# 4. VITask stage 1 (EP + RDA, connector trains) then stage 2 (connector frozen, + CRT).
vlm, processor = build_tiny_vlm("llava", seed=cli.seed)
stage1 = VITaskTrainer(
    model=vlm,
    args=config("stage1", stage=1),
    processing_class=processor,
    train_dataset=data["train"],
    task=task,
    tsm=tsm,
)
stage1.train()
stage2 = VITaskTrainer(
    model=stage1.model,
    args=config("stage2", stage=2),
    processing_class=processor,
    train_dataset=data["train"],
    task=task,
)
stage2.train()
stage2.save_model(f"{cli.output_dir}/vitask")
results["VITask w/o EP"] = accuracy(predict_classes(stage2.model, processor, task, test_images))
results["VITask w/ EP"] = accuracy(predict_classes(stage2.model, processor, task, test_images, use_tsm=True))

print("\ntest accuracy (option log-likelihood scoring, complete instructions)")
for name, value in results.items():
    print(f"  {name:<14} {value:.3f}")
print(f"\nsaved the VITask bundle to {cli.output_dir}/vitask (load it with hf_vitask.load_vitask)")
