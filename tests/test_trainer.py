"""VITaskTrainer: the loss terms per stage, frozen parts stay frozen, accumulation, resume, errors."""

import pytest
import torch

from hf_vitask import VITaskConfig, VITaskTrainer
from hf_vitask.config import DEFAULT_CRT_WEIGHT
from hf_vitask.data.collator import VITaskCollator
from hf_vitask.models.tiny import build_tiny_vlm
from tests.conftest import SHORT_RUN


def _args(tmp_path, **kw):
    return VITaskConfig(**{**SHORT_RUN, "output_dir": str(tmp_path / "out"), **kw})


def _trainer(tmp_path, digits, task, tsm, model=None, family="llava", **kw):
    processor = None
    if model is None:
        model, processor = build_tiny_vlm(family)
    else:
        processor = kw.pop("processor")
    teacher = kw.pop("teacher", None)
    return VITaskTrainer(
        model=model,
        args=_args(tmp_path, **kw),
        processing_class=processor,
        train_dataset=digits["train"],
        task=task,
        tsm=tsm,
        teacher=teacher,
    )


def _logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def _snapshot(module, name_filter=""):
    return {n: p.detach().clone() for n, p in module.named_parameters() if name_filter in n}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_stage1_logs_terms_and_trains_connector(tmp_path, digits, task, tsm, family):
    trainer = _trainer(tmp_path, digits, task, tsm, family=family)
    connector_before = _snapshot(trainer.model.connector)
    trainer.train()
    for key in ("loss_van", "loss_ep", "loss_rda"):
        values = _logged(trainer, key)
        assert len(values) == 3 and all(v >= 0 for v in values), key  # cross-entropies and a KL divergence
    assert not _logged(trainer, "loss_crt")
    # the loss is the stage-1 objective: L_van + L_EP + alpha * L_RDA, step by step
    args = trainer.args
    for e in (e for e in trainer.state.log_history if "loss_van" in e):
        total = (
            args.van_weight * e["loss_van"] + args.ep_weight * e["loss_ep"] + args.rda_weight * e["loss_rda"]
        )
        assert e["loss"] == pytest.approx(total, rel=1e-5)
    assert args.rda_weight > 0 and max(_logged(trainer, "loss_rda")) > 0
    changed = [not torch.equal(p, connector_before[n]) for n, p in trainer.model.connector.named_parameters()]
    assert all(changed)


def test_stage2_freezes_connector_and_adds_crt(tmp_path, digits, task, tsm):
    stage1 = _trainer(tmp_path / "s1", digits, task, tsm, max_steps=1)
    stage1.train()
    model = stage1.model
    connector_before = _snapshot(model.connector)
    lora_before = _snapshot(model.vlm, "lora_")
    stage2 = _trainer(
        tmp_path / "s2", digits, task, None, model=model, processor=stage1.processing_class, stage=2
    )
    assert stage2.args.effective_crt_weight == DEFAULT_CRT_WEIGHT and stage2.args.effective_freeze_connector
    stage2.train()
    assert len(_logged(stage2, "loss_crt")) == 3
    assert all(torch.equal(p, connector_before[n]) for n, p in model.connector.named_parameters())
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.vlm.named_parameters() if "lora_" in n)


def test_vanilla_needs_no_tsm(tmp_path, digits, task):
    trainer = _trainer(tmp_path, digits, task, None, ep_weight=0, rda_weight=0)
    assert trainer.model.connector is None
    trainer.train()
    assert _logged(trainer, "loss_van") and not _logged(trainer, "loss_ep")
    losses = _logged(trainer, "loss")
    assert losses == pytest.approx(_logged(trainer, "loss_van"), rel=1e-5)


