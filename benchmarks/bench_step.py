"""Step-time benchmark: what a VITask training step costs next to a plain SFT step, in one run.

    python benchmarks/bench_step.py --threads 1        # CPU: a tiny-but-not-trivial LLaVA, ~5 minutes
    python benchmarks/bench_step.py --hidden 2048 --layers 16 --image-tokens 576 --vocab 32064 --batch 8   # GPU

Every variant trains the same model shape on the same batches (same batch size, same sequence
length); variants take turns step by step, so drift in machine load hits them all alike. The
script prints the median step time (forward + backward + optimizer step), its ratio to the
plain SFT step (one forward of the VLM with ``labels``, the loss transformers/trl compute), and
memory (CUDA: peak allocated; CPU, which has no allocator statistics: the activations
autograd saves for backward, the part that differs between variants). It then measures the
collator's batch rate against the training step rate, option-likelihood evaluation against
generate-and-parse on a trained model, and what the top-k teacher cache changes in L_RDA.
See docs/performance.md.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import time

import torch

from hf_vitask import TaskSpecificModel, VITaskCollator, VITaskConfig, VITaskTrainer
from hf_vitask.data.collator import build_prompts
from hf_vitask.data.digits import digits_task, load_digits_dataset
from hf_vitask.evaluation import generate_answers, score_options
from hf_vitask.losses import rda_kl, rda_kl_cached
from hf_vitask.models.modeling import VITaskModel
from hf_vitask.models.tiny import build_tiny_vlm
from hf_vitask.trainers.base import wrap_lora

SFT = "plain SFT step (HF loss)"
VARIANTS = {  # name: VITaskConfig overrides (None: the plain SFT step)
    SFT: None,
    "vanilla (VITaskTrainer)": dict(ep_weight=0.0, rda_weight=0.0, crt_weight=0.0),
    "stage 1, naive (3 passes: none)": dict(stage=1, pass_fusion="none"),
    "stage 1 (EP + RDA)": dict(stage=1),
    "stage 2, naive (pass_fusion none)": dict(stage=2, pass_fusion="none"),
    "stage 2, passes stacked (batch)": dict(stage=2, pass_fusion="batch"),
    "stage 2 (EP + RDA + CRT)": dict(stage=2),
    "RDA frozen teacher, uncached": dict(
        stage=1, ep_weight=0.0, rda_teacher="frozen", rda_teacher_cache=False
    ),
    "RDA frozen teacher, cached": dict(stage=1, ep_weight=0.0, rda_teacher="frozen"),
    "stage 2, frozen teacher cached": dict(stage=2, rda_teacher="frozen"),
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


def loss_of(trainer: VITaskTrainer, batch: dict, sft: bool) -> torch.Tensor:
    if not sft:
        return trainer.compute_loss(trainer.model, dict(batch))
    keys = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    return trainer.model.vlm(**{k: batch[k] for k in keys if k in batch}).loss


def saved_for_backward_mb(trainer: VITaskTrainer, batch: dict, sft: bool) -> float:
    """Activation memory of one step: the distinct storages autograd keeps for backward (CPU has no
    allocator statistics; on CUDA the max-allocated peak is reported instead)."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    trainer.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of(trainer, batch, sft)
    loss.backward()
    trainer.model.zero_grad(set_to_none=True)
    return sum(storages.values()) / 2**20


