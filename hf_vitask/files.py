"""The file names of a bundle (what ``save_model`` writes and ``load_vitask`` reads), in one place,
and :func:`resolve_bundle`, which finds a bundle given as a directory or a Hub repo id.

A bundle directory holds the peft adapter, the package's own files and, optionally, the TSM::

    adapter_config.json, adapter_model.safetensors     peft (the LoRA adapter)
    vitask_config.json                                 family, token ids, connector settings
    exemplar_connector.safetensors                     the EP connector (VITask runs)
    proxy.safetensors                                  the proxy instruction (instruction-free runs)
    task.json | tasks.json                             the TaskSpec(s)
    vitask_processor.json                              the VITaskProcessor (TSM transform; points to the rest)
    training_config.json, eval_results.json, README.md the run's settings, metrics and model card
    tsm/model.safetensors, tsm/tsm_config.json         the task-specific model
    hf_vitask_bundle.json                              which files make the bundle (local bookkeeping)

Checkpoints carry the same files plus ``hf_vitask_checkpoint.json``, the manifest that marks them complete.
"""

import re
from os import PathLike
from pathlib import Path

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
VITASK_CONFIG_FILE = "vitask_config.json"
CONNECTOR_FILE = "exemplar_connector.safetensors"
PROXY_FILE = "proxy.safetensors"
TASK_FILE = "task.json"
TASKS_FILE = "tasks.json"  # a multi-task bundle: a list of TaskSpec dicts
VITASK_PROCESSOR_FILE = "vitask_processor.json"
TRAINING_CONFIG_FILE = "training_config.json"
EVAL_RESULTS_FILE = "eval_results.json"
README_FILE = "README.md"
TSM_DIR = "tsm"
TSM_WEIGHTS_FILE = "model.safetensors"
TSM_CONFIG_FILE = "tsm_config.json"
BUNDLE_LIST_FILE = "hf_vitask_bundle.json"
MANIFEST_FILE = "hf_vitask_checkpoint.json"


#: A Hugging Face Hub repo id (``name`` or ``owner/name``).
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_bundle(
    path: str | PathLike, revision: str | None = None, token: str | bool | None = None
) -> Path:
    """A local bundle directory as is; a hub repo id is downloaded (``snapshot_download``) first."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    text = str(path)
    if local.exists() or text.startswith((".", "/", "~")) or not REPO_ID.match(text) or text.count("/") > 1:
        raise FileNotFoundError(f"{text!r} is neither a bundle directory nor a Hugging Face Hub repo id")
    import huggingface_hub

    return Path(huggingface_hub.snapshot_download(repo_id=text, revision=revision, token=token))
