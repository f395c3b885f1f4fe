"""The frozen-teacher cache: its form chosen by size, the on-disk store (exact, index-only in RAM, reused on
resume, repaired after a crash, one writer), what top-k changes in L_RDA on a trained teacher, and two
processes sharing the store.

Run as a script (``torchrun ... tests/test_teacher_cache.py OUT CACHE``) it is one process of the
two-process test at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_vitask import VITaskConfig, VITaskTrainer
from hf_vitask.models.modeling import VITaskModel
from hf_vitask.models.tiny import build_tiny_vlm
from hf_vitask.trainers.teacher_cache import (
    DEFAULT_TOPK,
    INDEX_RECORD,
    CachePlan,
    DiskTeacherCache,
    plan_cache,
    size_text,
    token_bytes,
)

GiB = 2**30
NOT_MODEL_INPUTS = (
    "class_ids",
    "tsm_pixel_values",
    "crt_negative_index",
    "task_ids",
    "sample_keys",
    "images",
)


# -- the choice ---------------------------------------------------------------------------------------
def test_the_default_follows_the_estimated_size():
    # the paper's data: 0.5M samples x ~10 response tokens, Qwen2-VL's and Llama-3.2-Vision's vocabularies
    for vocab in (151_936, 128_256):
        plan = plan_cache("auto", None, vocab, 500_000, 10)
        assert plan == CachePlan("disk", DEFAULT_TOPK, vocab, 500_000, 10)
        assert plan.nbytes() == 500_000 * 10 * 256 * 8  # 9.5 GiB: float32 log-probs + int32 ids
        assert plan.nbytes(0) == 500_000 * 10 * vocab * 4  # the full distribution: 2.8 TiB (Qwen2-VL)
    assert size_text(plan_cache("auto", None, 151_936, 500_000, 10).nbytes()) == "9.5 GiB"
    assert plan_cache("auto", None, 151_936, 500_000, 10).nbytes(0) / 2**40 == pytest.approx(2.76, abs=0.01)
    # small enough for RAM: the exact distribution in RAM (67 digits x 4 tokens x 512 = 0.5 MiB)
    assert plan_cache("auto", None, 512, 67, 4) == CachePlan("memory", 0, 512, 67, 4)
    # the full distribution just over the budget: top-k, and that fits the budget
    samples = int(4 * GiB / (10 * 151_936 * 4)) + 1
    assert plan_cache("auto", None, 151_936, samples, 10) == CachePlan("memory", 256, 151_936, samples, 10)
    # what is set is kept: the mode, k (0: full), or both
    assert plan_cache("memory", None, 151_936, 500_000, 10).mode == "memory"
    assert plan_cache("auto", 0, 151_936, 500_000, 10) == CachePlan("disk", 0, 151_936, 500_000, 10)
    assert plan_cache("auto", 64, 151_936, 500_000, 10) == CachePlan("memory", 64, 151_936, 500_000, 10)
    assert plan_cache("disk", None, 512, 67, 4) == CachePlan("disk", 0, 512, 67, 4)
    # size unknown (an iterable dataset): on disk, top-k; a vocabulary within k: the full distribution
    assert plan_cache("auto", None, 151_936, None, None) == CachePlan("disk", 256, 151_936, None, None)
    assert plan_cache("auto", None, 200, None, None) == CachePlan("disk", 0, 200, None, None)
    assert plan_cache("off", None, 512, 67, 4).mode == "off"
    assert token_bytes(512, 1024) == 512 * 8  # k >= V: the sparse form over the whole vocabulary


def test_the_config_takes_the_old_switch_and_refuses_other_values(tmp_path):
    def config(**kw):
        return VITaskConfig(output_dir=str(tmp_path), report_to="none", **kw)

    assert config().rda_teacher_cache == "auto" and config().rda_teacher_topk is None
    assert config(rda_teacher_cache=True).rda_teacher_cache == "auto"
    assert config(rda_teacher_cache=False).rda_teacher_cache == "off"
    with pytest.raises(
        ValueError, match=r"rda_teacher_cache must be one of \['auto', 'memory', 'disk', 'off'\]"
    ):
        config(rda_teacher_cache="ram")
    with pytest.raises(ValueError, match="rda_teacher_topk must be >= 0"):
        config(rda_teacher_topk=-1)


# -- the store on its own ------------------------------------------------------------------------------
def _entries(n: int, width: int, topk: bool, seed: int = 0) -> dict:
    """``n`` made-up samples of 1 to 4 tokens: log-probs (float32) and, for top-k, token ids (int32)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        count = 1 + i % 4
        logprobs = torch.from_numpy(rng.standard_normal((count, width), dtype=np.float32))
        ids = torch.from_numpy(rng.integers(0, 1000, (count, width), dtype=np.int32)) if topk else None
        out[f"sample-{seed}-{i}"] = (logprobs, ids)
    return out


