"""VITaskCollator and build_prompts on both tiny families (llava, qwen2_vl).

What must hold: only the response (+ end of turn) is learnt, the prompt seen in training is
the prompt used at inference, CRT negatives always have another class, and bad rows fail
naming the row instead of at step 3,000.
"""

from __future__ import annotations

import io
import itertools

import datasets
import pytest
import torch
from PIL import Image

from hf_vitask.data.collator import VITaskCollator, build_prompts, pick_negatives, user_message
from hf_vitask.losses import IGNORE_INDEX
from hf_vitask.task import TaskSpec

# Class names of very different token lengths, so a batch needs right padding in both families
# (every digit name is a single token in the tiny llava vocabulary).
UNEVEN = TaskSpec(
    class_names=["no", "pleural effusion with café au lait spots 42"], name="uneven", modality="chest X-ray"
)


def _rows(random_image, labels, **extra) -> list[dict]:
    return [{"image": random_image(i), "label": label, **extra} for i, label in enumerate(labels)]


def _label_span(labels_row: torch.Tensor) -> tuple[int, int]:
    """[start, end) of the learnt positions; asserts they are one contiguous block."""
    pos = (labels_row != IGNORE_INDEX).nonzero().flatten()
    assert len(pos) > 0, "row has nothing to learn"
    start, end = pos[0].item(), pos[-1].item() + 1
    assert (labels_row[start:end] != IGNORE_INDEX).all(), "learnt tokens are not one block"
    return start, end


def _generation_suffix(processor, instruction: str) -> str:
    """What ``add_generation_prompt=True`` appends: the start of the assistant turn."""
    with_gen = processor.apply_chat_template(
        user_message(instruction), add_generation_prompt=True, tokenize=False
    )
    without = processor.apply_chat_template(
        user_message(instruction), add_generation_prompt=False, tokenize=False
    )
    assert with_gen.startswith(without) and len(with_gen) > len(without)
    return with_gen[len(without) :]


def _pixel_rows(batch, family: str) -> int:
    """Number of images in the batch's pixel data (qwen flattens patches, one grid per image)."""
    return batch["pixel_values"].shape[0] if family == "llava" else batch["image_grid_thw"].shape[0]


# -- 1. masking ------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["digits", "uneven"])
def test_labels_learn_only_the_response_then_end_of_turn(tiny, task, random_image, which):
    _, processor = tiny
    tok = processor.tokenizer
    spec = task if which == "digits" else UNEVEN
    labels = list(range(spec.num_classes)) + [0]
    collator = VITaskCollator(processor, spec)
    batch = collator(_rows(random_image, labels))
    ids, mask, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert lab.shape == ids.shape == mask.shape
    image_id = collator.image_token_id
    assert image_id is not None

    assert (lab[mask == 0] == IGNORE_INDEX).all(), "padding is learnt"
    assert (lab[ids == image_id] == IGNORE_INDEX).all(), "image tokens are learnt"
    if which == "uneven":
        assert (mask == 0).any(), "test needs a padded row"
    gen_suffix = _generation_suffix(processor, spec.instruction())
    for i, label in enumerate(labels):
        real = mask[i].nonzero().flatten()
        # right padding: the real tokens are a prefix of the row
        assert real.tolist() == list(range(len(real)))
        start, end = _label_span(lab[i])
        assert (lab[i, :start] == IGNORE_INDEX).all()  # the whole prompt is masked
        assert (lab[i, start:end] == ids[i, start:end]).all()  # labels are the input tokens themselves
        assert end == len(real), "the response must run to the end of the row (end of turn included)"
        last_image = (ids[i] == image_id).nonzero().flatten()[-1].item()
        assert start > last_image
        # the masked part is the full prompt, ending with the generation prompt
        prompt = tok.decode(ids[i, :start])
        assert spec.instruction() in prompt and prompt.endswith(gen_suffix)
        # the learnt part is exactly response + end of turn
        learnt = tok.decode(lab[i, start:end])
        assert tok.eos_token in learnt
        assert learnt.strip() == spec.response(label) + tok.eos_token, learnt
        assert spec.parse(learnt.replace(tok.eos_token, "")) == label


def test_training_prompt_is_the_inference_prompt(tiny, task, random_image):
    _, processor = tiny
    labels = [4, 1]
    batch = VITaskCollator(processor, task)(_rows(random_image, labels))
    prompts = build_prompts(processor, task, [random_image(i) for i in range(len(labels))])
    for i in range(len(labels)):
        start, _ = _label_span(batch["labels"][i])
        inference = prompts["input_ids"][i][prompts["attention_mask"][i].bool()]
        assert batch["input_ids"][i, :start].tolist() == inference.tolist()


