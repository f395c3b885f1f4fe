"""benchmarks/memory_estimate.py: its shape tables count the real architectures, and its per-GPU
estimates order the strategies the way sharding says they must."""

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_estimate.py"


@pytest.fixture(scope="module")
def est():
    spec = importlib.util.spec_from_file_location("memory_estimate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def output():
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return run.stdout


def main_table(text):
    """(base, method, strategy, gpus) of each row of the first markdown table."""
    lines = text.splitlines()
    header = "| base | method | strategy | GPUs | weights"
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 8, line
        rows.append((cells[0], cells[1], cells[2], int(cells[3])))
    return rows


def by_key(rows):
    return {(e.base, e.method, e.strategy, e.gpus): e for e in rows}


def test_totals_near_advertised_sizes(est):
    assert est.total_params(est.QWEN2_VL_2B) == pytest.approx(2.2e9, rel=0.10)
    assert est.total_params(est.LLAMA32_11B_VISION) == pytest.approx(10.6e9, rel=0.10)


def test_totals_match_transformers_counts(est):
    """Full-size counts of Qwen2VLForConditionalGeneration / MllamaForConditionalGeneration built on
    the meta device from these configs (transformers 5): the shape tables are exact, not just close."""
    assert est.total_params(est.QWEN2_VL_2B) == 2_208_985_600
    assert est.total_params(est.LLAMA32_11B_VISION) == 10_670_220_835


def test_shape_formulas_match_transformers_and_peft_on_shallow_models(est):
    """Same widths, fewer layers (fast on the meta device): every per-module formula, and the LoRA count
    for the package's own target regex (Mllama's cross-attention layers included)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from hf_vitask.models.loading import lora_config

    q = est.QWEN2_VL_2B
    q_small = dataclasses.replace(
        q, text=dataclasses.replace(q.text, layers=2), vision=dataclasses.replace(q.vision, depth=2)
    )
    m = est.LLAMA32_11B_VISION
    m_small = dataclasses.replace(
        m,
        text=dataclasses.replace(m.text, layers=5, cross_attn_layers=(3,)),
        vision=dataclasses.replace(m.vision, local_layers=6, global_layers=2),
    )
    with torch.device("meta"):
        qwen = transformers.Qwen2VLForConditionalGeneration(
            transformers.Qwen2VLConfig(
                text_config=dict(
                    hidden_size=1536,
                    intermediate_size=8960,
                    num_hidden_layers=2,
                    num_attention_heads=12,
                    num_key_value_heads=2,
                    vocab_size=151936,
                    tie_word_embeddings=True,
                ),
                vision_config=dict(
                    depth=2,
                    embed_dim=1280,
                    hidden_size=1536,
                    mlp_ratio=4,
                    num_heads=16,
                    patch_size=14,
                    spatial_merge_size=2,
                    temporal_patch_size=2,
                ),
                tie_word_embeddings=True,
            )
        )
        mllama = transformers.MllamaForConditionalGeneration(
            transformers.MllamaConfig(
                text_config=dict(
                    hidden_size=4096,
                    intermediate_size=14336,
                    num_hidden_layers=5,
                    num_attention_heads=32,
                    num_key_value_heads=8,
                    vocab_size=128256,
                    cross_attention_layers=[3],
                    tie_word_embeddings=False,
                ),
                vision_config=dict(
                    hidden_size=1280,
                    num_hidden_layers=6,
                    num_global_layers=2,
                    intermediate_size=5120,
                    patch_size=14,
                    image_size=560,
                    max_num_tiles=4,
                    num_attention_heads=16,
                    intermediate_layers_indices=[0, 1, 2, 3, 5],
                    vision_output_dim=7680,
                ),
            )
        )
    for base, model in ((q_small, qwen), (m_small, mllama)):
        assert est.total_params(base) == sum(p.numel() for p in model.parameters()), base.name
        lora = peft.get_peft_model(model, lora_config(model, r=16))
        trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        assert est.lora_params(base.text, 16) == trainable, base.name


def test_full_finetuning_zero3_below_zero2_below_ddp(est):
    rows = by_key(est.estimates([8]))
    for base in est.BASES:
        ddp, z2, z3 = (rows[base.name, "full", s, 8].total for s in ("DDP", "ZeRO-2", "ZeRO-3"))
        assert z3 < z2 < ddp, base.name


def test_lora_optimizer_state_is_small(est):
    """With LoRA, ZeRO-2 only shards the small adapter states: it saves less than the weights take."""
    rows = by_key(est.estimates([2, 8]))
    for base in est.BASES:
        for n in (2, 8):
            ddp, z2 = rows[base.name, "LoRA", "DDP", n], rows[base.name, "LoRA", "ZeRO-2", n]
            assert 0 < ddp.total - z2.total < ddp.weights


def test_zero3_per_gpu_memory_falls_with_more_gpus(est):
    rows = by_key(est.estimates([2, 8]))
    for base in est.BASES:
        for method in ("LoRA", "full"):
            assert rows[base.name, method, "ZeRO-3", 8].total < rows[base.name, method, "ZeRO-3", 2].total


def test_ddp_does_not_depend_on_gpu_count(est):
    rows = by_key(est.estimates([2, 8]))
    for (base, method, strategy, n), e in rows.items():
        if strategy == "DDP" and n == 8:
            assert e.total == pytest.approx(rows[base, method, strategy, 2].total)


def test_qlora_is_ddp_only(est):
    with pytest.raises(ValueError, match="DDP only"):
        est.estimate(est.LLAMA32_11B_VISION, "QLoRA", "ZeRO-3", 8, lora_r=16, seq_len=1024, batch=1)


def test_activations_scale_with_sequences(est):
    one = est.estimate(est.QWEN2_VL_2B, "LoRA", "DDP", 8, lora_r=16, seq_len=1024, batch=1)
    two = est.estimate(est.QWEN2_VL_2B, "LoRA", "DDP", 8, lora_r=16, seq_len=1024, batch=2)
    assert two.activations == pytest.approx(2 * one.activations)
    assert two.weights == one.weights


def test_table_has_one_row_per_combination(est, output):
    assert output.splitlines()[0] == "Estimate from shapes, not a measurement"
    rows = main_table(output)
    expected = {(b.name, m, s, n) for b, m, s, n in est.combinations([2, 8])}
    assert len(rows) == len(set(rows)) == len(expected) == 2 * (3 + 3 + 1) * 2
    assert set(rows) == expected


def test_cli_arguments(est, capsys):
    est.main(["--gpus", "4", "--lora-r", "8", "--seq-len", "512", "--batch-per-gpu", "2"])
    text = capsys.readouterr().out
    rows = main_table(text)
    assert {n for *_, n in rows} == {4}
    assert len(rows) == 2 * 7
    assert "LoRA r=8" in text and "512 tokens" in text
