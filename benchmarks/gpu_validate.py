"""GPU validation in one command: VITask training on real-shaped VLMs, QLoRA and bf16 LoRA, with figures.

The models have the shapes of the production checkpoints (Qwen2-VL-2B, InternVL2-2B and, in 4-bit,
Llama-3.2-11B-Vision) but random weights, built from configs: nothing comes from the Hub. Each one
is saved to a local folder once and loaded back through ``load_vlm`` (in bf16, and in 4-bit NF4
through bitsandbytes), the way a user's checkpoint is. The tokenizer and processor are the tiny
offline ones of ``hf_vitask.models.tiny``, configured for the family's native image handling
(448x448 images: 256 image tokens for Qwen2-VL and InternVL, four 560 px tiles read by
cross-attention for Mllama); the model keeps its real vocabulary, so the output layer costs what it
costs in production.

For each model and each of QLoRA / bf16 LoRA it trains vanilla instruction tuning (EP, RDA and CRT
weights 0), VITask stage 1 (EP + RDA) and stage 2 (+ CRT, continuing from the stage-1 model) with
``VITaskTrainer.train()``, gradient checkpointing on, and reports per run:

* peak memory: ``torch.cuda.max_memory_allocated`` (CPU: the process's peak RSS, which only grows);
* median step time (forward + backward + optimizer step, first step left out), samples/s, and the
  step time over the same model's vanilla step time;
* MFU = (6 * N_lm * T_lm + 2 * N_vis * T_vis) / (step time * peak). N_lm: the decoder's parameters
  without embeddings and output layer; T_lm: tokens into the decoder per step, counted at its input, so
  they are what the step's pass mode runs (VITask's shared image prefix once, then the plain, exemplar
  and negative continuations); N_vis / T_vis: the vision tower's and projector's parameters and the
  patches into the tower per step. 6 = 2 (forward) x 3: with frozen base weights the backward computes
  input gradients only (one forward's worth) and gradient checkpointing runs the forward again; the
  frozen vision tower runs forward only (2). The TSM and attention over the sequence are not counted.
  Peak: ``--peak-tflops``, by default 989 (H100/H200 dense bf16);
* that the vision tower, projector and ``lm_head`` stayed unquantised (no bitsandbytes ``Linear4bit``
  or ``Params4bit`` inside them) while the decoder's linears are 4-bit (QLoRA);
* that the loss fell: the mean of the last 5 steps' losses below the mean of the first 5.

A run that fails (out of memory, say) is reported as failed and the others go on; ``--budget-s``
skips the runs that would not finish in time (reported as skipped) and stops a run that passes it.
The exit status is 1 when a run failed or a check did not hold.

How to run
----------

On a CUDA machine without internet (the image has torch and transformers; trl, bitsandbytes,
datasets, evaluate, peft and what they need travel as wheels in ``.whl/``, fetched beforehand on a
machine with a package index by ``bash benchmarks/fetch_gpu_wheels.sh``)::

    bash benchmarks/gpu_validate.sh                     # ~8 minutes on one H100/H200, JSON to $OUT
    bash benchmarks/gpu_validate.sh --json /tmp/gpu.json --steps 30 --batch 8 --budget-s 420
    bash benchmarks/gpu_validate.sh --families qwen2_vl --modes qlora

On a laptop, the same code path on the tiny models (CPU, float32, QLoRA through bitsandbytes' CPU
backend)::

    python benchmarks/gpu_validate.py --tiny --steps 6 --json /tmp/tiny.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

# everything is built here: never wait on a network that is not there
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_vitask import TaskSpec, TaskSpecificModel, VITaskConfig, VITaskTrainer, load_vlm  # noqa: E402
from hf_vitask.models.families import get_family  # noqa: E402
from hf_vitask.models.tiny import build_tiny_vlm, save_tiny_vlm  # noqa: E402

VARIANTS = {  # name: VITaskConfig overrides
    "vanilla": dict(ep_weight=0.0, rda_weight=0.0, crt_weight=0.0),
    "stage1": dict(stage=1),
    "stage2": dict(stage=2),
}
MODES = ("qlora", "lora")  # 4-bit NF4 base + LoRA; bf16 base + LoRA (float32 on CPU)
TASK = TaskSpec(class_names=["pneumonia", "normal", "effusion", "nodule"], modality="chest X-ray")


@dataclass
class Shape:
    """A production checkpoint's shape: config overrides on top of the tiny family config (whose token ids
    and processor are kept), and how the tiny processor is sized to the checkpoint's image handling."""

    name: str
    text: dict
    vision: dict
    top: dict = field(default_factory=dict)
    processor: dict = field(default_factory=dict)  # build_tiny_vlm(image_size=..., image_tokens=...)
    modes: tuple[str, ...] = MODES


