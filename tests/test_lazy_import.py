"""``import hf_vitask`` is cheap: the heavy libraries load when a name that needs them is first used."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "trl", "peft", "timm", "bitsandbytes", "datasets")


def _loaded_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True
    )
    return eval(out.stdout.strip().splitlines()[-1])


def test_importing_the_package_loads_no_heavy_library():
    assert _loaded_after("import hf_vitask; hf_vitask.__version__") == []
    assert _loaded_after("from hf_vitask import TaskSpec; TaskSpec(class_names=['a', 'b'])") == []


def test_the_cli_usage_loads_no_heavy_library():
    assert _loaded_after("from hf_vitask.cli import main; main(['--help'])") == []


def test_every_public_name_resolves_to_its_module():
    import hf_vitask

    for name in hf_vitask.__all__:
        value = getattr(hf_vitask, name)
        assert value.__module__ == hf_vitask._EXPORTS[name] or name == "__version__", name
    assert set(dir(hf_vitask)) >= set(hf_vitask.__all__)
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'VITaskTrainr'"):
        hf_vitask.VITaskTrainr  # noqa: B018
