"""One process of a distributed training test (launched by tests/test_distributed.py with torchrun).

Trains a tiny LLaVA for a few steps with a fixed global batch of 4 rows, whatever the number of
processes, and writes, from the main process, ``result.pt`` (the trainable weights after the
last step and the log history). Every process writes
``written-rank<r>.json``: the paths under the output directory it created or opened for writing
(from Python's audit hooks), so the test can count what each rank wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

GLOBAL_BATCH = 4


def _audit_writes(root: Path, written: list[str]):
    root = str(root.resolve())

    def hook(event, args):
        path = None
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = (args[1] or ""), (args[2] or 0)
            if any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                path = args[0]
        elif event in ("os.mkdir", "os.rename", "os.replace", "shutil.move", "shutil.copyfile", "os.remove"):
            path = args[0] if event != "os.rename" else args[1]
        if path is not None:
            path = os.path.abspath(os.fsdecode(path))
            if path.startswith(root):
                written.append(os.path.relpath(path, root))

    sys.addaudithook(hook)


def run_cli() -> None:
    """``distributed_worker.py OUT_DIR cli COMMAND ARGS... [+ COMMAND ARGS...]``: ``hf-vitask`` commands one
    after the other in this process (one launch, one process group), each one's writes audited
    (``written-<command>-rank<r>.json``)."""
    out = Path(sys.argv[1])
    written: list[str] = []
    _audit_writes(out, written)
    from hf_vitask.cli import main as hf_vitask

    commands, current = [], []
    for arg in sys.argv[3:]:
        if arg == "+":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    commands.append(current)
    for argv in commands:
        written.clear()
        code = hf_vitask(argv)
        (out / f"written-{argv[0]}-rank{os.environ.get('RANK', '0')}.json").write_text(
            json.dumps(sorted(set(written)))
        )
        if code:
            raise SystemExit(code)
    from hf_vitask.distributed import end_process_group

    end_process_group()


def main() -> None:
    if sys.argv[2:3] == ["cli"]:
        return run_cli()
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--job", choices=["stage1", "stage2", "instruction_free"], default="stage1")
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pass_fusion", default="prefix")
    parser.add_argument("--fsdp", default="", help="TrainingArguments.fsdp, e.g. 'full_shard'")
    cli = parser.parse_args()

    out = Path(cli.output_dir)
    written: list[str] = []
    _audit_writes(out, written)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))

    import torch

    import hf_vitask.models.modeling as modeling
    from hf_vitask import TaskSpecificModel, VITaskConfig, VITaskTrainer
    from hf_vitask.data.digits import digits_task, load_digits_dataset
    from hf_vitask.models.tiny import build_tiny_vlm

    modes: set[str] = set()  # the pass-fusion modes that actually ran
    run_passes = modeling.run_passes

    def recording(*args, **kwargs):
        out = run_passes(*args, **kwargs)
        modes.add(out.mode)
        return out

    modeling.run_passes = recording
    data, task = load_digits_dataset(max_samples=48, seed=0), digits_task()
    torch.manual_seed(0)
    tsm = TaskSpecificModel("test_resnet", num_classes=10, img_size=32)  # random but the same on every rank
    vlm, processor = build_tiny_vlm("llava", seed=0)
    common = dict(
        output_dir=str(out),
        max_steps=cli.max_steps,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        seed=0,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        save_strategy="steps" if cli.save_steps else "no",
        save_steps=cli.save_steps or 500,
        disable_tqdm=True,
        pass_fusion=cli.pass_fusion,
    )
    if cli.fsdp:
        common.update(
            fsdp=cli.fsdp, fsdp_config={"use_orig_params": True, "cpu_ram_efficient_loading": False}
        )
    train = data["train"].select(range(16))  # 4 global batches per epoch
    extra: dict = {}
    if cli.job == "stage1":
        trainer = VITaskTrainer(
            model=vlm,
            args=VITaskConfig(stage=1, **common),
            processing_class=processor,
            train_dataset=train,
            task=task,
            tsm=tsm,
        )
    elif cli.job == "stage2":
        # stage 1 (the same on every process), saved by the main process as the frozen RDA teacher
        first = VITaskTrainer(
            model=vlm,
            args=VITaskConfig(stage=1, **{**common, "max_steps": 2}),
            processing_class=processor,
            train_dataset=train,
            task=task,
            tsm=tsm,
        )
        first.train()
        first.save_model(str(out / "stage1"))
        first.accelerator.wait_for_everyone()
        trainer = VITaskTrainer(
            model=first.model,
            args=VITaskConfig(stage=2, rda_teacher="frozen", **common),
            processing_class=processor,
            train_dataset=train,
            task=task,
            teacher=str(out / "stage1"),
        )
        collate = trainer.data_collator

        def paired_negatives(rows):  # row 2i and 2i+1 are each other's negative, in any process layout
            batch = collate(rows)
            batch["crt_negative_index"] = torch.arange(len(rows)) ^ 1
            return batch

        trainer.data_collator = paired_negatives
    else:
        from hf_vitask import InstructionFreeConfig, InstructionFreeTrainer
        from hf_vitask.data.digits import add_digit_descriptions

        args = InstructionFreeConfig(
            shuffle_prob=0.0, **{k: v for k, v in common.items() if k != "pass_fusion"}
        )
        trainer = InstructionFreeTrainer(
            model=vlm, args=args, processing_class=processor, train_dataset=add_digit_descriptions(train)
        )
    trainer.train(resume_from_checkpoint=True if cli.resume else None)
    extra["teacher_passes"] = getattr(trainer, "teacher_passes", 0)
    passes = [None] * trainer.args.world_size
    if trainer.args.world_size > 1:
        torch.distributed.all_gather_object(passes, extra["teacher_passes"])
    else:
        passes = [extra["teacher_passes"]]
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    # FSDP holds shards: the full weights are gathered (on every process: a collective)
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled else None
    if trainer.is_world_process_zero():
        weights = (
            {n: state[n].detach().clone() for n in trainable}
            if state is not None
            else {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        )
        torch.save(
            {
                "weights": weights,
                "log": trainer.state.log_history,
                "world_size": trainer.args.world_size,
                "teacher_passes": passes,
                "pass_modes": sorted(modes),
                "wrapper": type(trainer.model_wrapped).__name__,
                "fsdp": trainer.is_fsdp_enabled,
            },
            out / "result.pt",
        )
    (out / f"written-rank{rank}.json").write_text(json.dumps(sorted(set(written))))
    from hf_vitask.distributed import end_process_group

    end_process_group()


if __name__ == "__main__":
    main()