def _meta(topk: int, **kw) -> dict:
    return {"vocab": 1000, "topk": topk, "temperature": 1.0, "teacher": "abc", **kw}


def _same(a, b) -> bool:
    return (
        torch.equal(a[0], b[0])
        and (a[1] is None) == (b[1] is None)
        and (a[1] is None or torch.equal(a[1], b[1]))
    )


def _tensors_in(obj, seen=None) -> list:
    """Every tensor or array reachable from ``obj``'s attributes (through dicts, lists and tuples)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return [obj]
    if isinstance(obj, dict):
        children = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        children = list(vars(obj).values())
    else:
        return []
    return [t for child in children for t in _tensors_in(child, seen)]


@pytest.mark.parametrize("topk", [0, 8], ids=["full", "top-k"])
def test_the_store_returns_what_it_was_given_and_holds_only_its_index(tmp_path, topk):
    width = topk or 1000
    first, second = _entries(50, width, bool(topk)), _entries(30, width, bool(topk), seed=1)
    store = DiskTeacherCache(tmp_path, _meta(topk))
    store.update(first)
    store.update({**second, **first})  # samples already stored are not written again
    assert len(store) == 80 and all(key in store for key in {**first, **second}) and "other" not in store
    for key, entry in {**first, **second}.items():
        assert _same(store[key], entry), key
    # RAM holds the index (a digest, first row, count and checksum per sample), not the entries
    assert not _tensors_in(store)
    tokens = sum(len(e[0]) for e in {**first, **second}.values())
    assert store.nbytes == (tmp_path / "rows.bin").stat().st_size == tokens * token_bytes(1000, topk)
    assert (tmp_path / "index.bin").stat().st_size == 80 * INDEX_RECORD.itemsize
    store.close()
    reopened = DiskTeacherCache(tmp_path, _meta(topk))
    assert len(reopened) == 80 and all(_same(reopened[k], e) for k, e in {**first, **second}.items())
    with pytest.raises(ValueError, match="sample-x"):
        reopened.update(
            {"sample-x": (torch.zeros(2, width + 1), None if not topk else torch.zeros(2, width + 1))}
        )


def test_a_store_stopped_mid_write_is_cut_back_to_its_last_complete_sample(tmp_path, caplog):
    entries = _entries(10, 8, True)
    store = DiskTeacherCache(tmp_path, _meta(8))
    store.update(entries)
    store.close()
    rows, index = tmp_path / "rows.bin", tmp_path / "index.bin"
    last = list(entries)[-1]
    os.truncate(rows, rows.stat().st_size - 5)  # killed while writing the last sample's rows ...
    with open(index, "ab") as f:  # ... and a record after it
        f.write(b"\x01" * 7)
    with caplog.at_level(logging.WARNING):
        repaired = DiskTeacherCache(tmp_path, _meta(8))
    warning = caplog.records[-1].getMessage()
    assert str(index) in warning and str(rows) in warning and "kept its first 9 of 10 samples" in warning
    assert len(repaired) == 9 and last not in repaired
    assert all(_same(repaired[k], e) for k, e in entries.items() if k != last)
    assert index.stat().st_size == 9 * INDEX_RECORD.itemsize and rows.stat().st_size == repaired.nbytes
    repaired.update({last: entries[last]})  # computed again, appended where the good rows end
    assert _same(repaired[last], entries[last])
    repaired.close()

    # rows written whose record never was (killed between the two writes): dropped
    with open(rows, "ab") as f:
        f.write(b"\x00" * 100)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = DiskTeacherCache(tmp_path, _meta(8))
    assert len(again) == 10 and f"{rows} holds 100 bytes past its last complete sample" in caplog.text
    again.close()

    # a flipped byte in a sample's rows: that sample and those after it are dropped, nothing garbled is read
    data = bytearray(rows.read_bytes())
    data[64 + 10] ^= 0xFF  # inside the second sample (the first is 1 token: 8 log-probs + 8 ids, 64 bytes)
    rows.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        damaged = DiskTeacherCache(tmp_path, _meta(8))
    assert "do not match their checksum" in caplog.text and str(rows) in caplog.text
    assert len(damaged) == 1 and _same(damaged[list(entries)[0]], entries[list(entries)[0]])


def test_a_store_for_another_teacher_is_started_afresh(tmp_path, caplog):
    store = DiskTeacherCache(tmp_path, _meta(8))
    store.update(_entries(3, 8, True))
    store.close()
    with caplog.at_level(logging.WARNING):
        other = DiskTeacherCache(tmp_path, _meta(8, teacher="def"))
    assert len(other) == 0 and str(tmp_path / "meta.json") in caplog.text and "teacher" in caplog.text
    other.close()
    (tmp_path / "meta.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert len(DiskTeacherCache(tmp_path, _meta(8))) == 0
    assert "cannot be read" in caplog.text


def test_a_failed_write_leaves_the_store_as_it_was(tmp_path, monkeypatch, caplog):
    import hf_vitask.trainers.teacher_cache as module

    store = DiskTeacherCache(tmp_path, _meta(8))
    first, second = _entries(3, 8, True), _entries(2, 8, True, seed=1)
    store.update(first)
    sizes = [(tmp_path / name).stat().st_size for name in ("rows.bin", "index.bin")]
    write_all, calls = module._write_all, []

    def disk_full_at_the_index(fd, data):
        calls.append(fd)
        if len(calls) == 2:  # the rows went in, the records do not
            raise OSError(28, "No space left on device")
        write_all(fd, data)

    monkeypatch.setattr(module, "_write_all", disk_full_at_the_index)
    with pytest.raises(OSError, match=r"Cannot write the teacher cache .*rows.bin .*No space left on device"):
        store.update(second)
    assert len(store) == 3 and all(key not in store for key in second)
    assert [(tmp_path / name).stat().st_size for name in ("rows.bin", "index.bin")] == sizes
    monkeypatch.setattr(module, "_write_all", write_all)
    store.update(second)
    assert all(_same(store[k], e) for k, e in {**first, **second}.items())
    store.close()
    with caplog.at_level(logging.WARNING):
        assert len(DiskTeacherCache(tmp_path, _meta(8))) == 5
    assert caplog.text == ""


def _open_writer(directory, queue):
    try:
        DiskTeacherCache(directory, _meta(8))
        queue.put("opened")
    except RuntimeError as err:
        queue.put(str(err))


def test_a_second_process_cannot_write_the_same_store(tmp_path):
    store = DiskTeacherCache(tmp_path, _meta(8))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_open_writer, args=(tmp_path, queue))
    child.start()
    child.join(60)
    assert queue.get(timeout=5) == (
        f"{tmp_path / 'lock'} is locked by another process: another run is writing this teacher cache. Give "
        "each run its own output_dir."
    )
    store.close()


def test_a_reader_keeps_only_the_last_update_in_ram_and_reads_the_rest_from_the_files(tmp_path):
    """Several processes: every one calls ``update`` with the same gathered entries at the same step;
    the main process writes them, the others read them from the files from the next update on."""
    writer = DiskTeacherCache(tmp_path, _meta(8))
    early = _entries(4, 8, True, seed=0)
    writer.update(early)
    reader = DiskTeacherCache(tmp_path, _meta(8), writer=False)  # opened after the writer (a barrier)
    assert len(reader) == 4 and all(_same(reader[k], e) for k, e in early.items())
    steps = [_entries(3, 8, True, seed=s) for s in (1, 2, 3)]
    for step in steps:
        writer.update(step)
        reader.update(step)
        assert set(reader._pending) == {k for k in map(_digest, step)}  # this step's entries only
    assert len(reader) == len(writer) == 13
    reader._pending.clear()  # all from the files now
    for entries in (early, *steps):
        assert all(_same(reader[k], e) for k, e in entries.items())
    with pytest.raises(ValueError, match="not the one the main process opened"):
        DiskTeacherCache(tmp_path, _meta(16), writer=False)


def _digest(key: str) -> bytes:
    from hf_vitask.trainers.teacher_cache import key_digest

    return key_digest(key)


# -- in the trainer ------------------------------------------------------------------------------------
def _frozen_trainer(out, train, task, tsm, teacher, student=None, **kw) -> VITaskTrainer:
    model, processor = student if student is not None else build_tiny_vlm("llava")
    defaults = dict(
        output_dir=str(out),
        stage=1,
        ep_weight=0.0,
        rda_teacher="frozen",
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        seed=0,
        disable_tqdm=True,
    )
    return VITaskTrainer(
        model=model,
        args=VITaskConfig(**{**defaults, **kw}),
        processing_class=processor,
        train_dataset=train,
        task=task,
        tsm=tsm,
        teacher=teacher,
    )


@pytest.fixture(scope="module")
def train16(digits):
    return digits["train"].select(range(16))


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, train16, task, tsm):
    """A stage-1 model (EP + RDA) trained 30 steps on 16 digits, all weights (LoRA on this 64-wide
    model needs far more steps to become as confident)."""
    model, processor = build_tiny_vlm("llava")
    args = VITaskConfig(
        output_dir=str(tmp_path_factory.mktemp("teacher")),
        stage=1,
        use_lora=False,
        max_steps=30,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        logging_steps=30,
    )
    trainer = VITaskTrainer(
        model=model, args=args, processing_class=processor, train_dataset=train16, task=task, tsm=tsm
    )
    trainer.train()
    return trainer.model.eval()


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


def _l_rda(trainer: VITaskTrainer, batch: dict) -> float:
    """L_RDA of the batch (mean over its response tokens) from the trainer's teacher cache."""
    inputs = _model_inputs(batch)
    with torch.no_grad():
        student = trainer.model(**inputs).response_logits
        rda = trainer._frozen_rda(
            trainer.model, inputs, batch["tsm_pixel_values"], student, batch["sample_keys"]
        )
    return rda.mean().item()