def train_step(
    trainer: VITaskTrainer, optimizer, batch: dict, device: torch.device, sft: bool = False
) -> float:
    """Forward + backward + optimizer step, as Trainer.training_step does it; seconds."""
    trainer.model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss_of(trainer, batch, sft).backward()
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
    parser.add_argument(
        "--image-tokens", type=int, default=144, help="image tokens per image (a square number)"
    )
    parser.add_argument("--vocab", type=int, default=8192, help="output vocabulary (the tokenizer's, padded)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--teacher-steps", type=int, default=60, help="stage-1 steps of the frozen teacher")
    parser.add_argument("--eval-images", type=int, default=24)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--output-dir", default="/tmp/bench-vitask")
    cli = parser.parse_args(argv)
    if cli.threads:
        torch.set_num_threads(cli.threads)
    device = torch.device(cli.device)
    torch.manual_seed(0)
    image_size = 2 * int(cli.image_tokens**0.5) * 4

    data, task = load_digits_dataset(max_samples=600, image_size=image_size), digits_task()
    tsm = TaskSpecificModel("test_resnet", num_classes=10, img_size=32)
    rows = [data["train"][i] for i in range(cli.batch * (cli.steps + 1))]

    def fresh(teacher=None, **overrides) -> VITaskTrainer:
        model, processor = build_tiny_vlm(
            "llava",
            hidden_size=cli.hidden,
            num_layers=cli.layers,
            num_heads=cli.heads,
            image_size=image_size,
            image_tokens=cli.image_tokens,
        )
        if cli.vocab > model.get_output_embeddings().weight.shape[0]:
            model.resize_token_embeddings(cli.vocab, mean_resizing=False)  # real-sized lm_head cost
        args = VITaskConfig(
            output_dir=cli.output_dir,
            report_to="none",
            save_strategy="no",
            lora_r=16,
            lora_dropout=0.0,
            use_cpu=device.type == "cpu",
            learning_rate=2e-3,
            per_device_train_batch_size=cli.batch,
            disable_tqdm=True,
            logging_steps=1000,
            **overrides,
        )
        if args.stage == 2:  # timing only: the random connector stands in for a stage-1 one
            model = VITaskModel.from_vlm(wrap_lora(model, args), processor, tsm=tsm)
            model.connector.trained = True
        trainer = VITaskTrainer(
            model=model.to(device),
            args=args,
            processing_class=processor,
            train_dataset=data["train"],
            task=task,
            tsm=tsm,
            teacher=teacher,
        )
        trainer.model.to(device)
        return trainer

    # the frozen teacher: a stage-1 model trained briefly, saved once
    start = time.perf_counter()
    teacher_trainer = fresh(stage=1, max_steps=cli.teacher_steps)
    teacher_trainer.train()
    teacher_dir = f"{cli.output_dir}/teacher"
    teacher_trainer.save_model(teacher_dir)
    print(f"teacher: {cli.teacher_steps} stage-1 steps in {time.perf_counter() - start:.0f} s")

    def to_device(batch):
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    runs = {}
    for name, overrides in VARIANTS.items():
        trainer = fresh(
            teacher_dir if "frozen" in name else None, **(overrides or VARIANTS["vanilla (VITaskTrainer)"])
        )
        batches = [
            to_device(trainer.data_collator(rows[i * cli.batch : (i + 1) * cli.batch]))
            for i in range(cli.steps + 1)
        ]
        optimizer = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=1e-4)
        if name.endswith("cached"):  # the cache is filled in the first epoch; time a later one
            with torch.no_grad():
                for batch in batches:
                    trainer.compute_loss(trainer.model, dict(batch))
        runs[name] = (trainer, optimizer, batches, [], [])
    for step in range(cli.steps + 1):
        for name, (trainer, optimizer, batches, times, memory) in runs.items():
            base = reset_peak(device)
            seconds = train_step(trainer, optimizer, batches[step], device, sft=VARIANTS[name] is None)
            if step:  # the first step warms up kernels and allocators
                times.append(seconds)
                memory.append(peak_memory_mb(device) - (base if device.type == "cpu" else 0))
    if device.type != "cuda":
        for name, (trainer, _, batches, _, memory) in runs.items():
            memory[:] = [saved_for_backward_mb(trainer, batches[0], VARIANTS[name] is None)]
    results = {name: (statistics.median(t), max(m)) for name, (_, _, _, t, m) in runs.items()}
    sft = results[SFT][0]
    sequence = runs[SFT][2][0]["input_ids"].shape[1]
    print(
        f"\ndevice {device}, tiny LLaVA hidden {cli.hidden} x {cli.layers} layers, vocab {cli.vocab}, batch "
        f"{cli.batch}, {sequence}-token sequences ({cli.image_tokens} image tokens), median of {cli.steps} steps"
    )
    vanilla = results["vanilla (VITaskTrainer)"][0]
    memory_title = "peak MB" if device.type == "cuda" else "saved for backward MB"
    print(
        f"| {'variant':<36} | {'step (ms)':>9} | {'vs SFT':>7} | {'vs vanilla':>10} | {memory_title:>8} |\n|---|---|---|---|---|"
    )
    for name, (median, memory) in results.items():
        print(
            f"| {name:<36} | {median * 1e3:>9.1f} | {median / sft:>6.2f}x | {median / vanilla:>9.2f}x | {memory:>8.1f} |"
        )

    # collator throughput vs training step rate
    collator = runs[SFT][0].data_collator
    plain_collator = VITaskCollator(collator.processor, task, tsm=tsm, with_negatives=True)
    start = time.perf_counter()
    for i in range(cli.steps):
        plain_collator(rows[i * cli.batch : (i + 1) * cli.batch])
    collate = (time.perf_counter() - start) / cli.steps
    stage2 = results["stage 2 (EP + RDA + CRT)"][0]
    print(
        f"\ncollator (stage 2, negatives + TSM pixels): {collate * 1e3:.1f} ms/batch, {stage2 / collate:.1f}x the "
        f"stage-2 step rate ({sft / collate:.1f}x the SFT step rate)"
    )

    # what a top-k teacher cache would change: L_RDA from the top-k vs the full teacher distribution
    full = runs["RDA frozen teacher, uncached"][0]
    diffs: dict[int, list[float]] = {k: [] for k in (64, 256, 1024) if k < cli.vocab}
    with torch.no_grad():
        for batch in runs["RDA frozen teacher, uncached"][2]:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
            student = full.model(**inputs).response_logits
            teacher = full._frozen_teacher_logits(full.model, inputs, batch["tsm_pixel_values"])
            exact = rda_kl(student, teacher).mean().item()
            for k in diffs:
                values, index = torch.log_softmax(teacher.float(), dim=-1).topk(k, dim=-1)
                diffs[k].append(abs(rda_kl_cached(student, values, index).mean().item() - exact) / exact)
    print(
        "teacher cache, top-k instead of the full distribution: L_RDA differs by "
        + ", ".join(f"{statistics.fmean(d) * 100:.2f}% (k={k})" for k, d in diffs.items())
        + f" of {cli.vocab} tokens"
    )

    # option likelihood vs generate-and-parse, on the trained teacher without its TSM
    model, processor = teacher_trainer.model.eval(), teacher_trainer.processing_class
    images = data["test"]["image"][: cli.eval_images]
    labels = data["test"]["label"][: cli.eval_images]
    longest = max(len(processor.tokenizer(task.response(c))["input_ids"]) for c in range(task.num_classes))
    timings = {}
    for name, fn in {
        "likelihood, shared prompt": lambda: (
            score_options(model, processor, task, images, batch_size=8).argmax(1).tolist()
        ),
        "likelihood, full sequences": lambda: (
            score_options(model, processor, task, images, batch_size=8, shared_prompt=False)
            .argmax(1)
            .tolist()
        ),
        "generate-and-parse": lambda: [
            task.parse(t)
            for t in generate_answers(
                model, processor, task, images, batch_size=8, max_new_tokens=longest + 1
            )
        ],
        "generate-and-parse, 16 new tokens": lambda: [
            task.parse(t)
            for t in generate_answers(model, processor, task, images, batch_size=8, max_new_tokens=16)
        ],
    }.items():
        fn()  # warm-up
        start = time.perf_counter()
        predictions = fn()
        timings[name] = time.perf_counter() - start
        accuracy = statistics.fmean(p == y for p, y in zip(predictions, labels))
        print(f"evaluation of {len(images)} images, {name}: {timings[name]:.3f} s, accuracy {accuracy:.3f}")
    start = time.perf_counter()  # the bound: the prompt prefill, which both methods pay
    with torch.no_grad():
        for i in range(0, len(images), 8):
            prompts = build_prompts(processor, task, images[i : i + 8])
            model.vlm(**{k: v.to(device) for k, v in prompts.items()}, logits_to_keep=1)
    prefill = time.perf_counter() - start
    print(
        f"likelihood (shared prompt) is {timings['generate-and-parse'] / timings['likelihood, shared prompt']:.2f}x "
        f"faster than generate-and-parse ({longest + 1} new tokens), "
        f"{timings['likelihood, full sequences'] / timings['likelihood, shared prompt']:.1f}x faster than full-sequence "
        f"scoring; the prompt prefill alone takes {prefill:.3f} s"
    )


if __name__ == "__main__":
    main()