# -- 2. instruction variants -----------------------------------------------------------------------


def test_complete_and_incomplete_instruction(tiny, task, random_image):
    _, processor = tiny
    rows = _rows(random_image, [2, 5])
    decode = processor.tokenizer.decode
    full = VITaskCollator(processor, task)(rows)
    terse = VITaskCollator(processor, task, complete_instruction=False)(rows)
    assert task.instruction(True) != task.instruction(False)
    for i in range(len(rows)):
        assert task.instruction(True) in decode(full["input_ids"][i])
        text = decode(terse["input_ids"][i])
        assert task.instruction(False) in text
        assert task.instruction(True) not in text and ", ".join(task.class_names) not in text
    # the terse prompt is shorter, the answer is the same
    assert terse["input_ids"].shape[1] < full["input_ids"].shape[1]
    for i in range(len(rows)):
        s_full, e_full = _label_span(full["labels"][i])
        s_terse, e_terse = _label_span(terse["labels"][i])
        assert full["labels"][i, s_full:e_full].tolist() == terse["labels"][i, s_terse:e_terse].tolist()


# -- 3. class ids, TSM pixels, string labels -------------------------------------------------------


def test_class_ids_and_tsm_pixel_values(tiny, family, task, tsm, random_image):
    _, processor = tiny
    labels = [3, 0, 9]
    with_tsm = VITaskCollator(processor, task, tsm=tsm)(_rows(random_image, labels))
    assert with_tsm["class_ids"].dtype == torch.long
    assert with_tsm["class_ids"].tolist() == labels
    assert with_tsm["tsm_pixel_values"].shape == (3, 3, 32, 32)
    assert with_tsm["tsm_pixel_values"].dtype == torch.float32
    assert _pixel_rows(with_tsm, family) == 3
    assert "crt_negative_index" not in with_tsm

    without = VITaskCollator(processor, task)(_rows(random_image, labels))
    assert "tsm_pixel_values" not in without
    assert without["class_ids"].tolist() == labels
    for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
        assert torch.equal(without[key], with_tsm[key])


def test_labels_may_be_class_names(tiny, task, random_image):
    _, processor = tiny
    labels = [7, 2, 0]
    collator = VITaskCollator(processor, task)
    by_id = collator(_rows(random_image, labels))
    by_name = collator(_rows(random_image, [task.class_names[c] for c in labels]))
    assert by_name["class_ids"].tolist() == labels
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(by_id[key], by_name[key])


def test_custom_columns_and_row_ids(tiny, task, random_image):
    _, processor = tiny
    collator = VITaskCollator(processor, task, image_column="img", label_column="y")
    batch = collator([{"img": random_image(0), "y": 1}, {"img": random_image(1), "y": "six"}])
    assert batch["class_ids"].tolist() == [1, 6]
    with pytest.raises(ValueError, match=r"row 1 \(id 'scan-b'\)"):
        collator([{"img": random_image(0), "y": 1, "id": "scan-a"}, {"img": None, "y": 1, "id": "scan-b"}])


# -- 4. CRT negatives ------------------------------------------------------------------------------


def test_pick_negatives():
    import random

    rng = random.Random(0)
    class_ids = [0, 0, 1, 2, 2]
    for _ in range(20):
        neg = pick_negatives(class_ids, rng)
        assert all(class_ids[j] != c for j, c in zip(neg, class_ids))
    assert pick_negatives([3, 3, 3], rng) == [-1, -1, -1]
    assert pick_negatives([], rng) == []


def test_in_batch_negatives(tiny, family, task, random_image):
    _, processor = tiny
    collator = VITaskCollator(processor, task, with_negatives=True, seed=1)
    labels = [0, 0, 1, 2, 2, 1]
    for _ in range(3):  # the rng moves on between batches; every draw must be valid
        batch = collator(_rows(random_image, labels))
        neg = batch["crt_negative_index"]
        assert neg.dtype == torch.long and neg.shape == (len(labels),)
        assert batch["input_ids"].shape[0] == len(labels)  # no extra rows without a dataset
        for i, j in enumerate(neg.tolist()):
            assert 0 <= j < len(labels) and j != i
            assert batch["class_ids"][j] != batch["class_ids"][i]

    single = collator(_rows(random_image, [4, 4, 4]))
    assert single["crt_negative_index"].tolist() == [-1, -1, -1]
    assert single["input_ids"].shape[0] == 3 and _pixel_rows(single, family) == 3