def test_top_k_changes_l_rda_little_on_a_trained_teacher(tmp_path, train16, task, tsm, trained_teacher):
    """Relative change of L_RDA when the cache keeps the teacher's top k of its 512 tokens instead of all
    of them, on the 16 training samples (a fresh student). Measured: 6.6% (k=16), 4.2% (k=64), 0.97%
    (k=256) with the trained teacher; 39% / 26% / 9.0% with an untrained one: a confident teacher leaves
    little mass, and so little error, outside its top k."""
    rows = [train16[i] for i in range(16)]
    vlm, processor = build_tiny_vlm("llava", seed=1)
    untrained = VITaskModel.from_vlm(vlm, processor, tsm=tsm)
    errors = {}
    for name, teacher in (("trained", trained_teacher), ("untrained", untrained)):
        full = _frozen_trainer(tmp_path / name, train16, task, tsm, teacher, rda_teacher_topk=0)
        student = (full.model, full.processing_class)
        batches = [full.data_collator(rows[i : i + 8]) for i in (0, 8)]
        exact = [_l_rda(full, b) for b in batches]
        for k in (16, 64, 256):
            topk = _frozen_trainer(tmp_path / name, train16, task, tsm, teacher, student, rda_teacher_topk=k)
            assert topk.teacher_cache_plan.topk == k and isinstance(topk._teacher_cache, dict)
            approx = [_l_rda(topk, b) for b in batches]
            errors[name, k] = float(np.mean([abs(a - e) / e for a, e in zip(approx, exact)]))
    print({key: f"{value:.2%}" for key, value in errors.items()})
    assert errors["trained", 16] > errors["trained", 64] > errors["trained", 256] > 0
    assert errors["trained", 64] < 0.08 and errors["trained", 256] < 0.02
    assert all(errors["trained", k] < errors["untrained", k] for k in (16, 64, 256))


