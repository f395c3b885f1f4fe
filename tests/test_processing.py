"""VITaskProcessor: the collator's training batch, the evaluation's generation prompt, the bundle round trip."""

import json
import re
from pathlib import Path

import pytest
import torch

from hf_vitask import TaskSpec, TaskSpecificModel, VITaskProcessor
from hf_vitask.data.collator import VITaskCollator, build_prompts, generation_prompts
from hf_vitask.files import VITASK_PROCESSOR_FILE
from hf_vitask.losses import IGNORE_INDEX
from hf_vitask.models.families import family_of_processor, get_family
from hf_vitask.models.tiny import build_tiny_vlm
from hf_vitask.processing import TSMTransform

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def llava():
    return build_tiny_vlm("llava", seed=0)


@pytest.fixture(scope="module")
def cnn():
    return TaskSpecificModel("test_resnet", num_classes=10, img_size=32).eval()


def _equal(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_training_batch_is_the_collators(llava, cnn, digits, task):
    _, processor = llava
    vp = VITaskProcessor(processor, task, cnn)
    images, labels = digits["train"]["image"][:3], [1, 2, 3]
    batch = vp(images=images, responses=[1, "two", 3])  # class ids and class names alike
    expected = VITaskCollator(processor, task, tsm=cnn)(
        [{"image": i, "label": c} for i, c in zip(images, labels)]
    )
    expected.pop("class_ids")
    _equal(batch, expected)
    _check_labels_mask_the_prompt(
        processor, batch, images, [task.response(c) for c in labels], task.instruction()
    )


def _check_labels_mask_the_prompt(processor, batch, images, responses, instruction):
    """Each row is its generation prompt, then the learnt response (right padding after it)."""
    for i, (image, response) in enumerate(zip(images, responses)):
        prompt = generation_prompts(processor, [image], [instruction])["input_ids"][0]
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        length = int(batch["attention_mask"][i].sum())
        assert batch["attention_mask"][i, :length].all()  # right padding
        assert torch.equal(ids[: len(prompt)], prompt)
        assert (labels[: len(prompt)] == IGNORE_INDEX).all() and (labels[length:] == IGNORE_INDEX).all()
        assert torch.equal(labels[len(prompt) : length], ids[len(prompt) : length])
        learnt = processor.tokenizer.decode(ids[len(prompt) : length], skip_special_tokens=True)
        assert learnt.strip().startswith(response), (learnt, response)


def test_generation_prompt_is_the_evaluations(llava, cnn, digits, task):
    _, processor = llava
    vp = VITaskProcessor(processor, task, cnn)
    images = digits["test"]["image"][:3]
    inputs = vp(images=images)
    expected = dict(build_prompts(processor, task, images))
    assert torch.equal(inputs.pop("tsm_pixel_values"), cnn.preprocess(images))
    _equal(inputs, expected)
    _equal(vp(images=images, instruction="incomplete", task=0), {
        **build_prompts(processor, task, images, complete=False), "tsm_pixel_values": cnn.preprocess(images)
    })  # fmt: skip
    custom = VITaskProcessor(processor)(images=images[0], instruction="Which digit is it?")
    _equal(custom, generation_prompts(processor, images[:1], ["Which digit is it?"]))


def test_free_text_responses_and_several_tasks(llava, digits, task):
    _, processor = llava
    other = TaskSpec(["odd", "even"], name="parity", question="Is the digit odd or even?")
    vp = VITaskProcessor(processor, [task, other])
    images = digits["train"]["image"][:2]
    batch = vp(images=images, responses=["three", "even"], task=[0, 1])
    rows = [{"image": img, "label": c, "task": t} for img, c, t in zip(images, ["three", "even"], [0, 1])]
    expected = VITaskCollator(processor, [task, other])(rows)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], expected[key]), key
    assert vp.parse("even.", task=1) == 1 and vp.parse(["seven.", "no idea"]) == [7, None]
    raw = vp(
        images=images,
        instruction="Describe it.",
        responses=["A round digit.", "A thin one."],
        raw_responses=True,
    )
    assert (raw["labels"] != IGNORE_INDEX).any(1).all() and "tsm_pixel_values" not in raw


