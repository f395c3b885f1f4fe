"""Step-time benchmark: what a VITask training step costs next to a plain SFT step, in one run.

    python benchmarks/bench_step.py --threads 1        # CPU: a tiny-but-not-trivial LLaVA, ~5 minutes
    python benchmarks/bench_step.py --gradient-checkpointing          # every variant with checkpointing on
    python benchmarks/bench_step.py --vocab 151936 --no-eval          # a Qwen2-VL-sized vocabulary
    python benchmarks/bench_step.py --hidden 2048 --layers 16 --image-tokens 576 --vocab 32064 --batch 8   # GPU
    python benchmarks/bench_step.py --json benchmarks/results/step.json   # every figure, for the docs tables

Every variant trains the same model shape on the same batches (same batch size, same sequence
length); variants take turns step by step, so drift in machine load hits them all alike. The
script prints the median step time (forward + backward + optimizer step) and its ratio to three
baselines: the plain SFT step (one forward of the VLM with ``labels``, transformers' loss over
full logits), a real ``trl.SFTTrainer`` step (trl's own loss, with its fused LM head, and the
token metrics it logs) and this package's vanilla step (response-only logits). Memory: on CUDA
the peak allocated; on CPU, which has no allocator statistics, the activations autograd saves
for backward (the part that differs between variants) and the peak resident memory one step adds
to the process (measured in a forked child, so variants do not see each other's peaks). It then
measures the collator's batch rate against the training step rate, option-likelihood evaluation
against generate-and-parse on a trained model, and what the top-k teacher cache changes in L_RDA.
See docs/performance.md; ``benchmarks/performance_tables.py`` renders its tables from ``--json``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from hf_vitask import (
    InstructionFreeConfig,
    InstructionFreeTrainer,
    TaskSpecificModel,
    VITaskCollator,
    VITaskConfig,
    VITaskTrainer,
)
from hf_vitask.data.collator import build_prompts
from hf_vitask.data.digits import add_digit_descriptions, digits_task, load_digits_dataset
from hf_vitask.evaluation import generate_answers, score_options
from hf_vitask.losses import rda_kl, rda_kl_cached
from hf_vitask.models.loading import lora_config
from hf_vitask.models.modeling import VITaskModel
from hf_vitask.models.tiny import build_tiny_vlm
from hf_vitask.trainers.base import wrap_lora

SFT = "plain SFT step (HF loss)"
TRL = "trl SFTTrainer step"
VANILLA = "vanilla (VITaskTrainer)"
VARIANTS = {  # name: VITaskConfig overrides (None: a baseline, not a VITaskTrainer step)
    SFT: None,
    TRL: None,
    VANILLA: dict(ep_weight=0.0, rda_weight=0.0, crt_weight=0.0),
    "stage 1, naive (3 passes: none)": dict(stage=1, pass_fusion="none"),
    "stage 1 (EP + RDA)": dict(stage=1),
    "stage 2, naive (pass_fusion none)": dict(stage=2, pass_fusion="none"),
    "stage 2, passes stacked (batch)": dict(stage=2, pass_fusion="batch"),
    "stage 2 (EP + RDA + CRT)": dict(stage=2),
    "vanilla, logits loss (fused_loss_head off)": dict(
        ep_weight=0.0, rda_weight=0.0, crt_weight=0.0, fused_loss_head=False
    ),
    "stage 2, logits loss (fused_loss_head off)": dict(stage=2, fused_loss_head=False),
    "RDA frozen teacher, uncached": dict(
        stage=1, ep_weight=0.0, rda_teacher="frozen", rda_teacher_cache=False
    ),
    "RDA frozen teacher, cached": dict(stage=1, ep_weight=0.0, rda_teacher="frozen"),
    "stage 2, frozen teacher cached": dict(stage=2, rda_teacher="frozen"),
}
STAGE2 = "stage 2 (EP + RDA + CRT)"
#: what every run times; --variants adds to these
REQUIRED = (SFT, TRL, VANILLA, STAGE2)
SFT_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class Run:
    """One variant: how it computes its loss, its optimizer, its batches and what was measured."""

    def __init__(self, name: str, trainer, batches: list[dict], kind: str):
        self.name, self.trainer, self.batches, self.kind = name, trainer, batches, kind
        self.optimizer = torch.optim.AdamW(
            [p for p in trainer.model.parameters() if p.requires_grad], lr=1e-4
        )
        self.times: list[float] = []
        self.peaks: list[float] = []

    def loss(self, batch: dict) -> torch.Tensor:
        if self.kind == "vitask":
            return self.trainer.compute_loss(self.trainer.model, dict(batch))
        inputs = {k: batch[k] for k in SFT_KEYS if k in batch}
        if self.kind == "trl":  # trl's loss, fused LM head and logged token metrics included
            return self.trainer.compute_loss(self.trainer.model, inputs)
        return self.trainer.model.vlm(**inputs).loss

    def step(self, batch: dict, device: torch.device) -> float:
        """Forward + backward + optimizer step, as Trainer.training_step does it; seconds."""
        self.trainer.model.train()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.loss(batch).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def saved_for_backward_mb(self, batch: dict) -> float:
        """Activation memory of one step: the distinct storages autograd keeps for backward, weights
        and buffers left out (they exist whether or not a step runs)."""
        storages: dict[int, int] = {}
        model = self.trainer.model
        weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        self.trainer.model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = self.loss(batch)
        loss.backward()
        self.trainer.model.zero_grad(set_to_none=True)
        return sum(storages.values()) / 2**20

    def gflop(self, batch: dict) -> float:
        """Floating-point work of one forward + backward, counted by torch's ``FlopCounterMode``
        (matrix products and attention; elementwise work such as a softmax is not counted): the
        floor a variant's time cannot go below at a given machine throughput."""
        from torch.utils.flop_counter import FlopCounterMode

        _count_cpu_attention()
        self.trainer.model.train()
        with FlopCounterMode(display=False) as counter:
            self.loss(batch).backward()
        self.trainer.model.zero_grad(set_to_none=True)
        return counter.get_total_flops() / 1e9

    def step_rss_mb(self, batch: dict, device: torch.device) -> float:
        """Peak resident memory one training step adds to the process (CPU), in a forked child: every
        weight, optimizer state and batch tensor is touched first, so only what the step allocates
        (activations, gradients, temporaries) counts, and no variant sees another's peak."""
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: one thread (OpenMP pools do not survive a fork), one step, report, exit
            try:
                os.close(read)
                torch.set_num_threads(1)
                with torch.no_grad():
                    tensors = [p for p in self.trainer.model.parameters()]
                    tensors += [
                        t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)
                    ]
                    tensors += [v for v in batch.values() if torch.is_tensor(v)]
                    for t in tensors:
                        if t.numel():
                            t.sum() if t.is_floating_point() else t.long().sum()
                gc.collect()
                start = _rss_mb()
                self.step(batch, device)
                os.write(write, f"{peak_memory_mb(device) - start:.3f}".encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            value = pipe.read()
        os.waitpid(pid, 0)
        return float(value) if value else float("nan")


def _count_cpu_attention() -> None:
    """``FlopCounterMode`` knows the CUDA attention kernels; count the CPU one with the same formulas."""
    from torch.utils import flop_counter

    forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if forward in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(forward)
    def _forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)  # shapes

    @flop_counter.register_flop_formula(backward)
    def _backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing with input grads on, on a VITaskModel or a peft model."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    parser.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing on")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help=f"variants to run besides {', '.join(REQUIRED)} (default: all); names as in the table",
    )
    parser.add_argument(
        "--no-eval", action="store_true", help="skip the collator, teacher-cache and evaluation parts"
    )
    parser.add_argument(
        "--instruction-free",
        action="store_true",
        help="also time an instruction-free step (proxy, digit descriptions) with and without the fused loss head",
    )
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--output-dir", default="/tmp/bench-vitask")
    cli = parser.parse_args(argv)
    unknown = [v for v in cli.variants or [] if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    return cli


def main(argv: list[str] | None = None) -> dict:
    cli = parse_args(argv)
    if cli.threads:
        torch.set_num_threads(cli.threads)
    device = torch.device(cli.device)
    torch.manual_seed(0)
    image_size = 2 * int(cli.image_tokens**0.5) * 4
    names = [n for n in VARIANTS if cli.variants is None or n in REQUIRED or n in cli.variants]
    frozen = any("frozen" in n for n in names)

    data, task = load_digits_dataset(max_samples=600, image_size=image_size), digits_task()
    tsm = TaskSpecificModel("test_resnet", num_classes=10, img_size=32)
    rows = [data["train"][i] for i in range(cli.batch * (cli.steps + 1))]

    def vlm():
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
        return model, processor

    def config(**overrides) -> VITaskConfig:
        return VITaskConfig(
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

    def fresh(teacher=None, checkpointing=False, **overrides) -> VITaskTrainer:
        model, processor = vlm()
        args = config(**overrides)
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
        if checkpointing:
            enable_checkpointing(trainer.model)
        return trainer

    def trl_trainer():
        """trl's SFTTrainer on the same model shape with the same LoRA, as a user would set it up."""
        from trl import SFTConfig, SFTTrainer

        model, processor = vlm()
        args = config()
        peft = lora_config(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
        sft_args = SFTConfig(
            output_dir=cli.output_dir,
            report_to="none",
            use_cpu=device.type == "cpu",
            bf16=False,
            activation_checkpointing=False,  # turned on below, the same way for every variant
            remove_unused_columns=False,
            dataset_kwargs={"skip_prepare_dataset": True},
            max_length=None,
            per_device_train_batch_size=cli.batch,
            learning_rate=args.learning_rate,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(
            model=model.to(device),
            args=sft_args,
            train_dataset=data["train"],
            processing_class=processor,
            peft_config=peft,
        )
        trainer.model.to(device)
        if cli.gradient_checkpointing:
            enable_checkpointing(trainer.model)
        return trainer

    teacher_trainer, teacher_dir = None, None
    if frozen or not cli.no_eval:  # the frozen teacher: a stage-1 model trained briefly, saved once
        start = time.perf_counter()
        teacher_trainer = fresh(stage=1, max_steps=cli.teacher_steps)
        teacher_trainer.train()
        teacher_dir = f"{cli.output_dir}/teacher"
        teacher_trainer.save_model(teacher_dir)
        print(f"teacher: {cli.teacher_steps} stage-1 steps in {time.perf_counter() - start:.0f} s")

    def to_device(batch):
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    runs: dict[str, Run] = {}
    for name in names:
        overrides = VARIANTS[name] or VARIANTS[VANILLA]
        vitask = fresh(teacher_dir if "frozen" in name else None, cli.gradient_checkpointing, **overrides)
        batches = [
            to_device(vitask.data_collator(rows[i * cli.batch : (i + 1) * cli.batch]))
            for i in range(cli.steps + 1)
        ]
        if name == TRL:
            runs[name] = Run(name, trl_trainer(), batches, "trl")
            continue
        runs[name] = Run(name, vitask, batches, "sft" if name == SFT else "vitask")
        if name.endswith("cached"):  # the cache is filled in the first epoch; time a later one
            with torch.no_grad():
                for batch in batches:
                    vitask.compute_loss(vitask.model, dict(batch))
    for step in range(cli.steps + 1):
        for run in runs.values():
            reset_peak(device)
            seconds = run.step(run.batches[step], device)
            if step:  # the first step warms up kernels and allocators
                run.times.append(seconds)
                if device.type == "cuda":
                    run.peaks.append(peak_memory_mb(device))

    sft, trl_step, vanilla = (statistics.median(runs[n].times) for n in (SFT, TRL, VANILLA))
    variants = []
    for run in runs.values():
        median = statistics.median(run.times)
        row = {
            "name": run.name,
            "step_ms": median * 1e3,
            "vs_sft": median / sft,
            "vs_trl": median / trl_step,
            "vs_vanilla": median / vanilla,
        }
        if device.type == "cuda":
            row["peak_allocated_mb"] = max(run.peaks)
        else:
            row["saved_for_backward_mb"] = run.saved_for_backward_mb(run.batches[0])
            row["step_rss_mb"] = run.step_rss_mb(run.batches[0], device)
        row["gflop"] = run.gflop(run.batches[0])
        variants.append(row)
    vanilla_gflop = next(r["gflop"] for r in variants if r["name"] == VANILLA)
    for row in variants:  # the work ratio next to the time ratio: how close a variant is to its floor
        row["gflop_vs_vanilla"] = row["gflop"] / vanilla_gflop
    sequence = runs[SFT].batches[0]["input_ids"].shape[1]
    report = {
        "command": "python benchmarks/bench_step.py"
        + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:])),
        "config": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "hidden": cli.hidden,
            "layers": cli.layers,
            "heads": cli.heads,
            "vocab": cli.vocab,
            "batch": cli.batch,
            "image_tokens": cli.image_tokens,
            "sequence_tokens": int(sequence),
            "steps": cli.steps,
            "gradient_checkpointing": cli.gradient_checkpointing,
            "date": datetime.date.today().isoformat(),
            "versions": {m.__name__: m.__version__ for m in _versions()},
        },
        "variants": variants,
    }
    _print_steps(report)
    if cli.instruction_free:
        report["instruction_free"] = _instruction_free(vlm, config, data, device, cli)

    if not cli.no_eval:
        report.update(_collator_rate(runs, rows, task, tsm, cli))
        report.update(_topk_error(fresh, teacher_dir, rows, cli))
        report.update(_evaluation(teacher_trainer, data, task, device, cli))
    if cli.json:
        Path(cli.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cli.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {cli.json}")
    return report


def _versions():
    import peft
    import transformers
    import trl

    return (torch, transformers, trl, peft)


def _print_steps(report: dict) -> None:
    c = report["config"]
    print(
        f"\ndevice {c['device']}, tiny LLaVA hidden {c['hidden']} x {c['layers']} layers, vocab {c['vocab']}, "
        f"batch {c['batch']}, {c['sequence_tokens']}-token sequences ({c['image_tokens']} image tokens), "
        f"gradient checkpointing {'on' if c['gradient_checkpointing'] else 'off'}, median of {c['steps']} steps"
    )
    memory = [
        k for k in ("peak_allocated_mb", "saved_for_backward_mb", "step_rss_mb") if k in report["variants"][0]
    ]
    head = ["variant", "step (ms)", "vs SFT", "vs trl", "vs vanilla", *memory, "GFLOP", "GFLOP vs vanilla"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in report["variants"]:
        cells = [row["name"], f"{row['step_ms']:.1f}"]
        cells += [f"{row[k]:.2f}x" for k in ("vs_sft", "vs_trl", "vs_vanilla")]
        cells += [f"{row[k]:.1f}" for k in memory]
        cells += [f"{row['gflop']:.1f}", f"{row['gflop_vs_vanilla']:.2f}x"]
        print("| " + " | ".join(cells) + " |")


def _instruction_free(vlm, config, data, device, cli) -> dict:
    """An InstructionFreeTrainer step (proxy instruction, digit descriptions as responses) with the
    output layer inside the loss and on the logits path, on the same batches, taking turns."""
    described = add_digit_descriptions(data)["train"]
    rows = [described[i] for i in range(cli.batch * (cli.steps + 1))]
    runs, base = {}, config()
    for name, fused in (
        ("instruction-free", True),
        ("instruction-free, logits loss (fused_loss_head off)", False),
    ):
        model, processor = vlm()
        args = InstructionFreeConfig(
            **{
                k: getattr(base, k)
                for k in ("output_dir", "report_to", "save_strategy", "lora_r", "lora_dropout")
            },
            use_cpu=device.type == "cpu",
            per_device_train_batch_size=cli.batch,
            disable_tqdm=True,
            fused_loss_head=fused,
        )
        trainer = InstructionFreeTrainer(
            model=model.to(device), args=args, processing_class=processor, train_dataset=described
        )
        trainer.model.to(device)
        if cli.gradient_checkpointing:
            enable_checkpointing(trainer.model)
        if not runs:  # collated once (responses shuffled once): both variants step on these batches
            batches = [
                {
                    k: (v.to(device) if torch.is_tensor(v) else v)
                    for k, v in trainer.data_collator(rows[i * cli.batch : (i + 1) * cli.batch]).items()
                }
                for i in range(cli.steps + 1)
            ]
        runs[name] = Run(name, trainer, batches, "vitask")
    for step in range(cli.steps + 1):
        for run in runs.values():
            seconds = run.step(run.batches[step], device)
            if step:
                run.times.append(seconds)
    fused = statistics.median(runs["instruction-free"].times)
    batch = runs["instruction-free"].batches[0]
    responses = int((batch["labels"] != -100).sum())
    rows_out = []
    for run in runs.values():
        median = statistics.median(run.times)
        row = {"name": run.name, "step_ms": median * 1e3, "vs_fused": median / fused}
        if device.type == "cpu":
            row["saved_for_backward_mb"] = run.saved_for_backward_mb(run.batches[0])
            row["step_rss_mb"] = run.step_rss_mb(run.batches[0], device)
        row["gflop"] = run.gflop(run.batches[0])
        rows_out.append(row)
    print(f"\ninstruction-free step, {responses} description tokens in a batch of {cli.batch}")
    print("| " + " | ".join(["instruction-free step", *list(rows_out[0])[1:]]) + " |")
    for row in rows_out:
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return {"response_tokens": responses, "variants": rows_out}


def _collator_rate(runs: dict[str, Run], rows, task, tsm, cli) -> dict:
    """Collator throughput against the training step rates."""
    processor = runs[SFT].trainer.processing_class
    collator = VITaskCollator(processor, task, tsm=tsm, with_negatives=True)
    start = time.perf_counter()
    for i in range(cli.steps):
        collator(rows[i * cli.batch : (i + 1) * cli.batch])
    collate = (time.perf_counter() - start) / cli.steps
    stage2, sft = (statistics.median(runs[n].times) for n in (STAGE2, SFT))
    print(
        f"\ncollator (stage 2, negatives + TSM pixels): {collate * 1e3:.1f} ms/batch, {stage2 / collate:.1f}x the "
        f"stage-2 step rate ({sft / collate:.1f}x the SFT step rate)"
    )
    return {
        "collator": {
            "ms_per_batch": collate * 1e3,
            "vs_stage2_step": stage2 / collate,
            "vs_sft_step": sft / collate,
        }
    }


def _topk_error(fresh, teacher_dir, rows, cli) -> dict:
    """What a top-k teacher cache changes: L_RDA from the top-k vs the full teacher distribution."""
    full = fresh(teacher_dir, stage=1, ep_weight=0.0, rda_teacher="frozen", rda_teacher_cache=False)
    device = full.model.device
    diffs: dict[int, list[float]] = {k: [] for k in (64, 256, 1024) if k < cli.vocab}
    with torch.no_grad():
        for i in range(cli.steps + 1):
            batch = full.data_collator(rows[i * cli.batch : (i + 1) * cli.batch])
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
            student = full.model(**inputs).response_logits
            teacher = full._frozen_teacher_logits(full.model, inputs, batch["tsm_pixel_values"])
            exact = rda_kl(student, teacher).mean().item()
            for k in diffs:
                values, index = torch.log_softmax(teacher.float(), dim=-1).topk(k, dim=-1)
                diffs[k].append(abs(rda_kl_cached(student, values, index).mean().item() - exact) / exact)
    errors = {str(k): statistics.fmean(d) for k, d in diffs.items()}
    print(
        "teacher cache, top-k instead of the full distribution: L_RDA differs by "
        + ", ".join(f"{e * 100:.2f}% (k={k})" for k, e in errors.items())
        + f" of {cli.vocab} tokens"
    )
    return {"teacher_topk_relative_error": errors}


def _evaluation(teacher_trainer, data, task, device, cli) -> dict:
    """Option likelihood vs generate-and-parse, on the trained teacher without its TSM."""
    model, processor = teacher_trainer.model.eval(), teacher_trainer.processing_class
    images = data["test"]["image"][: cli.eval_images]
    labels = data["test"]["label"][: cli.eval_images]
    longest = max(len(processor.tokenizer(task.response(c))["input_ids"]) for c in range(task.num_classes))

    def likelihood(**kw):
        return score_options(model, processor, task, images, batch_size=8, **kw).argmax(1).tolist()

    def generate(new_tokens):
        answers = generate_answers(model, processor, task, images, batch_size=8, max_new_tokens=new_tokens)
        return [task.parse(t) for t in answers]

    methods = {
        "likelihood, shared prompt": likelihood,
        "likelihood, full sequences": lambda: likelihood(shared_prompt=False),
        "generate-and-parse": lambda: generate(longest + 1),
        "generate-and-parse, 16 new tokens": lambda: generate(16),
    }

    def timed(fn):
        """Median seconds of three runs after a warm-up (one run is at the mercy of machine noise)."""
        fn()
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            out = fn()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds), out

    results = {}
    for name, fn in methods.items():
        seconds, predictions = timed(fn)
        accuracy = statistics.fmean(p == y for p, y in zip(predictions, labels))
        results[name] = {"seconds": seconds, "accuracy": accuracy}
        print(f"evaluation of {len(images)} images, {name}: {seconds:.3f} s, accuracy {accuracy:.3f}")

    def prefill_only():  # the bound: the prompt prefill, which both methods pay
        with torch.no_grad():
            for i in range(0, len(images), 8):
                prompts = build_prompts(processor, task, images[i : i + 8])
                model.vlm(**{k: v.to(device) for k, v in prompts.items()}, logits_to_keep=1)

    prefill, _ = timed(prefill_only)
    shared = results["likelihood, shared prompt"]["seconds"]
    print(
        f"likelihood (shared prompt) is {results['generate-and-parse']['seconds'] / shared:.2f}x "
        f"faster than generate-and-parse ({longest + 1} new tokens), "
        f"{results['likelihood, full sequences']['seconds'] / shared:.1f}x faster than full-sequence "
        f"scoring, {shared / prefill:.2f}x the prompt prefill alone ({prefill:.3f} s)"
    )
    return {
        "evaluation": {
            "images": len(images),
            "new_tokens": longest + 1,
            "prefill_seconds": prefill,
            "methods": results,
        }
    }


if __name__ == "__main__":
    main()
