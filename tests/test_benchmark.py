"""The benchmarks stay runnable, and what they print holds together: every ratio is the quotient of the
times it compares, the evaluation methods agree where they must, the teacher they train is written."""

import importlib.util
import json
import re
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ratio_of(ratio: float, numerator: float, denominator: float, decimals: int, time_decimals: int) -> bool:
    """Whether a printed ratio (``decimals``) is numerator / denominator, both printed with ``time_decimals``."""
    half = 0.5 * 10**-time_decimals
    low, high = (numerator - half) / (denominator + half), (numerator + half) / (denominator - half)
    return low - 0.5 * 10**-decimals - 1e-9 <= ratio <= high + 0.5 * 10**-decimals + 1e-9


def test_bench_step_smoke(tmp_path, capsys):
    bench = _load(BENCH)
    bench.main(
        [
            "--hidden",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--batch",
            "4",
            "--steps",
            "1",
            "--teacher-steps",
            "1",
            "--image-tokens",
            "16",
            "--vocab",
            "600",
            "--eval-images",
            "2",
            "--output-dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out

    # the step table: one row per variant, in order; ratios to the SFT step and to the vanilla step
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith("| variant")
    ]
    assert [r[0] for r in rows] == list(bench.VARIANTS)
    table = {r[0]: (float(r[1]), float(r[2].rstrip("x")), float(r[3].rstrip("x")), float(r[4])) for r in rows}
    sft, vanilla = table[bench.SFT][0], table["vanilla (VITaskTrainer)"][0]
    assert table[bench.SFT][1] == 1.0 and table["vanilla (VITaskTrainer)"][2] == 1.0
    for name, (ms, vs_sft, vs_vanilla, memory) in table.items():
        assert ms > 0 and memory > 0, name
        assert _ratio_of(vs_sft, ms, sft, 2, 1) and _ratio_of(vs_vanilla, ms, vanilla, 2, 1), name

    # the collator against the stage-2 and the SFT step rates: the two ratios differ by stage-2 / SFT
    collate_ms, vs_stage2, vs_sft = map(
        float,
        re.search(
            r"TSM pixels\): ([\d.]+) ms/batch, ([\d.]+)x the stage-2 step rate \(([\d.]+)x the SFT", out
        ).groups(),
    )
    stage2 = table["stage 2 (EP + RDA + CRT)"][0]
    assert _ratio_of(vs_stage2, stage2, collate_ms, 1, 1) and _ratio_of(vs_sft, sft, collate_ms, 1, 1)

    # the top-k teacher cache: the more tokens kept, the closer to the full distribution's L_RDA
    differences = {int(k): float(d) for d, k in re.findall(r"([\d.]+)% \(k=(\d+)\)", out)}
    assert list(differences) == [64, 256] and differences[256] < differences[64]

    # evaluation: both likelihood forms score the same, so they predict the same; accuracies are counts of 2
    evaluation = {
        name: (float(seconds), float(accuracy))
        for name, seconds, accuracy in re.findall(
            r"evaluation of 2 images, (.+?): ([\d.]+) s, accuracy ([\d.]+)", out
        )
    }
    assert list(evaluation) == [
        "likelihood, shared prompt",
        "likelihood, full sequences",
        "generate-and-parse",
        "generate-and-parse, 16 new tokens",
    ]
    assert evaluation["likelihood, shared prompt"][1] == evaluation["likelihood, full sequences"][1]
    assert all(accuracy in (0.0, 0.5, 1.0) for _, accuracy in evaluation.values())
    faster, new_tokens, full_faster = re.search(
        r"likelihood \(shared prompt\) is ([\d.]+)x faster than generate-and-parse \((\d+) new tokens\), "
        r"([\d.]+)x faster than full-sequence",
        out,
    ).groups()
    shared = evaluation["likelihood, shared prompt"][0]
    assert _ratio_of(float(faster), evaluation["generate-and-parse"][0], shared, 2, 3)
    assert _ratio_of(float(full_faster), evaluation["likelihood, full sequences"][0], shared, 1, 3)
    from hf_vitask.data.digits import digits_task
    from hf_vitask.models.tiny import build_tiny_tokenizer

    tokenizer, task = build_tiny_tokenizer("llava"), digits_task()  # the answer's tokens + 1
    assert int(new_tokens) == 1 + max(len(tokenizer(task.response(c))["input_ids"]) for c in range(10))

    # the frozen teacher: a stage-1 bundle of --teacher-steps steps, with its connector and TSM
    teacher = tmp_path / "teacher"
    for name in ("adapter_model.safetensors", "exemplar_connector.safetensors", "tsm/model.safetensors"):
        assert (teacher / name).is_file(), name
    config = json.loads((teacher / "training_config.json").read_text())
    assert (config["stage"], config["max_steps"]) == (1, 1)


def test_bench_distributed_runs_each_layout_with_its_process_count(capsys):
    """Each run really has its process count (the script checks each worker's world size) and the table
    is relative to the single process."""
    bench = _load(BENCH.with_name("bench_distributed.py"))
    bench.main(
        [
            "--hidden",
            "32",
            "--layers",
            "1",
            "--image-tokens",
            "16",
            "--vocab",
            "600",
            "--batch",
            "2",
            "--steps",
            "2",
        ]
    )
    rows = [line for line in capsys.readouterr().out.splitlines() if line.endswith("x")]
    assert [r[:44].strip() for r in rows] == [name for name, _, _ in bench.RUNS]
    seconds = [float(r.split()[-2]) for r in rows]
    ratios = [float(r.split()[-1][:-1]) for r in rows]
    assert ratios[0] == 1.0 and all(s > 0 for s in seconds)
    for s, ratio in zip(seconds, ratios):
        assert _ratio_of(ratio, s, seconds[0], 2, 3), (s, ratio)


def test_ratio_check_allows_only_rounding():
    assert _ratio_of(1.95, 0.167, 0.086, 2, 3) and not _ratio_of(2.05, 0.167, 0.086, 2, 3)
    assert _ratio_of(0.62, 41.4, 67.2, 2, 1) and not _ratio_of(0.64, 41.4, 67.2, 2, 1)