def test_errors_name_the_item(llava, digits, task):
    _, processor = llava
    vp = VITaskProcessor(processor, task)
    images = digits["train"]["image"][:2]
    with pytest.raises(ValueError, match=r"Unknown label 'twelve' at index 1 for task 'digits'"):
        vp(images=images, responses=[1, "twelve"])
    with pytest.raises(ValueError, match=r"Label 10 at index 0 is out of range"):
        vp(images=images, responses=[10, 1])
    with pytest.raises(ValueError, match=r"Missing image at index 1"):
        vp(images=[images[0], None])
    with pytest.raises(ValueError, match=r"instruction at index 0 must be 'complete', 'incomplete'"):
        vp(images=images, instruction="")
    with pytest.raises(ValueError, match=r"Task index 1 at index 0 is out of range for 1 task"):
        vp(images=images, task=1)
    with pytest.raises(ValueError, match=r"2 images but 1 responses"):
        vp(images=images, responses=[1])
    with pytest.raises(ValueError, match=r"has no task at index 0"):
        VITaskProcessor(processor)(images=images)
    with pytest.raises(TypeError, match=r"unexpected arguments \['padding'\]"):
        vp(images=images, padding=True)


def test_it_stands_in_for_the_vlm_processor(digits, task):
    """Passed where the VLM's processor went (the collator, the family registry), it is that processor."""
    _, processor = build_tiny_vlm("mllama", seed=0)
    vp = VITaskProcessor(processor, task)
    assert isinstance(vp, VITaskProcessor) and not isinstance(vp, type(processor))
    assert family_of_processor(vp) is get_family("mllama")
    assert vp.tokenizer is processor.tokenizer and vp.image_token == processor.image_token
    assert vp.apply_chat_template is not None and VITaskProcessor(vp).processor is processor
    rows = [{"image": img, "label": 1} for img in digits["train"]["image"][:2]]
    _equal(VITaskCollator(vp, task)(rows), VITaskCollator(processor, task)(rows))
    ids = vp(images=rows[0]["image"])["input_ids"]
    assert vp.batch_decode(ids) == processor.batch_decode(ids) and vp.decode(ids[0]) == processor.decode(
        ids[0]
    )


def test_save_and_from_pretrained_give_the_same_tensors(llava, cnn, digits, task, tmp_path):
    _, processor = llava
    vp = VITaskProcessor(processor, task, cnn)
    vp.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / VITASK_PROCESSOR_FILE).read_text())
    assert (
        saved["tsm_transform"]["backend"] == "timm" and saved["processor_class"] == type(processor).__name__
    )
    loaded = VITaskProcessor.from_pretrained(tmp_path)
    assert loaded.tasks == [task] and loaded.tsm_transform == vp.tsm_transform
    images = digits["test"]["image"][:3]
    _equal(loaded(images=images), vp(images=images))
    _equal(loaded(images=images, responses=[4, 5, 6]), vp(images=images, responses=[4, 5, 6]))
    with pytest.raises(FileNotFoundError, match="neither a bundle directory nor"):
        VITaskProcessor.from_pretrained(str(tmp_path / "missing") + "/")


def test_a_repo_id_resolves_as_load_vitask_does(llava, task, tmp_path, monkeypatch):
    import huggingface_hub

    _, processor = llava
    VITaskProcessor(processor, task).save_pretrained(tmp_path)
    calls = []

    def snapshot_download(**kwargs):  # the Hub, intercepted
        calls.append(kwargs)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = VITaskProcessor.from_pretrained("me/digits-vitask", revision="v1")
    assert calls == [{"repo_id": "me/digits-vitask", "revision": "v1", "token": None}]
    assert loaded.task == task and loaded.tsm_transform is None


