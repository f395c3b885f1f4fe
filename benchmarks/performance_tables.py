"""Render docs/performance.md's measured tables from the JSON files ``bench_step.py --json`` writes.

    python benchmarks/performance_tables.py            # rewrite every table block in docs/performance.md
    python benchmarks/performance_tables.py --check    # exit 1 when a block differs from its JSON

A block in the page is ``<!-- bench: results/NAME.json -->`` ... ``<!-- /bench -->``; everything
between the markers is generated (the command that produced the file, the machine, the step table
and the evaluation figures), so no measured number in the page is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGE = HERE.parent / "docs" / "performance.md"
BLOCK = re.compile(r"(<!-- bench: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /bench -->)", re.S)
TARGETS = re.compile(r"(<!-- bench-targets -->\n)(?P<body>.*?)(<!-- /bench-targets -->)", re.S)
STAGE1, STAGE2, VANILLA = "stage 1 (EP + RDA)", "stage 2 (EP + RDA + CRT)", "vanilla (VITaskTrainer)"
SFT = "plain SFT step (HF loss)"
MEMORY = ("peak_allocated_mb", "step_rss_mb", "saved_for_backward_mb")


def _variant(report: dict, name: str) -> dict:
    return next(v for v in report["variants"] if v["name"] == name)


def _work(report: dict, name: str, baseline: str) -> float | None:
    """The counted floating-point work of variant ``name`` over ``baseline`` (None when not counted)."""
    a, b = _variant(report, name), _variant(report, baseline)
    return a["gflop"] / b["gflop"] if "gflop" in a and "gflop" in b else None


def _targets(reports: dict[str, dict]) -> list[tuple[str, str, float, float, str, float | None]]:
    """(target, JSON file, measured, bound, unit, work) for every target whose file is present;
    ``measured <= bound`` meets it; ``work`` is the ratio of the counted GFLOP of the two steps a
    time target compares (the ratio the time would have if every FLOP cost the same)."""
    rows = []

    def add(target, path, measured, bound, unit="x", work=None):
        rows.append((target, path, measured, bound, unit, work))

    for path, r in reports.items():
        c = r["config"]
        stage2, vanilla = _variant(r, STAGE2), _variant(r, VANILLA)
        if c["gradient_checkpointing"]:
            add(
                "stage 2 with checkpointing <= 1.3x a plain SFT step with checkpointing",
                path,
                stage2["vs_sft"],
                1.3,
                work=_work(r, STAGE2, SFT),
            )
        elif c["vocab"] > 100_000:
            add(
                f"stage 2 <= 1.3x the vanilla step in time (vocab {c['vocab']:,})",
                path,
                stage2["vs_vanilla"],
                1.3,
                work=_work(r, STAGE2, VANILLA),
            )
            for key in MEMORY:
                if key in stage2:
                    what = key.removesuffix("_mb").replace("_", " ")
                    add(
                        f"stage 2 <= 1.3x the vanilla step in memory ({what}, vocab {c['vocab']:,})",
                        path,
                        stage2[key] / vanilla[key],
                        1.3,
                    )
        else:
            add("stage 2 <= 2.5x a plain SFT step", path, stage2["vs_sft"], 2.5, work=_work(r, STAGE2, SFT))
            if any(v["name"] == STAGE1 for v in r["variants"]):
                add(
                    "stage 1 <= 1.8x a plain SFT step",
                    path,
                    _variant(r, STAGE1)["vs_sft"],
                    1.8,
                    work=_work(r, STAGE1, SFT),
                )
            if "collator" in r:
                add(
                    "collator >= 10x the stage-2 step rate (shown: 10 / rate)",
                    path,
                    10 / r["collator"]["vs_stage2_step"],
                    1.0,
                )
            if "evaluation" in r:
                ev = r["evaluation"]
                shared = ev["methods"]["likelihood, shared prompt"]["seconds"]
                add(
                    "option likelihood <= 1.3x the prompt prefill alone",
                    path,
                    shared / ev["prefill_seconds"],
                    1.3,
                )
                add(
                    "option likelihood faster than generate-and-parse (likelihood / generation time)",
                    path,
                    shared / ev["methods"]["generate-and-parse"]["seconds"],
                    1.0,
                )
    return rows


def render_targets(reports: dict[str, dict]) -> str:
    lines = ["| target | measured | bound | counted work | from | |", "|---|---|---|---|---|---|"]
    for target, path, measured, bound, unit, work in _targets(reports):
        status = "met" if measured <= bound else "**not met**"
        floor = "" if work is None else f"{work:.2f}x"
        lines.append(
            f"| {target} | {measured:.2f}{unit} | {bound:.2f}{unit} | {floor} | `benchmarks/{path}` | {status} |"
        )
    return "\n".join(lines) + "\n"


def render(report: dict) -> str:
    """The markdown of one benchmark report."""
    c = report["config"]
    lines = [
        "```bash",
        report["command"],
        "```",
        "",
        f"{c['device_name'] or c['device']} ({c['device']}, {c['threads']} torch threads of {c['cpu_count']} cores), "
        f"{c['date']}; tiny LLaVA hidden {c['hidden']} x {c['layers']} layers, vocab {c['vocab']:,}, batch "
        f"{c['batch']}, {c['sequence_tokens']}-token sequences ({c['image_tokens']} image tokens), gradient "
        f"checkpointing {'on' if c['gradient_checkpointing'] else 'off'}, median of {c['steps']} steps.",
        "",
    ]
    memory = {
        "peak_allocated_mb": "peak allocated (MB)",
        "saved_for_backward_mb": "saved for backward (MB)",
        "step_rss_mb": "step peak RSS (MB)",
    }
    columns = [k for k in memory if k in report["variants"][0]]
    counted = "gflop" in report["variants"][0]
    head = [
        "variant",
        "step (ms)",
        "vs SFT",
        "vs trl SFTTrainer",
        "vs vanilla",
        *(memory[k] for k in columns),
        *(["GFLOP", "GFLOP vs vanilla"] if counted else []),
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in report["variants"]:
        cells = [
            v["name"],
            f"{v['step_ms']:.1f}",
            *(f"{v[k]:.2f}x" for k in ("vs_sft", "vs_trl", "vs_vanilla")),
        ]
        cells += [f"{v[k]:.1f}" for k in columns]
        if counted:
            cells += [f"{v['gflop']:.1f}", f"{v['gflop_vs_vanilla']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    if "instruction_free" in report:
        lines += ["", *_instruction_free_table(report["instruction_free"], memory)]
    notes = []
    if "collator" in report:
        col = report["collator"]
        notes.append(
            f"collator (stage 2: negatives + TSM pixels): {col['ms_per_batch']:.1f} ms per batch, "
            f"{col['vs_stage2_step']:.1f}x the stage-2 step rate"
        )
    if "teacher_topk_relative_error" in report:
        errors = report["teacher_topk_relative_error"]
        notes.append(
            "top-k teacher cache instead of the full distribution: L_RDA differs by "
            + ", ".join(f"{e * 100:.2f}% (k = {k})" for k, e in errors.items())
        )
    if "evaluation" in report:
        ev = report["evaluation"]
        m = ev["methods"]
        shared = m["likelihood, shared prompt"]["seconds"]
        notes.append(
            f"evaluation of {ev['images']} images (the trained teacher, no TSM; median of 3 runs): prompt prefill alone "
            f"{ev['prefill_seconds']:.3f} s; likelihood with a shared prompt {shared:.3f} s "
            f"({shared / ev['prefill_seconds']:.2f}x the prefill); full sequences "
            f"{m['likelihood, full sequences']['seconds']:.3f} s; generate-and-parse "
            f"{m['generate-and-parse']['seconds']:.3f} s ({ev['new_tokens']} new tokens, "
            f"{m['generate-and-parse']['seconds'] / shared:.2f}x the likelihood time) / "
            f"{m['generate-and-parse, 16 new tokens']['seconds']:.3f} s (16); accuracy "
            + " / ".join(f"{x['accuracy']:.3f}" for x in m.values())
        )
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _instruction_free_table(section: dict, memory: dict[str, str]) -> list[str]:
    columns = [k for k in memory if k in section["variants"][0]]
    head = ["instruction-free step", "step (ms)", "vs fused head", *(memory[k] for k in columns), "GFLOP"]
    lines = [
        f"Instruction-free tuning (proxy instruction, digit descriptions: {section['response_tokens']} "
        "response tokens in the batch), the same batches with the output layer inside the loss and on "
        "the logits path:",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for v in section["variants"]:
        cells = [v["name"], f"{v['step_ms']:.1f}", f"{v['vs_fused']:.2f}x"]
        cells += [f"{v[k]:.1f}" for k in columns] + [f"{v['gflop']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def update(page: Path = PAGE) -> tuple[str, list[str]]:
    """The page with every block regenerated, and the JSON files it names."""
    text = page.read_text()
    used = []

    def fill(match: re.Match) -> str:
        path = (HERE / match["path"]).resolve()
        used.append(match["path"])
        return match.group(1) + render(json.loads(path.read_text())) + match.group(4)

    text = BLOCK.sub(fill, text)
    reports = {path: json.loads((HERE / path).read_text()) for path in used}
    text = TARGETS.sub(lambda m: m.group(1) + render_targets(reports) + m.group(3), text)
    return text, used


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="only check that the page matches its JSON files"
    )
    parser.add_argument("--page", type=Path, default=PAGE)
    cli = parser.parse_args(argv)
    text, used = update(cli.page)
    if cli.check:
        if text != cli.page.read_text():
            print(f"{cli.page} differs from {', '.join(used)}: run python benchmarks/performance_tables.py")
            return 1
        return 0
    cli.page.write_text(text)
    print(f"{cli.page}: {len(used)} tables from {', '.join(used)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
