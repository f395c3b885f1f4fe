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
