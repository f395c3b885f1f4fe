"""Several tasks in one run: a shared TSM head with per-task cross-entropy, per-row TaskSpecs, per-task evaluation."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from hf_vitask.cli import main
from hf_vitask.data.collator import VITaskCollator, pick_negatives
from hf_vitask.models.tiny import build_tiny_vlm
from hf_vitask.models.tsm import TaskSpecificModel, restrict_to_tasks, task_offsets, tsm_predict
from hf_vitask.task import TaskSpec, load_tasks, save_tasks
from hf_vitask.trainers.tsm import train_tsm

LOW = TaskSpec(class_names=["zero", "one", "two", "three", "four"], name="low", modality="handwritten digit")
HIGH = TaskSpec(
    class_names=["five", "six", "seven", "eight", "nine"], name="high", modality="handwritten digit"
)


def _two_task_rows(digits, split="train"):
    """Digits 0-4 as task 0 and 5-9 as task 1, labels within each task."""
    ds = digits[split]
    return ds.map(lambda r: {"task": int(r["label"] >= 5), "label": r["label"] % 5}).cast_column(
        "label", __import__("datasets").Value("int64")
    )


def test_restrict_to_tasks_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    out = restrict_to_tasks(logits, torch.tensor([0, 1]), [2, 3])
    assert out[0, :2].tolist() == [1.0, 2.0] and torch.isinf(out[0, 2:]).all()
    assert torch.isinf(out[1, :2]).all() and out[1, 2:].tolist() == [3.0, 4.0, 5.0]
    # restricted CE of row 1, local label 0 (global 2) = -log softmax([3, 4, 5])[0]
    ce = F.cross_entropy(out[1:], torch.tensor([2]))
    assert ce.item() == pytest.approx(
        -math.log(math.exp(3) / (math.exp(3) + math.exp(4) + math.exp(5))), abs=1e-6
    )
    assert task_offsets([2, 3, 4]) == [0, 2, 5]


def test_shared_head_trains_per_task(digits):
    rows = _two_task_rows(digits)
    tsm = TaskSpecificModel("test_resnet", num_classes=10, img_size=32)
    history = train_tsm(
        tsm, rows, epochs=3, batch_size=8, learning_rate=3e-3, task_sizes=[5, 5], progress=False
    )
    assert history["train_loss"][-1] < history["train_loss"][0]
    probs = tsm_predict(tsm, rows, task_sizes=[5, 5])
    task = torch.tensor(rows["task"])
    assert torch.allclose(probs[task == 0, 5:], torch.zeros(1)) and torch.allclose(
        probs[task == 1, :5], torch.zeros(1)
    )
    assert torch.allclose(probs.sum(-1), torch.ones(len(rows)), atol=1e-5)
    with pytest.raises(ValueError, match="row 0 has label 7, outside task 0"):
        train_tsm(tsm, rows.map(lambda r: {"label": 7}), epochs=1, task_sizes=[5, 5], progress=False)
    with pytest.raises(ValueError, match="sum to"):
        train_tsm(tsm, rows, epochs=1, task_sizes=[5, 4], progress=False)


def test_collator_uses_each_rows_task(digits):
    _, processor = build_tiny_vlm("llava")
    rows = [_two_task_rows(digits)[i] for i in range(8)]
    collator = VITaskCollator(
        processor, [LOW, HIGH], with_negatives=True, negatives_dataset=_two_task_rows(digits)
    )
    batch = collator(rows)
    n = len(rows)
    assert batch["task_ids"][:n].tolist() == [r["task"] for r in rows]
    texts = processor.tokenizer.batch_decode(batch["input_ids"][:n])
    for text, row in zip(texts, rows):
        task = [LOW, HIGH][row["task"]]
        assert task.instruction() in text and task.response(row["label"]) in text
    # every negative has the same task and another class
    for i, j in enumerate(batch["crt_negative_index"][:n].tolist()):
        assert batch["task_ids"][j] == batch["task_ids"][i] and batch["class_ids"][j] != batch["class_ids"][i]
    assert pick_negatives([0, 1, 0, 1], __import__("random").Random(0), groups=[0, 0, 1, 2]) == [1, 0, -1, -1]
    with pytest.raises(KeyError, match="'task'"):
        collator([{"image": rows[0]["image"], "label": 0}])


def test_save_and_load_tasks(tmp_path):
    save_tasks([LOW, HIGH], tmp_path)
    assert load_tasks(tmp_path) == [LOW, HIGH]
    save_tasks(LOW, tmp_path / "one")
    assert load_tasks(tmp_path / "one") == LOW
    assert load_tasks(tmp_path / "none") is None


def _npz(path, digits, low: bool):
    """A MedMNIST-format file made of real digits: 0-4 (low) or 5-9 (high), labels within the task."""
    arrays = {}
    for split, key in (("train", "train"), ("validation", "val"), ("test", "test")):
        ds = digits[split].filter(lambda r: (r["label"] < 5) == low)
        arrays[f"{key}_images"] = np.stack(
            [np.array(img.convert("L").resize((28, 28))) for img in ds["image"]]
        )
        arrays[f"{key}_labels"] = (np.array(ds["label"]) % 5)[:, None]
    np.savez(path, **arrays)


def test_cli_multitask_round_trip(tmp_path, digits):
    _npz(tmp_path / "lowdigits.npz", digits, True)
    _npz(tmp_path / "highdigits.npz", digits, False)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "run"),
                "dataset": "npz",
                "dataset_paths": [str(tmp_path / "lowdigits.npz"), str(tmp_path / "highdigits.npz")],
                "class_names": None,
                "modality": "handwritten digit",
                "tsm_model": "test_resnet",
                "tsm_pretrained": False,
                "tsm_img_size": 32,
                "tsm_epochs": 1,
                "tsm_batch_size": 16,
                "tsm_learning_rate": 0.003,
                "model_name_or_path": "tiny-llava",
                "max_steps": 2,
                "per_device_train_batch_size": 8,
                "lora_r": 4,
                "save_strategy": "no",
                "report_to": "none",
                "disable_tqdm": True,
                "eval_split": "test",
                "eval_max_samples": 4,
                "eval_methods": ["likelihood"],
                "eval_instructions": "complete",
            }
        )
    )
    assert main(["train-tsm", str(config)]) == 0
    assert json.loads((tmp_path / "run" / "tsm" / "tsm_config.json").read_text())["num_classes"] == 10
    assert main(["train", str(config)]) == 0
    assert [t.name for t in load_tasks(tmp_path / "run" / "stage2")] == ["lowdigits", "highdigits"]
    assert main(["evaluate", str(config)]) == 0
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert set(results["per_task"]) == {"lowdigits", "highdigits"}
    per = [
        results["per_task"][t]["without_tsm/complete"]["likelihood"]["accuracy"]
        for t in ("lowdigits", "highdigits")
    ]
    assert results["without_tsm/complete"]["likelihood"]["accuracy"] == pytest.approx(sum(per) / 2)
    # each task's TSM row: the saved TSM's logits of that task's first 4 test digits, softmax over its own 5 classes
    from hf_vitask.cli import parse
    from hf_vitask.pipeline import load_data_and_tasks
    from tests.conftest import sklearn_metrics

    (_, data_args, *_), _ = parse([str(config)])
    test = load_data_and_tasks(data_args)[0]["test"]
    tsm = TaskSpecificModel.from_pretrained(tmp_path / "run" / "tsm").eval()
    for index, name in enumerate(("lowdigits", "highdigits")):
        rows = test.filter(lambda t, i=index: t == i, input_columns="task").select(range(4))
        with torch.no_grad():
            logits = tsm(tsm.preprocess(rows["image"]))[:, 5 * index : 5 * index + 5]
        reported = results["per_task"][name]["tsm"]
        assert reported == pytest.approx(
            {"num_samples": 4, **sklearn_metrics(logits.argmax(-1).tolist(), rows["label"], logits)}, abs=1e-6
        ), name
    per = [results["per_task"][t]["tsm"] for t in ("lowdigits", "highdigits")]
    assert results["tsm"] == pytest.approx({k: (per[0][k] + per[1][k]) / 2 for k in per[0]})


def test_crt_averages_over_rows_with_a_negative_and_logs_coverage(tmp_path, digits, caplog):
    """A task with one class in the batch has no in-batch negative: its rows leave L_CRT, which is the
    mean over the covered rows' tokens (not diluted by the others), crt_coverage says how many, and
    the run warns once."""
    import logging

    from hf_vitask import VITaskConfig, VITaskTrainer
    from hf_vitask.losses import IGNORE_INDEX, crt_loss, response_row_ids
    from hf_vitask.models.passes import run_passes

    rows = _two_task_rows(digits)
    low = [r for r in rows if r["task"] == 0][:4]
    high = [r for r in rows if r["task"] == 1 and r["label"] == 2][:2]  # task 1: one class only
    vlm, processor = build_tiny_vlm("llava")
    args = VITaskConfig(
        output_dir=str(tmp_path),
        stage=2,
        van_weight=0.0,
        ep_weight=0.0,
        rda_weight=0.0,
        crt_weight=1.0,
        crt_negatives="batch",
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        report_to="none",
    )
    trainer = VITaskTrainer(
        model=vlm, args=args, processing_class=processor, train_dataset=rows, task=[LOW, HIGH]
    )
    batch = trainer.data_collator(low + high)
    assert (
        batch["crt_negative_index"][4:].tolist() == [-1, -1] and (batch["crt_negative_index"][:4] >= 0).all()
    )
    batch = {k: v.to(trainer.args.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    with caplog.at_level(logging.WARNING):
        loss = trainer.compute_loss(trainer.model, batch)
        trainer.compute_loss(trainer.model, batch)
    warnings = [r for r in caplog.records if "no CRT negative" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 6 rows" in warnings[0].getMessage()
    assert [value for _, value, _ in trainer._metrics["train"]["crt_coverage"]] == [4 / 6, 4 / 6]

    inputs = {k: v for k, v in batch.items() if k not in ("class_ids", "task_ids", "crt_negative_index")}
    out = run_passes(trainer.model, inputs, negative_index=batch["crt_negative_index"], mode="none")
    keep = (batch["crt_negative_index"] >= 0)[response_row_ids(batch["labels"])]
    expected = crt_loss(
        out.plain.response_logits[keep], out.negative.response_logits, out.plain.response_targets[keep]
    ).mean()
    assert keep.sum() < (batch["labels"] != IGNORE_INDEX).sum()  # some tokens are not covered
    torch.testing.assert_close(loss, expected)
    # normalised by the batch's response tokens, as Trainer does: still the mean over the covered tokens
    total = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch, num_items_in_batch=total), expected)


def test_a_task_index_out_of_range_is_named_with_its_row(digits):
    _, processor = build_tiny_vlm("llava")
    rows = [
        {"image": digits["train"][i]["image"], "label": 0, "task": t, "id": f"img{i}"}
        for i, t in enumerate([0, 1, 2])
    ]
    with pytest.raises(ValueError, match=r"Task index 2 in row 2 \(id 'img2'\) is out of range for 2 tasks"):
        VITaskCollator(processor, [LOW, HIGH])(rows)