@pytest.mark.parametrize("topk", [0, 64], ids=["full", "top-k"])
def test_the_disk_store_gives_exactly_the_in_memory_loss_and_gradients(
    tmp_path, train16, task, tsm, trained_teacher, topk
):
    memory = _frozen_trainer(
        tmp_path / "memory",
        train16,
        task,
        tsm,
        trained_teacher,
        rda_teacher_cache="memory",
        rda_teacher_topk=topk,
    )
    student = (memory.model, memory.processing_class)
    disk = _frozen_trainer(
        tmp_path / "disk",
        train16,
        task,
        tsm,
        trained_teacher,
        student,
        rda_teacher_cache="disk",
        rda_teacher_topk=topk,
    )
    batch = memory.data_collator([train16[i] for i in range(8)])

    def loss_and_grads(trainer):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        return loss.detach(), {
            n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None
        }

    for trainer in (memory, disk):  # fill both caches
        loss_and_grads(trainer)
    disk._teacher_cache.close()
    disk._teacher_store = None  # reopened from its files: everything below comes from disk
    (loss, grads), (disk_loss, disk_grads) = loss_and_grads(memory), loss_and_grads(disk)
    store = disk._teacher_cache
    assert isinstance(store, DiskTeacherCache) and len(store) == 8 and disk.teacher_passes == 8
    assert torch.equal(disk_loss, loss) and grads.keys() == disk_grads.keys() and grads
    assert all(torch.equal(disk_grads[n], g) for n, g in grads.items())
    for key in batch["sample_keys"]:
        assert _same(store[key], memory._teacher_cache[key])
    assert not _tensors_in(store)
    tokens = sum(len(memory._teacher_cache[k][0]) for k in batch["sample_keys"])
    assert store.nbytes == tokens * token_bytes(512, topk)


