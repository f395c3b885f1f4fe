"""The step benchmark stays runnable (a smoke run: its numbers are read in docs/performance.md, not here)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"


def test_bench_step_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_step", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--hidden", "32", "--layers", "1", "--heads", "2", "--batch", "4", "--steps", "1", "--teacher-steps", "1",
                "--image-tokens", "16", "--vocab", "600", "--eval-images", "2", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    for name in bench.VARIANTS:
        assert f"| {name}" in out
    for line in ("collator (stage 2", "teacher cache, top-k", "likelihood (shared prompt) is", "vs vanilla"):
        assert line in out


def test_bench_distributed_runs_each_layout_with_its_process_count(capsys):
    """Each run really has its process count (the script checks each worker's world size) and the table
    is relative to the single process."""
    spec = importlib.util.spec_from_file_location("bench_distributed", BENCH.with_name("bench_distributed.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--hidden", "32", "--layers", "1", "--image-tokens", "16", "--vocab", "600", "--batch", "2",
                "--steps", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.endswith("x")]
    assert [r[:44].strip() for r in rows] == [name for name, _, _ in bench.RUNS]
    assert rows[0].endswith(" 1.00x") and all(float(r.split()[-1][:-1]) > 0 for r in rows)
