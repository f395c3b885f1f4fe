"""Writing a bundle so that a reader never sees a mixture, and one run per output directory.

A bundle (adapter, connector, TSM, processor, task, configs) shares its directory with the run's
checkpoints, so it cannot be swapped in with one rename. It is written to a temporary sibling
directory first; then the previous bundle's marker (``vitask_config.json``, which every loader
reads first) is removed, the previous bundle's files are removed (those listed in its
``hf_vitask_bundle.json``; a bundle without that list loses every file name a bundle can hold),
the new files are moved in, and the marker comes last. A failure while writing leaves the
previous bundle intact; a failure while moving leaves no marker, so no mixture loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from hf_vitask.files import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    BUNDLE_LIST_FILE,
    CONNECTOR_FILE,
    PROXY_FILE,
    README_FILE,
    TASK_FILE,
    TASKS_FILE,
    TRAINING_CONFIG_FILE,
    TSM_DIR,
    VITASK_CONFIG_FILE,
    VITASK_PROCESSOR_FILE,
)

__all__ = ["BUNDLE_LIST_FILE", "OutputDirLock", "publish_bundle", "staging_dir"]

MARKER = VITASK_CONFIG_FILE
#: Names an hf_vitask bundle may hold (removed from a directory whose bundle predates the list).
KNOWN_ENTRIES = (
    MARKER,
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CONNECTOR_FILE,
    TSM_DIR,
    TASK_FILE,
    TASKS_FILE,
    VITASK_PROCESSOR_FILE,
    TRAINING_CONFIG_FILE,
    PROXY_FILE,
    README_FILE,
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def staging_dir(final: Path) -> Path:
    """A new empty directory next to ``final`` to write the bundle into."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.saving-", dir=final.parent))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _previous_entries(final: Path) -> list[str]:
    listed = final / BUNDLE_LIST_FILE
    if listed.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return [str(name) for name in json.loads(listed.read_text())["entries"]] + [BUNDLE_LIST_FILE]
    return [name for name in KNOWN_ENTRIES + (BUNDLE_LIST_FILE,) if (final / name).exists()]


def publish_bundle(staged: Path, final: Path) -> None:
    """Replace the bundle in ``final`` by the one written in ``staged`` (checkpoints are kept)."""
    final.mkdir(parents=True, exist_ok=True)
    entries = sorted(p.name for p in staged.iterdir())
    _remove(final / MARKER)  # from here on no loader accepts the directory until the new marker lands
    for name in _previous_entries(final):
        if "/" not in name and name not in ("", ".", ".."):
            _remove(final / name)
    for name in entries:
        if name != MARKER:
            os.replace(staged / name, final / name)
    (final / BUNDLE_LIST_FILE).write_text(json.dumps({"entries": entries}, indent=1) + "\n")
    if MARKER in entries:
        os.replace(staged / MARKER, final / MARKER)
    shutil.rmtree(staged, ignore_errors=True)


class OutputDirLock:
    """Hold ``<output_dir>/.hf_vitask.lock`` for a training run; a second live run into the same
    directory fails at once, naming the holder. The OS releases the lock when the process dies."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / ".hf_vitask.lock"
        self._file = None

    def __enter__(self) -> OutputDirLock:
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held until __exit__
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RuntimeError(
                f"{self.path.parent} is in use by a training run that is still alive ({holder}). "
                "Give this run another output_dir, or wait for that one to finish."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
