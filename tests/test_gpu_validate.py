"""benchmarks/gpu_validate.py --tiny: the GPU validation's code path on CPU with a tiny model. Every run
reports every figure, the derived figures are computed from the measured ones, and the QLoRA runs keep
the vision side unquantised."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_validate.py"
FIGURES = (
    "params",
    "decoder_params",
    "vision_params",
    "load_s",
    "run_s",
    "steps_done",
    "sequence_length",
    "lm_tokens_per_step",
    "vision_tokens_per_step",
    "trainable_params",
    "peak_memory_mib",
    "step_s_median",
    "samples_per_s",
    "tflop_per_step",
    "mfu",
    "loss_first",
    "loss_last",
    "vs_vanilla",
)


def _load():
    spec = importlib.util.spec_from_file_location(SCRIPT.stem, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[SCRIPT.stem] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: extra threads only add contention on a busy 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_run_reports_every_figure(tmp_path, capsys):
    path = tmp_path / "figures.json"
    report = _load().main(["--tiny", "--steps", "3", "--families", "qwen2_vl", "--json", str(path)])
    out = capsys.readouterr().out
    assert json.loads(path.read_text()) == json.loads(json.dumps(report, default=str))
    runs = {(r["mode"], r["variant"]): r for r in report["runs"]}
    assert list(runs) == [(m, v) for m in ("qlora", "lora") for v in ("vanilla", "stage1", "stage2")]
    batch, peak = report["batch"], report["peak_tflops"]
    for (mode, variant), r in runs.items():
        assert r["status"] == "ok" and r["model"] == "tiny-qwen2_vl", r.get("error")
        for name in FIGURES:
            assert isinstance(r[name], (int, float)) and r[name] > 0, (mode, variant, name, r[name])
        assert r["steps_done"] == 3 == len(r["step_s_all"]) == len(r["losses"])
        assert not r["stopped_at_deadline"]
        # the derived figures come from the measured ones
        assert r["step_s_median"] == statistics.median(r["step_s_all"][1:])
        assert r["samples_per_s"] == pytest.approx(batch / r["step_s_median"], rel=1e-12)
        flops = (
            6 * r["decoder_params"] * r["lm_tokens_per_step"]
            + 2 * r["vision_params"] * r["vision_tokens_per_step"]
        )
        assert r["tflop_per_step"] == pytest.approx(flops / 1e12, rel=1e-12)
        assert r["mfu"] == pytest.approx(flops / (r["step_s_median"] * peak * 1e12), rel=1e-12)
        vanilla = runs[mode, "vanilla"]["step_s_median"]
        assert r["vs_vanilla"] == pytest.approx(r["step_s_median"] / vanilla, rel=1e-12)
        assert r["loss_first"] == r["losses"][0] and r["loss_last"] == r["losses"][-1]  # 3 steps: 1 vs 1
        assert r["loss_fell"] == (r["loss_last"] < r["loss_first"])
        # the vision tower, merger and lm_head stay unquantised; QLoRA's decoder linears (2 layers x q, k, v,
        # o, gate, up, down) are 4-bit
        assert r["vision_unquantised"] is True
        assert r["decoder_4bit_linears"] == (2 * 7 if mode == "qlora" else 0)
    for mode in ("qlora", "lora"):
        # tokens counted at the decoder's input: vanilla is one pass over the batch, stage 1 adds the exemplar
        # pass, stage 2 the negative one; the vision tower sees each image once per step (32 px, 4 px patches)
        vanilla, stage1, stage2 = (runs[mode, v] for v in ("vanilla", "stage1", "stage2"))
        assert vanilla["lm_tokens_per_step"] == batch * vanilla["sequence_length"]
        assert vanilla["lm_tokens_per_step"] < stage1["lm_tokens_per_step"] < stage2["lm_tokens_per_step"]
        assert vanilla["vision_tokens_per_step"] == batch * (32 // 4) ** 2
        # after stage 2: option likelihood vs generate-and-parse vs the prompt prefill, on 16 images
        assert stage2["eval_images"] == 16 and "likelihood_s" not in stage1
        for name in ("likelihood_s", "generate_s", "prefill_s"):
            assert stage2[name] > 0
        assert stage2["likelihood_vs_generate"] == stage2["likelihood_s"] / stage2["generate_s"]
        assert stage2["likelihood_vs_prefill"] == stage2["likelihood_s"] / stage2["prefill_s"]
        assert f"tiny-qwen2_vl {mode}: 16 images, option likelihood {stage2['likelihood_s']:.3f} s" in out
    assert runs["qlora", "vanilla"]["vs_vanilla"] == 1.0
    # the printed table shows each run's ratio
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| tiny-qwen2_vl")]
    assert len(rows) == 6
    for row in rows:
        r = runs[row[1].strip(), row[2].strip()]
        assert float(row[7].strip().rstrip("x")) == pytest.approx(r["vs_vanilla"], abs=0.005)
        assert row[8].strip().startswith("yes")
    assert report["ok"] == (not report["problems"])


def test_budget_spent_skips_every_run(tmp_path):
    report = _load().main(
        ["--tiny", "--families", "llava", "mllama", "--budget-s", "0", "--json", str(tmp_path / "f.json")]
    )
    skipped = [("llava", "skipped")] * 6 + [("mllama", "skipped")] * 6
    assert [(r["family"], r["status"]) for r in report["runs"]] == skipped
    assert all("budget" in r["reason"] for r in report["runs"]) and report["ok"]