def test_transformers_tsm_transform_round_trips(digits):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from hf_vitask import TransformersTSM

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=10)  # fmt: skip
    image_processor = ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    tsm = TransformersTSM(ViTForImageClassification(config), image_processor)
    transform = TSMTransform.from_dict(json.loads(json.dumps(TSMTransform.from_tsm(tsm).to_dict())))
    images = digits["test"]["image"][:2]
    assert transform.backend == "transformers" and torch.equal(transform(images), tsm.preprocess(images))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, digits, task):
    """One VITask stage-1 step with a TSM on tiny llava, saved with save_model; the trainer is given a
    VITaskProcessor as its processing_class (the plain VLM processor is what the other suites give)."""
    from hf_vitask import VITaskConfig, VITaskTrainer

    root = tmp_path_factory.mktemp("processing")
    vlm, processor = build_tiny_vlm("llava", seed=0)
    args = VITaskConfig(output_dir=str(root / "run"), max_steps=1, per_device_train_batch_size=2, report_to="none",
                        save_strategy="no", lora_r=4, disable_tqdm=True)  # fmt: skip
    tsm = TaskSpecificModel("test_resnet", num_classes=10, img_size=32)
    trainer = VITaskTrainer(model=vlm, args=args, processing_class=VITaskProcessor(processor, task, tsm),
                            train_dataset=digits["train"], task=task, tsm=tsm)  # fmt: skip
    trainer.train()
    trainer.save_model(str(root / "vitask-digits"))
    return root / "vitask-digits", processor, tsm


def test_every_bundle_holds_it_and_load_vitask_returns_it(bundle, digits, task):
    from hf_vitask import load_vitask, predict_classes

    path, processor, tsm = bundle
    assert VITASK_PROCESSOR_FILE in json.loads((path / "hf_vitask_bundle.json").read_text())["entries"]
    model, vp, task2 = load_vitask(path)
    assert isinstance(vp, VITaskProcessor) and task2 == task and vp.task == task
    images = digits["test"]["image"][:3]
    expected = VITaskProcessor(processor, task, tsm)
    _equal(vp(images=images), expected(images=images))
    _equal(VITaskProcessor.from_pretrained(path)(images=images), expected(images=images))
    # callers that took the VLM's processor take it unchanged
    for use_tsm in (False, True):
        assert predict_classes(model, vp, task2, images, use_tsm=use_tsm) == predict_classes(
            model, processor, task, images, use_tsm=use_tsm
        )
    # a bundle saved before vitask_processor.json: the transform comes from tsm/
    (path / VITASK_PROCESSOR_FILE).rename(path.parent / "saved.json")
    try:
        assert VITaskProcessor.from_pretrained(path).tsm_transform == expected.tsm_transform
        assert load_vitask(path).processor.tsm_transform == expected.tsm_transform
    finally:
        (path.parent / "saved.json").rename(path / VITASK_PROCESSOR_FILE)


def test_readme_prediction_snippet_runs(bundle, digits, monkeypatch, capsys):
    from hf_vitask import generate_answers, load_vitask

    path, _, _ = bundle
    code = re.search(
        r"## Predict with a trained bundle.*?```py\n(.*?)```", README.read_text(), flags=re.S
    ).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 6
    monkeypatch.chdir(path.parent)
    images = digits["test"]["image"][:2]
    exec(compile(code, str(README), "exec"), {"__name__": "readme", "images": images})
    predictions = eval(capsys.readouterr().out.strip().splitlines()[-1])
    model, processor, task = load_vitask(path)
    answers = generate_answers(model, processor, task, images, use_tsm=True, max_new_tokens=8)
    assert predictions == [task.parse(a) for a in answers]


# -- one place renders prompts --------------------------------------------------------------------------
MARK = "Look closely at the strokes."