def test_dataset_negatives_top_up_a_single_class_batch(tiny, family, task, tsm, digits, random_image):
    _, processor = tiny
    collator = VITaskCollator(processor, task, tsm=tsm, negatives_dataset=digits["train"], seed=0)
    n_real = 3
    batch = collator(_rows(random_image, [5] * n_real))
    n = n_real * 2  # one extra row per real row that had no in-batch negative
    ids, labels, class_ids, neg = (
        batch["input_ids"],
        batch["labels"],
        batch["class_ids"],
        batch["crt_negative_index"],
    )
    assert ids.shape[0] == labels.shape[0] == batch["attention_mask"].shape[0] == n
    assert class_ids.shape == neg.shape == (n,)
    assert _pixel_rows(batch, family) == n
    assert batch["tsm_pixel_values"].shape == (n, 3, 32, 32)
    assert ((ids == collator.image_token_id).sum(1) == 16).all()  # every row carries its own image
    assert class_ids[:n_real].tolist() == [5] * n_real
    assert (labels[n_real:] == IGNORE_INDEX).all()  # extra rows only lend their image
    assert neg[n_real:].tolist() == [-1] * n_real
    for i in range(n_real):
        j = neg[i].item()
        assert n_real <= j < n
        assert class_ids[j] != class_ids[i]
    assert sorted(neg[:n_real].tolist()) == list(range(n_real, n))  # each extra row used once
    # real rows still learn their answer
    for i in range(n_real):
        _label_span(labels[i])


def test_dataset_negatives_not_needed_for_a_mixed_batch(tiny, task, digits, random_image):
    _, processor = tiny
    collator = VITaskCollator(processor, task, negatives_dataset=digits["train"])
    batch = collator(_rows(random_image, [1, 2, 1]))
    assert batch["input_ids"].shape[0] == 3
    neg = batch["crt_negative_index"].tolist()
    assert all(batch["class_ids"][j] != batch["class_ids"][i] for i, j in enumerate(neg))


def test_negatives_are_deterministic_for_a_seed(tiny, task, digits, random_image):
    _, processor = tiny
    batches = [_rows(random_image, [8, 8]), _rows(random_image, [0, 3, 3, 6])]

    def run(seed):
        collator = VITaskCollator(processor, task, negatives_dataset=digits["train"], seed=seed)
        return [collator(rows) for rows in batches]

    first, second = run(7), run(7)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_negatives_dataset_errors_name_the_dataset_row(tiny, task, random_image, tmp_path):
    _, processor = tiny
    bad = datasets.Dataset.from_dict({"image": [str(tmp_path / "gone.png")], "label": [1]})
    collator = VITaskCollator(processor, task, negatives_dataset=bad)
    with pytest.raises(ValueError, match=r"row 0 of the negatives dataset.*gone\.png"):
        collator(_rows(random_image, [0]))
    one_class = datasets.Dataset.from_dict({"image": [random_image(0)], "label": [0]})
    with pytest.raises(ValueError, match="at least two classes"):
        VITaskCollator(processor, task, negatives_dataset=one_class)(_rows(random_image, [0]))


# -- 5. errors name the offending item; images by path and bytes load --------------------------------


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_images_from_paths_and_bytes_load_like_pil(tiny, task, random_image, tmp_path):
    _, processor = tiny
    collator = VITaskCollator(processor, task)
    images = [random_image(0), random_image(1), random_image(2).convert("L"), random_image(3)]
    path = tmp_path / "img0.png"
    images[0].save(path)
    (tmp_path / "img3.png").write_bytes(_png_bytes(images[3]))
    rows = [
        {"image": str(path), "label": 0},
        {"image": {"bytes": _png_bytes(images[1]), "path": None}, "label": 1},
        {"image": {"bytes": _png_bytes(images[2])}, "label": 2},  # greyscale -> RGB
        {"image": {"bytes": None, "path": str(tmp_path / "img3.png")}, "label": 3},
    ]
    from_files = collator(rows)
    from_pil = collator([{"image": img, "label": i} for i, img in enumerate(images)])
    for key in from_pil:
        assert torch.equal(from_files[key], from_pil[key]), key