def _mllama_aspect_ratios(max_tiles: int) -> list[list[int]]:
    from transformers.models.mllama.image_processing_mllama import get_all_supported_aspect_ratios

    return [list(r) for r in get_all_supported_aspect_ratios(max_tiles)]


SHAPES = {
    "qwen2_vl": Shape(
        name="Qwen2-VL-2B",
        text=dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14),
        top=dict(tie_word_embeddings=True),
        processor=dict(image_size=448, image_tokens=256),  # 14 px patches, 2x2 merge: 256 tokens
    ),
    "internvl": Shape(
        name="InternVL2-2B",  # InternViT-300M + an InternLM2-1.8B-sized decoder (as a Qwen2 one)
        text=dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=8,
            vocab_size=92553,
            max_position_embeddings=32768,
        ),
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=448,
            patch_size=14,
        ),
        top=dict(tie_word_embeddings=False),
        processor=dict(image_size=896, image_tokens=1024),  # 448 px tiles of 256 tokens; 448 px image: 1 tile
    ),
    "mllama": Shape(
        name="Llama-3.2-11B-Vision",
        text=dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=40,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
            max_position_embeddings=131072,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
        vision=dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_global_layers=8,
            attention_heads=16,
            vision_output_dim=7680,
            image_size=560,
            patch_size=14,
            max_num_tiles=4,
            intermediate_layers_indices=[3, 7, 15, 23, 30],
            supported_aspect_ratios=_mllama_aspect_ratios(4),
        ),
        processor=dict(image_size=560, image_tokens=1600, max_image_tiles=4),
        modes=("qlora",),  # 10.7B: QLoRA is how it is fine-tuned on one GPU
    ),
}
TINY_FAMILIES = ("llava", "qwen2_vl", "internvl", "mllama")

# config keys derived from others: rebuilt from the new sizes instead of copied from the tiny config
_DERIVED = ("layer_types", "head_dim", "transformers_version", "architectures", "_name_or_path", "dtype")


def real_config(tiny_config, shape: Shape):
    """The tiny family config (token ids, feature strategy) with the checkpoint's sizes."""
    config = tiny_config.to_dict()
    for part, overrides in (("text_config", shape.text), ("vision_config", shape.vision)):
        kept = {k: v for k, v in config[part].items() if k not in _DERIVED}
        config[part] = {**kept, **overrides}
    config.update(shape.top)
    return type(tiny_config).from_dict(config)


def build_base(family: str, tiny: bool, folder: str, device: torch.device) -> dict:
    """Save a random model of ``family`` (tiny, or real-shaped in bf16) with its processor to ``folder``;
    return its parameter counts (the decoder without embeddings, the vision side), for MFU."""
    if tiny:
        save_tiny_vlm(folder, family)
        model, _ = build_tiny_vlm(family)
    else:
        shape = SHAPES[family]
        sizes = {k: v for k, v in shape.processor.items() if k != "max_image_tiles"}
        tiny_model, processor = build_tiny_vlm(family, **sizes)
        if "max_image_tiles" in shape.processor:
            processor.image_processor.max_image_tiles = shape.processor["max_image_tiles"]
        config = real_config(tiny_model.config, shape)
        with torch.device(device):
            model = type(tiny_model)._from_config(config, dtype=torch.bfloat16)
        if family == "mllama":  # tanh gates start at 0 (text ignores the image); trained ones are not
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                        param.fill_(1.0)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    kept = get_family(model).vision_modules
    vision = sum(
        p.numel() for n, p in model.named_parameters() if under(n, kept) and not under(n, ["lm_head"])
    )
    embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    decoder = total - vision - embeddings.numel() - (0 if head is embeddings else head.numel())
    counts = {"params": total, "decoder_params": decoder, "vision_params": vision}
    del model
    free_memory()
    return counts