class _Marked(VITaskProcessor):
    """A chat layout of its own: a sentence after every instruction. Counts what it rendered."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rendered: list[str] = []

    def prompt_messages(self, instruction):
        self.rendered.append(instruction)
        return super().prompt_messages(f"{instruction} {MARK}")


def _has_mark(ids: torch.Tensor, mark: list[int]) -> bool:
    ids, n = ids.tolist(), len(mark)
    return any(ids[i : i + n] == mark for i in range(len(ids) - n + 1))


def test_collators_and_evaluation_render_prompts_through_the_processor(llava, cnn, digits, task):
    """Training batches, option scoring, generation and multiple-choice evaluation all take their
    prompts from the VITaskProcessor: a processor with another chat layout changes every one of them."""
    from hf_vitask.data.instruction_free import InstructionFreeCollator
    from hf_vitask.evaluation import generate_texts, mc_evaluate, score_options
    from hf_vitask.models.modeling import VITaskModel

    vlm, processor = llava
    marked = _Marked(processor, task)
    mark = processor.tokenizer(f" {MARK}", add_special_tokens=False)["input_ids"][2:-1]  # inner words
    assert len(mark) >= 3
    images = digits["train"]["image"][:2]
    rows = [{"image": img, "label": c} for img, c in zip(images, [3, 5])]

    batch = VITaskCollator(marked, task)(rows)
    plain = VITaskCollator(processor, task)(rows)
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        assert _has_mark(ids[labels == IGNORE_INDEX], mark)  # in the prompt, never learnt
    assert not any(_has_mark(ids, mark) for ids in plain["input_ids"])
    assert torch.equal(
        batch["labels"][batch["labels"] != IGNORE_INDEX], plain["labels"][plain["labels"] != IGNORE_INDEX]
    )
    free = InstructionFreeCollator(marked, use_proxy=False, instruction_text="Describe the image.")
    assert all(
        _has_mark(ids, mark) for ids in free([{"image": images[0], "description": "a digit"}])["input_ids"]
    )

    model = VITaskModel.from_vlm(vlm, processor, tsm=cnn).eval()
    seen: list[torch.Tensor] = []
    hook = vlm.get_input_embeddings().register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    try:
        for run in (
            lambda: score_options(model, marked, task, images, shared_prompt=True),
            lambda: score_options(model, marked, task, images, shared_prompt=False, use_tsm=True),
            lambda: generate_texts(model, marked, images, ["Which digit?"] * 2, max_new_tokens=2),
            lambda: mc_evaluate(
                model,
                marked,
                [{"image": images[0], "question": "Which?", "options": ["one", "two"], "answer": 0}],
            ),
        ):
            seen.clear()
            marked.rendered.clear()
            run()
            assert marked.rendered, run
            assert seen and all(_has_mark(row, mark) for row in seen[0])  # the first pass runs the prompts
    finally:
        hook.remove()
    assert not torch.allclose(
        score_options(model, marked, task, images), score_options(model, processor, task, images)
    )


def test_a_processor_subclass_trains_with_its_layout_and_is_named_in_the_bundle(
    llava, digits, task, tmp_path
):
    from hf_vitask import VITaskConfig, VITaskTrainer

    vlm, processor = build_tiny_vlm("llava", seed=0)  # the trainer adds LoRA layers to the model it gets
    marked = _Marked(processor, task)
    mark = processor.tokenizer(f" {MARK}", add_special_tokens=False)["input_ids"][2:-1]
    args = VITaskConfig(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, report_to="none",
                        lora_r=4, ep_weight=0.0, rda_weight=0.0)  # fmt: skip
    trainer = VITaskTrainer(
        model=vlm, args=args, processing_class=marked, train_dataset=digits["train"], task=task
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert all(_has_mark(ids, mark) for ids in batch["input_ids"])

    marked.save_pretrained(tmp_path / "saved")
    assert (
        json.loads((tmp_path / "saved" / VITASK_PROCESSOR_FILE).read_text())["vitask_processor_class"]
        == "_Marked"
    )
    images = digits["test"]["image"][:2]
    _equal(_Marked.from_pretrained(tmp_path / "saved")(images=images), marked(images=images))
    with pytest.warns(UserWarning, match=r"saved by _Marked.*_Marked\.from_pretrained"):
        VITaskProcessor.from_pretrained(tmp_path / "saved")
