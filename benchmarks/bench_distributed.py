"""What a stage-2 VITask step costs under DDP, next to the single-process fused step, in one run.

    python benchmarks/bench_distributed.py                 # CPU: 1 process, then 2 (torchrun, gloo), 1 thread each
    python benchmarks/bench_distributed.py --steps 20 --batch 8

Every run trains the same tiny-but-not-trivial LLaVA (the shapes of benchmarks/bench_step.py) for
``--steps`` timed stage-2 steps (EP + RDA + CRT) after two warm-up steps, through ``Trainer.train``,
with ``--batch`` rows per process. Each process gets one CPU thread, so two processes use two
cores. The script prints the median step time of each run and its ratio to the single-process
fused step: a process of a 2-process job does the same work as the single process (same batch
per process) plus the gradient all-reduce, so the ratio is the per-sample cost of distributing
(1.0 = free). The "pass_fusion none" row is the three separate forwards, the price a wrapper that
runs the passes one by one would pay.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = (  # name, processes, pass_fusion
    ("1 process, fused (prefix)", 1, "prefix"),
    ("2 processes (DDP, gloo), fused (prefix)", 2, "prefix"),
    ("2 processes (DDP, gloo), pass_fusion none", 2, "none"),
)


def worker(cli) -> None:
    import torch
    from transformers import TrainerCallback

    from hf_vitask import TaskSpecificModel, VITaskConfig, VITaskTrainer
    from hf_vitask.data.digits import digits_task, load_digits_dataset
    from hf_vitask.distributed import end_process_group
    from hf_vitask.models.tiny import build_tiny_vlm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    image_size = 2 * int(cli.image_tokens**0.5) * 4
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = load_digits_dataset(max_samples=600, image_size=image_size)
    tsm = TaskSpecificModel("test_resnet", num_classes=10, img_size=32)
    model, processor = build_tiny_vlm(
        "llava",
        hidden_size=cli.hidden,
        num_layers=cli.layers,
        num_heads=4,
        image_size=image_size,
        image_tokens=cli.image_tokens,
    )
    model.resize_token_embeddings(cli.vocab, mean_resizing=False)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    args = VITaskConfig(
        output_dir=cli.out,
        stage=2,
        freeze_connector=False,
        pass_fusion=cli.pass_fusion,
        max_steps=cli.steps + 2,
        per_device_train_batch_size=cli.batch,
        learning_rate=2e-3,
        lora_r=16,
        lora_dropout=0.0,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = VITaskTrainer(
        model=model,
        args=args,
        processing_class=processor,
        train_dataset=data["train"],
        task=digits_task(),
        tsm=tsm,
        callbacks=[Clock()],
    )
    trainer.train()
    if trainer.is_world_process_zero():
        Path(cli.out, "times.json").write_text(json.dumps({"times": times[2:], "world_size": world}))
    end_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-tokens", type=int, default=144)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4, help="rows per process and step")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run (after two warm-up steps)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pass-fusion", default="prefix", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    cli = parser.parse_args(argv)
    if cli.worker:
        return worker(cli)

    shapes = [
        "--hidden",
        str(cli.hidden),
        "--layers",
        str(cli.layers),
        "--image-tokens",
        str(cli.image_tokens),
        "--vocab",
        str(cli.vocab),
        "--batch",
        str(cli.batch),
        "--steps",
        str(cli.steps),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    medians = {}
    for name, processes, fusion in RUNS:
        with tempfile.TemporaryDirectory() as out:
            launcher = (
                [sys.executable]
                if processes == 1
                else [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    f"--nproc_per_node={processes}",
                    f"--master_port={_free_port()}",
                ]
            )
            command = [*launcher, __file__, "--worker", "--out", out, "--pass-fusion", fusion, *shapes]
            done = subprocess.run(
                command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            if done.returncode:  # say why: the workers' own error, not only an exit status
                raise RuntimeError(
                    f"{name} ({processes} processes) exited with {done.returncode}:\n{done.stderr[-4000:]}"
                )
            result = json.loads(Path(out, "times.json").read_text())
        assert result["world_size"] == processes
        medians[name] = statistics.median(result["times"])

    reference = medians[RUNS[0][0]]
    print(f"stage-2 step, {cli.batch} rows per process, {cli.steps} timed steps, 1 CPU thread per process")
    print(f"{'run':44s} {'median step (s)':>16s} {'per-sample cost vs 1 process':>30s}")
    for name, seconds in medians.items():
        print(f"{name:44s} {seconds:16.3f} {seconds / reference:29.2f}x")


if __name__ == "__main__":
    main()