def test_frozen_teacher_stays_frozen(tmp_path, digits, task, tsm):
    stage1 = _trainer(tmp_path / "s1", digits, task, tsm, max_steps=2)
    stage1.train()
    stage1.save_model(str(tmp_path / "teacher"))
    model = stage1.model
    stage2 = _trainer(
        tmp_path / "s2",
        digits,
        task,
        None,
        model=model,
        processor=stage1.processing_class,
        stage=2,
        rda_teacher="frozen",
        teacher=str(tmp_path / "teacher"),
    )
    teacher_lora = _snapshot(model.vlm, ".rda_teacher.")
    student_lora = _snapshot(model.vlm, ".default.")
    teacher_connector = _snapshot(stage2.teacher_connector)
    assert teacher_lora and student_lora
    assert all(not p.requires_grad for n, p in model.vlm.named_parameters() if ".rda_teacher." in n)
    stage2.train()
    assert len(_logged(stage2, "loss_rda")) == 3 and max(_logged(stage2, "loss_rda")) > 0
    for n, p in model.vlm.named_parameters():
        if ".rda_teacher." in n:
            assert torch.equal(p, teacher_lora[n]) and p.grad is None, n
    assert all(torch.equal(p, teacher_connector[n]) for n, p in stage2.teacher_connector.named_parameters())
    assert any(
        not torch.equal(p, student_lora[n]) for n, p in model.vlm.named_parameters() if ".default." in n
    )
    # saving the student writes only the trained adapter
    stage2.save_model(str(tmp_path / "student"))
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "student" / "adapter_model.safetensors")).keys()
    assert keys and not any("rda_teacher" in k for k in keys)


def test_gradient_accumulation_matches_full_batch(tmp_path, digits, task, tsm):
    """Two micro-batches normalised by the accumulated token count give the full batch's gradient."""
    trainer = _trainer(tmp_path, digits, task, tsm)
    model = trainer.model
    rows = [digits["train"][i] for i in range(4)]
    collate = trainer.data_collator
    full = collate(rows)
    num_items = (full["labels"][:, 1:] != -100).sum()

    def grads(batches):
        model.zero_grad()
        for batch in batches:
            trainer.compute_loss(model, batch, num_items_in_batch=num_items).backward()
        return {
            n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None
        }

    g_full = grads([collate(rows)])
    g_acc = grads([collate(rows[:2]), collate(rows[2:])])
    assert g_full.keys() == g_acc.keys() and len(g_full) > 0
    for n in g_full:
        assert torch.allclose(g_full[n], g_acc[n], atol=1e-5, rtol=1e-4), n