@pytest.mark.parametrize(
    "case, error, pattern",
    [
        ("missing image", ValueError, r"Missing image in row 1"),
        ("null image dict", ValueError, r"Missing image in row 1"),
        ("no such path", ValueError, r"not found in row 1.*does-not-exist\.png"),
        ("corrupt file", ValueError, r"Cannot read image in row 1.*garbage\.png"),
        ("corrupt bytes", ValueError, r"Cannot read image in row 1 \(<4000 bytes>\)"),
        ("truncated lazy PIL", ValueError, r"Cannot read image in row 1"),
        ("label out of range", ValueError, r"Label 10 in row 2 is out of range"),
        ("negative label", ValueError, r"Label -1 in row 2 is out of range"),
        ("unknown class name", ValueError, r"Unknown label 'eleven' in row 2"),
        ("no label", ValueError, r"neither a class id nor a class name"),
        ("no image column", KeyError, r"Row 1 has no 'image' column"),
        ("no label column", KeyError, r"Row 2 has no 'label' column"),
    ],
)
def test_bad_rows_fail_naming_the_row(tiny, task, random_image, tmp_path, case, error, pattern):
    _, processor = tiny
    rows = _rows(random_image, [0, 1, 2])
    if case == "missing image":
        rows[1]["image"] = None
    elif case == "null image dict":
        rows[1]["image"] = {"bytes": None, "path": None}
    elif case == "no such path":
        rows[1]["image"] = str(tmp_path / "does-not-exist.png")
    elif case == "corrupt file":
        (tmp_path / "garbage.png").write_bytes(b"\x89PNG not really" * 10)
        rows[1]["image"] = str(tmp_path / "garbage.png")
    elif case == "corrupt bytes":
        rows[1]["image"] = {"bytes": b"\x00\x01\x02\x03" * 1000, "path": None}
    elif case == "truncated lazy PIL":
        data = _png_bytes(random_image(1, 128))
        (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
        rows[1]["image"] = Image.open(tmp_path / "half.png")  # lazy: decoding fails in the collator
    elif case == "label out of range":
        rows[2]["label"] = 10
    elif case == "negative label":
        rows[2]["label"] = -1
    elif case == "unknown class name":
        rows[2]["label"] = "eleven"
    elif case == "no label":
        rows[2]["label"] = None
    elif case == "no image column":
        del rows[1]["image"]
    elif case == "no label column":
        del rows[2]["label"]
    with pytest.raises(error, match=pattern) as excinfo:
        VITaskCollator(processor, task)(rows)
    assert len(str(excinfo.value)) < 400  # never dumps image bytes into the message


def test_empty_batch(tiny, task):
    with pytest.raises(ValueError, match="Empty batch"):
        VITaskCollator(tiny[1], task)([])


def test_max_length_names_rows_and_never_truncates(tiny, task, random_image):
    _, processor = tiny
    rows = _rows(random_image, [0, 1])
    batch = VITaskCollator(processor, task)(rows)
    longest = batch["attention_mask"].sum(1).max().item()
    fits = VITaskCollator(processor, task, max_length=longest)(rows)
    assert torch.equal(fits["input_ids"], batch["input_ids"])  # untouched when it fits
    with pytest.raises(
        ValueError, match=r"Rows \[0, 1\] are \[\d+, \d+\] tokens long, over max_length=10"
    ) as e:
        VITaskCollator(processor, task, max_length=10)(rows)
    assert "truncat" in str(e.value)


def test_tokenizer_without_pad_token_is_refused(tiny, task):
    _, processor = tiny
    processor.tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        VITaskCollator(processor, task)


# -- 6. build_prompts ------------------------------------------------------------------------------


class _TwoInstructions:
    """Duck-typed task whose instruction alternates, so prompts in one batch differ in length."""

    def __init__(self, *texts: str):
        self._texts = itertools.cycle(texts)

    def instruction(self, complete: bool = True) -> str:
        return next(self._texts)


def test_build_prompts_are_left_padded_generation_prompts(tiny, family, task, random_image):
    _, processor = tiny
    tok = processor.tokenizer
    images = [random_image(0), random_image(1)]
    out = build_prompts(processor, task, images)
    assert set(out) >= {"input_ids", "attention_mask", "pixel_values"}
    assert _pixel_rows(out, family) == 2
    assert tok.padding_side == "right"  # left padding is asked per call, the tokenizer is untouched
    gen_suffix = _generation_suffix(processor, task.instruction())
    for i in range(2):
        text = tok.decode(out["input_ids"][i][out["attention_mask"][i].bool()])
        assert text.endswith(gen_suffix)
        after = text.split(task.instruction(), 1)[1]
        assert task.parse(after) is None, f"a response leaked into the prompt: {after!r}"
        assert not any(task.response(c) in after for c in range(task.num_classes))
    terse = build_prompts(processor, task, images, complete=False)
    text = tok.decode(terse["input_ids"][0])
    assert task.instruction(False) in text and task.instruction(True) not in text

    # rows of different lengths: the shorter one is padded on the left and otherwise identical
    long_text, short_text = task.instruction(True), task.instruction(False)
    mixed = build_prompts(processor, _TwoInstructions(long_text, short_text), images)
    mask = mixed["attention_mask"]
    n_long, n_short = mask.sum(1).tolist()
    assert n_long > n_short and mask.shape[1] == n_long
    assert mask[0].all()
    assert (mask[1, : n_long - n_short] == 0).all() and mask[1, n_long - n_short :].all()
    assert (mixed["input_ids"][1, : n_long - n_short] == tok.pad_token_id).all()
    alone = build_prompts(processor, task, images[1:], complete=False)
    assert mixed["input_ids"][1, n_long - n_short :].tolist() == alone["input_ids"][0].tolist()
    assert tok.decode(mixed["input_ids"][1][mask[1].bool()]).endswith(gen_suffix)


def test_build_prompts_names_a_bad_image(tiny, task, random_image, tmp_path):
    with pytest.raises(ValueError, match=r"not found at index 1"):
        build_prompts(tiny[1], task, [random_image(0), str(tmp_path / "nope.png")])


def test_vlm_collator_is_trls_for_families_without_quirks_and_fixes_the_others(digits):
    """VLMCollator finds the family from the processor; for LLaVA it returns exactly trl's batch,
    for PaliGemma (whose processor refuses text without images) the answer is a causal suffix."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from hf_vitask.data.collator import assistant_message, user_message
    from hf_vitask.data.vlm_collator import VLMCollator
    from hf_vitask.models.families import family_of_processor
    from hf_vitask.models.tiny import build_tiny_vlm

    def examples():
        return [
            {
                "images": [row["image"].convert("RGB")],
                "prompt": user_message("Which digit?"),
                "completion": assistant_message(f"digit {row['label']}"),
            }
            for row in digits["train"].select(range(3))
        ]

    _, llava = build_tiny_vlm("llava")
    ours = VLMCollator(llava, completion_only_loss=True)
    assert ours.family.name == "llava"
    theirs = DataCollatorForVisionLanguageModeling(llava, completion_only_loss=True).torch_call(examples())
    got = ours.torch_call(examples())
    assert set(got) == set(theirs) and all(torch.equal(got[k], theirs[k]) for k in theirs)

    _, paligemma = build_tiny_vlm("paligemma")
    with pytest.raises(ValueError, match="images"):  # what trl alone does with PaliGemma
        DataCollatorForVisionLanguageModeling(paligemma, completion_only_loss=True).torch_call(examples())
    batch = VLMCollator(paligemma, completion_only_loss=True).torch_call(examples())
    answer = batch["labels"] != -100
    assert answer.any(1).all()
    assert torch.equal(batch["token_type_ids"].bool() & batch["attention_mask"].bool(), answer)
    assert family_of_processor(llava.tokenizer) is None  # no family claims a bare tokenizer


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_images_are_scaled_by_their_range_not_clipped(tmp_path, mode):
    """A 16-bit scan through convert("RGB") is nearly all white; scaled, its gradient keeps its order."""
    import numpy as np

    from hf_vitask.data.collator import load_image
    from hf_vitask.models.tsm import _to_rgb

    ramp = np.linspace(1000, 60000, 64 * 32).reshape(32, 64)  # all above 255: clipping would flatten it
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    image = Image.fromarray(ramp.astype(dtype))
    assert image.mode == mode
    assert len(set(np.asarray(image.convert("RGB"))[..., 0].ravel().tolist())) <= 2  # what PIL alone does
    sources = [image]
    if mode == "I;16":
        image.save(tmp_path / "scan.png")
        sources.append(str(tmp_path / "scan.png"))
    for source in sources:
        for rgb in (load_image(source, ""), _to_rgb(image, 0)):
            pixels = np.asarray(rgb)[..., 0].astype(int).ravel()
            assert rgb.mode == "RGB" and pixels.min() == 0 and pixels.max() == 255
            assert (np.diff(pixels) >= 0).all() and len(set(pixels.tolist())) > 200
    flat = Image.fromarray(np.full((4, 4), 5000, np.uint16))
    assert np.asarray(load_image(flat, "")).max() == 0  # a constant image is black, as documented


def test_a_chat_template_that_drops_the_image_is_named(random_image, task):
    from hf_vitask.models.tiny import build_tiny_vlm

    _, processor = build_tiny_vlm("llava")
    processor.chat_template = (  # renders only the text parts of each message
        "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'text' %}"
        "{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(ValueError, match=r"Rows \[0, 1\] have no image token after the chat template"):
        VITaskCollator(processor, task)(_rows(random_image, [0, 1]))