def under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def quantisation_layout(model) -> dict:
    """Whether the family's kept modules (vision tower, projector, lm_head) hold no 4-bit layer or weight,
    and how many 4-bit linears the rest (the decoder) has."""
    try:
        from bitsandbytes.nn import Linear4bit, Params4bit
    except Exception:  # no bitsandbytes: nothing can be 4-bit
        Linear4bit = Params4bit = ()
    kept = get_family(model).vision_modules
    kept_4bit = [n for n, m in model.named_modules() if under(n, kept) and isinstance(m, Linear4bit)]
    kept_4bit += [
        n
        for n, p in model.named_parameters()
        if under(n, kept) and (isinstance(p, Params4bit) or not p.dtype.is_floating_point)
    ]
    decoder_4bit = sum(isinstance(m, Linear4bit) for n, m in model.named_modules() if not under(n, kept))
    return {"vision_unquantised": not kept_4bit, "decoder_4bit_linears": decoder_4bit}


def make_rows(n: int, size: int, seed: int = 0) -> list[dict]:
    """Noisy images with a class-coloured square (so CRT negatives differ); labels cycle over the classes."""
    rng = np.random.default_rng(seed)
    colours = np.array([[230, 40, 40], [40, 230, 40], [40, 40, 230], [230, 230, 40]])
    rows = []
    for i in range(n):
        label = i % TASK.num_classes
        pixels = rng.integers(0, 96, (size, size, 3))
        side = size // 2
        y, x = rng.integers(0, size - side + 1, 2)
        pixels[y : y + side, x : x + side] = colours[label]
        rows.append({"image": Image.fromarray(pixels.astype(np.uint8)), "label": label})
    return rows


