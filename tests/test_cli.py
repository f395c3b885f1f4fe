import subprocess
import sys

import pytest

from hf_vitask.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "hf_vitask" in out and "llava" in out and "qwen2_vl" in out


def test_version_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "hf_vitask" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


def test_console_script_module_entry():
    result = subprocess.run([sys.executable, "-m", "hf_vitask.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "info" in result.stdout