def test_resume_from_checkpoint_continues_exactly(tmp_path, digits, task, tsm):
    straight = _trainer(tmp_path / "a", digits, task, tsm, max_steps=4, save_strategy="steps", save_steps=2)
    straight.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (
        checkpoint / "exemplar_connector.safetensors"
    ).is_file()
    resumed = _trainer(tmp_path / "b", digits, task, tsm, max_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    want = dict(straight.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, want[n], atol=1e-6), n


def test_configuration_errors(tmp_path, digits, task, tsm):
    model, processor = build_tiny_vlm("llava")
    with pytest.raises(ValueError, match="needs a trained TSM"):
        VITaskTrainer(
            model=model,
            args=_args(tmp_path),
            processing_class=processor,
            train_dataset=digits["train"],
            task=task,
        )
    with pytest.raises(ValueError, match="train_dataset is empty"):
        VITaskTrainer(
            model=model,
            args=_args(tmp_path),
            processing_class=processor,
            train_dataset=digits["train"].select([]),
            task=task,
            tsm=tsm,
        )
    with pytest.raises(ValueError, match="teacher"):
        VITaskTrainer(
            model=model,
            args=_args(tmp_path, rda_teacher="frozen"),
            processing_class=processor,
            train_dataset=digits["train"],
            task=task,
            tsm=tsm,
        )
    with pytest.raises(ValueError, match="processing_class"):
        VITaskTrainer(model=model, args=_args(tmp_path), train_dataset=digits["train"], task=task, tsm=tsm)
    with pytest.raises(ValueError, match="stage"):
        _args(tmp_path, stage=3)
    with pytest.raises(ValueError, match="rda_teacher"):
        _args(tmp_path, rda_teacher="ema")
    with pytest.raises(ValueError, match="nothing to train"):
        _args(tmp_path, van_weight=0, ep_weight=0, rda_weight=0)


def test_a_collator_given_without_negatives_is_copied_not_changed(tmp_path, digits, task, tsm):
    """The trainer configures a copy of the user's collator (CRT negatives, picked by the collator
    alone); the object the user passed is left as it was."""
    model, processor = build_tiny_vlm("llava")
    given = VITaskCollator(processor, task, tsm=tsm)
    trainer = VITaskTrainer(
        model=model,
        args=_args(tmp_path, stage=2, max_steps=2, freeze_connector=False),
        processing_class=processor,
        train_dataset=digits["train"],
        task=task,
        tsm=tsm,
        data_collator=given,
    )
    assert trainer.data_collator is not given and trainer.data_collator.with_negatives
    assert not given.with_negatives and not given.return_images
    trainer.train()
    assert len(_logged(trainer, "loss_crt")) == 2
    # a collator of the user's own that picks no negatives is named, not silently given some
    batch = given([digits["train"][i] for i in range(4)])
    with pytest.raises(ValueError, match="CRT .* needs crt_negative_index"):
        trainer.compute_loss(trainer.model, batch)


def test_trainer_evaluate_reports_classification_metrics(tmp_path, digits, task, tsm):
    from hf_vitask.evaluation import compute_classification_metrics

    model, processor = build_tiny_vlm("llava")
    trainer = VITaskTrainer(
        model=model,
        args=_args(tmp_path, max_steps=1, per_device_eval_batch_size=4),
        processing_class=processor,
        train_dataset=digits["train"],
        eval_dataset=digits["validation"],
        task=task,
        tsm=tsm,
        compute_metrics=compute_classification_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    for key in (
        "eval_loss",
        "eval_loss_van",
        "eval_loss_ep",
        "eval_loss_rda",
        "eval_accuracy",
        "eval_macro_f1",
        "eval_auc",
    ):
        assert key in metrics, key
    # the same numbers as scoring the validation images directly (scikit-learn on the per-class scores)
    from hf_vitask.evaluation import score_options
    from tests.conftest import sklearn_metrics

    scores = score_options(trainer.model, processor, task, digits["validation"]["image"])
    labels = torch.tensor(digits["validation"]["label"])
    assert metrics["eval_accuracy"] == pytest.approx((scores.argmax(-1) == labels).float().mean().item())
    expected = sklearn_metrics(scores.argmax(-1).tolist(), labels.tolist(), scores)
    assert {k: metrics[f"eval_{k}"] for k in expected} == pytest.approx(expected, abs=1e-5)


def test_gradient_checkpointing_trains(tmp_path, digits, task, tsm):
    trainer = _trainer(tmp_path, digits, task, tsm, max_steps=2, gradient_checkpointing=True)
    lora_before = _snapshot(trainer.model.vlm, "lora_B")
    trainer.train()
    assert len(_logged(trainer, "loss_van")) == 2
    assert any(
        not torch.equal(p, lora_before[n]) for n, p in trainer.model.vlm.named_parameters() if "lora_B" in n
    )
    # checkpointing is on: backward runs the decoder layers again (their attention, say), for the gradients of
    # the plain backward
    model = trainer.model.train()
    layer = dict(model.vlm.named_modules())["base_model.model.model.language_model.layers.0.self_attn"]
    batch = trainer.data_collator([digits["train"][i] for i in range(4)])
    calls = []
    handle = layer.register_forward_pre_hook(lambda *_: calls.append(1))

    def loss_grads_and_layer_runs():
        model.zero_grad()
        calls.clear()
        loss = trainer.compute_loss(model, dict(batch))
        in_forward = len(calls)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.item(), grads, in_forward, len(calls) - in_forward

    try:
        loss, grads, forward_runs, backward_runs = loss_grads_and_layer_runs()
        model.gradient_checkpointing_disable()
        plain_loss, plain_grads, _, plain_backward_runs = loss_grads_and_layer_runs()
    finally:
        handle.remove()
    assert forward_runs > 0 and backward_runs == forward_runs and plain_backward_runs == 0
    assert loss == pytest.approx(plain_loss, rel=1e-5) and grads.keys() == plain_grads.keys()
    assert any("lora_B" in n for n in grads) and any("connector" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], plain_grads[n], atol=1e-6, rtol=1e-5, msg=n)


def test_frozen_teacher_outputs_are_cached_once_per_sample(tmp_path, digits, task, tsm):
    stage1 = _trainer(tmp_path / "s1", digits, task, tsm, max_steps=1)
    stage1.save_model(str(tmp_path / "teacher"))

    def stage2(**kw):
        model, processor = build_tiny_vlm("llava")
        return _trainer(
            tmp_path / "s2",
            digits,
            task,
            tsm,
            model=model,
            processor=processor,
            stage=1,
            ep_weight=0.0,
            rda_teacher="frozen",
            teacher=str(tmp_path / "teacher"),
            **kw,
        )

    trainer = stage2(rda_teacher_topk=0)
    rows = [digits["train"][i] for i in range(4)]
    batch = trainer.data_collator(rows)
    assert len(batch["sample_keys"]) == 4 and len(set(batch["sample_keys"])) == 4
    calls = []
    original = trainer._frozen_teacher_logits
    trainer._frozen_teacher_logits = lambda *a: calls.append(a[1]["input_ids"].shape[0]) or original(*a)
    cached = [trainer.compute_loss(trainer.model, dict(batch)).item() for _ in range(2)]
    assert calls == [4] and len(trainer._teacher_cache) == 4  # the second step hit the cache
    trainer.compute_loss(trainer.model, trainer.data_collator(rows[2:] + [digits["train"][5]]))
    assert calls == [4, 1]  # only the unseen sample ran through the teacher
    uncached = stage2(rda_teacher_cache=False)
    assert "sample_keys" not in uncached.data_collator(rows)
    assert (
        cached[0]
        == pytest.approx(cached[1])
        == pytest.approx(uncached.compute_loss(uncached.model, dict(batch)).item(), rel=1e-5)
    )
    vocab = trainer.model.vlm.get_output_embeddings().weight.shape[0]
    every = stage2(rda_teacher_topk=vocab)  # the sparse form with k = V is the full one
    assert every.compute_loss(every.model, dict(batch)).item() == pytest.approx(cached[0], rel=1e-5)
    topk = stage2(rda_teacher_topk=8)
    approximate = topk.compute_loss(topk.model, dict(batch)).item()
    # only L_RDA changes, and only a little: the mass outside the top 8 is spread evenly (observed: 2% off)
    assert approximate != cached[0] and approximate == pytest.approx(cached[0], rel=0.1)
    # the cache keeps each token's 8 most likely teacher tokens, with their exact log-probabilities
    assert len(topk._teacher_cache) == 4 and topk._teacher_cache.keys() <= trainer._teacher_cache.keys()
    for key, (logprobs, index) in topk._teacher_cache.items():
        full, no_index = trainer._teacher_cache[key]
        assert no_index is None and logprobs.shape == index.shape == (*full.shape[:-1], 8)
        best = full.topk(8, dim=-1)
        torch.testing.assert_close(logprobs, best.values)
        torch.testing.assert_close(full.gather(-1, index), best.values)


@pytest.mark.parametrize("fusion", ["batch", "prefix"])
def test_pass_fusion_gives_the_reference_loss_and_gradients(tmp_path, digits, task, tsm, fusion, monkeypatch):
    """The fused passes, with the output layer applied inside the loss (fused_loss_head), give the
    loss and gradients of separate passes with full logits."""
    from hf_vitask.trainers import vitask as vitask_module

    calls = []
    real = vitask_module.fused_head_losses
    monkeypatch.setattr(vitask_module, "fused_head_losses", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = [digits["train"][i] for i in range(6)]
    results = {}
    for mode in ("none", fusion):
        trainer = _trainer(
            tmp_path / mode, digits, task, tsm, stage=2, pass_fusion=mode, freeze_connector=False
        )
        batch = trainer.data_collator(rows)
        trainer.model.zero_grad()
        calls.clear()
        loss = trainer.compute_loss(trainer.model, batch)
        assert len(calls) == (mode != "none")  # separate passes keep their logits
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results[mode] = loss.item(), grads
    (ref_loss, ref_grads), (loss, grads) = results["none"], results[fusion]
    assert loss == pytest.approx(ref_loss, rel=1e-5) and grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-6, rtol=1e-4, msg=n)


def test_a_wrapped_model_runs_the_passes_through_its_wrapper(tmp_path, digits, task, tsm):
    """Under a distributed wrapper (DDP, FSDP, DeepSpeed) the fused passes of a step run in ONE call of
    the wrapper's forward (what the wrapper's gradient and parameter bookkeeping expects)."""
    trainer = _trainer(tmp_path, digits, task, tsm, stage=2, freeze_connector=False)
    inner = trainer.model
    calls = []

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            calls.append(1)
            return self.module(**kwargs)

    batch = trainer.data_collator([digits["train"][i] for i in range(4)])
    fused = trainer.compute_loss(inner, dict(batch)).item()
    trainer.accelerator.unwrap_model = lambda model, *a, **k: inner
    wrapped = trainer.compute_loss(Wrapper(inner), dict(batch)).item()
    assert len(calls) == 1  # no-EP, EP and negative passes, fused
    assert wrapped == pytest.approx(fused, rel=1e-6)


def test_a_large_full_teacher_cache_is_announced(tmp_path, digits, task, tsm, caplog):
    stage1 = _trainer(tmp_path / "s1", digits, task, tsm, max_steps=1)
    stage1.save_model(str(tmp_path / "teacher"))
    model, processor = build_tiny_vlm("llava")
    trainer = _trainer(
        tmp_path / "s2",
        digits,
        task,
        tsm,
        model=model,
        processor=processor,
        stage=1,
        ep_weight=0.0,
        rda_teacher="frozen",
        teacher=str(tmp_path / "teacher"),
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_vitask.trainers.vitask"):
        trainer._check_teacher_cache_size(limit_gib=1e-4)
        assert "rda_teacher_topk" in caplog.text and f"{len(digits['train'])} samples" in caplog.text
        caplog.clear()
        trainer._check_teacher_cache_size()  # 67 digits x a few tokens x 512: far below 4 GiB
        assert caplog.text == ""


@pytest.mark.parametrize("fused", [True, False], ids=["fused head", "logits"])
@pytest.mark.parametrize("teacher_dropout", [True, False])
def test_rda_teacher_dropout(tmp_path, digits, task, tsm, teacher_dropout, fused, monkeypatch):
    """rda_teacher_dropout=False: the self-teacher is an EP pass without LoRA dropout (the same on every
    call); True: the training EP pass, dropout included. Compared as teacher log-probabilities."""
    from hf_vitask.trainers import vitask as vitask_module

    trainer = _trainer(
        tmp_path,
        digits,
        task,
        tsm,
        lora_dropout=0.5,
        rda_teacher_dropout=teacher_dropout,
        fused_loss_head=fused,
    )
    teachers = []
    real_kl, real_fused = vitask_module.rda_kl, vitask_module.fused_head_losses

    def spy_kl(s, t, temp, detach):
        teachers.append(t.detach().float().log_softmax(-1))
        return real_kl(s, t, temp)

    def spy_fused(weight, bias, student, targets, coefficients, **kw):
        given = kw["teacher_logprobs"]
        if given is None:
            given = torch.nn.functional.linear(kw["teacher"].detach(), weight, bias).float().log_softmax(-1)
        teachers.append(given)
        return real_fused(weight, bias, student, targets, coefficients, **kw)

    monkeypatch.setattr(vitask_module, "rda_kl", spy_kl)
    monkeypatch.setattr(vitask_module, "fused_head_losses", spy_fused)
    batch = trainer.data_collator([digits["train"][i] for i in range(4)])
    model = trainer.model.train()
    with torch.no_grad():  # LoRA B starts at 0, where dropout on the adapter's input changes nothing
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    for seed in (0, 1):
        torch.manual_seed(seed)
        trainer.compute_loss(model, batch)
    model.eval()
    with torch.no_grad():
        inputs = {
            k: v for k, v in batch.items() if k not in ("class_ids", "tsm_pixel_values", "crt_negative_index")
        }
        eval_teacher = model(**inputs, tsm_pixel_values=batch["tsm_pixel_values"]).response_logits
    model.train()
    assert len(teachers) == 2
    if teacher_dropout:
        assert not torch.allclose(teachers[0], teachers[1])
    else:
        torch.testing.assert_close(teachers[0], teachers[1])
        torch.testing.assert_close(teachers[0], eval_teacher.float().log_softmax(-1))


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, digits, task, tsm):
    from hf_vitask import NonFiniteLossError, VITaskModel

    trainer = _trainer(
        tmp_path,
        digits,
        task,
        tsm,
        max_steps=6,
        learning_rate=1e30,
        max_grad_norm=0.0,
        save_strategy="steps",
        save_steps=1,
        logging_steps=1,
    )
    with pytest.raises(
        NonFiniteLossError, match=r"step (\d+): the (loss term 'loss_\w+' is (nan|inf)|trainable weight)"
    ) as err:
        trainer.train()
    step = int(err.value.args[0].split(":")[0].split()[1])
    assert step >= 2 and "checkpoint-" in str(err.value)
    out = tmp_path / "out"
    checkpoints = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert checkpoints and max(checkpoints) == step - 1  # nothing written at or after the failing step
    assert not (out / "vitask_config.json").exists()  # no final bundle
    # a bundle whose weights hold NaN is refused on load, naming the file and the tensor
    bundle = tmp_path / "bundle"
    good = _trainer(tmp_path / "ok", digits, task, tsm, max_steps=1)
    good.train()
    good.save_model(str(bundle))
    from safetensors.torch import load_file, save_file

    connector = load_file(str(bundle / "exemplar_connector.safetensors"))
    name = next(iter(connector))
    connector[name] = torch.full_like(connector[name], float("nan"))
    save_file(connector, str(bundle / "exemplar_connector.safetensors"))
    with pytest.raises(ValueError, match=rf"exemplar_connector.safetensors: tensor '{name}' holds NaN"):
        VITaskModel.from_pretrained(bundle)


def test_a_weight_that_turns_non_finite_stops_training_before_its_checkpoint(tmp_path, digits, task, tsm):
    from transformers import TrainerCallback

    from hf_vitask import NonFiniteLossError

    class Poison(TrainerCallback):  # runs before the trainer's own check: a step that broke one weight
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    next(model.connector.parameters())[0] = float("inf")

    trainer = _trainer(tmp_path, digits, task, tsm, max_steps=4, save_strategy="steps", save_steps=1)
    trainer.add_callback(Poison())
    trainer.callback_handler.callbacks.sort(key=lambda c: type(c).__name__ != "Poison")
    name = next(n for n, _ in trainer.model.named_parameters() if n.startswith("connector."))
    with pytest.raises(
        NonFiniteLossError,
        match=rf"^step 2: the trainable weight '{name}' is no longer finite\. "
        r"Training stopped .*checkpoint-1, is kept",
    ):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1"]


def test_logged_terms_add_up_to_the_loss_under_gradient_accumulation(tmp_path, digits, task, tsm):
    """Micro-batches of different response lengths: each term is weighted by its tokens, as in the loss."""
    from hf_vitask.task import TaskSpec

    uneven = TaskSpec(class_names=[f"class {'long ' * (i % 4)}{i}" for i in range(10)], name="digits")
    trainer = _trainer(
        tmp_path,
        digits,
        uneven,
        tsm,
        stage=2,
        freeze_connector=False,
        max_steps=3,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
    )
    trainer.train()
    lines = [e for e in trainer.state.log_history if "loss_van" in e]
    assert len(lines) == 3
    for e in lines:
        total = e["loss_van"] + e["loss_ep"] + 0.3 * e["loss_rda"] + DEFAULT_CRT_WEIGHT * e["loss_crt"]
        assert total == pytest.approx(e["loss"], rel=1e-5)