class TokenCounter:
    """Tokens into the decoder and patches into the vision tower while active: forward pre-hooks on the two
    modules, which run once per pass (gradient checkpointing re-runs the layers inside them, not them). So
    they count what the step's pass mode does: the shared image prefix once, each pass's continuation."""

    def __init__(self, vlm):
        base = vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm
        inner = base.model
        self.decoder = getattr(inner, "language_model", None) or inner.text_model
        self.vision = base.get_submodule(get_family(base).vision_modules[0])
        vision = base.config.vision_config
        patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
        self.patch_values = 3 * patch * patch * getattr(vision, "temporal_patch_size", 1)
        self.lm_tokens = self.vision_tokens = 0

    @staticmethod
    def _input(args, kwargs, names):
        tensors = [a for a in args if torch.is_tensor(a)] + [kwargs.get(n) for n in names]
        return next(t for t in tensors if t is not None)

    def _count_lm(self, module, args, kwargs):
        ids = self._input(args, kwargs, ("inputs_embeds", "input_ids"))
        self.lm_tokens += ids.shape[0] * ids.shape[1]

    def _count_vision(self, module, args, kwargs):
        self.vision_tokens += (
            self._input(args, kwargs, ("pixel_values", "hidden_states")).numel() // self.patch_values
        )

    def __enter__(self):
        self.hooks = [
            self.decoder.register_forward_pre_hook(self._count_lm, with_kwargs=True),
            self.vision.register_forward_pre_hook(self._count_vision, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()


class StepClock(TrainerCallback):
    """Times each optimizer step (the batch is collated before ``on_step_begin``); stops at the deadline."""

    def __init__(self, deadline: float):
        self.deadline, self.times, self.stopped = deadline, [], False

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self.start)
        if time.perf_counter() > self.deadline and state.global_step < state.max_steps:
            control.should_training_stop = self.stopped = True


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_run(model, tsm, processor, rows, cli, variant: str, counts: dict, deadline: float, out: str):
    """One ``VITaskTrainer.train()``; returns the trainer (its model feeds stage 2) and the run's figures."""
    on_gpu = torch.cuda.is_available()
    args = VITaskConfig(
        output_dir=out,
        report_to="none",
        save_strategy="no",
        max_steps=cli.steps,
        per_device_train_batch_size=cli.batch,
        learning_rate=cli.lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        disable_tqdm=True,
        gradient_checkpointing=True,
        bf16=cli.bf16,
        use_cpu=not on_gpu,
        # rows in order: the labels cycle, so every batch mixes the classes alike (each row has a CRT negative in
        # it, and the losses of the first and the last steps compare like with like)
        train_sampling_strategy="sequential",
        crt_negatives="batch",
        seed=0,
        **VARIANTS[variant],
    )
    clock = StepClock(deadline)
    trainer = VITaskTrainer(
        model=model,
        args=args,
        processing_class=processor,
        train_dataset=rows,
        task=TASK,
        tsm=None if variant == "vanilla" else tsm,
        callbacks=[clock],
    )
    trainer.remove_callback(PrinterCallback)  # the step losses go to the JSON; the summary line says the rest
    first = trainer.data_collator(rows[: cli.batch])  # sequential sampling: the first batch
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with TokenCounter(trainer.model.vlm) as counter:
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    timed = clock.times[1:] or clock.times  # the first step warms kernels and allocators up
    step_s = statistics.median(timed)
    lm_tokens = counter.lm_tokens / len(clock.times)
    vis_tokens = counter.vision_tokens / len(clock.times)
    flops = 6 * counts["decoder_params"] * lm_tokens + 2 * counts["vision_params"] * vis_tokens
    k = min(5, len(losses) // 2) or 1
    figures = {
        "status": "ok",
        "steps_done": len(clock.times),
        "stopped_at_deadline": clock.stopped,
        "sequence_length": first["input_ids"].shape[1],
        "lm_tokens_per_step": lm_tokens,
        "vision_tokens_per_step": vis_tokens,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "peak_memory_mib": memory_mib(),
        "step_s_median": step_s,
        "step_s_all": clock.times,
        "samples_per_s": cli.batch / step_s,
        "tflop_per_step": flops / 1e12,
        "mfu": flops / (step_s * cli.peak_tflops * 1e12),
        "losses": losses,
        "loss_first": statistics.fmean(losses[:k]),
        "loss_last": statistics.fmean(losses[-k:]),
    }
    figures["loss_fell"] = figures["loss_last"] < figures["loss_first"]
    return trainer, figures


def evaluation_run(model, processor, rows, images: int) -> dict:
    """Seconds to classify ``images`` images with the trained stage-2 model (no TSM): option likelihood
    (every class answer packed after one cached prompt), generate-and-parse (greedy, as many new
    tokens as the longest answer + 1) and, the bound both pay, the prompt prefill alone."""
    from hf_vitask.data.collator import build_prompts
    from hf_vitask.evaluation import generate_answers, score_options

    chosen = [row["image"] for row in rows[:images]]
    longest = max(len(processor.tokenizer(TASK.response(c))["input_ids"]) for c in range(TASK.num_classes))
    device = model.get_input_embeddings().weight.device

    def prefill():
        with torch.no_grad():
            for i in range(0, len(chosen), 8):
                prompts = build_prompts(processor, TASK, chosen[i : i + 8])
                model.vlm(**{k: v.to(device) for k, v in prompts.items()}, logits_to_keep=1)

    methods = {
        "likelihood_s": lambda: score_options(model, processor, TASK, chosen, batch_size=8),
        "generate_s": lambda: generate_answers(model, processor, TASK, chosen, batch_size=8, max_new_tokens=longest + 1),
        "prefill_s": prefill,
    }  # fmt: skip
    model.eval()
    out = {"eval_images": len(chosen)}
    for name, fn in methods.items():
        fn()  # warm-up
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out[name] = time.perf_counter() - began
    out["likelihood_vs_generate"] = out["likelihood_s"] / out["generate_s"]
    out["likelihood_vs_prefill"] = out["likelihood_s"] / out["prefill_s"]
    return out


def load(folder: str, mode: str, bf16: bool):
    """The saved model through ``load_vlm``: 4-bit NF4 (QLoRA) or not, bf16 or float32 (also the 4-bit compute dtype)."""
    return load_vlm(
        folder,
        load_in_4bit=mode == "qlora",
        torch_dtype=torch.bfloat16 if bf16 else torch.float32,
        device_map={"": torch.cuda.current_device()} if torch.cuda.is_available() else None,
    )


def validate_family(family, cli, tsm, rows, workdir, start, records):
    """Build and save the family's model, then train every (mode, variant); appends one record per run."""
    shape = None if cli.tiny else SHAPES[family]
    name = f"tiny-{family}" if cli.tiny else shape.name
    modes = cli.modes or (MODES if cli.tiny else shape.modes)
    base = dict(family=family, model=name)
    planned = [(m, v) for m in modes for v in VARIANTS]
    deadline = start + cli.budget_s

    def skip(mode, variant, why):
        records.append({**base, "mode": mode, "variant": variant, "status": "skipped", "reason": why})

    remaining = deadline - time.perf_counter()
    longest = max((r["run_s"] for r in records if "run_s" in r), default=0.0)
    if remaining <= 0 or remaining < longest:  # a bigger model's first run takes at least that
        for mode, variant in planned:
            skip(
                mode,
                variant,
                f"time budget: {max(remaining, 0):.0f} s left, the longest run took {longest:.0f} s",
            )
        return
    folder = os.path.join(workdir, family)
    began = time.perf_counter()
    counts = build_base(family, cli.tiny, folder, cli.device)
    print(
        f"\n{name}: {counts['params'] / 1e6:,.1f}M parameters, built and saved in {time.perf_counter() - began:.0f} s"
    )
    last_duration = 0.0
    for mode in modes:
        stage1 = None
        for variant in VARIANTS:
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or remaining < last_duration:
                skip(
                    mode,
                    variant,
                    f"time budget: {max(remaining, 0):.0f} s left, the last run took {last_duration:.0f} s",
                )
                continue
            if variant == "stage2" and stage1 is None:
                skip(mode, variant, "stage 1 did not finish")
                continue
            record = {**base, "mode": mode, "variant": variant, **counts}
            began = time.perf_counter()
            try:
                if variant == "stage2":  # continues from the stage-1 model (connector trained)
                    model, processor, layout = stage1
                    stage1 = None
                else:
                    model, processor = load(folder, mode, cli.bf16)
                    layout = quantisation_layout(model)
                record["load_s"] = time.perf_counter() - began
                record.update(layout)
                trainer, figures = train_run(
                    model, tsm, processor, rows, cli, variant, counts, deadline, os.path.join(workdir, "run")
                )
                record.update(figures)
                if variant == "stage2" and cli.eval_images:
                    record.update(evaluation_run(trainer.model, processor, rows, cli.eval_images))
                if variant == "stage1":
                    stage1 = (trainer.model, processor, layout)
            except Exception as err:  # report it and go on with the next run
                traceback.print_exc()
                record.update(status="failed", error=f"{type(err).__name__}: {err}"[:2000])
            finally:
                trainer = model = None
                free_memory()
            record["run_s"] = time.perf_counter() - began
            last_duration = record["run_s"]
            records.append(record)
            print(summary_line(record))
    shutil.rmtree(folder, ignore_errors=True)


def summary_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"  {r['mode']:<5} {r['variant']:<7} {r['status']}: {r.get('error') or r.get('reason')}"
    return (
        f"  {r['mode']:<5} {r['variant']:<7} {r['step_s_median'] * 1e3:8.1f} ms/step, "
        f"{r['peak_memory_mib'] / 1024:6.2f} GiB peak, loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}"
        + (f" (stopped at the time budget after {r['steps_done']} steps)" if r["stopped_at_deadline"] else "")
    )


def add_ratios(records: list[dict]) -> None:
    """Each run's median step time over the vanilla run's of the same model and mode."""
    vanilla = {
        (r["family"], r["mode"]): r["step_s_median"]
        for r in records
        if r["variant"] == "vanilla" and r["status"] == "ok"
    }
    for r in records:
        if r["status"] == "ok":
            base = vanilla.get((r["family"], r["mode"]))
            r["vs_vanilla"] = r["step_s_median"] / base if base else None


def checks(records: list[dict]) -> list[str]:
    """What did not hold: failed runs, quantised vision modules, missing 4-bit decoders, losses that did not fall."""
    problems = []
    for r in records:
        where = f"{r['model']} {r['mode']} {r['variant']}"
        if r["status"] == "failed":
            problems.append(f"{where}: failed ({r['error'].splitlines()[0]})")
        if r["status"] != "ok":
            continue
        if not r["vision_unquantised"]:
            problems.append(f"{where}: a vision tower / projector / lm_head module was quantised")
        if r["mode"] == "qlora" and not r["decoder_4bit_linears"]:
            problems.append(f"{where}: QLoRA, yet the decoder has no 4-bit linear")
        if not r["loss_fell"]:
            problems.append(f"{where}: the loss did not fall ({r['loss_first']:.4f} -> {r['loss_last']:.4f})")
    return problems


def table(records: list[dict], memory_title: str) -> str:
    lines = [
        f"| model | mode | variant | {memory_title} | step ms | samples/s | MFU | vs vanilla | vision unquantised | loss first -> last |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in records:
        head = f"| {r['model']} | {r['mode']} | {r['variant']} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} | | | | | | |")
            continue
        ratio = f"{r['vs_vanilla']:.2f}x" if r["vs_vanilla"] else "-"
        unquantised = "yes" if r["vision_unquantised"] else "NO"
        if r["mode"] == "qlora":
            unquantised += f" ({r['decoder_4bit_linears']} decoder Linear4bit)"
        fell = "" if r["loss_fell"] else " (did not fall)"
        lines.append(
            f"{head} {r['peak_memory_mib'] / 1024:.2f} | {r['step_s_median'] * 1e3:.1f} | {r['samples_per_s']:.2f} "
            f"| {100 * r['mfu']:.3g}% | {ratio} | {unquantised} | {r['loss_first']:.3f} -> {r['loss_last']:.3f}{fell} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny models on CPU (float32): the same code path"
    )
    parser.add_argument(
        "--families", nargs="+", help=f"default: {', '.join(SHAPES)} ({', '.join(TINY_FAMILIES)} with --tiny)"
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, help="default: qlora and lora (Mllama: qlora)")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (default 30; 6 with --tiny)"
    )
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default 8; 4 with --tiny)")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on with CUDA, off on CPU",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (LoRA and connector)")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="the chip's dense bf16 peak, for MFU"
    )
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="wall-clock budget; later runs are skipped"
    )
    parser.add_argument(
        "--eval-images",
        type=int,
        default=16,
        help="after stage 2, time option likelihood vs generate-and-parse on this many images (0: skip)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--workdir", default=None, help="where the random models are saved (default: a temp dir)"
    )
    default_json = os.path.join(os.environ["OUT"], "gpu_validate.json") if os.environ.get("OUT") else None
    parser.add_argument(
        "--json", default=default_json, help="write every figure here (default: $OUT/gpu_validate.json)"
    )
    cli = parser.parse_args(argv)
    cli.steps = cli.steps or (6 if cli.tiny else 30)
    cli.batch = cli.batch or (4 if cli.tiny else 8)
    cli.bf16 = torch.cuda.is_available() if cli.bf16 is None else cli.bf16
    families = cli.families or (TINY_FAMILIES if cli.tiny else tuple(SHAPES))
    unknown = [f for f in families if f not in (TINY_FAMILIES if cli.tiny else SHAPES)]
    if unknown:
        parser.error(f"unknown families {unknown}")
    if not cli.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --tiny for the tiny models on CPU")
    if cli.threads:
        torch.set_num_threads(cli.threads)
    hf_logging.disable_progress_bar()
    cli.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    torch.manual_seed(0)
    if cli.tiny:
        tsm, image_size = TaskSpecificModel("test_resnet", num_classes=TASK.num_classes, img_size=32), 32
    else:
        tsm, image_size = TaskSpecificModel("vit_small_patch16_224", num_classes=TASK.num_classes), 448
    rows = make_rows(max(cli.batch * 4, 16), image_size)
    workdir = cli.workdir or tempfile.mkdtemp(prefix="gpu_validate-")
    os.makedirs(workdir, exist_ok=True)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    print(
        f"{device_name}; torch {torch.__version__}; {cli.steps} steps x {cli.batch} rows per run; "
        f"budget {cli.budget_s:.0f} s"
    )
    records: list[dict] = []
    try:
        for family in families:
            validate_family(family, cli, tsm, rows, workdir, start, records)
    finally:
        if cli.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    add_ratios(records)
    problems = checks(records)
    memory_title = "peak GiB" if torch.cuda.is_available() else "peak RSS GiB"
    print("\n" + table(records, memory_title))
    print(f"\nMFU: (6 N_lm T_lm + 2 N_vis T_vis) / (step time x {cli.peak_tflops:g} TFLOP/s)")
    for r in records:
        if "likelihood_s" in r:
            print(
                f"{r['model']} {r['mode']}: {r['eval_images']} images, option likelihood {r['likelihood_s']:.3f} s, "
                f"generate-and-parse {r['generate_s']:.3f} s ({r['likelihood_vs_generate']:.2f}x), "
                f"prompt prefill {r['prefill_s']:.3f} s ({r['likelihood_vs_prefill']:.2f}x)"
            )
    print("\n".join(["", "checks that did not hold:", *problems] if problems else ["", "every check held"]))
    import transformers

    report = {
        "device": device_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "tiny": cli.tiny,
        "steps": cli.steps,
        "batch": cli.batch,
        "learning_rate": cli.lr,
        "peak_tflops": cli.peak_tflops,
        "budget_s": cli.budget_s,
        "elapsed_s": time.perf_counter() - start,
        "memory": "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "peak RSS",
        "mfu_formula": "(6 * decoder_params * lm_tokens_per_step + 2 * vision_params * vision_tokens_per_step)"
        " / (step_s_median * peak_tflops * 1e12)",
        "runs": records,
        "problems": problems,
        "ok": not problems,
    }
    if cli.json:
        os.makedirs(os.path.dirname(os.path.abspath(cli.json)), exist_ok=True)
        with open(cli.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"figures written to {cli.json}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
