"""The step benchmark stays runnable (a smoke run: its numbers are read in docs/performance.md, not here)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"


def test_bench_step_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_step", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--hidden", "32", "--layers", "1", "--heads", "2", "--batch", "4", "--steps", "1",
                "--eval-images", "2", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    for name in bench.VARIANTS:
        assert name in out
    assert "collator" in out and "option likelihood" in out
