"""Step-time benchmark: what a VITask training step costs next to a plain SFT step, in one run.

    python benchmarks/bench_step.py                    # CPU, a tiny-but-not-trivial LLaVA, a few minutes
    python benchmarks/bench_step.py --hidden 512 --layers 8 --batch 8 --steps 20   # bigger / GPU

Every variant trains the same model shape on the same batches (same batch size, same sequence
length); the script prints the median step time, its ratio to the plain SFT step, and peak
memory (CUDA: max allocated; CPU: peak RSS growth of the process). It also measures the
collator's batch rate against the training step rate, and option-likelihood evaluation against
generate-and-parse. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import time

import torch

from hf_vitask import (
    TaskSpecificModel,
    VITaskCollator,
    VITaskConfig,
    VITaskTrainer,
    digits_task,
    load_digits_dataset,
)
from hf_vitask.evaluation import generate_answers, score_options
from hf_vitask.models.tiny import build_tiny_vlm

VARIANTS = {  # name: VITaskConfig overrides
    "plain SFT (vanilla)": dict(ep_weight=0.0, rda_weight=0.0, crt_weight=0.0),
    "stage 1 (EP + RDA)": dict(stage=1),
    "stage 2 (EP + RDA + CRT)": dict(stage=2),
    "stage 2, frozen teacher": dict(stage=2, rda_teacher="frozen"),
}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device) -> float:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return peak_memory_mb(device)


def train_step(trainer: VITaskTrainer, optimizer, batch: dict, device: torch.device) -> float:
    """Forward + backward + optimizer step, as Trainer.training_step does it; seconds."""
    model = trainer.model
    model.train()
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256, help="LLM hidden size of the tiny LLaVA")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--eval-images", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output-dir", default="/tmp/bench-vitask")
    cli = parser.parse_args(argv)
    if cli.threads:
        torch.set_num_threads(cli.threads)
    device = torch.device(cli.device)
    torch.manual_seed(0)

    data, task = load_digits_dataset(max_samples=400), digits_task()
    tsm = TaskSpecificModel("test_resnet", num_classes=10, img_size=32)
    rows = [data["train"][i] for i in range(cli.batch * (cli.steps + 1))]

    def fresh(teacher=None, **overrides) -> VITaskTrainer:
        model, processor = build_tiny_vlm("llava", hidden_size=cli.hidden, num_layers=cli.layers, num_heads=cli.heads)
        args = VITaskConfig(output_dir=cli.output_dir, report_to="none", save_strategy="no", lora_r=16,
                            lora_dropout=0.0, use_cpu=device.type == "cpu", **overrides)
        trainer = VITaskTrainer(model=model.to(device), args=args, processing_class=processor,
                                train_dataset=data["train"], task=task, tsm=tsm, teacher=teacher)
        trainer.model.to(device)
        return trainer

    # the frozen teacher: a stage-1 bundle saved once
    teacher_trainer = fresh(stage=1, max_steps=1)
    teacher_dir = f"{cli.output_dir}/teacher"
    teacher_trainer.save_model(teacher_dir)

    # Variants take turns step by step, so drift in machine load hits them all alike.
    runs = {}
    for name, overrides in VARIANTS.items():
        trainer = fresh(teacher_dir if "frozen" in name else None, **overrides)
        batches = [trainer.data_collator(rows[i * cli.batch : (i + 1) * cli.batch]) for i in range(cli.steps + 1)]
        optimizer = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=1e-4)
        runs[name] = (trainer, optimizer, batches, [], [])
    for step in range(cli.steps + 1):
        for _name, (trainer, optimizer, batches, times, memory) in runs.items():
            base = reset_peak(device)
            seconds = train_step(trainer, optimizer, batches[step], device)
            if step:  # the first step warms up kernels and allocators
                times.append(seconds)
                memory.append(peak_memory_mb(device) - (base if device.type == "cpu" else 0))
    results = {name: (statistics.median(t), max(m)) for name, (_, _, _, t, m) in runs.items()}
    collator = runs["plain SFT (vanilla)"][0].data_collator
    batches = runs["plain SFT (vanilla)"][2]
    sft = results["plain SFT (vanilla)"][0]
    print(f"\ndevice {device}, tiny LLaVA hidden {cli.hidden} x {cli.layers} layers, batch {cli.batch}, "
          f"sequence {batches[0]['input_ids'].shape[1]} tokens, median of {cli.steps} steps")
    print(f"{'variant':<28} {'step (ms)':>10} {'vs SFT':>8} {'peak MB':>9}")
    for name, (median, memory) in results.items():
        print(f"{name:<28} {median * 1e3:>10.1f} {median / sft:>7.2f}x {memory:>9.0f}")

    # collator throughput vs training step rate
    plain_collator = VITaskCollator(collator.processor, task, tsm=tsm, with_negatives=True)
    start = time.perf_counter()
    for i in range(cli.steps):
        plain_collator(rows[i * cli.batch : (i + 1) * cli.batch])
    collate = (time.perf_counter() - start) / cli.steps
    stage2 = results["stage 2 (EP + RDA + CRT)"][0]
    print(f"\ncollator {collate * 1e3:.1f} ms/batch: {stage2 / collate:.1f}x the stage-2 step rate "
          f"({sft / collate:.1f}x the SFT step rate)")

    # option likelihood vs generate-and-parse
    model, processor = build_tiny_vlm("llava", hidden_size=cli.hidden, num_layers=cli.layers, num_heads=cli.heads)
    from hf_vitask.models.modeling import VITaskModel

    wrapped = VITaskModel.from_vlm(model.to(device), processor, with_connector=False).eval()
    images = data["test"]["image"][: cli.eval_images]
    start = time.perf_counter()
    score_options(wrapped, processor, task, images, batch_size=8)
    likelihood = time.perf_counter() - start
    start = time.perf_counter()
    generate_answers(wrapped, processor, task, images, batch_size=8, max_new_tokens=8)
    generate = time.perf_counter() - start
    print(f"evaluation of {len(images)} images: option likelihood {likelihood:.2f} s, generate-and-parse "
          f"{generate:.2f} s (likelihood is {generate / likelihood:.2f}x faster)")


if __name__ == "__main__":
    main()