@pytest.mark.parametrize("stage", [1, 2])
def test_a_top_k_cache_keeps_the_fused_loss_head(tmp_path, train16, task, tsm, trained_teacher, stage):
    """The fused loss head reads the cached top-k (the rest of the mass spread evenly, as
    rda_kl_cached does): the loss and gradients of the logits path, with no logits computed."""
    from hf_vitask.trainers import vitask as vitask_module

    extra = {} if stage == 1 else {"stage": 2, "ep_weight": 0.5, "crt_weight": 0.5, "freeze_connector": False}
    trainer = _frozen_trainer(
        tmp_path,
        train16,
        task,
        tsm,
        trained_teacher,
        rda_teacher_cache="memory",
        rda_teacher_topk=16,
        **extra,
    )
    assert trainer.teacher_cache_plan.topk == 16
    batch = trainer.data_collator([train16[i] for i in range(8)])
    calls = []
    real = vitask_module.fused_head_losses

    def spy(*args, **kwargs):
        calls.append(kwargs.get("teacher_index"))
        return real(*args, **kwargs)

    vitask_module.fused_head_losses = spy
    try:
        results = {}
        for fused in (True, False, True):  # the first fills the cache; the next two read it
            trainer.args.fused_loss_head = fused
            trainer.model.zero_grad(set_to_none=True)
            loss = trainer.compute_loss(trainer.model, dict(batch))
            loss.backward()
            results[fused] = (
                loss.detach(),
                {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None},
            )
    finally:
        vitask_module.fused_head_losses = real
    assert len(calls) == 2 and all(index is not None and index.shape[-1] == 16 for index in calls)
    assert trainer.teacher_passes == 8  # computed once, then read from the cache
    (loss, grads), (reference, reference_grads) = results[True], results[False]
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert grads.keys() == reference_grads.keys() and grads
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_choice_is_announced_once_with_its_size(tmp_path, train16, task, tsm, trained_teacher, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_vitask.trainers.vitask"):
        auto = _frozen_trainer(tmp_path / "auto", train16, task, tsm, trained_teacher)
        disk = _frozen_trainer(
            tmp_path / "disk",
            train16,
            task,
            tsm,
            trained_teacher,
            rda_teacher_cache="disk",
            rda_teacher_topk=16,
        )
        disk.train()  # no second announcement
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Frozen-teacher cache")]
    tokens = auto.teacher_cache_plan.tokens
    assert auto.teacher_cache_plan == CachePlan("memory", 0, 512, 16, tokens)
    assert disk.teacher_cache_plan == CachePlan("disk", 16, 512, 16, tokens)
    assert lines == [
        auto.teacher_cache_plan.describe(),
        disk.teacher_cache_plan.describe(tmp_path / "disk" / "teacher_cache"),
    ]
    assert "the full distribution (512 float32 log-probs per token), in RAM" in lines[0]
    assert f"up to {size_text(16 * tokens * 512 * 4)} for 16 samples x {tokens} response tokens" in lines[0]
    assert "top 16 log-probs per token (float32 + int32 ids" in lines[1] and "on disk in" in lines[1]
    assert f"up to {size_text(16 * tokens * 16 * 8)}" in lines[1]


def test_a_resumed_run_reuses_the_stored_teacher_outputs(
    tmp_path, train16, task, tsm, trained_teacher, caplog
):
    out = tmp_path / "run"
    settings = dict(rda_teacher_cache="disk", rda_teacher_topk=16, save_strategy="steps", save_steps=2)
    first = _frozen_trainer(out, train16, task, tsm, trained_teacher, max_steps=4, **settings)
    first.train()  # one epoch: every sample once through the teacher
    assert first.teacher_passes == 16 and len(first._teacher_cache) == 16
    assert not _tensors_in(first._teacher_cache)
    first._teacher_cache.close()
    rows = out / "teacher_cache" / "rows.bin"
    os.truncate(rows, rows.stat().st_size - 3)  # the job was killed while writing its last sample

    resumed = _frozen_trainer(out, train16, task, tsm, trained_teacher, max_steps=8, **settings)
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert resumed.state.global_step == 8
    assert resumed.teacher_passes == 1  # only the damaged sample; 6 steps of 4 samples were trained
    assert len(resumed._teacher_cache) == 16
    assert any(
        str(rows) in r.getMessage() and "kept its first 15 of 16" in r.getMessage() for r in caplog.records
    )


# -- two processes -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, processes: int, cache: str) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    launcher = [sys.executable]
    if processes > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            f"--master_port={_free_port()}",
        ]
    done = subprocess.run(
        [*launcher, __file__, str(out), cache], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads((out / "result.json").read_text())


def test_two_processes_share_one_store_written_by_the_main_process(tmp_path):
    one = _launch(tmp_path / "one", 1, "memory")
    two = _launch(tmp_path / "two", 2, "disk")
    # 16 samples, 2 epochs: each through the teacher once for the whole job, whichever process has it
    assert sum(one["passes"]) == sum(two["passes"]) == 16 and all(two["passes"])
    assert two["stores"] == [["DiskTeacherCache", True, 16, 0], ["DiskTeacherCache", False, 16, 0]]
    assert two["digests"][0] == two["digests"][1]  # both processes read the same entries
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)


