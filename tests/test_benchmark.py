"""The benchmarks stay runnable, and what they print holds together: every ratio is the quotient of the
times it compares, the evaluation methods agree where they must, the teacher they train is written."""

import importlib.util
import json
from pathlib import Path

import pytest

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


TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--batch", "4", "--teacher-steps", "1"]
TINY += ["--image-tokens", "16", "--vocab", "600", "--eval-images", "2"]


def _check_step_table(bench, report: dict, out: str, names: list[str]) -> None:
    """The JSON and the printed table agree, and every ratio is the quotient of the times it compares."""
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith("| variant")
    ]
    rows = [r for r in rows if not r[0].startswith("instruction-free")]  # its own table
    variants = {v["name"]: v for v in report["variants"]}
    assert [r[0] for r in rows] == list(variants) == names
    base = {
        key: variants[name]["step_ms"]
        for key, name in (("sft", bench.SFT), ("trl", bench.TRL), ("vanilla", bench.VANILLA))
    }
    for row in rows:
        v = variants[row[0]]
        assert v["step_ms"] > 0 and float(row[1]) == pytest.approx(v["step_ms"], abs=0.05)
        for key, column in (("sft", 2), ("trl", 3), ("vanilla", 4)):
            assert v[f"vs_{key}"] == pytest.approx(v["step_ms"] / base[key], rel=1e-9)
            assert float(row[column].rstrip("x")) == pytest.approx(v[f"vs_{key}"], abs=0.005)
        # CPU memory: what autograd saves, and what a step adds to a forked child's resident memory
        assert v["saved_for_backward_mb"] > 0 and v["step_rss_mb"] >= 0, row[0]
        # the counted work, next to the times
        assert v["gflop"] > 0 and float(row[-2]) == pytest.approx(v["gflop"], abs=0.05)
        assert v["gflop_vs_vanilla"] == pytest.approx(v["gflop"] / variants[bench.VANILLA]["gflop"])
    assert variants[bench.SFT]["vs_sft"] == 1.0 and variants[bench.TRL]["vs_trl"] == 1.0


def test_bench_step_smoke(tmp_path, capsys):
    bench = _load(BENCH)
    report = bench.main(
        [*TINY, "--steps", "1", "--output-dir", str(tmp_path), "--json", str(tmp_path / "r.json")]
    )
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(report))
    assert report["command"].startswith("python benchmarks/bench_step.py --hidden 32")
    assert report["config"]["vocab"] == 600 and report["config"]["gradient_checkpointing"] is False
    _check_step_table(bench, report, out, list(bench.VARIANTS))

    # the collator against the stage-2 and the SFT step rates
    collator = report["collator"]
    variants = {v["name"]: v for v in report["variants"]}
    assert collator["vs_stage2_step"] == pytest.approx(
        variants[bench.STAGE2]["step_ms"] / collator["ms_per_batch"]
    )
    assert collator["vs_sft_step"] == pytest.approx(variants[bench.SFT]["step_ms"] / collator["ms_per_batch"])

    # the top-k teacher cache: the more tokens kept, the closer to the full distribution's L_RDA
    errors = report["teacher_topk_relative_error"]
    assert list(errors) == ["64", "256"] and errors["256"] < errors["64"]

    # evaluation: both likelihood forms score the same, so they predict the same; accuracies are counts of 2
    evaluation = report["evaluation"]
    methods = evaluation["methods"]
    assert list(methods) == [
        "likelihood, shared prompt",
        "likelihood, full sequences",
        "generate-and-parse",
        "generate-and-parse, 16 new tokens",
    ]
    assert (
        methods["likelihood, shared prompt"]["accuracy"] == methods["likelihood, full sequences"]["accuracy"]
    )
    assert all(m["accuracy"] in (0.0, 0.5, 1.0) and m["seconds"] > 0 for m in methods.values())
    assert evaluation["prefill_seconds"] > 0
    from hf_vitask.data.digits import digits_task
    from hf_vitask.models.tiny import build_tiny_tokenizer

    tokenizer, task = build_tiny_tokenizer("llava"), digits_task()  # the answer's tokens + 1
    assert evaluation["new_tokens"] == 1 + max(
        len(tokenizer(task.response(c))["input_ids"]) for c in range(10)
    )

    # the frozen teacher: a stage-1 bundle of --teacher-steps steps, with its connector and TSM
    teacher = tmp_path / "teacher"
    for name in ("adapter_model.safetensors", "exemplar_connector.safetensors", "tsm/model.safetensors"):
        assert (teacher / name).is_file(), name
    config = json.loads((teacher / "training_config.json").read_text())
    assert (config["stage"], config["max_steps"]) == (1, 1)


def test_bench_step_with_checkpointing_runs_the_fused_prefix(tmp_path, capsys, caplog):
    """--gradient-checkpointing turns checkpointing on for every variant, and stage 2 still shares its
    prefix (no fallback warning); --variants keeps the baselines and stage 2."""
    import logging

    from hf_vitask.models import passes

    bench = _load(BENCH)
    passes._warned.clear()
    with caplog.at_level(logging.WARNING, logger=passes.__name__):
        report = bench.main(
            [
                *TINY,
                "--steps",
                "1",
                "--gradient-checkpointing",
                "--no-eval",
                "--variants",
                "stage 1 (EP + RDA)",
                "--instruction-free",
                "--output-dir",
                str(tmp_path),
            ]
        )
    assert not [r for r in caplog.records if r.name == passes.__name__], "the prefix fell back"
    assert report["config"]["gradient_checkpointing"] is True and "evaluation" not in report
    names = [bench.SFT, bench.TRL, bench.VANILLA, "stage 1 (EP + RDA)", bench.STAGE2]
    _check_step_table(bench, report, capsys.readouterr().out, names)
    # --instruction-free: the same batches with and without the fused loss head; the logits path
    # computes the output layer at every position, the fused head at the description tokens only
    section = report["instruction_free"]
    fused, logits = section["variants"]
    assert fused["name"] == "instruction-free" and "fused_loss_head off" in logits["name"]
    assert fused["vs_fused"] == 1.0 and logits["vs_fused"] == pytest.approx(
        logits["step_ms"] / fused["step_ms"]
    )
    assert section["response_tokens"] > 0 and 0 < fused["gflop"] < logits["gflop"]


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


def test_performance_page_tables_come_from_the_committed_results():
    """Every measured table of docs/performance.md is the rendering of a JSON file bench_step.py wrote:
    the page cannot drift from its files, and each file names the command that produced it."""
    tables = _load(BENCH.with_name("performance_tables.py"))
    text, used = tables.update()
    assert used, "docs/performance.md has no generated table"
    assert text == tables.PAGE.read_text(), "run python benchmarks/performance_tables.py"
    for path in used:
        report = json.loads((BENCH.parent / path).read_text())
        assert report["command"].startswith("python benchmarks/bench_step.py")
        assert f"--json benchmarks/{path}" in report["command"]
        assert report["command"] in text
    targets = tables._targets({path: json.loads((BENCH.parent / path).read_text()) for path in used})
    assert targets and all(f"| {t[0]} |" in text for t in targets)
