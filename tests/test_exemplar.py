"""Exemplar slot insertion and injection, on plain tensors and a toy embedding."""

import pytest
import torch
from torch import nn

from hf_vitask.models.exemplar import (
    ConnectorConfig,
    ExemplarConnector,
    ExemplarInjector,
    exemplar_positions,
    insert_exemplar_slots,
)

IMG, END, PAD = 9, 8, 0


def test_positions_after_image_block():
    ids = torch.tensor([[1, IMG, IMG, 5, 6, PAD], [1, 2, IMG, IMG, 7, 6]])
    assert exemplar_positions(ids, IMG).tolist() == [3, 4]


def test_positions_skip_the_image_end_marker():
    ids = torch.tensor([[1, IMG, IMG, END, 5], [IMG, END, 2, 3, 4]])
    assert exemplar_positions(ids, IMG, END).tolist() == [4, 2]


def test_positions_require_an_image():
    with pytest.raises(ValueError, match=r"rows \[1\] have no image token"):
        exemplar_positions(torch.tensor([[IMG, 1], [1, 2]]), IMG)


def test_insert_slots_by_hand():
    batch = {
        "input_ids": torch.tensor([[1, IMG, 5, 6], [IMG, 5, 6, PAD]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, -100, 5, 6], [-100, 5, 6, -100]]),
        "mm_token_type_ids": torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0]]),
        "pixel_values": torch.ones(2, 3),
    }
    out, slots = insert_exemplar_slots(batch, torch.tensor([2, 1]), 2, PAD, ("mm_token_type_ids",))
    assert out["input_ids"].tolist() == [[1, IMG, PAD, PAD, 5, 6], [IMG, PAD, PAD, 5, 6, PAD]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert out["labels"].tolist() == [[-100, -100, -100, -100, 5, 6], [-100, -100, -100, 5, 6, -100]]
    assert out["mm_token_type_ids"].tolist() == [[0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert out["pixel_values"] is batch["pixel_values"]
    assert slots.tolist() == [
        [False, False, True, True, False, False],
        [False, True, True, False, False, False],
    ]


@pytest.mark.parametrize("feature,shape", [("pooled", (3, 16)), ("patch", (3, 5, 16))])
def test_connector_shapes(feature, shape):
    conn = ExemplarConnector(ConnectorConfig(tsm_dim=16, llm_dim=8, num_tokens=2, feature=feature))
    assert conn(torch.randn(*shape)).shape == (3, 2, 8)
    with pytest.raises(ValueError, match="expects"):
        conn(torch.randn(3, 4, 5, 16))


def test_connector_config_validation():
    with pytest.raises(ValueError, match="feature"):
        ConnectorConfig(tsm_dim=4, llm_dim=4, feature="cls")
    with pytest.raises(ValueError, match="num_tokens"):
        ConnectorConfig(tsm_dim=4, llm_dim=4, num_tokens=0)


def test_injector_writes_slots_and_passes_gradient():
    emb = nn.Embedding(10, 4)
    injector = ExemplarInjector(emb)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    slots = torch.tensor([[False, True, False], [False, False, True]])
    values = torch.randn(2, 1, 4, requires_grad=True)
    with injector.inject(slots, values):
        out = emb(ids)
    assert torch.equal(out[0, 1], values[0, 0]) and torch.equal(out[1, 2], values[1, 0])
    assert torch.equal(out[0, 0], emb.weight[1])
    out.sum().backward()
    assert values.grad is not None and torch.equal(values.grad, torch.ones_like(values))
    # outside the context the embedding is untouched, and the hook fires only once per context
    assert torch.equal(emb(ids), emb.weight[ids])


def test_injector_fires_once_and_skips_other_shapes():
    emb = nn.Embedding(10, 4)
    injector = ExemplarInjector(emb)
    slots = torch.tensor([[True, False]])
    values = torch.ones(1, 1, 4)
    with injector.inject(slots, values):
        decode_step = emb(torch.tensor([[3]]))  # a different shape (a decoding step): left alone
        prefill = emb(torch.tensor([[1, 2]]))
        again = emb(torch.tensor([[1, 2]]))
    assert torch.equal(decode_step[0, 0], emb.weight[3])
    assert torch.equal(prefill[0, 0], values[0, 0])
    assert torch.equal(again[0, 0], emb.weight[1])


def test_injector_raises_when_never_used():
    injector = ExemplarInjector(nn.Embedding(10, 4))
    with (
        pytest.raises(RuntimeError, match="never written"),
        injector.inject(torch.tensor([[True]]), torch.ones(1, 1, 4)),
    ):
        pass
    with pytest.raises(ValueError, match="slots"):
        injector.inject(torch.tensor([[True, True]]), torch.ones(1, 1, 4))