def _worker(out: Path, cache: str) -> None:
    """One process of the two-process test: 8 steps of 4 rows (per process: 4 / processes) over 16
    digits against a random frozen teacher, the cache in ``cache`` mode."""
    from hf_vitask.data.digits import digits_task, load_digits_dataset
    from hf_vitask.models.tsm import TaskSpecificModel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    data, task = load_digits_dataset(max_samples=48, seed=0), digits_task()
    train = data["train"].select(range(16))
    torch.manual_seed(0)
    tsm = TaskSpecificModel("test_resnet", num_classes=10, img_size=32)  # random but the same everywhere
    vlm, processor = build_tiny_vlm("llava", seed=0)
    teacher = VITaskModel.from_vlm(build_tiny_vlm("llava", seed=1)[0], processor, tsm=tsm)
    trainer = _frozen_trainer(
        out,
        train,
        task,
        tsm,
        teacher,
        (vlm, processor),
        rda_teacher_cache=cache,
        rda_teacher_topk=16,
        max_steps=8,
        per_device_train_batch_size=4 // world,
        learning_rate=1e-3,
    )
    trainer.train()
    store = trainer._teacher_cache
    keys = trainer.data_collator([train[i] for i in range(16)])["sample_keys"]
    digest = hashlib.blake2b(digest_size=16)
    for key in keys:
        logprobs, ids = store[key]
        digest.update(logprobs.numpy().tobytes() + ids.numpy().tobytes())
    mine = {
        "passes": trainer.teacher_passes,
        "store": [
            type(store).__name__,
            getattr(store, "writer", None),
            len(store),
            len(getattr(store, "_pending", {})),
        ],
        "digest": digest.hexdigest(),
    }
    parts = [mine]
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, mine)
    if trainer.is_world_process_zero():
        result = {
            "passes": [p["passes"] for p in parts],
            "stores": [p["store"] for p in parts],
            "digests": [p["digest"] for p in parts],
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        }
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
