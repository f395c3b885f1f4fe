"""The package's layering: every import points down (or sideways), never up, and no private name
crosses a module boundary; exemplar injection leaves no hook behind."""

import ast
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parent.parent / "hf_vitask"

#: lowest first; a module may import from its own layer or any layer below
LAYERS = [
    {"version", "files", "config", "losses", "task", "metrics", "jsonfile", "distributed"},
    {"models", "data", "processing"},
    {"evaluation", "hub"},
    {"trainers"},
    {"pipeline", "ablation", "quickstart"},
    {"cli"},
]


def _layer(module: str) -> int:
    top = module.split(".")[1]
    found = [i for i, names in enumerate(LAYERS) if top in names]
    assert found, f"{module} belongs to no layer: add it to LAYERS"
    return found[0]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _submodules() -> set[str]:
    return {_module_name(p) for p in PACKAGE.rglob("*.py")}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hf_vitask"):
            yield node.lineno, node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("hf_vitask"):
                    yield node.lineno, alias.name, []


def test_imports_point_down_and_carry_no_private_names():
    modules = _submodules()
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _module_name(path)
        if here == "hf_vitask":  # the package's lazy index of public names
            continue
        for line, target, names in _imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if target == "hf_vitask":
                non_modules = [n for n in names if f"hf_vitask.{n}" not in modules]
                if non_modules:
                    problems.append(f"{where} imports {non_modules} from the package __init__")
                continue
            if _layer(target) > _layer(here):
                problems.append(
                    f"{where}: {here} (layer {_layer(here)}) imports {target} (layer {_layer(target)})"
                )
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if private:
                problems.append(f"{where} imports private {private} from {target}")
    assert not problems, "\n".join(problems)


def test_every_public_name_resolves_and_demo_helpers_live_in_their_module():
    import hf_vitask

    assert sorted(hf_vitask.__all__) == sorted(hf_vitask._EXPORTS)
    for name in hf_vitask.__all__:
        assert getattr(hf_vitask, name).__name__ == name
    for user_needs in (
        "VITaskTrainer",
        "VITaskConfig",
        "TaskSpec",
        "load_vlm",
        "load_vitask",
        "load_image_folder",
        "load_data_files",
        "evaluate_vlm",
        "mc_evaluate",
        "InstructionFreeTrainer",
    ):
        assert user_needs in hf_vitask.__all__
    assert not {"load_digits_dataset", "digits_task", "make_mc_questions"} & set(hf_vitask.__all__)


def _hooks(module: torch.nn.Module) -> int:
    return len(module._forward_hooks) + len(module._forward_pre_hooks)


def test_wrapping_evaluating_and_training_leave_no_hook_on_the_embedding(tmp_path):
    from hf_vitask import TaskSpecificModel, VITaskModel, generate_answers, score_options
    from hf_vitask.data.collator import VITaskCollator
    from hf_vitask.data.digits import digits_task, load_digits_dataset
    from hf_vitask.models.tiny import build_tiny_vlm

    vlm, processor = build_tiny_vlm("llava")
    embedding = vlm.get_input_embeddings()
    before = _hooks(embedding)
    tsm = TaskSpecificModel("test_resnet", num_classes=10, img_size=32)
    model = VITaskModel.from_vlm(vlm, processor, tsm=tsm)
    model = VITaskModel.from_vlm(model.vlm, processor, tsm=tsm)  # re-wrapped
    assert _hooks(embedding) == before
    task = digits_task()
    images = load_digits_dataset(max_samples=30)["test"]["image"][:2]
    batch = VITaskCollator(processor, task, tsm=tsm)([{"image": img, "label": 1} for img in images])
    batch.pop("class_ids")
    seen = []
    probe = embedding.register_forward_hook(lambda m, a, out: seen.append(_hooks(m)))
    model(**batch)  # the exemplar is written through a hook that lives for this call only
    probe.remove()
    assert seen and seen[0] == before + 2  # the probe and the injection, during the call
    score_options(model, processor, task, images, use_tsm=True)
    generate_answers(model, processor, task, images, use_tsm=True, max_new_tokens=2)
    unused = model.inject(torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3, embedding.embedding_dim))
    with pytest.raises(RuntimeError, match="never written"), unused:
        pass
    assert _hooks(embedding) == before
